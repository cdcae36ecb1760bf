"""LLM early-exit speculative decoding, end to end from scratch on one GPU, within a time budget.

1. pretrain a 12-layer Llama-architecture LM (~92M parameters, profiles/llm/bench-target.toml) on the local chat
   corpora + tiny-shakespeare, and compare its held-out perplexity with a unigram baseline;
2. finetune-head at exit layers 1/4, 1/2, 3/4 of the depth (head-only KL distillation), and at 1/4 also with its
   last block tuned (option B; held-out metrics only);
3. spec-test at batch 1, greedy and T=1, on Spec-Bench prompts: E[accepted], acceptance, c_hat, measured and
   predicted speedup vs the same target's vanilla decoding, both on the static decode path (static KV caches, CUDA
   graphs); greedy with the draft reading and writing the target's KV cache (self-speculation) at every exit layer;
   at 1/2 depth, greedy: gammas 1 and 2 and (on a GPU) the same static path without CUDA graphs;
4. the Hugging Face peers on the same prompts: `generate(assistant_early_exit=l+1)` (self-speculation with the
   target's own head at layer l) and `generate(assistant_model=draft)`, each against HF's plain `generate`.

Prints a markdown table and writes it to --out (and everything measured to --out with suffix .json).
    python benchmarks/llm_bench.py --data-dir ../shared/data --out docs/bench-llm.md --budget-min 8.5
    python benchmarks/llm_bench.py --data-dir ../shared/data --out /tmp/smoke.md --smoke   # CPU, ~3 minutes
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from specctl.core.profile import load_profile, with_overrides
from specctl.core.rundir import RunDir
from specctl.core.runtime import resolve_device, seed_everything, synchronize
from specctl.core.schema import Profile
from specctl.llm.draft import load_draft, resolve_draft
from specctl.llm.finetune import finetune_heads
from specctl.llm.lm import autocast, load_lm
from specctl.llm.pretrain import llama_config, pretrain_lm
from specctl.llm.spectest import load_prompts, run_llm_spec_test

START = time.perf_counter()
SHARES = {"pretrain": 0.30, "finetune": 0.20, "spec": 0.32, "hf": 0.18}  # of the time left when a stage starts
SLACK = 0.08  # of the budget, for loading, evaluation and the report
SMOKE = [  # a CPU-sized run of the same pipeline, to check the script itself
    "device=\"auto\"", "llm.arch.vocab_size=512", "llm.arch.hidden_size=64", "llm.arch.intermediate_size=128",
    "llm.arch.num_hidden_layers=4", "llm.early_exit_layers=[0, 1, 2]", "llm.arch.num_attention_heads=4",
    "llm.max_len=64", "llm.max_examples=400",
    "llm.max_eval_examples=32", "llm.dtype=\"fp32\"", "train.batch_size=8", "train.epochs=2",
    "llm.spec.n_prompts=3", "llm.spec.max_new_tokens=16", "llm.spec.step_repeats=3",
]


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {message}", flush=True)


class Budget:
    """Seconds for each stage: its share of the time left, so time a stage does not use goes to later ones."""

    def __init__(self, total_s: float):
        self.end, self.left = START + total_s * (1 - SLACK), dict(SHARES)

    def take(self, stage: str) -> float:
        share = self.left[stage] / sum(self.left.values())
        del self.left[stage]
        seconds = max(0.0, self.end - time.perf_counter()) * share
        log(f"{stage}: {seconds:.0f}s of the budget")
        return seconds


def free_memory() -> None:
    """Drop models of finished stages (each stage loads its own), so they neither hold memory nor slow the GC."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Vocab:
    """What llama_config reads from a tokenizer, for timing a training step before the tokenizer exists."""

    eos_token_id = pad_token_id = 0
    bos_token_id = None

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def train_step_seconds(profile, device: torch.device, batch_size: int, head_only: bool) -> float:
    """Measured seconds per optimisation step of the target architecture (or of a head-only draft step)."""
    from transformers import LlamaForCausalLM

    llm = profile.llm
    model = LlamaForCausalLM(llama_config(llm.arch, _Vocab(llm.arch.vocab_size))).to(device)
    params = list(model.lm_head.parameters()) if head_only else list(model.parameters())
    model.requires_grad_(not head_only)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, llm.arch.vocab_size, (batch_size, llm.max_len), device=device)

    def step() -> None:
        with autocast(device, llm.dtype):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(4):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / 4
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds * (1.5 if head_only else 1.0)  # drafts also spend time on held-out rows outside training


