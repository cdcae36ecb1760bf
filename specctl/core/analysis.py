"""Results analysis: summary statistics, top configurations, Pareto fronts, the marginal effect of each setting,
the spread of repeated timings, and recommendations. Works on every results CSV specctl writes (core/results.py
tells them apart). Speed differences inside the timing spread are never ranked: a setting that changed nothing
but the clock is said to be noise, and ties inside the spread are broken by quality. Pure data in, data out."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specctl.core.errors import SpecctlError
from specctl.core.results import (
    TIMESERIES_SWEEP,
    Kind,
    finished_or_fail,
    has,
    kind_of,
    load_results,
    metric_columns,
    read_results,
    records,
    require_kind,
    settings,
    shown_columns,
)


def summarize(ok: pd.DataFrame, kind: Kind) -> pd.DataFrame:
    stats = ok[metric_columns(ok, kind)].agg(["count", "mean", "std", "min", "median", "max"]).T
    return stats.rename_axis("metric").reset_index()


def top(ok: pd.DataFrame, metric: str, n: int, kind: Kind) -> pd.DataFrame:
    ranked = ok.dropna(subset=[metric]).sort_values(metric, ascending=dict(kind.tops).get(metric) == "min",
                                                    kind="stable")
    return ranked.head(n)[shown_columns(ok, kind)]


def pareto_front(frame: pd.DataFrame, maximize: str, minimize: str) -> pd.DataFrame:
    """Rows no other row beats on both objectives (at least as good on both, strictly better on one)."""
    points = frame.dropna(subset=[maximize, minimize])
    up, down = points[maximize].to_numpy(float), points[minimize].to_numpy(float)
    as_good = (up[None, :] >= up[:, None]) & (down[None, :] <= down[:, None])
    better = (up[None, :] > up[:, None]) | (down[None, :] < down[:, None])
    dominated = (as_good & better).any(axis=1)
    return points[~dominated].sort_values([minimize, maximize], ascending=[True, False])


def marginal_effects(ok: pd.DataFrame, kind: Kind) -> pd.DataFrame:
    """Mean and standard deviation of each key metric for each value of each setting that varies."""
    metrics = [m for m in kind.effects if has(ok, m)]
    parts = []
    for key in settings(ok, kind):
        grouped = ok.groupby(key, sort=True)[metrics]
        part = grouped.mean().join(grouped.std().add_suffix(" sd")).join(grouped.size().rename("n"))
        parts.append(part.rename_axis("value").reset_index().assign(key=key))
    if not parts:
        return pd.DataFrame(columns=["key", "value", "n"])
    effects = pd.concat(parts, ignore_index=True)
    return effects[["key", "value", "n", *(c for m in metrics for c in (m, f"{m} sd"))]]


# -- the timing spread ----------------------------------------------------------------------------------------------

@dataclass
class Spread:
    """How far apart timings of the same work lie, relative to the faster: speed differences within `band` are
    not told apart. From each trial's repeated timings (time series: max - min over repeats per batch; LLM: the
    half-width of the speedup's confidence interval) and from trials that did identical work (same outcome)."""

    metric: str | None
    band: float = 0.0
    repeats: float | None = None
    identical: list[list[str]] = field(default_factory=list)
    identical_range: list[float] | None = None  # the widest such group's slowest and fastest speed
    disagree: list[str] = field(default_factory=list)  # trials whose measured and predicted speedup differ > 2x


DISAGREE = 2.0  # measured vs predicted speedup: a larger ratio says the clock was disturbed, not the model wrong


def timing_columns(ok: pd.DataFrame, kind: Kind) -> list[str]:
    """What equal work means: the outcome columns present, plus the settings that change timings only."""
    outcome = [c for c in kind.outcome if c in ok]
    return [*outcome, *(k for k in kind.timing_keys if k in ok)] if outcome else []


def cell_sum(value: Any) -> float:
    """The sum of a list cell (`[1.5, 2.0]`, as the CSV stores lists) or the number itself."""
    if isinstance(value, str):
        return float(np.sum(json.loads(value)))
    return float(value)


