"""spec-test for kind = "llm": vanilla (target-only) and speculative decoding on the same prompts, the same static
decode path (static KV caches; on a GPU, unless llm.spec.cuda_graphs = false, each vanilla step and each whole
speculative round replays one CUDA graph), sampling policy and seeds; acceptance, distribution overlap, timing and
speedup with bootstrap CIs."""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from specctl.core.data_dir import data_dir
from specctl.core.files import write_csv
from specctl.core.rundir import RunDir
from specctl.core.runtime import synchronize
from specctl.llm.chat import prompt_ids
from specctl.llm.draft import Draft, build_draft, build_skip_draft, load_draft, resolve_draft
from specctl.llm.lm import LM, eos_ids, load_lm
from specctl.llm.profile import LLMProfile
from specctl.llm.skip import skip_layers
from specctl.llm.speculative import Decoding, Generation, Sampling, predicted_speedup
from specctl.llm.static import static_pair
from specctl.llm.text import load_examples, resolve_text_file

# metric: (numerator, denominator) summed over prompts; bootstrap resamples prompts and recomputes the ratio
RATIOS = {
    "acceptance_rate": ("accepted", "proposed"),
    "alpha_hat": ("accepted", "evaluated"),
    "mean_accepted": ("accepted", "rounds"),
    "overlap": ("overlap_sum", "overlap_n"),
    "tokens_per_target_call": ("spec_tokens", "target_calls"),
    "tok_s_vanilla": ("vanilla_tokens", "vanilla_seconds"),
    "tok_s_spec": ("spec_tokens", "spec_seconds"),
}
DEFINITIONS = {
    "proposed / accepted": "draft tokens proposed / accepted, summed over rounds and prompts",
    "acceptance_rate": "accepted / proposed",
    "alpha_hat": "accepted / evaluated; evaluated = positions tested up to and including the first rejection",
    "mean_accepted": "E[accepted] per round (0..gamma)",
    "position_acceptance": "P(accept at draft position i | position i was tested), i = 1..gamma",
    "accepted_lengths": "fraction of rounds that accepted k draft tokens, k = 0..gamma",
    "overlap": "E[sum_v min(p(v), q(v))] over every drafted position (p target, q draft, after sampling filters)",
    "tv": "1 - overlap (total variation distance)",
    "tokens_per_target_call": "tokens emitted / target forward calls (tau; prefill counts as one call)",
    "target_calls_per_token": "1 / tokens_per_target_call",
    "tok_s_vanilla / tok_s_spec": "new tokens / wall seconds, summed over prompts (warm, synchronised)",
    "speedup": "tok_s_spec / tok_s_vanilla (same prompts, device and process)",
    "c_hat": "median draft decode-step time / median target decode-step time (one token on the static path, "
             "sampling included, replayed as decoding is)",
    "predicted_speedup": "(1 - a^(g+1)) / ((1 - a)(g c + 1)) with a = alpha_hat, c = c_hat, g = gamma",
    "v_hat": "median verification-call time (g + 1 tokens, distributions included) / median target decode-step time",
    "predicted_speedup_v": "(1 - a^(g+1)) / ((1 - a)(g c + v)) with v = v_hat: predicted_speedup with the measured "
                           "cost of a verification instead of one step; the rest of a gap to speedup is per-round "
                           "overhead (acceptance, bookkeeping, prefill, the last round's overshoot)",
    "draft / draft_kind / skip_layers": "the draft: a finetune-head checkpoint, the untuned exit, or the target "
                                        "without blocks skip_layers (layer skip)",
    "identical_fraction": "greedy only: fraction of prompts where speculative output == vanilla output",
    "peak_mem_gb": "torch.cuda.max_memory_allocated over the run (None on CPU)",
    "cuda_graphs": "whether vanilla steps and speculative rounds replayed CUDA graphs (never on CPU)",
    "ci": "bootstrap percentile interval across prompts",
}


@dataclass
class LLMSpecTestResult:
    """Vanilla against speculative decoding of one setting on the same prompts."""

    definitions: ClassVar[dict[str, str]] = DEFINITIONS

    acceptance_rate: float
    alpha_hat: float
    mean_accepted: float
    overlap: float
    tokens_per_target_call: float
    tok_s_vanilla: float
    tok_s_spec: float
    speedup: float
    proposed: int
    accepted: int
    tv: float
    target_calls_per_token: float
    position_acceptance: list[float]
    accepted_lengths: list[float]
    c_hat: float
    predicted_speedup: float
    v_hat: float
    predicted_speedup_v: float
    peak_mem_gb: float | None
    identical_fraction: float | None
    ci: dict[str, list[float]]
    n_prompts: int
    gamma: int
    exit_layer: int
    target_layers: int
    temperature: float
    top_p: float
    top_k: int
    max_new_tokens: int
    share_cache: bool
    cuda_graphs: bool
    draft: str
    draft_kind: str
    skip_layers: list[int]
    target: str
    samples: list[dict[str, str]] = field(default_factory=list)  # a few decoded prompts and outputs

    def metrics(self) -> dict[str, Any]:
        out = asdict(self)
        del out["samples"]
        return out


