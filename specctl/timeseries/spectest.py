"""spec-test for time series: the same windows through target-only decoding (KV cache), the draft alone, the
reference sliding-window loop and speculative decoding; quality, acceptance, timing (timing.py), and a prediction
of the speedup from measured per-call costs (costs.py) that is checked against the measured one.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from specctl.core.errors import SpecctlError
from specctl.core.files import write_csv
from specctl.core.runtime import PhaseClock, Timing
from specctl.timeseries.costs import AdaptiveK, StepCosts, adaptive_k, k_rounds_of, leviathan_speedup, predict
from specctl.timeseries.data import describe_split, load_series
from specctl.timeseries.early_exit import draft_stepper, load_draft
from specctl.timeseries.evaluate import errors, window_starts
from specctl.timeseries.forecast import Norm, forecast_cached, forecast_sliding, n_tokens, step_distances
from specctl.timeseries.model import Stepper, load_timer
from specctl.timeseries.profile import TimeseriesProfile
from specctl.timeseries.rng import series_seeds
from specctl.timeseries.spec_result import SpecTestResult
from specctl.timeseries.speculative import SpecResult, cache_length, check_pair, refeed_width
from specctl.timeseries.speculative_forecast import (
    opening_seconds,
    prefilled,
    round_seconds,
    speculative_forecast,
    steppers,
)
from specctl.timeseries.timing import Measured, call_seconds, prefill_seconds, time_batches
from specctl.timeseries.training import check_lookback

SESSION_KEYS = ("seed", "device", "data", "spec.target", "spec.draft", "spec.horizon", "spec.batch_size",
                "spec.max_windows", "spec.repeats", "spec.warmup", "spec.dtype", "spec.sliding_baseline")


@dataclass
class Window:
    ids: np.ndarray
    context: torch.Tensor  # [b, L, C]
    truth: torch.Tensor  # [b, H, C]


def session_key(profile: TimeseriesProfile) -> str:
    dump = profile.model_dump()
    picked = {}
    for key in SESSION_KEYS:
        node = dump
        for part in key.split("."):
            node = node[part]
        picked[key] = node
    return json.dumps(picked, sort_keys=True, default=str)


def make_batches(series: torch.Tensor, lookback: int, horizon: int, batch_size: int,
                 max_windows: int | None) -> list[Window]:
    starts = window_starts(len(series), lookback, horizon, max_windows)
    return [
        Window(chunk, torch.stack([series[s : s + lookback] for s in chunk]),
               torch.stack([series[s + lookback : s + lookback + horizon] for s in chunk]))
        for chunk in np.array_split(starts, max(1, math.ceil(len(starts) / batch_size)))
    ]


class SpecTestSession:
    """Loads models and data once and times the baselines once; `run` scores one decoding setting."""

    def __init__(self, profile: TimeseriesProfile, device: torch.device, progress=None) -> None:
        spec = profile.spec
        if not spec.target or not spec.draft:
            raise SpecctlError("spec.target and spec.draft must name checkpoints (folders with model.safetensors)")
        self.profile, self.device, self.key, self.progress = profile, device, session_key(profile), progress
        self.target, _ = load_timer(spec.target, device)
        self.draft = load_draft(spec.draft, self.target, spec.target, device)
        lookback = profile.data.lookback
        check_lookback(lookback, self.target.cfg.patch_len, "the target's patch length")
        check_pair(self.target, self.draft, lookback)
        if spec.dtype == "bf16":
            self.target.to(torch.bfloat16), self.draft.to(torch.bfloat16)
        self.horizon = spec.horizon or max(profile.data.horizons)
        self.steps = n_tokens(self.horizon, self.target.cfg.patch_len)  # tokens per forecast
        data = load_series(profile.data, lookback + self.horizon, splits=("test",), horizon=self.horizon)
        if data.n_vars != self.target.cfg.n_vars:
            raise SpecctlError(f"data '{profile.data.name}' has {data.n_vars} variables but the checkpoints were "
                               f"trained on {self.target.cfg.n_vars}")
        self.data, self.notes, self.split = data, list(data.notes), describe_split(data)
        test = torch.from_numpy(np.ascontiguousarray(data.test, dtype=np.float32)).to(device)
        self.batches = make_batches(test, lookback, self.horizon, spec.batch_size, spec.max_windows)
        self.truths = [b.truth for b in self.batches]
        self.graphs = spec.cuda_graphs and device.type == "cuda"
        self.pairs: dict[tuple[int, int], tuple[Stepper, Stepper]] = {}  # (batch, k) -> (target, draft)
        self.round_graphs: dict = {}
        self.series_seeds: dict[tuple[int, bytes], torch.Tensor] = {}
        # the target timed against itself as a setting is timed against it: what a ratio of 1 measures as (noise)
        self.cached = self.timed(lambda b: self.forecast("target", b), "target (KV cache)", against_itself=True)
        self.draft_alone = self.timed(lambda b: self.forecast("draft", b), "draft only")
        self.draft_rmse: dict[str, list[float]] = {}
        self.sliding = (self.timed(lambda b: forecast_sliding(self.target, b.context, self.horizon),
                                   "target (sliding)") if spec.sliding_baseline else None)
        self.base_costs = self.step_costs()
        self.val_batches: list[Window] | None = None
        self.target_val: list[torch.Tensor] | None = None

    def timed(self, fn: Callable[[Window], torch.Tensor], label: str, against_itself: bool = False) -> Measured:
        spec = self.profile.spec
        outputs, timings, again = time_batches(fn, self.batches, self.device, spec.repeats, spec.warmup, self.progress,
                                               label, beside=fn if against_itself else None)
        return Measured(outputs, timings, again)

    def forecast(self, which: str, batch: Window) -> torch.Tensor:
        pair = self.pair(len(batch.ids), self.profile.spec.k)
        return forecast_cached(getattr(self, which), batch.context, self.horizon, pair[which == "draft"])

    def pair(self, batch: int, k: int) -> tuple[Stepper, Stepper]:
        """The target's and the draft's caches (and CUDA graphs) for this batch size, long enough for speculation
        length k, made and checked once: a forecast looks them up before its first launch, and at batch 32 on an H200
        its host work is part of its time (the fallback's look-ups and checks cost 34-55 us of a 9 ms forecast). The
        draft's sits beside the target's (on it, for an early exit: early_exit.draft_stepper)."""
        if (batch, k) not in self.pairs:
            lookback, patch = self.profile.data.lookback, self.target.cfg.patch_len
            need = cache_length(lookback, self.horizon, patch, k)
            fits = [p for (b, _), p in self.pairs.items() if b == batch and p[0].max_len >= need]
            if fits:
                self.pairs[batch, k] = fits[0]
            else:
                tstep = Stepper(self.target, batch, cache_length(lookback, self.horizon, patch, max(k, 8)), self.graphs)
                dstep = draft_stepper(self.draft, tstep, self.graphs)
                self.pairs[batch, k] = steppers(tstep, dstep, batch, lookback, self.horizon, k)
        return self.pairs[batch, k]

    def step_costs(self) -> dict[str, float]:
        """The setting-independent costs at the first batch's size: steps and prefills."""
        first, k = self.batches[0], self.profile.spec.k
        B, n0 = len(first.ids), self.profile.data.lookback // self.target.cfg.patch_len
        tstep, dstep = self.pair(B, k)
        return {"target_step": call_seconds(tstep, first.context, 1, self.device),
                "draft_step": call_seconds(dstep, first.context, 1, self.device),
                "target_forecast": self.cached.timings[0].median,
                "prefill_spec": prefill_seconds(prefilled(tstep, dstep), first.context, n0 - 1, self.device)}

    def compatible(self, profile: TimeseriesProfile) -> bool:
        return session_key(profile) == self.key

    def validation_batches(self) -> list[Window]:
        """Windows of the validation split (at most spec.max_windows, else 256), for choices made before the test
        split is looked at; [] when the split holds none."""
        if self.val_batches is None:
            spec, lookback = self.profile.spec, self.profile.data.lookback
            val = torch.from_numpy(np.ascontiguousarray(self.data.val, dtype=np.float32)).to(self.device)
            enough = len(val) >= lookback + self.horizon
            self.val_batches = make_batches(val, lookback, self.horizon, spec.batch_size,
                                            spec.max_windows or 256) if enough else []
        return self.val_batches

    def decode_validation(self, profile: TimeseriesProfile, policy: AdaptiveK | None,
                          rounds: bool = False) -> list[SpecResult]:
        """Every validation batch decoded as the test split will be, adaptive K learning from batch to batch."""
        results = []
        for batch in self.validation_batches():
            results.append(self.speculate(profile, batch, rounds=rounds, policy=policy))
            if policy is not None:
                policy.learn(results[-1])
        return results

    def validation_forecasts(self) -> list[torch.Tensor]:
        """The target's own forecasts of the validation windows (made once)."""
        if self.target_val is None:
            self.target_val = [self.forecast("target", b) for b in self.validation_batches()]
        return self.target_val

    def validation_mse(self, units: str = "data") -> float | None:
        """The target's MSE to the truth on the validation windows, in the tolerance's units (spec.tol_units: the
        data's, or each window's own, over its context's std); None when the val split holds none."""
        batches = self.validation_batches()
        if not batches:
            return None
        scales = [Norm.fit(b.context, self.target.cfg).std if units == "window" else 1.0 for b in batches]
        mse, _ = errors([f / s for f, s in zip(self.validation_forecasts(), scales)],
                        [b.truth / s for b, s in zip(batches, scales)])
        return mse

    def validation_rmse(self, units: str = "data") -> float | None:
        """The target's per-token RMSE to the truth on validation windows, in the tolerance's units: what
        spec.tol_relative is relative to."""
        mse = self.validation_mse(units)
        return None if mse is None else math.sqrt(mse)

    def draft_rmse_by_step(self, units: str) -> list[float]:
        """Per step of the horizon, the draft's RMSE to the target along the target's forecast on the test windows,
        in the tolerance's units (forecast.step_distances)."""
        if units not in self.draft_rmse:
            squares = sum(step_distances(self.target, self.draft, b.context, self.steps, units) for b in self.batches)
            self.draft_rmse[units] = (squares / sum(len(b.ids) for b in self.batches)).sqrt().tolist()
        return self.draft_rmse[units]

    def resolve_tolerance(self, profile: TimeseriesProfile) -> TimeseriesProfile:
        """With spec.tol_relative, the profile whose spec.tol is that share of the target's validation RMSE."""
        spec = profile.spec
        if spec.rule != "tolerance" or spec.tol_relative is None:
            return profile
        rmse = self.validation_rmse(spec.tol_units)
        if rmse is None:
            need = self.profile.data.lookback + self.horizon
            raise SpecctlError(f"spec.tol_relative needs validation windows, but the val split has "
                               f"{len(self.data.val)} rows, fewer than data.lookback + horizon = {need}; set spec.tol "
                               "(scaled units) instead")
        return profile.model_copy(update={"spec": spec.model_copy(update={"tol": spec.tol_relative * rmse})})

    def seeds(self, profile: TimeseriesProfile, batch: Window) -> torch.Tensor:
        """The batch's series seeds, made once (an input of the forecast, like its context: ~25 small ops and a copy
        to the device that a timed forecast should not pay)."""
        key = (profile.seed, batch.ids.tobytes())
        if key not in self.series_seeds:
            self.series_seeds[key] = series_seeds(profile.seed, torch.from_numpy(batch.ids).to(self.device))
        return self.series_seeds[key]

    def speculate(self, profile: TimeseriesProfile, batch: Window, debug: bool = False,
                  clock: PhaseClock | None = None, rounds: bool = False, policy: AdaptiveK | None = None) -> SpecResult:
        return speculative_forecast(*self.pair(len(batch.ids), profile.spec.k), batch.context,
                                    self.horizon, profile.spec, self.seeds(profile, batch), debug, clock,
                                    self.round_graphs if rounds else None, policy)

    def round_graphs_agree(self, profile: TimeseriesProfile) -> bool:
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

    def whole_rounds(self, profile: TimeseriesProfile) -> bool:
        """Whether this setting's rounds run as whole-round CUDA graphs (asked for, on CUDA, and reproducing eager)."""
        return bool(profile.spec.graph_rounds and self.graphs and self.round_graphs_agree(profile))

    def costs(self, profile: TimeseriesProfile, whole_rounds: bool, batch: Window | None = None) -> StepCosts:
        """Per-call costs of this setting at the size of `batch` (default: the first test batch): the rounds of each
        draft length it may use, as the timed pass runs them, and a forecast's first round at the length it opens
        with."""
        spec, batch = profile.spec, batch or self.batches[0]
        B = len(batch.ids)
        tstep, dstep = self.pair(B, spec.k)
        graphs = self.round_graphs if whole_rounds else None
        verify, rounds, first = {}, {}, {}
        args = (tstep, dstep, batch.context, self.horizon, spec, self.seeds(profile, batch), graphs,
                max(5, spec.repeats))
        # adaptive K decides before every later round (at batch 32-256 on an H200, leaving that out of the round's
        # cost made the prediction 9-14% high): a stand-in policy makes the same decision's calls
        uniform = dict.fromkeys(range(spec.k + 1), 1.0)
        decide = adaptive_k(uniform, uniform, spec, self.steps)
        for k in range(spec.k + 1) if spec.adaptive_k else [spec.k]:
            w = refeed_width(spec, k, k)  # in steady state a round of k follows one of k
            verify[k] = call_seconds(tstep, batch.context, w + k, self.device)
            rounds[k] = round_seconds(*args, k, w, decide)
            # a forecast's opening, what it adds to the prefill's calls; an opening of k = 0 is a whole forecast
            prefill = self.base_costs["prefill_spec"]
            if k == 0 and spec.emit != "sample":  # the target's own loop, timed when the session started
                first[0] = max(0.0, self.base_costs["target_forecast"] - prefill)
            else:  # timed whole (one replay where graphed); k = 0 (samples): then target steps to the end
                first[k] = max(0.0, opening_seconds(*args, k) - prefill)
                first[k] += (self.steps - 1 - spec.target_opens) * rounds[0] if k == 0 else 0.0
        return StepCosts(verify=verify, round=rounds, first=first, **self.base_costs)

    def run(self, profile: TimeseriesProfile, debug_csv: Path | None = None) -> SpecTestResult:
        if not self.compatible(profile):
            raise SpecctlError("this trial changes models, data or timing settings: it needs a new session")
        budget = None
        if profile.spec.fidelity_budget is not None:
            from specctl.timeseries.budget import choose_within_budget

            profile, budget = choose_within_budget(self, profile)
        profile = self.resolve_tolerance(profile)
        spec = profile.spec
        whole_rounds = self.whole_rounds(profile)
        costs = self.costs(profile, whole_rounds)
        policy = adaptive_k(costs.round, costs.first, spec, self.steps)
        if policy is not None:  # its prior: the validation windows (at batch 256 on an H200, learning from a prior
            # of one passing test took 5 of 9 test batches, at 0.4-0.6x, to fall back to the target)
            self.decode_validation(profile, policy, whole_rounds)
        learn = policy.learn if policy else None
        results, timings, target_timings = time_batches(
            lambda b: self.speculate(profile, b, rounds=whole_rounds, policy=policy), self.batches, self.device,
            spec.repeats, spec.warmup, self.progress, "speculative", after=learn,
            beside=lambda b: self.forecast("target", b))
        clock = PhaseClock(self.device)
        for batch in self.batches:
            self.speculate(profile, batch, clock=clock, policy=policy)
        if debug_csv is not None:
            rows = [row for batch in self.batches for row in self.speculate(
                profile, batch, debug=True, policy=policy).debug_rows([int(i) for i in batch.ids])]
            write_csv(debug_csv, rows)
        target_seconds = sum(t.median for t in target_timings)
        result = self.score(profile, results, timings, target_seconds, clock, whole_rounds, costs)
        result.budget = budget
        if policy is not None and policy.whole is not None:
            drafted, bound = policy.drafted_mean(), policy.drafted_bound()
            result.adaptive_drafted, result.adaptive_target_ms = policy.drafted, 1e3 * policy.whole
            result.adaptive_drafted_ms = None if drafted is None else 1e3 * drafted
            result.adaptive_drafted_bound_ms = None if bound is None else 1e3 * bound
        return result

    def score(self, profile: TimeseriesProfile, results: list[SpecResult], timings: list[Timing],
              target_seconds: float, clock: PhaseClock, whole_rounds: bool, costs: StepCosts) -> SpecTestResult:
        spec, K = profile.spec, profile.spec.k
        total = lambda name: int(sum(int(getattr(r, name).sum()) for r in results))  # noqa: E731
        proposed, accepted, evaluated = total("proposed"), total("accepted"), total("evaluated")
        rounds, emitted = total("rounds"), total("emitted")
        alpha = accepted / evaluated if evaluated else 0.0
        bonus = spec.emit != "draft_mean"
        k_rounds = k_rounds_of(results, K)
        predicted = predict(costs, results)
        spec_seconds = sum(t.median for t in timings)
        forecasts = [r.forecast for r in results]
        mse, mae = errors(forecasts, self.truths)
        mse_target, mae_target = errors(self.cached.forecasts, self.truths)
        mse_draft, mae_draft = errors(self.draft_alone.forecasts, self.truths)
        sliding = self.sliding
        mse_sliding, mae_sliding = errors(sliding.forecasts, self.truths) if sliding else (None, None)
        rmse_val = self.validation_rmse(spec.tol_units) if spec.rule == "tolerance" else None
        return SpecTestResult(
            rule=spec.rule, emit=spec.emit, k=K, proposed=proposed, accepted=accepted,
            acceptance_rate=accepted / proposed if proposed else 0.0,
            alpha_hat=alpha, mean_accepted=accepted / rounds if rounds else 0.0,
            tokens_per_target_call=emitted / rounds if rounds else 0.0,
            c_hat=costs.c_hat, v_hat=costs.v_hat(K), o_hat=costs.o_hat(K), adaptive_k=spec.adaptive_k,
            target_opens=spec.target_opens,
            k_rounds=k_rounds, round_ms={k: 1e3 * t for k, t in costs.round.items()},
            first_round_ms={k: 1e3 * t for k, t in costs.first.items()}, predicted_speedup=predicted.speedup,
            predicted_speedup_leviathan=leviathan_speedup(alpha, K, costs.c_hat, bonus),
            speedup=target_seconds / spec_seconds, speedup_target_self=self.cached.against_itself,
            speedup_draft=self.cached.seconds / self.draft_alone.seconds,
            mse=mse, mae=mae, mse_target=mse_target, mae_target=mae_target, mse_draft=mse_draft, mae_draft=mae_draft,
            delta_mse_pct=100 * (mse - mse_target) / mse_target,
            delta_mse_pct_draft=100 * (mse_draft - mse_target) / mse_target,
            fidelity_mse=float((torch.cat(forecasts) - torch.cat(self.cached.forecasts)).double().pow(2).mean()),
            cap_hits=total("cap_hits"),
            accepted_hist=[int(sum(int(r.accepted_hist[i]) for r in results)) for i in range(K + 1)],
            windows=int(sum(len(b.ids) for b in self.batches)), batches=len(self.batches), horizon=self.horizon,
            wall_s_spec=spec_seconds, wall_s_target=target_seconds, wall_s_draft=self.draft_alone.seconds,
            target_step_ms=1e3 * costs.target_step,
            batch_ms_spec=[1e3 * t.median for t in timings],
            batch_ms_spec_spread=[1e3 * (t.high - t.low) for t in timings],
            breakdown_s=clock.totals, cuda_graphs=self.graphs, graph_rounds=whole_rounds, split=self.split,
            device=self.device.type,
            tol=spec.tol if spec.rule == "tolerance" else None,
            tol_relative=spec.tol / rmse_val if rmse_val and spec.rule == "tolerance" else None,
            target_rmse_val=rmse_val, draft_rmse_by_step=self.draft_rmse_by_step(spec.tol_units),
            tol_units=spec.tol_units if spec.rule == "tolerance" else None,
            mse_sliding=mse_sliding, mae_sliding=mae_sliding,
            # sliding vs target (side by side at the session's start) times target vs speculative (side by side now)
            speedup_sliding=sliding.seconds / self.cached.seconds * target_seconds / spec_seconds if sliding else None,
            wall_s_sliding=sliding.seconds if sliding else None, notes=self.notes,
        )
