"""finetune-head: distil early-exit drafts at one or more exit layers (and temperatures), or evaluate existing draft
checkpoints.

Data: llm.train_files (chat-formatted), split into train / in-domain held-out ("val"); every file in
llm.eval_files is an out-of-domain held-out set named by its stem. With llm.replies = "target" each chat's reply
is the target's own (replies.py); the loss and the metrics count reply tokens only (chat.py).
Tuning reads a teacher cache (teacher.py): the target runs once over the training set and once over the
validation rows, never per step. results.csv has one row per exit layer and head (`copy` = the untuned exit,
`tuned` = a trained head copy, `adapter` = a trained adapter; or one row per --eval-only checkpoint), its
held-out metrics computed against the full target (no top-k).
"""

from __future__ import annotations

import glob
import hashlib
import random
import time
from collections.abc import Callable
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
from specctl.llm.chat import Tokens, batches, prompt_ids, text_tokens, tokens, with_reply
from specctl.llm.draft import Draft, build_draft, draft_logits, load_draft, target_pass
from specctl.llm.kl import HeldOut, objective
from specctl.llm.lm import LM, autocast, check_exit_layer, load_lm
from specctl.llm.pretrain import log_epoch
from specctl.llm.profile import LLMProfile
from specctl.llm.replies import ReplySettings, cached_replies
from specctl.llm.teacher import Chunk, Student, Teacher, bucketed_kl, record
from specctl.llm.text import Example, read_files, split

