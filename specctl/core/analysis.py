"""Sweep results analysis: summary statistics, top configurations, Pareto fronts, the marginal effect of each
swept key, and recommendations for the sweep guide's decision criteria. Pure data in, data out."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specctl.core.errors import SpecctlError
from specctl.core.schema import Profile

TEXT_COLUMNS = ("trial_id", "status", "error")
REQUIRED = ("trial_id", "status", "acceptance_rate", "mse")
KEY_METRICS = ("acceptance_rate", "mean_accepted", "speedup", "mse")
SHOWN_METRICS = ("acceptance_rate", "mean_accepted", "speedup", "predicted_speedup", "best_val_loss", "epochs", "mse",
                 "mse_sliding", "delta_mse_pct")
SPEED_METRICS = ("speedup", "predicted_speedup", "acceptance_rate")
TOPS = {"acceptance_rate": "max", "speedup": "max", "mse": "min", "best_val_loss": "min"}
FRONTS = (("acceptance_rate", "mse"), ("speedup", "mse"))


def is_param(column: str) -> bool:
    """Swept keys are dotted profile keys (spec.sigma) or top-level profile fields (seed); metrics never are."""
    return "." in column or column in Profile.model_fields


def read_results(path: Path, required: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """One results CSV; a file that is not one fails with one line naming what is missing."""
    try:
        frame = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, "str"))
    except OSError as e:
        raise SpecctlError(f"{path}: cannot read: {e.strerror or e}") from None
    except pd.errors.EmptyDataError:
        raise SpecctlError(f"{path}: empty file, not a sweep results CSV") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SpecctlError(f"{path}: not a readable CSV: {str(e).splitlines()[0]}") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise SpecctlError(f"{path}: not a sweep results CSV: missing column(s) {', '.join(missing)}")
    return frame


def load_results(paths: list[Path], required: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """Several CSVs merged: one row per trial id (a finished row wins over a failed one), metrics numeric."""
    if not paths:
        raise SpecctlError("no results CSV given")
    frame = pd.concat([read_results(p, required) for p in paths], ignore_index=True)
    for column in frame.columns:
        if column not in TEXT_COLUMNS and not is_param(column):
            numbers = pd.to_numeric(frame[column], errors="coerce")
            if numbers.notna().sum() == frame[column].notna().sum():  # a text column (e.g. `head`) stays text
                frame[column] = numbers
    order = frame["status"].eq("ok").astype(int)
    frame = frame.loc[order.sort_values(kind="stable").index].drop_duplicates("trial_id", keep="last")
    return frame.sort_index().reset_index(drop=True)


def finished(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"] == "ok"].reset_index(drop=True)


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """Parameter columns that take at least two values."""
    return [c for c in frame.columns if is_param(c) and frame[c].nunique(dropna=True) > 1]


def metric_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in TEXT_COLUMNS and not is_param(c) and frame[c].notna().any()
            and pd.api.types.is_numeric_dtype(frame[c])]


def shown_columns(frame: pd.DataFrame) -> list[str]:
    return ["trial_id", *swept_keys(frame), *(m for m in SHOWN_METRICS if m in metric_columns(frame))]


def summarize(ok: pd.DataFrame) -> pd.DataFrame:
    stats = ok[metric_columns(ok)].agg(["count", "mean", "std", "min", "median", "max"]).T
    return stats.rename_axis("metric").reset_index()


def top(ok: pd.DataFrame, metric: str, n: int) -> pd.DataFrame:
    ranked = ok.dropna(subset=[metric]).sort_values(metric, ascending=TOPS.get(metric) == "min", kind="stable")
    return ranked.head(n)[shown_columns(ok)]


def pareto_front(frame: pd.DataFrame, maximize: str, minimize: str) -> pd.DataFrame:
    """Rows no other row beats on both objectives (at least as good on both, strictly better on one)."""
    points = frame.dropna(subset=[maximize, minimize])
    up, down = points[maximize].to_numpy(float), points[minimize].to_numpy(float)
    as_good = (up[None, :] >= up[:, None]) & (down[None, :] <= down[:, None])
    better = (up[None, :] > up[:, None]) | (down[None, :] < down[:, None])
    dominated = (as_good & better).any(axis=1)
    return points[~dominated].sort_values([minimize, maximize], ascending=[True, False])


def marginal_effects(ok: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of each key metric for each value of each swept key."""
    metrics = [m for m in KEY_METRICS if m in metric_columns(ok)]
    parts = []
    for key in swept_keys(ok):
        grouped = ok.groupby(key, sort=True)[metrics]
        part = grouped.mean().join(grouped.std().add_suffix(" sd")).join(grouped.size().rename("n"))
        parts.append(part.rename_axis("value").reset_index().assign(key=key))
    if not parts:
        return pd.DataFrame(columns=["key", "value", "n"])
    effects = pd.concat(parts, ignore_index=True)
    return effects[["key", "value", "n", *(c for m in metrics for c in (m, f"{m} sd"))]]