@dataclass
class SpecSetup:
    """The target, draft, prompts and static decoders of one LLM spec-test setting."""

    lm: LM
    draft: Draft
    decoding: Decoding  # vanilla and speculative decoding on the static path
    prompts: list[list[int]]
    eos: frozenset[int]


def load_prompts(profile: LLMProfile, tokenizer) -> list[list[int]]:
    """A fixed prompt set: n_prompts examples of the prompts file, sampled with the profile seed."""
    spec = profile.llm.spec
    examples = load_examples(resolve_text_file(spec.prompts, data_dir(profile.data)))
    if spec.n_prompts < len(examples):
        examples = random.Random(profile.seed).sample(examples, spec.n_prompts)
    return [prompt_ids(e, tokenizer, spec.max_prompt_tokens) for e in examples]


def load_target(profile: LLMProfile, device: torch.device) -> LM:
    llm = profile.llm
    return load_lm(llm.target, device, llm.tokenizer, llm.dtype, llm.offline)


def pick_draft(profile: LLMProfile, lm: LM, say=None) -> Draft:
    """A layer-skip draft (llm.draft_kind = "layer_skip"), or the early exit at llm.exit_layer: the llm.spec.draft
    checkpoint for that layer, else the untuned exit (the target's own head)."""
    llm = profile.llm
    if llm.draft_kind == "layer_skip":
        return build_skip_draft(lm, skip_layers(profile, lm, say))
    return load_draft(resolve_draft(llm.spec.draft, llm.exit_layer), lm) if llm.spec.draft else build_draft(
        lm, llm.exit_layer, head="target")


def draft_label(profile: LLMProfile, draft: Draft) -> str:
    if draft.skip:
        return f"layer skip {list(draft.skip)}"
    return profile.llm.spec.draft or "untuned head copy"


def setup(profile: LLMProfile, lm: LM, draft: Draft) -> SpecSetup:
    """Prompts, sampling policy and the static decoders, sized for the longest prompt (max_len = prompt +
    max_new_tokens + 2 gamma + 1) and reused for every prompt."""
    spec = profile.llm.spec
    prompts = load_prompts(profile, lm.tokenizer)
    max_len = max(map(len, prompts)) + spec.max_new_tokens + 2 * spec.gamma + 1
    target, draft_dec = static_pair(lm.model, draft.model, max_len, spec.share_cache)
    decoding = Decoding(target, draft_dec, spec.gamma, Sampling(spec.temperature, spec.top_k, spec.top_p),
                        spec.cuda_graphs)
    eos = eos_ids(lm) if spec.stop_at_eos else frozenset()
    return SpecSetup(lm, draft, decoding, prompts, eos)


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - start


def run_prompt(s: SpecSetup, profile: LLMProfile, index: int, device: torch.device) -> dict:
    """Vanilla and speculative decoding of one prompt with fixed seeds (which runs first alternates between
    prompts); one row of per-prompt sums."""
    spec, prompt, decoding = profile.llm.spec, s.prompts[index], s.decoding
    runs = {"vanilla": lambda: decoding.vanilla(prompt, spec.max_new_tokens, s.eos),
            "spec": lambda: decoding.speculative(prompt, spec.max_new_tokens, s.eos)}
    order = list(runs) if index % 2 == 0 else list(runs)[::-1]
    done = {}
    for name in order:
        torch.manual_seed(profile.seed + index)
        done[name] = timed(runs[name], device)
    return prompt_row(index, prompt, *done["vanilla"], *done["spec"])


def prompt_row(index: int, prompt: list[int], base: Generation, t_van: float, fast: Generation,
               t_spec: float) -> dict:
    """The per-prompt sums of a vanilla and a speculative generation of one prompt (what `ratios` reads)."""
    accepted = [a for _, a in fast.rounds]
    return {
        "prompt": index, "prompt_tokens": len(prompt),
        "vanilla_tokens": len(base.tokens), "vanilla_seconds": t_van,
        "spec_tokens": len(fast.tokens), "spec_seconds": t_spec, "target_calls": fast.target_calls,
        "rounds": len(fast.rounds), "proposed": sum(g for g, _ in fast.rounds), "accepted": sum(accepted),
        "evaluated": sum(min(a + 1, g) for g, a in fast.rounds),
        "overlap_sum": sum(fast.overlaps), "overlap_n": len(fast.overlaps),
        "identical": base.tokens == fast.tokens,
        "accepted_per_round": accepted, "drafted_per_round": [g for g, _ in fast.rounds],
        "vanilla_ids": base.tokens, "spec_ids": fast.tokens,
    }