def steps_for(seconds: float, epochs: int, step_s: float) -> int:
    """Steps per epoch that fit `seconds` with ~15% for validation."""
    return max(5, int(seconds / (epochs * step_s * 1.15)))


def exit_layers(n_layers: int) -> list[int]:
    return sorted({max(0, round(n_layers * f) - 1) for f in (0.25, 0.5, 0.75)})  # 0-based, 12 -> 2, 5, 8


def stage_pretrain(base: list[str], budget: Budget, device: torch.device) -> dict:
    profile = load_profile("llm/bench-target", base)
    step_s = train_step_seconds(profile, device, profile.train.batch_size, head_only=False)
    steps = steps_for(budget.take("pretrain"), profile.train.epochs, step_s)
    log(f"pretrain: {step_s * 1000:.0f} ms/step -> at most {profile.train.epochs} epochs x {steps} steps")
    profile = with_overrides(profile, {"train.max_steps_per_epoch": steps})
    run = RunDir.create(profile, "pretrain", str(device))
    started = time.perf_counter()
    metrics = pretrain_lm(profile, device, run, False, None, log)
    metrics["minutes"] = (time.perf_counter() - started) / 60
    run.write_json("metrics.json", metrics)
    run.finish()
    log(f"pretrain: {metrics['parameters'] / 1e6:.1f}M parameters, val ppl {metrics['val_ppl']:.2f} vs unigram "
        f"{metrics['unigram_ppl']:.2f} ({metrics['minutes']:.1f} min)")
    if not metrics["val_ppl"] < 0.5 * metrics["unigram_ppl"]:
        log("WARNING: held-out perplexity is not clearly below the unigram baseline (the target is undertrained)")
    return metrics


def stage_finetune(base: list[str], layers: list[int], budget: Budget, device: torch.device, work: Path) -> list[dict]:
    """Head-only drafts at every exit layer (the ones spec-test uses), then option B (head and block tuned) at the
    first exit layer, for its held-out metrics."""
    profile = load_profile("llm/bench-draft", [*base, f"llm.exit_layers={layers}"])
    step_s = train_step_seconds(profile, device, profile.train.batch_size, head_only=True)
    steps = steps_for(budget.take("finetune") / (len(layers) + 1), profile.train.epochs, step_s)
    log(f"finetune-head: layers {layers}, ~{step_s * 1000:.0f} ms/step -> {profile.train.epochs} epochs x {steps} "
        "steps")
    rows = []
    for overrides in ({}, {"llm.tune_block": True, "llm.exit_layers": layers[:1], "llm.eval_baseline": False,
                           "train.save_to": str(work / "draft_block")}):
        p = with_overrides(profile, {"train.max_steps_per_epoch": steps, **overrides})
        run = RunDir.create(p, "finetune-head", str(device))
        result = finetune_heads(p, device, run, None, log)
        run.write_json("metrics.json", result)
        run.finish()
        rows += result["rows"]
    return rows


def decode_seconds_per_token(profile, device: torch.device, graphs: bool) -> float:
    """Vanilla decoding speed of the target on the decode path spec-test uses, with or without CUDA graphs (to size
    the prompt set to the budget)."""
    from specctl.llm.speculative import Decoding, Sampling
    from specctl.llm.static import decoder

    lm = load_lm(profile.llm.target, device, None, profile.llm.dtype)
    prompt = load_prompts(profile, lm.tokenizer)[0]
    decoding = Decoding(decoder(lm.model, len(prompt) + 32), sampling=Sampling(0.0), graphs=graphs)
    decoding.vanilla(prompt, 8)
    synchronize(device)
    start = time.perf_counter()
    out = decoding.vanilla(prompt, 32)
    synchronize(device)
    return (time.perf_counter() - start) / len(out.tokens)


MODES = {"greedy": {"llm.spec.temperature": 0.0}, "T=1": {"llm.spec.temperature": 1.0}}