@dataclass(frozen=True)
class Criterion:
    """A decision criterion: mse ≤ mse_ratio × mse_target and acceptance_rate ≥ min_acceptance, then fastest."""

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


@dataclass
class Recommendation:
    scenario: str
    rule: str
    ranked_by: str
    feasible: int
    best: dict[str, Any] | None


def speed_metric(frame: pd.DataFrame) -> str | None:
    """Measured speedup if there is one, else the predicted speedup, else the acceptance rate."""
    return next((m for m in SPEED_METRICS if m in frame and frame[m].notna().any()), None)


def rank_metric(frame: pd.DataFrame) -> str | None:
    """What a sweep's best trials are ranked by: speed for spec-test sweeps, validation loss for recipe searches
    (never test MSE: choosing by the test split would make its numbers optimistic)."""
    has_val = "best_val_loss" in frame and frame["best_val_loss"].notna().any()
    return speed_metric(frame) or ("best_val_loss" if has_val else None)


def recommend(ok: pd.DataFrame, criteria: list[Criterion]) -> list[Recommendation]:
    """For each criterion the fastest configuration that meets it (ties: lower mse)."""
    speed = speed_metric(ok) or "acceptance_rate"
    recommendations = []
    for criterion in criteria:
        feasible = ok[criterion.feasible(ok)].sort_values([speed, "mse"], ascending=[False, True], kind="stable")
        best = records(feasible.head(1)[shown_columns(ok)])
        recommendations.append(Recommendation(criterion.scenario, criterion.rule(ok), speed, len(feasible),
                                              best[0] if best else None))
    return recommendations


@dataclass
class Report:
    sources: list[str]
    trials: int
    failed: int
    swept: list[str]
    summary: pd.DataFrame
    top: dict[str, pd.DataFrame]
    pareto: dict[str, pd.DataFrame]
    effects: pd.DataFrame
    recommendations: list[Recommendation]


def analyze(frame: pd.DataFrame, sources: list[str], n: int = 5, criteria: list[Criterion] | None = None) -> Report:
    ok = finished(frame)
    if ok.empty:
        first = frame["error"].dropna()
        reason = f"; first error: {first.iloc[0]}" if len(first) else ""
        raise SpecctlError(f"no finished trial in {', '.join(sources)} ({len(frame)} failed){reason}")
    present = metric_columns(ok)
    return Report(
        sources=sources, trials=len(frame), failed=len(frame) - len(ok), swept=swept_keys(ok),
        summary=summarize(ok),
        top={m: top(ok, m, n) for m in TOPS if m in present},
        pareto={f"{up} vs {down}": pareto_front(ok, up, down)[shown_columns(ok)]
                for up, down in FRONTS if up in present and down in present},
        effects=marginal_effects(ok),
        recommendations=recommend(ok, criteria if criteria is not None else decision_criteria()),
    )


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: NaN becomes None, numpy scalars become Python numbers."""
    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


def clean(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def report_to_dict(report: Report) -> dict[str, Any]:
    return {
        "sources": report.sources, "trials": report.trials, "failed": report.failed, "swept": report.swept,
        "summary": records(report.summary),
        "top": {m: records(f) for m, f in report.top.items()},
        "pareto": {name: records(f) for name, f in report.pareto.items()},
        "effects": records(report.effects),
        "recommendations": [asdict(r) for r in report.recommendations],
    }


def fmt(value: Any) -> str:
    value = clean(value)
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def setting(key: str, value: Any) -> str:
    """`sigma=0.25`: a swept key's value, short (tables, legends, annotations)."""
    return f"{key.split('.')[-1]}={fmt(value)}"