def ratios(rows: list[dict]) -> dict[str, float]:
    out = {}
    for name, (num, den) in RATIOS.items():
        d = sum(r[den] for r in rows)
        out[name] = sum(r[num] for r in rows) / d if d else float("nan")
    out["speedup"] = out["tok_s_spec"] / out["tok_s_vanilla"]
    return out


def bootstrap(rows: list[dict], n: int, level: float, seed: int) -> dict[str, list[float]]:
    """Percentile intervals of every ratio metric, resampling prompts with replacement."""
    if n == 0 or len(rows) < 2:
        return {}
    rng = np.random.default_rng(seed)
    draws = [ratios([rows[i] for i in rng.integers(0, len(rows), len(rows))]) for _ in range(n)]
    tail = (1 - level) / 2 * 100
    return {k: [float(np.nanpercentile([d[k] for d in draws], tail)),
                float(np.nanpercentile([d[k] for d in draws], 100 - tail))] for k in draws[0]}


def position_acceptance(rows: list[dict], gamma: int) -> list[float]:
    """P(accept at position i | tested at i), from the per-round (drafted, accepted) pairs."""
    pairs = [(g, a) for r in rows for g, a in zip(r["drafted_per_round"], r["accepted_per_round"])]
    out = []
    for i in range(gamma):
        tested = sum(1 for g, a in pairs if g > i and a >= i)
        out.append(sum(1 for g, a in pairs if g > i and a > i) / tested if tested else float("nan"))
    return out


def accepted_lengths(rows: list[dict], gamma: int) -> list[float]:
    """The fraction of rounds that accepted k draft tokens, k = 0..gamma."""
    counts = np.bincount([a for r in rows for a in r["accepted_per_round"]], minlength=gamma + 1)
    return (counts / max(1, counts.sum())).tolist()


def measure_prompts(s: SpecSetup, profile: LLMProfile, device: torch.device,
                    progress=None) -> tuple[LLMSpecTestResult, list[dict]]:
    """Vanilla and speculative decoding of every prompt: the metrics and the per-prompt rows."""
    spec = profile.llm.spec
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(spec.warmup):
        run_prompt(s, profile, 0, device)
    task = progress.add_task("spec-test", total=len(s.prompts), info="") if progress is not None else None
    rows = []
    for i in range(len(s.prompts)):
        rows.append(run_prompt(s, profile, i, device))
        if progress is not None:
            progress.update(task, advance=1, info=f"accepted {ratios(rows)['mean_accepted']:.2f}/round")
    seconds = s.decoding.timings(s.prompts[0], spec.step_repeats)
    c_hat, v_hat = (seconds[k] / seconds["target_step"] for k in ("draft_step", "verify"))
    metrics = ratios(rows)
    result = LLMSpecTestResult(
        **metrics,
        proposed=sum(r["proposed"] for r in rows), accepted=sum(r["accepted"] for r in rows),
        tv=1 - metrics["overlap"], target_calls_per_token=1 / metrics["tokens_per_target_call"],
        position_acceptance=position_acceptance(rows, spec.gamma),
        accepted_lengths=accepted_lengths(rows, spec.gamma), c_hat=c_hat,
        predicted_speedup=predicted_speedup(metrics["alpha_hat"], spec.gamma, c_hat), v_hat=v_hat,
        predicted_speedup_v=predicted_speedup(metrics["alpha_hat"], spec.gamma, c_hat, v_hat),
        peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        identical_fraction=sum(r["identical"] for r in rows) / len(rows) if s.decoding.sampling.greedy else None,
        ci=bootstrap(rows, spec.bootstrap, spec.ci, profile.seed),
        n_prompts=len(rows), gamma=spec.gamma, exit_layer=s.draft.layer, target_layers=s.lm.n_layers,
        temperature=spec.temperature, top_p=spec.top_p, top_k=spec.top_k, max_new_tokens=spec.max_new_tokens,
        share_cache=spec.share_cache, cuda_graphs=s.decoding.graphed,
        draft=draft_label(profile, s.draft), draft_kind=s.draft.kind, skip_layers=list(s.draft.skip),
        target=s.lm.path,
    )
    if progress is not None:
        progress.remove_task(task)
    return result, rows


def run_llm_spec_test(profile: LLMProfile, device: torch.device, run: RunDir, progress=None,
                      say=None) -> LLMSpecTestResult:
    """Run vanilla and speculative decoding on the profile's prompts; write per_prompt.csv and samples.json."""
    lm = load_target(profile, device)
    s = setup(profile, lm, pick_draft(profile, lm, say))
    result, rows = measure_prompts(s, profile, device, progress)
    scalar = [k for k in rows[0] if not isinstance(rows[0][k], list)]
    write_csv(run.path / "per_prompt.csv", rows, scalar)
    result.samples = [{"prompt": lm.tokenizer.decode(s.prompts[r["prompt"]]),
                       "vanilla": lm.tokenizer.decode(r["vanilla_ids"]),
                       "speculative": lm.tokenizer.decode(r["spec_ids"])} for r in rows[:5]]
    run.write_json("samples.json", result.samples)
    return result