def spec_runs(layers: list[int], gamma: int, device: torch.device) -> list[dict]:
    """Every exit layer x mode at the profile's gamma, and greedy with a shared KV cache (self-speculation); at 1/2
    depth, greedy: smaller gammas and (on a GPU) no CUDA graphs."""
    mid = layers[len(layers) // 2]
    runs = [{"llm.exit_layer": layer, **MODES[mode]} for layer in layers for mode in MODES]
    runs += [{"llm.exit_layer": layer, **MODES["greedy"], "llm.spec.share_cache": True} for layer in layers]
    runs += [{"llm.exit_layer": mid, **MODES["greedy"], "llm.spec.gamma": g} for g in (1, 2) if g < gamma]
    runs += [{"llm.exit_layer": mid, **MODES["greedy"], "llm.spec.cuda_graphs": False}] if device.type == "cuda" else []
    return runs


def label(run: dict, gamma: int) -> str:
    mode = "greedy" if run["llm.spec.temperature"] == 0 else "T=1"
    extra = [", shared KV"] if run.get("llm.spec.share_cache") else []
    extra += [f", gamma {run['llm.spec.gamma']}"] if run.get("llm.spec.gamma", gamma) != gamma else []
    extra += [", no CUDA graphs"] if not run.get("llm.spec.cuda_graphs", True) else []
    return mode + "".join(extra)


def stage_spec(base: list[str], layers: list[int], budget: Budget, device: torch.device) -> tuple[list[dict], Profile]:
    profile = load_profile("llm/bench-spec", base)
    spec = profile.llm.spec
    runs = spec_runs(layers, spec.gamma, device)
    per_token = {graphs: decode_seconds_per_token(profile, device, graphs)
                 for graphs in {run.get("llm.spec.cuda_graphs", True) for run in runs}}
    # a prompt of a run: vanilla + speculative + overheads
    per_prompt = sum(2.5 * spec.max_new_tokens * per_token[run.get("llm.spec.cuda_graphs", True)] for run in runs)
    fit = budget.take("spec") / per_prompt - spec.warmup
    n_prompts = int(min(spec.n_prompts, max(4, fit)))
    speeds = ", ".join(f"{t * 1000:.1f} ms/token {'with' if g else 'without'} CUDA graphs"
                       for g, t in per_token.items())
    log(f"spec-test: vanilla {speeds} -> {n_prompts} prompts x {len(runs)} runs")
    profile = with_overrides(profile, {"llm.spec.n_prompts": n_prompts})
    rows = []
    for overrides in runs:
        p = with_overrides(profile, overrides)
        run = RunDir.create(p, "spec-test", str(device))
        metrics = run_llm_spec_test(p, device, run, None)
        run.write_json("metrics.json", metrics)
        run.finish()
        free_memory()
        name = label(overrides, spec.gamma)
        rows.append({"exit_layer": overrides["llm.exit_layer"], "mode": name,
                     **{k: v for k, v in metrics.items() if k != "definitions"}})
        log(f"spec-test layer {rows[-1]['exit_layer']} {name}: E[accepted] {metrics['mean_accepted']:.2f}, "
            f"acceptance {metrics['acceptance_rate']:.3f}, speedup {metrics['speedup']:.2f}x (predicted "
            f"{metrics['predicted_speedup']:.2f}x, c_hat {metrics['c_hat']:.3f}, v_hat {metrics['v_hat']:.2f})")
    return rows, profile


def hf_time(model, prompts: list[list[int]], profile, greedy: bool, device: torch.device, **extra) -> float:
    """Tokens/s of Hugging Face `generate` over the prompts (seeded, synchronised, first prompt as warm-up)."""
    spec = profile.llm.spec
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    tokens, seconds = 0, 0.0
    for i, prompt in enumerate([prompts[0], *prompts]):
        ids = torch.tensor([prompt], device=device)
        torch.manual_seed(profile.seed + i)
        synchronize(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=spec.max_new_tokens,
                             pad_token_id=model.generation_config.eos_token_id, **sampling, **extra)
        synchronize(device)
        if i:
            tokens, seconds = tokens + out.shape[1] - len(prompt), seconds + time.perf_counter() - start
    return tokens / seconds


def fixed_gamma(model, gamma: int) -> None:
    """HF assisted generation with exactly gamma draft tokens per round (no adaptive schedule or early stop)."""
    cfg = model.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = gamma, "constant"
    cfg.assistant_confidence_threshold = 0.0


def stage_hf(profile, layers: list[int], budget: Budget, device: torch.device) -> dict:
    """Speedups of HF assisted generation over HF plain generate, per (exit layer, mode); errors are recorded."""
    lm = load_lm(profile.llm.target, device, None, profile.llm.dtype)
    fixed_gamma(lm.model, profile.llm.spec.gamma)
    prompts = load_prompts(profile, lm.tokenizer)
    per_prompt = 2.0 * profile.llm.spec.max_new_tokens / hf_time(lm.model, prompts[:1], profile, True, device)
    calls = len(MODES) * (1 + 2 * len(layers))  # plain generate, then early exit and assistant per layer
    prompts = prompts[: int(min(len(prompts), max(2, budget.take("hf") / (per_prompt * calls) - 1)))]  # 1 warm-up
    log(f"HF peers: {len(prompts)} prompts")
    out: dict = {}
    for mode in MODES:
        greedy = mode == "greedy"
        plain = hf_time(lm.model, prompts, profile, greedy, device)
        out[("vanilla", mode)] = plain
        for layer in layers:
            draft = load_draft(resolve_draft(profile.llm.spec.draft, layer), lm)
            fixed_gamma(draft.model, profile.llm.spec.gamma)
            for name, extra in (("early_exit", {"assistant_early_exit": layer + 1}),
                                ("assistant", {"assistant_model": draft.model})):
                try:
                    out[(name, mode, layer)] = hf_time(lm.model, prompts, profile, greedy, device, **extra) / plain
                except Exception as e:  # a peer failing must not hide our results
                    traceback.print_exc()
                    out[(name, mode, layer)] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
                log(f"HF {name} layer {layer} {mode}: {out[(name, mode, layer)]}")
    return out


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}f}"
    return "–" if value is None else str(value)