def repeat_spread(ok: pd.DataFrame) -> float | None:
    """The median over trials of one trial's own repeat-to-repeat spread, relative to its time."""
    if has(ok, "batch_ms_spec_spread") and has(ok, "batch_ms_spec"):
        rows = ok.dropna(subset=["batch_ms_spec_spread", "batch_ms_spec"])
        spread = [cell_sum(s) / cell_sum(m) for s, m in zip(rows["batch_ms_spec_spread"], rows["batch_ms_spec"])
                  if cell_sum(m) > 0]
        return float(np.median(spread)) if spread else None
    if has(ok, "speedup_ci_low") and has(ok, "speedup_ci_high"):
        half = (ok["speedup_ci_high"] - ok["speedup_ci_low"]) / (2 * ok["speedup"])
        return float(half.median()) if half.notna().any() else None
    return None


def timing_spread(ok: pd.DataFrame, kind: Kind, speed: str | None) -> Spread:
    if speed not in ("speedup", "predicted_speedup"):
        return Spread(speed)  # acceptance rates are counted, not timed
    spread = Spread(speed, repeats=repeat_spread(ok) if speed == "speedup" else None)
    columns = timing_columns(ok, kind)
    widest = 0.0
    for _, rows in (ok.groupby(columns, dropna=False, sort=False) if columns else []):
        times = rows[speed].dropna()
        if len(times) < 2:
            continue
        spread.identical.append(list(rows["trial_id"]))
        width = 1 - times.min() / times.max()
        if width >= widest:
            widest, spread.identical_range = width, [float(times.min()), float(times.max())]
    spread.band = max(widest, spread.repeats or 0.0)
    if speed == "speedup" and has(ok, "predicted_speedup"):
        ratio = ok["speedup"] / ok["predicted_speedup"]
        spread.disagree = list(ok.loc[(ratio > DISAGREE) | (ratio < 1 / DISAGREE), "trial_id"])
    return spread


# -- what each setting changes --------------------------------------------------------------------------------------

@dataclass
class Influence:
    """What varying one setting did: whether any outcome changed (None: no two trials differ in it alone), the
    mean speed at its slowest and fastest value, and whether that difference is inside the timing spread."""

    key: str
    changes_outcome: bool | None
    speed_low: float | None = None
    speed_high: float | None = None
    within_spread: bool = False


def changes_outcome(ok: pd.DataFrame, key: str, others: list[str], outcome: list[str]) -> bool | None:
    """Whether trials that differ only in `key` ever produced different outcomes."""
    compared = False
    for _, rows in (ok.groupby(others, dropna=False, sort=False) if others else [(None, ok)]):
        if rows[key].nunique(dropna=True) < 2:
            continue
        compared = True
        if len(rows[outcome].drop_duplicates()) > 1:
            return True
    return False if compared else None


def influences(ok: pd.DataFrame, kind: Kind, spread: Spread) -> list[Influence]:
    keys, outcome = settings(ok, kind), [c for c in kind.outcome if c in ok]
    if not outcome:
        return []  # results that are not decodings: nothing tells timing noise from an effect
    out = []
    for key in keys:
        influence = Influence(key, changes_outcome(ok, key, [k for k in keys if k != key], outcome))
        if spread.metric in ("speedup", "predicted_speedup"):
            means = ok.groupby(key)[spread.metric].mean()
            influence.speed_low, influence.speed_high = float(means.min()), float(means.max())
            influence.within_spread = bool(1 - means.min() / means.max() <= spread.band)
        out.append(influence)
    return out


