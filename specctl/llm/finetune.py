"""finetune-head: distil early-exit drafts at one or more exit layers, or evaluate existing draft checkpoints.

Training data: llm.train_files (chat-formatted), split into train / in-domain held-out ("val"); every file in
llm.eval_files is an out-of-domain held-out set named by its stem. results.csv has one row per exit layer and
head (`copy` = the untuned copy of the target head, `tuned` = after training; or one row per checkpoint).
"""

from __future__ import annotations

import glob
import hashlib
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from specctl.core import distributed
from specctl.core.checkpoint import CONFIG, STATE, export_checkpoint, load_weights
from specctl.core.data_dir import data_dir
from specctl.core.errors import SpecctlError
from specctl.core.files import write_csv
from specctl.core.rundir import RunDir
from specctl.core.train import FitResult, Task, fit
from specctl.llm.draft import Draft, build_draft, load_draft, pair_logits
from specctl.llm.kl import HeldOut, distill_loss
from specctl.llm.lm import LM, autocast, load_lm
from specctl.llm.pretrain import log_epoch
from specctl.llm.profile import LLMProfile
from specctl.llm.text import batches, encode, read_files, split

DEFINITIONS = {
    "rows": "one per exit layer and head (copy = the untuned copy of the target's head, tuned = after training, or one "
            "per --eval-only checkpoint); <set>_<metric> for the in-domain held-out set (val) and every llm.eval_files "
            "set, token-weighted",
    "<set>_kl / _kl_t1": "KL(p_target || p_draft) per token at llm.kl_temperature / at T = 1 (nats)",
    "<set>_ce / _ppl": "the draft's cross-entropy to the text (nats/token) and its exp",
    "<set>_top1 / _top<k>": "the draft's top-1 / top-k accuracy against the text",
    "<set>_agreement": "top-1 agreement of draft and target: the greedy acceptance rate, teacher-forced",
    "target_unchanged": "the target's parameters hashed before and after tuning are equal",
}