def with_ci(metrics: dict, key: str) -> str:
    low, high = metrics.get("ci", {}).get(key, [None, None])
    return fmt(metrics[key], 2) + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]


def target_section(t: dict) -> list[str]:
    held = [k for k in t if k.startswith("ppl_")]
    header = ["parameters", "layers", "vocab", "train tokens", "epochs", "held-out ppl", "unigram ppl", *held,
              "minutes"]
    row = [f"{t['parameters'] / 1e6:.1f}M", t["layers"], t["vocab_size"], f"{t['train_tokens']:,}", t["epochs"],
           fmt(t["val_ppl"], 2), fmt(t["unigram_ppl"], 2), *[fmt(t[k], 2) for k in held], fmt(t["minutes"], 1)]
    return ["", "## Target (pretrained from scratch)", "", *md_table(header, [row])]


def drafts_section(drafts: list[dict]) -> list[str]:
    ood = [k[:-3] for k in drafts[0] if k.endswith("_kl") and not k.startswith("val_")]
    header = ["exit layer", "head", "val KL", "val KL T=1", "val ppl (target)", "val top1 (target)", "val top5",
              "val agreement", *[f"{o} {m}" for o in ood for m in ("KL", "top1")]]
    rows = [[r["exit_layer"], r["head"] + (" + block" if r["tune_block"] else ""), fmt(r["val_kl"], 4),
             fmt(r["val_kl_t1"], 4),
             f"{fmt(r['val_ppl'], 2)} ({fmt(r['val_target_ppl'], 2)})",
             f"{fmt(r['val_top1'])} ({fmt(r['val_target_top1'])})", fmt(r["val_top5"]), fmt(r["val_agreement"]),
             *[x for o in ood for x in (fmt(r[f"{o}_kl"], 4), fmt(r[f"{o}_top1"]))]] for r in drafts]
    return ["", "## Early-exit drafts (held-out, token-weighted; `copy` = the untuned target head; agreement = "
                "the draft's top-1 is the target's, the teacher-forced greedy acceptance rate)", "",
            *md_table(header, rows)]


def spec_section(spec: list[dict], hf: dict, profile: Profile) -> list[str]:
    s = profile.llm.spec
    header = ["exit layer", "mode", "E[accepted]", "acceptance", "alpha_hat", "tau", "c_hat", "v_hat",
              "tok/s vanilla", "tok/s spec", "speedup", "predicted", "predicted with v_hat", "identical to vanilla",
              "CUDA graphs", "HF early-exit speedup", "HF assistant speedup"]
    rows = []
    for r in spec:
        mode, layer = r["mode"].split(",")[0], r["exit_layer"]
        plain_run = "," not in r["mode"]  # peers were timed for the plain exit-layer x mode runs only
        peers = [fmt(hf.get((k, mode, layer)), 2) if plain_run else "–" for k in ("early_exit", "assistant")]
        rows.append([layer, r["mode"], with_ci(r, "mean_accepted"), fmt(r["acceptance_rate"]), fmt(r["alpha_hat"]),
                     fmt(r["tokens_per_target_call"], 2), fmt(r["c_hat"]), fmt(r["v_hat"], 2),
                     fmt(r["tok_s_vanilla"], 1), fmt(r["tok_s_spec"], 1), with_ci(r, "speedup"),
                     fmt(r["predicted_speedup"], 2), fmt(r["predicted_speedup_v"], 2),
                     fmt(r["identical_fraction"], 2), "yes" if r["cuda_graphs"] else "no", *peers])
    plain = ", ".join(f"{m} {fmt(hf.get(('vanilla', m)), 1)}" for m in MODES)
    return ["", f"## Speculative decoding (batch 1, gamma {s.gamma}, {spec[0]['n_prompts']} Spec-Bench prompts, "
                f"max_new_tokens {s.max_new_tokens}, {profile.llm.dtype}; [95% bootstrap CI across prompts])", "",
            "Vanilla and speculative decoding run the same static decode path (static KV caches; CUDA graphs where "
            "the column says so); c_hat = draft / target decode-step time, v_hat = verification-call / target "
            "decode-step time, predicted = (1 - a^(g+1)) / ((1 - a)(g c_hat + 1)) with a = alpha_hat, and with "
            "v_hat in place of the 1.", "",
            *md_table(header, rows), "",
            "HF peers: speedup of `generate(assistant_early_exit=l+1)` (the target's own head at layer l) and of "
            "`generate(assistant_model=draft)` over plain `generate` on a subset of the same prompts, same sampling, "
            f"gamma fixed; HF plain generate tok/s: {plain}."]