# -- recommendations ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Criterion:
    """A decision criterion: mse ≤ mse_ratio × mse_target and acceptance_rate ≥ min_acceptance, then the best."""

    scenario: str
    mse_ratio: float | None = None
    min_acceptance: float | None = None

    def rule(self, ok: pd.DataFrame) -> str:
        parts = []
        if self.mse_ratio is not None:
            targets = ok["mse_target"].dropna().unique() if "mse_target" in ok else []
            bound = f"{self.mse_ratio * targets[0]:.4g} = " if len(targets) == 1 else ""
            parts.append(f"mse ≤ {bound}{self.mse_ratio:g}×target")
        if self.min_acceptance is not None:
            parts.append(f"acceptance ≥ {self.min_acceptance:.0%}")
        return ", ".join(parts) or "no constraint"

    def feasible(self, ok: pd.DataFrame) -> pd.Series:
        mask = pd.Series(True, index=ok.index)
        if self.mse_ratio is not None:
            mask &= ok["mse"] <= self.mse_ratio * ok.get("mse_target", pd.Series(np.nan, index=ok.index))
        if self.min_acceptance is not None:
            mask &= ok["acceptance_rate"] >= self.min_acceptance
        return mask


def decision_criteria(maintain_mse: float = 1.053, maintain_acceptance: float = 0.60,
                      balanced_mse: float = 1.095, balanced_acceptance: float = 0.75) -> list[Criterion]:
    """The sweep guide's table; its MSE bounds (0.50 and 0.52 for a 0.475 baseline) relative to mse_target."""
    return [
        Criterion("maximise speed"),
        Criterion("maintain quality", maintain_mse, maintain_acceptance),
        Criterion("balanced", balanced_mse, balanced_acceptance),
    ]


def criteria_for(kind: Kind, thresholds: tuple[float, ...] = ()) -> list[Criterion]:
    """Time-series sweeps: the sweep guide's three; other kinds: their one scenario, without constraints."""
    return decision_criteria(*thresholds) if kind is TIMESERIES_SWEEP else [Criterion(kind.scenario)]


@dataclass
class Recommendation:
    scenario: str
    rule: str
    ranked_by: str
    feasible: int
    best: dict[str, Any] | None
    tied: int = 0  # configurations within the timing spread of the fastest (the best quality of them is picked)


def speed_metric(frame: pd.DataFrame, kind: Kind) -> str | None:
    """Measured speedup if there is one, else the predicted speedup, else the acceptance rate (kinds that decode)."""
    return next((m for m in kind.speed if has(frame, m)), None)


def rank_metric(frame: pd.DataFrame) -> str | None:
    """What a sweep's best trials are ranked by: speed for spec-test sweeps, validation loss for recipe searches
    (never test MSE: choosing by the test split would make its numbers optimistic)."""
    kind = kind_of(frame)
    return None if kind is None else speed_metric(frame, kind) or kind.quality


def pick(rows: pd.DataFrame, kind: Kind, speed: str | None, band: float) -> tuple[pd.DataFrame, int]:
    """The fastest row, or among those within `band` of it the best quality (then faster); without speed, the
    best quality. Returns it and how many tied."""
    if speed is None:
        return rows.sort_values(kind.quality, kind="stable").head(1), 0
    fastest = rows[speed].max()
    tied = rows[rows[speed] >= fastest * (1 - band)]
    order = tied.sort_values([kind.quality, speed], ascending=[True, False], kind="stable")
    return order.head(1), len(tied) if len(tied) > 1 else 0


def recommend(ok: pd.DataFrame, criteria: list[Criterion], kind: Kind, band: float = 0.0) -> list[Recommendation]:
    """For each criterion the best configuration that meets it (see `pick`)."""
    speed = speed_metric(ok, kind)
    out = []
    for criterion in criteria:
        feasible = ok[criterion.feasible(ok)].dropna(subset=[speed or kind.quality])
        best, tied = pick(feasible, kind, speed, band) if len(feasible) else (feasible, 0)
        chosen = records(best[shown_columns(ok, kind)])
        out.append(Recommendation(criterion.scenario, criterion.rule(ok), speed or kind.quality, len(feasible),
                                  chosen[0] if chosen else None, tied))
    return out