@dataclass
class FinetuneResult:
    definitions: ClassVar[dict[str, str]] = DEFINITIONS

    target: str
    target_layers: int
    target_unchanged: bool
    results_csv: str
    rows: list[dict[str, Any]]

    def metrics(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TextSets:
    train: list[list[int]]
    held_out: dict[str, list[list[int]]]  # "val" (in-domain) and one per eval file


def load_sets(profile: LLMProfile, tokenizer) -> TextSets:
    llm = profile.llm

    def enc(examples) -> list[list[int]]:
        return [ids for ids in (encode(e, tokenizer, llm.max_len) for e in examples) if len(ids) >= 3]

    folder = data_dir(profile.data)
    train, val = split(read_files(llm.train_files, folder, llm.max_examples), llm.val_fraction, profile.seed)
    held_out = {"val": enc(val[: llm.max_eval_examples])}
    for name in llm.eval_files:
        examples = read_files([name], folder)
        rng = random.Random(profile.seed)
        held_out[Path(name).stem] = enc(rng.sample(examples, min(llm.max_eval_examples, len(examples))))
    sets = TextSets(enc(train), held_out)
    empty = [k for k, v in {"train": sets.train, **held_out}.items() if not v]
    if empty:
        raise SpecctlError(f"no example of at least 3 tokens in: {', '.join(empty)}")
    return sets


def checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (to prove the target never changes)."""
    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def evaluate(draft: Draft, seqs: list[list[int]], profile: LLMProfile, device: torch.device,
             max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted held-out metrics (see kl.HeldOut) of the draft against the target."""
    llm, pad = profile.llm, draft.target.tokenizer.pad_token_id
    acc = HeldOut(llm.kl_temperature, llm.top_k_accuracy)
    with torch.no_grad():
        for i, (ids, mask) in enumerate(batches(seqs, profile.train.batch_size, pad, device)):
            if max_batches is not None and i >= max_batches:
                break
            with autocast(device, llm.dtype):
                teacher, student = pair_logits(draft, ids, mask)
            acc.add(teacher, student, ids, mask)
    return acc.result()


def objective(metrics: dict[str, float], profile: LLMProfile) -> float:
    """The training loss on held-out data: kl_weight * T^2 * KL_T + ce_weight * CE."""
    llm = profile.llm
    return llm.kl_weight * llm.kl_temperature**2 * metrics["kl"] + llm.ce_weight * metrics["ce"]


def train_draft(draft: Draft, sets: TextSets, profile: LLMProfile, device: torch.device, ckpt_dir: Path,
                progress=None, on_epoch_end=None, resume: bool = False) -> FitResult:
    """Distil the draft's trainable parts toward the target; the best checkpoint is loaded back."""
    llm, cfg, pad = profile.llm, profile.train, draft.target.tokenizer.pad_token_id

    def loss(batch) -> torch.Tensor:
        ids, mask = (t.to(device) for t in batch)
        with autocast(device, llm.dtype):
            teacher, student = pair_logits(draft, ids, mask)
        return distill_loss(teacher, student, ids, mask, llm.kl_temperature, llm.kl_weight, llm.ce_weight)

    def validate() -> dict[str, float]:
        metrics = evaluate(draft, sets.held_out["val"], profile, device, cfg.max_val_batches)
        return {"val_loss": objective(metrics, profile), "val_kl": metrics["kl"], "val_top1": metrics["top1"]}

    config = {**draft.config(), "kl_temperature": llm.kl_temperature, "kl_weight": llm.kl_weight,
              "ce_weight": llm.ce_weight, "train_files": llm.train_files, "max_len": llm.max_len}
    task = Task(draft.model, draft.trainable().values(), loss,
                lambda epoch: batches(sets.train, cfg.batch_size, pad, "cpu", seed=profile.seed + epoch, shard=True),
                validate, config, draft.weights)
    result = fit(task, cfg, ckpt_dir, resume, progress, on_epoch_end)
    draft.model.load_state_dict(load_weights(result.best_dir, device), strict=False)
    return result


def row(draft: Draft, sets: TextSets, profile: LLMProfile, device: torch.device, head: str, **extra) -> dict:
    """One results.csv row: settings, then `<set>_<metric>` for every held-out set."""
    llm = profile.llm
    checkpoint = Path(str(extra.get("checkpoint") or "")).name
    # trial_id and status make this CSV readable by `specctl plot` / `analyze` like a sweep's
    out = {"trial_id": "-".join(filter(None, (f"layer{draft.layer}", head, checkpoint))), "status": "ok",
           "exit_layer": draft.layer, "target_layers": draft.target.n_layers, "head": head,
           "tune_block": draft.tune_block, "kl_temperature": llm.kl_temperature, "ce_weight": llm.ce_weight, **extra}
    for name, seqs in sets.held_out.items():
        out.update({f"{name}_{k}": v for k, v in evaluate(draft, seqs, profile, device).items()})
    return out


def draft_folders(pattern: str) -> list[Path]:
    """Draft checkpoint folders matching a glob (a match may be the folder or a file inside it)."""
    found = sorted({p if p.is_dir() else p.parent for p in map(Path, glob.glob(pattern))})
    folders = [p for p in found if (p / CONFIG).is_file()]
    if not folders:
        raise SpecctlError(f"eval-only: no draft checkpoint matches '{pattern}'")
    return folders


def finetune_heads(profile: LLMProfile, device: torch.device, run: RunDir, resume: bool = False, progress=None,
                   say=print) -> FinetuneResult:
    """Train (or, with llm.eval_only, evaluate) early-exit drafts; write results.csv; return the rows.

    With `resume`, each exit layer continues from its last finished epoch in this run's checkpoints, and a
    layer whose training already ended is not trained again."""
    llm, cfg = profile.llm, profile.train
    lm: LM = load_lm(llm.target, device, llm.tokenizer)
    sets = load_sets(profile, lm.tokenizer)
    say(f"target {lm.path}: {lm.n_layers} layers, vocab {lm.vocab_size}; {len(sets.train)} training examples, "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.held_out.items()))
    before = checksum(lm.model)
    rows = []
    if llm.eval_only:
        for folder in draft_folders(llm.eval_only):
            rows.append(row(load_draft(folder, lm), sets, profile, device, "tuned", checkpoint=str(folder)))
            say(f"evaluated {folder}")
    for layer in ([] if llm.eval_only else llm.layers()):
        draft = build_draft(lm, layer, llm.tune_block)
        if llm.eval_baseline:
            rows.append(row(draft, sets, profile, device, "copy", checkpoint=""))
        started = time.perf_counter()
        ckpt = run.checkpoints / f"layer{layer}"
        result = train_draft(draft, sets, profile, device, ckpt, progress, log_epoch(say),
                             resume=resume and (ckpt / "last" / STATE).is_file())
        saved = (export_checkpoint(result.best_dir, Path(cfg.save_to) / f"layer{layer}") if cfg.save_to
                 else result.best_dir)
        rows.append(row(draft, sets, profile, device, "tuned", checkpoint=str(saved), epochs=result.epochs_done,
                        best_val_loss=result.best_val, train_seconds=time.perf_counter() - started))
        say(f"exit layer {layer}: val KL {rows[-1]['val_kl']:.4f}, top1 {rows[-1]['val_top1']:.3f}, agreement "
            f"{rows[-1]['val_agreement']:.3f} -> {saved}")
    unchanged = checksum(lm.model) == before
    if not unchanged:
        raise SpecctlError("internal error: the target's parameters changed while tuning a draft")
    if distributed.is_main():
        write_csv(run.path / "results.csv", rows)
    return FinetuneResult(lm.path, lm.n_layers, unchanged, str(run.path / "results.csv"), rows)
