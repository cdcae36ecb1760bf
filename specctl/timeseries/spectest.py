"""spec-test for time series: the same windows through target-only decoding (KV cache), the reference
sliding-window loop, optionally draft-only, and speculative decoding; quality, acceptance and timing.

Timing (SPEC section 7): every batch is run warm-up + repeats times with the device synchronised around each
call, batch by batch side by side in one process; the median per batch is summed over batches. Decoding is
deterministic given the seeds (counter-based per-series random numbers), so the warm-up call's output is the
one scored.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specctl.timeseries.data import load_series
from specctl.core.errors import SpecctlError
from specctl.timeseries.evaluate import window_starts
from specctl.core.files import write_csv
from specctl.timeseries.forecast import Norm, forecast_cached, forecast_sliding, times_for
from specctl.timeseries.model import Stepper, load_timer
from specctl.timeseries.pretrain import check_lookback
from specctl.timeseries.rng import series_seeds
from specctl.core.runtime import PhaseClock, Timing, time_call
from specctl.core.schema import Profile
from specctl.timeseries.speculative import SpecResult, cache_length, check_pair, speculative_forecast

METRICS = {
    "proposed": "draft tokens proposed (K per round per active series), summed",
    "accepted": "draft tokens accepted, summed",
    "acceptance_rate": "accepted / proposed",
    "alpha_hat": "accepted / evaluated; evaluated = positions tested up to and including the first rejection",
    "mean_accepted": "E[accepted] per round (0..K)",
    "tokens_per_target_call": "tokens emitted / target verification calls (tau; the prefill is not counted)",
    "c_hat": "measured draft one-step time / target one-step time, same batch size",
    "predicted_speedup": "(1 - a^(K+1)) / ((1 - a)(K c + 1)) with a = alpha_hat, c = c_hat",
    "speedup": "target-only KV-cached wall time / speculative wall time (same windows, device, warm, synchronised)",
    "speedup_sliding": "sliding-window recompute wall time / speculative wall time",
    "mse": "speculative forecast vs truth (scaled space)", "mae": "speculative forecast vs truth",
    "mse_target": "target-only KV-cached forecast vs truth", "mae_target": "target-only forecast vs truth",
    "mse_sliding": "sliding-window target forecast vs truth", "mae_sliding": "sliding-window forecast vs truth",
    "delta_mse_pct": "100 (mse - mse_target) / mse_target",
    "fidelity_mse": "MSE between the speculative and the target-only forecast of the same inputs",
    "cap_hits": "exact rule: residual draws that hit the try cap (output then not exactly distributed as p)",
    "breakdown_s": "seconds per phase (prefill of both decoders, draft, verify, accept, overhead) over all batches, "
                   "from a separate pass synchronised at every phase (slower than the timed pass)",
}

SESSION_KEYS = ("seed", "device", "data", "spec.target", "spec.draft", "spec.horizon", "spec.batch_size",
                "spec.max_windows", "spec.repeats", "spec.warmup", "spec.dtype", "spec.draft_only",
                "spec.sliding_baseline")


@dataclass
class Window:
    ids: np.ndarray
    context: torch.Tensor  # [b, L, C]
    truth: torch.Tensor  # [b, H, C]


@dataclass
class Measured:
    forecasts: list[torch.Tensor]
    timings: list[Timing]

    @property
    def seconds(self) -> float:
        return sum(t.median for t in self.timings)


def session_key(profile: Profile) -> str:
    dump = profile.model_dump()
    picked = {}
    for key in SESSION_KEYS:
        node = dump
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return json.dumps(picked, sort_keys=True, default=str)


def measure(fn: Callable[[Window], Any], batches: list[Window], device, repeats: int, warmup: int,
            progress=None, label: str = "") -> tuple[list, list[Timing]]:
    """Run fn on every batch: the first call's output is kept, then the batch is timed (warm-up excluded)."""
    outputs, timings = [], []
    task = progress.add_task(label, total=len(batches), info="") if progress is not None else None
    for batch in batches:
        outputs.append(fn(batch))
        timings.append(time_call(partial(fn, batch), device, repeats, max(0, warmup - 1)))
        if progress is not None:
            progress.update(task, advance=1, info=f"{1e3 * timings[-1].median:.1f} ms/batch")
    if progress is not None:
        progress.remove_task(task)
    return outputs, timings


@torch.no_grad()
def step_time(step: Stepper, context: torch.Tensor, device, repeats: int = 20) -> float:
    """Median time of one cached one-token decode step at this batch size (for c_hat)."""
    tokens = Norm.fit(context, step.model.cfg).tokens(context, step.model.cfg.patch_len)
    B, n0 = tokens.shape[0], tokens.shape[2]
    step(tokens, times_for(B, 0, n0, device))
    one, at = tokens[:, :, -1:], times_for(B, n0, 1, device)
    return time_call(lambda: step(one, at), device, repeats, 3).median


