"""What a time-series spec-test reports: the result of one setting, the fidelity budget's choice, the definition of
every metric (written beside them in metrics.json), and its line in the results log."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from specctl.core.files import append_line
from specctl.timeseries.profile import TimeseriesProfile

METRICS = {
    "proposed": "draft tokens proposed (K per round per active series), summed",
    "accepted": "draft tokens accepted, summed",
    "acceptance_rate": "accepted / proposed",
    "alpha_hat": "accepted / evaluated; evaluated = positions tested up to and including the first rejection",
    "mean_accepted": "E[accepted] per round (0..K)",
    "tokens_per_target_call": "tokens emitted inside the horizon / target verification calls (tau; the prefill is "
                              "not counted)",
    "c_hat": "measured draft one-step time / target one-step time, same batch size",
    "v_hat": "measured verification-call time (W + K tokens) / target one-step time, same batch size",
    "o_hat": "measured round time / target one-step time - K c_hat - v_hat: acceptance and bookkeeping per round",
    "adaptive_k": "each round drafted the k in 0..K that finishes the forecast soonest at the measured round costs "
                  "(0: a plain target step)",
    "adaptive_drafted": "adaptive K: forecasts (batches) that drafted, the validation windows' included (its prior)",
    "adaptive_drafted_ms": "adaptive K: the mean cost of a forecast that drafted, its rounds priced at the measured "
                           "round costs, beyond the prefill",
    "adaptive_drafted_bound_ms": "adaptive K: adaptive_drafted_ms's upper bound at 97.5% (Student's t); above "
                                 "adaptive_target_ms (after forecasts of 32 series or more), no forecast drafts",
    "adaptive_target_ms": "adaptive K: the target's own whole forecast, beyond the speculative prefill",
    "target_opens": "the target's prefill emitted each forecast's first token, and rounds drafted from the second",
    "k_rounds": "rounds per draft length k, all batches (adaptive K's schedule; one entry, K, otherwise)",
    "round_ms": "measured ms of one later round per draft length k (re-feeding what the previous round of k needs)",
    "first_round_ms": "measured ms of a forecast's first round per draft length k (re-feeding one token)",
    "predicted_speedup": "predicted target-only / speculative wall time of the whole run from the measured "
                         "per-call costs: prefills, the rounds the run took (per k) at the measured round time, each "
                         "batch's first round at its own, and target-only's steps at the measured step time "
                         "(costs.py); it checks the cost model, the acceptance is the run's",
    "predicted_speedup_leviathan": "(1 - a^(K+1)) / ((1 - a)(K c + 1)) with a = alpha_hat, c = c_hat (Leviathan et "
                                   "al.; a^K fewer tokens per round without the bonus token, emit = draft_mean)",
    "speedup": "target-only KV-cached wall time / speculative wall time (same windows, device, warm, synchronised; "
               "the target timed on each batch interleaved with the speculative pass, each first in turn)",
    "speedup_target_self": "the target's forecast timed against itself as `speedup` times a setting against it (same "
                           "batches, repeats and interleaving): the ratio that identical calls measure, its noise",
    "speedup_draft": "target-only KV-cached wall time / the draft's own KV-cached forecast's wall time (both timed "
                     "side by side when the session starts)",
    "speedup_sliding": "sliding-window recompute wall time / speculative wall time",
    "mse": "speculative forecast vs truth (scaled space)", "mae": "speculative forecast vs truth",
    "mse_target": "target-only KV-cached forecast vs truth", "mae_target": "target-only forecast vs truth",
    "mse_draft": "the draft's own KV-cached forecast vs truth", "mae_draft": "the draft's forecast vs truth",
    "mse_sliding": "sliding-window target forecast vs truth", "mae_sliding": "sliding-window forecast vs truth",
    "delta_mse_pct": "100 (mse - mse_target) / mse_target",
    "delta_mse_pct_draft": "100 (mse_draft - mse_target) / mse_target",
    "fidelity_mse": "MSE between the speculative and the target-only forecast of the same inputs",
    "cap_hits": "exact rule: residual draws that hit the try cap (output then not exactly distributed as p)",
    "target_step_ms": "one cached one-token target call at the first batch's size (median)",
    "tol": "the tolerance rule's threshold on a token's RMSE, in tol_units",
    "tol_units": "data: the dataset's scaled units; window: each window's own (values over its context's std)",
    "tol_relative": "tol / the target's own per-token RMSE to the truth on validation windows (in tol_units)",
    "target_rmse_val": "the target's per-token RMSE to the truth on validation windows (sqrt of its MSE there; in "
                       "tol_units)",
    "draft_rmse_by_step": "per step of the horizon, the RMSE (tol_units, per value, over the test windows) between "
                          "the draft's and the target's next token, both given the target's own forecast so far: what "
                          "the tolerance rule tests at that step when every earlier token was accepted",
    "split": "the split protocol the windows come from",
    "budget": "spec.fidelity_budget: the tolerance (relative) and k chosen on validation windows as the fastest "
              "predicted setting whose validation MSE is within the budget of the target's (k 0, the target alone, "
              "when none is predicted to beat it), and its validation scores",
    "breakdown_s": "seconds per phase (prefill of both decoders, draft, verify, accept, overhead) over all batches, "
                   "from a separate pass synchronised at every phase (slower than the timed pass)",
}


@dataclass
class SpecTestResult:
    """One spec-test setting: acceptance, quality against the truth and the baselines, speed and its prediction."""

    definitions: ClassVar[dict[str, str]] = METRICS

    rule: str
    emit: str
    k: int
    proposed: int
    accepted: int
    acceptance_rate: float
    alpha_hat: float
    mean_accepted: float
    tokens_per_target_call: float
    c_hat: float
    v_hat: float
    o_hat: float
    predicted_speedup: float
    predicted_speedup_leviathan: float
    speedup: float
    speedup_draft: float
    mse: float
    mae: float
    mse_target: float
    mae_target: float
    mse_draft: float
    mae_draft: float
    delta_mse_pct: float
    delta_mse_pct_draft: float
    fidelity_mse: float
    cap_hits: int
    accepted_hist: list[int]
    windows: int
    batches: int
    horizon: int
    wall_s_spec: float
    wall_s_target: float
    wall_s_draft: float
    target_step_ms: float
    batch_ms_spec: list[float]
    batch_ms_spec_spread: list[float]
    breakdown_s: dict[str, float]
    cuda_graphs: bool
    graph_rounds: bool
    split: str
    device: str = "cpu"
    speedup_target_self: float | None = None
    adaptive_k: bool = False
    adaptive_drafted: int | None = None
    adaptive_drafted_ms: float | None = None
    adaptive_drafted_bound_ms: float | None = None
    adaptive_target_ms: float | None = None
    target_opens: bool = False
    k_rounds: dict[int, int] = field(default_factory=dict)
    round_ms: dict[int, float] = field(default_factory=dict)
    first_round_ms: dict[int, float] = field(default_factory=dict)
    budget: BudgetChoice | None = None
    tol: float | None = None
    tol_relative: float | None = None
    tol_units: str | None = None
    target_rmse_val: float | None = None
    draft_rmse_by_step: list[float] = field(default_factory=list)
    mse_sliding: float | None = None
    mae_sliding: float | None = None
    speedup_sliding: float | None = None
    wall_s_sliding: float | None = None
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class BudgetChoice:
    """What spec.fidelity_budget chose on validation windows, and how it scored there."""

    budget: float
    tol_relative: float
    k: int
    val_delta_mse_pct: float
    val_acceptance_rate: float
    val_predicted_speedup: float
    candidates: int
    within_budget: int


def summary_line(profile: TimeseriesProfile, result: SpecTestResult) -> str:
    s = profile.spec
    return (f"{datetime.now().isoformat(timespec='seconds')} {profile.name} data={profile.data.name} "
            f"H={result.horizon} rule={s.rule} emit={s.emit} k={s.k} sigma={s.sigma} bias={s.bias} tol={s.tol} "
            f"batch={s.batch_size} dtype={s.dtype} acceptance={result.acceptance_rate:.3f} "
            f"mse={result.mse:.4f} mse_target={result.mse_target:.4f} mse_draft={result.mse_draft:.4f} "
            f"delta_mse_pct={result.delta_mse_pct:+.2f} speedup={result.speedup:.2f}x "
            f"speedup_draft={result.speedup_draft:.2f}x predicted={result.predicted_speedup:.2f}x\n")


def append_results_log(path: Path, line: str) -> None:
    append_line(path, line)