def baseline_verdict(ok: pd.DataFrame, kind: Kind, spread: Spread) -> str | None:
    """Whether any configuration beats the kind's baseline (speedup 1x), beyond the timing spread."""
    speed = spread.metric
    if speed not in ("speedup", "predicted_speedup") or not kind.baseline:
        return None
    what = "measured" if speed == "speedup" else "predicted"
    fastest = float(ok[speed].max())
    if fastest < 1:
        return (f"no configuration beats {kind.baseline}: the fastest {what} speedup is {fastest:.2f}x; "
                f"use {kind.baseline}")
    if fastest * (1 - spread.band) < 1:
        return (f"no configuration beats {kind.baseline} beyond the timing spread: the fastest {what} speedup is "
                f"{fastest:.2f}x, but timings of the same work spread ±{spread.band:.0%}")
    faster = int((ok[speed] * (1 - spread.band) >= 1).sum())
    said = f"{faster} configuration(s) beat {kind.baseline} beyond the timing spread; the fastest: {fastest:.2f}x"
    if spread.disagree:
        said += (f", but {len(spread.disagree)} trial(s) measured over {DISAGREE:g}x away from their predicted "
                 "speedup: re-run on a quiet machine before trusting the timings")
    return said


# -- the report -----------------------------------------------------------------------------------------------------

@dataclass
class Report:
    sources: list[str]
    kind: Kind
    trials: int
    failed: int
    swept: list[str]
    summary: pd.DataFrame
    top: dict[str, pd.DataFrame]
    pareto: dict[str, pd.DataFrame]
    effects: pd.DataFrame
    spread: Spread
    influences: list[Influence]
    verdict: str | None
    recommendations: list[Recommendation]


def load_kind(paths: list[Path]) -> Kind:
    """The one kind of results the files hold (each file's finished rows); a mix is refused."""
    kinds: dict[str, Kind] = {}
    for path in paths:
        frame = read_results(path)
        ok = frame[frame["status"] == "ok"]
        if len(ok):
            kinds[str(path)] = require_kind(ok, str(path))
    if len({k.name for k in kinds.values()}) > 1:
        raise SpecctlError("these CSVs hold different kinds of results (" + "; ".join(
            f"{p}: {k.name}" for p, k in kinds.items()) + "): analyze each kind on its own")
    return next(iter(kinds.values()))


def analyze(frame: pd.DataFrame, sources: list[str], n: int = 5, criteria: list[Criterion] | None = None,
            kind: Kind | None = None) -> Report:
    ok = finished_or_fail(frame, sources)
    kind = kind or require_kind(ok, ", ".join(sources))
    spread = timing_spread(ok, kind, speed_metric(ok, kind))
    return Report(
        sources=sources, kind=kind, trials=len(frame), failed=len(frame) - len(ok), swept=settings(ok, kind),
        summary=summarize(ok, kind),
        top={m: top(ok, m, n, kind) for m, _ in kind.tops if has(ok, m)},
        pareto={f"{up} vs {down}": pareto_front(ok, up, down)[shown_columns(ok, kind)]
                for up, down in kind.fronts if has(ok, up) and has(ok, down)},
        effects=marginal_effects(ok, kind), spread=spread, influences=influences(ok, kind, spread),
        verdict=baseline_verdict(ok, kind, spread),
        recommendations=recommend(ok, criteria if criteria is not None else criteria_for(kind), kind, spread.band),
    )


def analyze_files(paths: list[Path], n: int = 5, thresholds: tuple[float, ...] = ()) -> Report:
    """`specctl analyze`: merge the files, refuse what is not a finished result of one kind, report."""
    sources = [str(p) for p in paths]
    frame = load_results(paths)
    finished_or_fail(frame, sources)
    kind = load_kind(paths)
    return analyze(frame, sources, n, criteria_for(kind, thresholds), kind)


def report_to_dict(report: Report) -> dict[str, Any]:
    return {
        "sources": report.sources, "kind": report.kind.name, "trials": report.trials, "failed": report.failed,
        "swept": report.swept, "summary": records(report.summary),
        "top": {m: records(f) for m, f in report.top.items()},
        "pareto": {name: records(f) for name, f in report.pareto.items()},
        "effects": records(report.effects), "timing_spread": asdict(report.spread),
        "keys": [asdict(i) for i in report.influences], "verdict": report.verdict,
        "recommendations": [asdict(r) for r in report.recommendations],
    }