DEFINITIONS = {
    "rows": "one per exit layer, head and temperature (copy = the untuned exit: the target's own head on block l; "
            "tuned = a trained copy of the head; adapter = a trained affine map before the frozen norm and head; or "
            "one per --eval-only checkpoint); <set>_<metric> for the in-domain held-out set (val) and every "
            "llm.eval_files set, token-weighted over reply tokens (chat) or every token (plain text), against the "
            "full target",
    "<set>_kl / _kl_t1": "KL(p_target || p_draft) per token at the row's kl_temperature / at T = 1 (nats)",
    "<set>_ce / _ppl": "the draft's cross-entropy to the text (nats/token) and its exp",
    "<set>_top1 / _top<k>": "the draft's top-1 / top-k accuracy against the text",
    "<set>_agreement": "top-1 agreement of draft and target: the greedy acceptance rate, teacher-forced",
    "<set>_overlap": "E[sum_v min(p(v), q(v))] at T = 1: the acceptance rate of speculative sampling, teacher-forced",
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
    train: list[Tokens]
    held_out: dict[str, list[Tokens]]  # "val" (in-domain) and one per eval file


def checksum(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (to prove the target never changes, and to key cached replies)."""
    h = hashlib.sha256()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        h.update(name.encode())
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def on_policy(groups: dict[str, list[Example]], lm: LM, weights: str, profile: LLMProfile,
              say=None) -> Callable[[Example], Tokens]:
    """Example -> its first user turn and the target's reply (chat), or the text itself (plain text)."""
    llm = profile.llm
    room = llm.max_len - llm.reply_tokens
    if room < 8:
        raise SpecctlError(f"llm.max_len ({llm.max_len}) must leave a prompt at least 8 tokens beside "
                           f"llm.reply_tokens ({llm.reply_tokens})")
    chats = [e for examples in groups.values() for e in examples if e.messages is not None]
    prompts = [prompt_ids(e, lm.tokenizer, room, "llm.max_len - llm.reply_tokens") for e in chats]
    settings = ReplySettings(llm.reply_tokens, llm.reply_temperature, llm.reply_batch, profile.seed)
    replies = cached_replies(lm, weights, prompts, settings, say) if chats else []
    made = {id(e): with_reply(p, r, llm.max_len) for e, p, r in zip(chats, prompts, replies)}
    return lambda e: made[id(e)] if e.messages is not None else text_tokens(e.text or "", lm.tokenizer, llm.max_len)


def load_sets(profile: LLMProfile, lm: LM, weights: str, say=None) -> TextSets:
    """Train / val / out-of-domain sequences, each with at least one counted (reply) token."""
    llm = profile.llm
    folder = data_dir(profile.data)
    train, val = split(read_files(llm.train_files, folder, llm.max_examples), llm.val_fraction, profile.seed)
    groups = {"train": train, "val": val[: llm.max_eval_examples]}
    for name in llm.eval_files:
        examples = read_files([name], folder)
        groups[Path(name).stem] = random.Random(profile.seed).sample(
            examples, min(llm.max_eval_examples, len(examples)))
    encode = on_policy(groups, lm, weights, profile, say) if llm.replies == "target" else (
        lambda e: tokens(e, lm.tokenizer, llm.max_len))
    sets = {name: [s for s in map(encode, examples) if s.n_counted] for name, examples in groups.items()}
    empty = [k for k, v in sets.items() if not v]
    if empty:
        raise SpecctlError(f"no example with a reply token to learn from in: {', '.join(empty)} (a chat file "
                           'without assistant turns needs llm.replies = "target")')
    return TextSets(sets.pop("train"), sets)


def evaluate_drafts(drafts: list[Draft], temperatures: list[float], seqs: list[Tokens], profile: LLMProfile,
                    device: torch.device) -> list[dict[str, float]]:
    """Token-weighted held-out metrics (kl.HeldOut, KL at each draft's temperature) of every draft against the
    full target, in one target pass per batch."""
    llm, lm = profile.llm, drafts[0].target
    accs = [HeldOut(t, llm.top_k_accuracy) for t in temperatures]
    with torch.no_grad():
        for ids, attention, counted in batches(seqs, profile.train.batch_size, lm.tokenizer.pad_token_id, device):
            with autocast(device, llm.dtype):
                teacher, states = target_pass(lm, [d.layer for d in drafts if d.shares_trunk], ids, attention)
                for draft, acc in zip(drafts, accs):
                    acc.add(teacher, draft_logits(draft, states, ids, attention), ids, counted)
    return [acc.result() for acc in accs]


def teacher_batches(teacher: Teacher, tune_block: bool, size: int, seed: int) -> list:
    """An epoch's batches: shuffled chunks of sequences (option B), else shuffled rows of `size` tokens."""
    g = torch.Generator().manual_seed(seed)
    if tune_block:
        return [teacher.chunks[i] for i in torch.randperm(len(teacher.chunks), generator=g).tolist()]
    return list(torch.randperm(teacher.rows, generator=g).to(teacher.labels.device).split(size))


@dataclass
class BatchLoss:
    loss: torch.Tensor
    kl: torch.Tensor  # per row
    logits: torch.Tensor
    rows: torch.Tensor | slice  # the teacher rows


def batch_loss(student: Student, teacher: Teacher, batch, temperature: float, profile: LLMProfile,
               device: torch.device) -> BatchLoss:
    """The objective on one batch of teacher rows (a tensor of rows, or a chunk of sequences under option B)."""
    llm = profile.llm
    rows = batch.rows if isinstance(batch, Chunk) else batch
    with autocast(device, llm.dtype):
        logits = student.chunk(batch) if isinstance(batch, Chunk) else student.rows(teacher, batch)
    kl = bucketed_kl(logits, teacher.top_ids[rows], teacher.top_logits[rows], teacher.lse[temperature][rows],
                     temperature)
    loss = objective(kl, logits, teacher.labels[rows], temperature, llm.kl_weight, llm.ce_weight)
    return BatchLoss(loss, kl, logits, rows)


def cached_metrics(student: Student, teacher: Teacher, temperature: float, profile: LLMProfile,
                   device: torch.device) -> dict[str, float]:
    """Validation from the teacher cache: val_loss (the training objective), KL (top-k bucketed), top-1 accuracy
    and top-1 agreement with the target."""
    sums = {"val_loss": 0.0, "val_kl": 0.0, "val_top1": 0.0, "val_agreement": 0.0}
    size = profile.llm.token_batch
    rows_of = teacher.chunks if student.draft.tune_block else torch.arange(teacher.rows, device=device).split(size)
    for batch in rows_of:
        b = batch_loss(student, teacher, batch, temperature, profile, device)
        top, rows = b.logits.argmax(-1), b.rows
        for key, value in (("val_loss", b.loss * b.kl.shape[0]), ("val_kl", b.kl.sum()),
                           ("val_top1", (top == teacher.labels[rows]).sum()),
                           ("val_agreement", (top == teacher.top_ids[rows, 0]).sum())):
            sums[key] += float(value)
    return {k: v / max(teacher.rows, 1) for k, v in sums.items()}


def tune(draft: Draft, teacher: Teacher, val: Teacher, temperature: float, profile: LLMProfile,
         device: torch.device, ckpt_dir: Path, progress=None, on_epoch_end=None, resume: bool = False) -> FitResult:
    """Distil the draft's trainable parts toward the cached teacher; the best checkpoint is loaded back."""
    llm = profile.llm
    student = Student(draft)
    if draft.adapter is not None:
        draft.adapter.fit_scale(teacher.states[draft.layer])
    config = {**draft.config(), "kl_temperature": temperature, "kl_weight": llm.kl_weight,
              "ce_weight": llm.ce_weight, "train_files": llm.train_files, "max_len": llm.max_len,
              "replies": llm.replies, "teacher_top_k": llm.teacher_top_k}
    def epoch_batches(epoch: int) -> list:
        """Under torchrun each process takes its share of every batch of teacher rows (core/distributed.py); chunks
        of sequences (option B) are not split, so every process computes the same gradients there."""
        chosen = teacher_batches(teacher, draft.tune_block, llm.token_batch, profile.seed + epoch)
        return chosen if draft.tune_block else list(distributed.shard_batches(chosen))

    task = Task(draft.model, draft.trainable().values(),
                lambda batch: batch_loss(student, teacher, batch, temperature, profile, device).loss,
                epoch_batches,
                lambda: cached_metrics(student, val, temperature, profile, device), config, draft.weights)
    result = fit(task, profile.train, ckpt_dir, resume, progress, on_epoch_end)
    draft.model.load_state_dict(load_weights(result.best_dir, device), strict=False)
    return result


def row(draft: Draft, temperature: float, metrics: dict[str, dict[str, float]], profile: LLMProfile, head: str,
        **extra) -> dict:
    """One results.csv row: settings, then `<set>_<metric>` for every held-out set."""
    checkpoint = Path(str(extra.get("checkpoint") or "")).name
    # trial_id and status make this CSV readable by `specctl plot` / `analyze` like a sweep's
    out = {"trial_id": "-".join(filter(None, (f"layer{draft.layer}", head, checkpoint))), "status": "ok",
           "exit_layer": draft.layer, "target_layers": draft.target.n_layers, "head": head,
           "tune_block": draft.tune_block, "kl_temperature": temperature, "ce_weight": profile.llm.ce_weight,
           **extra}
    for name, values in metrics.items():
        out.update({f"{name}_{k}": v for k, v in values.items()})
    return out


def evaluate_rows(drafts: list[tuple[Draft, float, str, dict]], sets: TextSets, profile: LLMProfile,
                  device: torch.device) -> list[dict]:
    """results.csv rows of (draft, temperature, head name, extra columns), every held-out set in one target pass
    per batch for all of them."""
    per_set = {name: evaluate_drafts([d for d, *_ in drafts], [t for _, t, *_ in drafts], seqs, profile, device)
               for name, seqs in sets.held_out.items()}
    return [row(d, t, {name: values[i] for name, values in per_set.items()}, profile, head, **extra)
            for i, (d, t, head, extra) in enumerate(drafts)]


def draft_folders(pattern: str) -> list[Path]:
    """Draft checkpoint folders matching a glob (a match may be the folder or a file inside it)."""
    found = sorted({p if p.is_dir() else p.parent for p in map(Path, glob.glob(pattern))})
    folders = [p for p in found if (p / CONFIG).is_file()]
    if not folders:
        raise SpecctlError(f"eval-only: no draft checkpoint matches '{pattern}'")
    return folders


def draft_name(layer: int, temperature: float, several: bool) -> str:
    """layer{l}, or layer{l}_T{t} when one run tunes several temperatures."""
    return f"layer{layer}_T{temperature:g}" if several else f"layer{layer}"


def tune_all(lm: LM, sets: TextSets, profile: LLMProfile, device: torch.device, run: RunDir, resume: bool,
             progress=None, say=print) -> list[tuple[Draft, float, str, dict]]:
    """A draft per exit layer and temperature, tuned from one teacher cache; (draft, T, head, extra) each."""
    llm, cfg = profile.llm, profile.train
    layers, temps = llm.layers(), llm.temperatures()
    started = time.perf_counter()
    with autocast(device, llm.dtype):
        teacher = record(lm, sets.train, layers, temps, llm.teacher_top_k, cfg.batch_size, llm.tune_block)
        val = record(lm, sets.held_out["val"], layers, temps, llm.teacher_top_k, cfg.batch_size, llm.tune_block)
    say(f"teacher cache: {teacher.rows} training and {val.rows} validation tokens, top {teacher.top_ids.shape[1]} "
        f"logits, {time.perf_counter() - started:.1f}s")
    head = "adapter" if llm.draft_head == "adapter" else "tuned"
    done = []
    for layer in layers:
        for t in temps:
            name = draft_name(layer, t, len(temps) > 1)
            draft, ckpt, started = build_draft(lm, layer, llm.tune_block, llm.draft_head), run.checkpoints / name, \
                time.perf_counter()
            result = tune(draft, teacher, val, t, profile, device, ckpt, progress, log_epoch(say),
                          resume=resume and (ckpt / "last" / STATE).is_file())
            saved = export_checkpoint(result.best_dir, Path(cfg.save_to) / name) if cfg.save_to else result.best_dir
            best = min(result.history, key=lambda h: h["val_loss"]) if result.history else {}
            say(f"exit layer {layer}, T {t:g}: val KL {best.get('val_kl', float('nan')):.4f}, agreement "
                f"{best.get('val_agreement', float('nan')):.3f} -> {saved}")
            done.append((draft, t, head, {"checkpoint": str(saved), "epochs": result.epochs_done,
                                          "best_val_loss": result.best_val,
                                          "train_seconds": time.perf_counter() - started}))
    return done


def finetune_heads(profile: LLMProfile, device: torch.device, run: RunDir, resume: bool = False, progress=None,
                   say=print) -> FinetuneResult:
    """Train (or, with llm.eval_only, evaluate) early-exit drafts; write results.csv; return the rows.

    With `resume`, each draft continues from its last finished epoch in this run's checkpoints, and a draft whose
    training already ended is not trained again."""
    llm = profile.llm
    lm: LM = load_lm(llm.target, device, llm.tokenizer, offline=llm.offline)
    for layer in [] if llm.eval_only else llm.layers():
        check_exit_layer(layer, lm.n_layers)
    before = checksum(lm.model)
    sets = load_sets(profile, lm, before, say)
    say(f"target {lm.path}: {lm.n_layers} layers, vocab {lm.vocab_size}; {len(sets.train)} training sequences, "
        + ", ".join(f"{k} {len(v)}" for k, v in sets.held_out.items()))
    if llm.eval_only:
        loaded = [(load_draft(folder, lm), folder) for folder in draft_folders(llm.eval_only)]
        drafts = [(d, llm.kl_temperature, "adapter" if d.head_kind == "adapter" else "tuned",
                   {"checkpoint": str(folder)}) for d, folder in loaded]
    else:
        tuned = tune_all(lm, sets, profile, device, run, resume, progress, say)
        copies = {d.layer: (build_draft(lm, d.layer, head="target"), llm.kl_temperature, "copy", {"checkpoint": ""})
                  for d, *_ in tuned} if llm.eval_baseline else {}
        drafts = [x for layer in llm.layers() for x in ([copies[layer]] if layer in copies else []) + [
            d for d in tuned if d[0].layer == layer]]
    rows = evaluate_rows(drafts, sets, profile, device)
    unchanged = checksum(lm.model) == before
    if not unchanged:
        raise SpecctlError("internal error: the target's parameters changed while tuning a draft")
    write_csv(run.path / "results.csv", rows)
    return FinetuneResult(lm.path, lm.n_layers, unchanged, str(run.path / "results.csv"), rows)