def errors(forecasts: list[torch.Tensor], truths: list[torch.Tensor]) -> tuple[float, float]:
    pred, truth = torch.cat(forecasts).double(), torch.cat(truths).double()
    return float((pred - truth).pow(2).mean()), float((pred - truth).abs().mean())


class SpecTestSession:
    """Loads models and data once and times the baselines once; `run` scores one decoding setting."""

    def __init__(self, profile: Profile, device: torch.device, progress=None) -> None:
        spec = profile.spec
        if not spec.target or not spec.draft:
            raise SpecctlError("spec.target and spec.draft must name checkpoints (folders with model.safetensors)")
        self.profile, self.device, self.key = profile, device, session_key(profile)
        self.target, _ = load_timer(spec.target, device)
        self.draft, _ = load_timer(spec.draft, device)
        lookback = profile.data.lookback
        check_lookback(lookback, self.target.cfg.patch_len, "the target's patch length")
        check_pair(self.target, self.draft, lookback)
        if spec.dtype == "bf16":
            self.target.to(torch.bfloat16), self.draft.to(torch.bfloat16)
        self.horizon = spec.horizon or max(profile.data.horizons)
        data = load_series(profile.data, lookback + self.horizon)
        if data.n_vars != self.target.cfg.n_vars:
            raise SpecctlError(f"data '{profile.data.name}' has {data.n_vars} variables but the checkpoints were "
                               f"trained on {self.target.cfg.n_vars}")
        test = torch.from_numpy(np.ascontiguousarray(data.test, dtype=np.float32)).to(device)
        starts = window_starts(len(test), lookback, self.horizon, spec.max_windows)
        self.batches = [
            Window(chunk, torch.stack([test[s : s + lookback] for s in chunk]),
                   torch.stack([test[s + lookback : s + lookback + self.horizon] for s in chunk]))
            for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / spec.batch_size)))
        ]
        self.truths = [b.truth for b in self.batches]
        self.graphs = spec.cuda_graphs and device.type == "cuda"
        self.steppers: dict[tuple[str, int], Stepper] = {}
        self.round_graphs: dict = {}
        self.progress = progress
        timed = lambda fn, label: Measured(*measure(fn, self.batches, device, spec.repeats, spec.warmup,  # noqa: E731
                                                    progress, label))
        cached = lambda which, b: forecast_cached(  # noqa: E731
            getattr(self, which), b.context, self.horizon, self.stepper(which, len(b.ids), spec.k))
        self.cached = timed(lambda b: cached("target", b), "target (KV cache)")
        self.sliding = (timed(lambda b: forecast_sliding(self.target, b.context, self.horizon), "target (sliding)")
                        if spec.sliding_baseline else None)
        self.draft_alone = timed(lambda b: cached("draft", b), "draft only") if spec.draft_only else None
        first = self.batches[0]
        self.c_hat = (step_time(self.stepper("draft", len(first.ids), spec.k), first.context, device)
                      / step_time(self.stepper("target", len(first.ids), spec.k), first.context, device))

    def stepper(self, which: str, batch: int, k: int) -> Stepper:
        """The model's cache (and CUDA graphs) for this batch size, long enough for speculation length k."""
        model = getattr(self, which)
        patch, lookback = model.cfg.patch_len, self.profile.data.lookback
        step = self.steppers.get((which, batch))
        if step is None or step.max_len < cache_length(lookback, self.horizon, patch, k):
            step = Stepper(model, batch, cache_length(lookback, self.horizon, patch, max(k, 8)), self.graphs)
            self.steppers[which, batch] = step
        return step

    def compatible(self, profile: Profile) -> bool:
        return session_key(profile) == self.key

    def speculate(self, profile: Profile, batch: Window, debug: bool = False, clock: PhaseClock | None = None,
                  rounds: bool = False) -> SpecResult:
        seeds = series_seeds(profile.seed, torch.from_numpy(batch.ids).to(self.device))
        k, B = profile.spec.k, len(batch.ids)
        return speculative_forecast(self.stepper("target", B, k), self.stepper("draft", B, k), batch.context,
                                    self.horizon, profile.spec, seeds, debug, clock,
                                    self.round_graphs if rounds else None)

    def round_graphs_agree(self, profile: Profile) -> bool:
        """Whole-round CUDA graphs are used only if they reproduce eager rounds on the first batch."""
        batch = self.batches[0]
        eager = self.speculate(profile, batch)
        try:
            graphed = self.speculate(profile, batch, rounds=True)
        except RuntimeError as e:
            warnings.warn(f"whole-round CUDA graph capture failed, not used: {e}", stacklevel=2)
            return False
        close = 1e-3 if profile.spec.dtype == "fp32" else 3e-2  # bf16 kernels may round differently in a graph
        agree = torch.equal(eager.accepted, graphed.accepted) and torch.allclose(
            eager.forecast, graphed.forecast, atol=close, rtol=close)
        if not agree:
            warnings.warn("whole-round CUDA graphs differ from eager rounds on the first batch: not used", stacklevel=2)
        return agree

    def run(self, profile: Profile, debug_csv: Path | None = None) -> dict[str, Any]:
        if not self.compatible(profile):
            raise SpecctlError("this trial changes models, data or timing settings: it needs a new session")
        spec = profile.spec
        whole_rounds = spec.graph_rounds and self.graphs and self.round_graphs_agree(profile)
        results, timings = measure(lambda b: self.speculate(profile, b, rounds=whole_rounds), self.batches, self.device,
                                   spec.repeats, spec.warmup, self.progress, "speculative")
        clock = PhaseClock(self.device)
        for batch in self.batches:
            self.speculate(profile, batch, clock=clock)
        if debug_csv is not None:
            rows = [row for batch in self.batches for row in self.speculate(profile, batch, debug=True).debug_rows(
                [int(i) for i in batch.ids])]
            write_csv(debug_csv, rows)
        total = lambda name: int(sum(int(getattr(r, name).sum()) for r in results))  # noqa: E731
        proposed, accepted, evaluated = total("proposed"), total("accepted"), total("evaluated")
        rounds, emitted = total("rounds"), total("emitted")
        alpha = accepted / evaluated if evaluated else 0.0
        K, c = spec.k, self.c_hat
        predicted = (K + 1) / (K * c + 1) if alpha >= 1 else (1 - alpha ** (K + 1)) / ((1 - alpha) * (K * c + 1))
        spec_seconds = sum(t.median for t in timings)
        forecasts = [r.forecast for r in results]
        mse, mae = errors(forecasts, self.truths)
        mse_target, mae_target = errors(self.cached.forecasts, self.truths)
        metrics: dict[str, Any] = {
            "proposed": proposed, "accepted": accepted,
            "acceptance_rate": accepted / proposed if proposed else 0.0,
            "alpha_hat": alpha, "mean_accepted": accepted / rounds if rounds else 0.0,
            "tokens_per_target_call": emitted / rounds if rounds else 0.0,
            "c_hat": c, "predicted_speedup": predicted,
            "speedup": self.cached.seconds / spec_seconds,
            "mse": mse, "mae": mae, "mse_target": mse_target, "mae_target": mae_target,
            "delta_mse_pct": 100 * (mse - mse_target) / mse_target,
            "fidelity_mse": float((torch.cat(forecasts) - torch.cat(self.cached.forecasts)).double().pow(2).mean()),
            "cap_hits": total("cap_hits"),
            "accepted_hist": [int(sum(int(r.accepted_hist[i]) for r in results)) for i in range(K + 1)],
            "windows": int(sum(len(b.ids) for b in self.batches)), "batches": len(self.batches),
            "horizon": self.horizon, "wall_s_spec": spec_seconds, "wall_s_target": self.cached.seconds,
            "batch_ms_spec": [1e3 * t.median for t in timings],
            "batch_ms_spec_spread": [1e3 * (t.high - t.low) for t in timings],
            "breakdown_s": clock.totals, "cuda_graphs": self.graphs, "graph_rounds": whole_rounds,
        }
        if self.sliding is not None:
            metrics["mse_sliding"], metrics["mae_sliding"] = errors(self.sliding.forecasts, self.truths)
            metrics["speedup_sliding"] = self.sliding.seconds / spec_seconds
            metrics["wall_s_sliding"] = self.sliding.seconds
        if self.draft_alone is not None:
            metrics["mse_draft"], metrics["mae_draft"] = errors(self.draft_alone.forecasts, self.truths)
            metrics["wall_s_draft"] = self.draft_alone.seconds
        return metrics


def summary_line(profile: Profile, metrics: dict[str, Any]) -> str:
    s = profile.spec
    return (f"{datetime.now().isoformat(timespec='seconds')} {profile.name} data={profile.data.name} "
            f"H={metrics['horizon']} rule={s.rule} emit={s.emit} k={s.k} sigma={s.sigma} bias={s.bias} tol={s.tol} "
            f"batch={s.batch_size} dtype={s.dtype} acceptance={metrics['acceptance_rate']:.3f} "
            f"mse={metrics['mse']:.4f} mse_target={metrics['mse_target']:.4f} "
            f"delta_mse_pct={metrics['delta_mse_pct']:+.2f} speedup={metrics['speedup']:.2f}x "
            f"predicted={metrics['predicted_speedup']:.2f}x\n")


def append_results_log(path: Path, line: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