def markdown(args, device: torch.device, target: dict, drafts: list[dict], spec: list[dict], hf: dict,
             profile: Profile | None, failure: str | None) -> str:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = ["# LLM early-exit speculative decoding benchmark", "",
             f"- date: {now}; device: {name}; torch {torch.__version__}, transformers {transformers.__version__}",
             f"- command: `{' '.join(sys.argv)}`; budget {args.budget_s / 60:.0f} min; took "
             f"{(time.perf_counter() - START) / 60:.1f} min"]
    if failure:
        lines += ["", f"**FAILED**: {failure}"]
    lines += target_section(target) if target else []
    lines += drafts_section(drafts) if drafts else []
    lines += spec_section(spec, hf, profile) if spec else []
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("SPECCTL_DATA_DIR"), help="folder of the local corpora")
    parser.add_argument("--out", required=True, type=Path, help="markdown file to write (and .json beside it)")
    parser.add_argument("--budget-min", type=float, default=8.5,
                        help="wall-clock budget in minutes (a device command is capped at 10)")
    parser.add_argument("--work", type=Path, default=Path("runs/llm-bench"), help="folder for runs and models")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU-sized run of the same pipeline")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="a profile override for every stage (repeatable), e.g. llm.early_exit_weight=1.0")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data-dir (or $SPECCTL_DATA_DIR) is required")
    device = resolve_device(args.device)
    budget_s = args.budget_s = (3.0 if args.smoke else args.budget_min) * 60
    work = args.work.resolve()
    base = [f"data.dir={json.dumps(str(Path(args.data_dir).resolve()))}", f"run_root={json.dumps(str(work / 'runs'))}",
            f"device={json.dumps(device.type)}", f"llm.target={json.dumps(str(work / 'target'))}",
            f"llm.spec.draft={json.dumps(str(work / 'draft'))}", *(SMOKE if args.smoke else []), *args.overrides]
    save = {"bench-llm-target": work / "target", "bench-llm-draft": work / "draft"}
    log(f"device {device}; budget {budget_s / 60:.0f} min; work folder {work}")
    if device.type == "cuda":
        log(f"GPU: {torch.cuda.get_device_name(device)}")
    seed_everything(0)
    target, drafts, spec, hf, profile, failure = {}, [], [], {}, None, None
    try:
        budget = Budget(budget_s)
        target = stage_pretrain([*base, f"train.save_to={json.dumps(str(save['bench-llm-target']))}"], budget, device)
        free_memory()
        layers = exit_layers(target["layers"])
        drafts = stage_finetune([*base, f"train.save_to={json.dumps(str(save['bench-llm-draft']))}"], layers,
                                budget, device, work)
        free_memory()
        spec, profile = stage_spec(base, layers, budget, device)
        hf = stage_hf(profile, layers, budget, device)
    except Exception as e:
        traceback.print_exc()
        failure = f"{type(e).__name__}: {e}"
    text = markdown(args, device, target, drafts, spec, hf, profile, failure)
    print(text, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(
        {"target": target, "drafts": drafts, "spec": spec, "hf": {"/".join(map(str, k)): v for k, v in hf.items()},
         "failure": failure}, indent=2, default=str), encoding="utf-8")
    log(f"wrote {args.out}")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
