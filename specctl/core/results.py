"""Results CSVs as data: reading and merging them, and telling what kind of results a file holds.

specctl writes four kinds of results CSV, one row per trial: time-series spec-test sweeps, LLM spec-test sweeps,
pretrain recipe searches (`sweep_command = "pretrain"`) and finetune-head results. A `Kind`, read from the
columns, says what its quality metric is, what ranks it and what a speedup of 1x means; `analyze` and the sweep's
final table work on every one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from specctl.core.errors import SpecctlError
from specctl.core.schema import Profile

TEXT_COLUMNS = ("trial_id", "status", "error")
BASE = ("trial_id", "status")
SPEED_METRICS = ("speedup", "predicted_speedup", "acceptance_rate")
FRONTS = (("acceptance_rate", "mse"), ("speedup", "mse"))  # (maximised, minimised) of time-series sweeps


@dataclass(frozen=True)
class Kind:
    """How to read one kind of results: lower `quality` is better; `speed` ranks by preference (the first column
    present); `outcome` columns are what the decoding produced, which timing cannot change (trials equal on them
    did the same work); `timing_keys` are settings that change timings only."""

    name: str
    needs: tuple[str, ...]
    quality: str
    scenario: str  # what its one recommendation is ("maximise speed", "lowest validation loss")
    shown: tuple[str, ...]
    effects: tuple[str, ...]
    tops: tuple[tuple[str, str], ...]
    fronts: tuple[tuple[str, str], ...] = ()
    speed: tuple[str, ...] = ()
    baseline: str = ""  # what a speedup of 1x is
    keys: tuple[str, ...] = ()  # setting columns that are not profile keys
    outcome: tuple[str, ...] = ()
    timing_keys: tuple[str, ...] = ()


FINETUNE = Kind(
    "finetune-head results", needs=("exit_layer", "head", "val_kl"), quality="val_kl", scenario="closest draft",
    shown=("val_kl", "val_ppl", "val_top1", "val_agreement"), effects=("val_kl", "val_top1", "val_agreement"),
    tops=(("val_kl", "min"), ("val_agreement", "max")), fronts=(("val_agreement", "exit_layer"),),
    keys=("exit_layer", "head"),
)
LLM_SWEEP = Kind(
    "LLM spec-test sweep", needs=("tv", "speedup", "mean_accepted"), quality="tv", scenario="maximise speed",
    shown=("acceptance_rate", "mean_accepted", "tv", "speedup", "speedup_ci_low", "speedup_ci_high",
           "predicted_speedup", "identical_fraction"),
    effects=("acceptance_rate", "mean_accepted", "speedup", "tv"),
    tops=(("speedup", "max"), ("acceptance_rate", "max"), ("tv", "min")),
    fronts=(("speedup", "tv"), ("acceptance_rate", "tv")), speed=SPEED_METRICS, baseline="vanilla decoding",
    outcome=("gamma", "proposed", "accepted", "acceptance_rate", "mean_accepted", "tv", "identical_fraction"),
    timing_keys=("device", "llm.spec.cuda_graphs", "llm.spec.share_cache", "llm.spec.step_repeats"),
)
RECIPE = Kind(
    "pretrain recipe search", needs=("best_val_loss",), quality="best_val_loss", scenario="lowest validation loss",
    shown=("best_val_loss", "epochs", "mse", "mse_sliding"), effects=("best_val_loss", "mse"),
    tops=(("best_val_loss", "min"), ("mse", "min")),
)
TIMESERIES_SWEEP = Kind(
    "time-series spec-test sweep", needs=("acceptance_rate", "mse"), quality="mse", scenario="maximise speed",
    shown=("acceptance_rate", "mean_accepted", "speedup", "predicted_speedup", "mse", "mse_sliding",
           "delta_mse_pct"),
    effects=("acceptance_rate", "mean_accepted", "speedup", "mse"),
    tops=(("acceptance_rate", "max"), ("speedup", "max"), ("mse", "min")), fronts=FRONTS, speed=SPEED_METRICS,
    baseline="target-only decoding",
    outcome=("k", "proposed", "accepted", "acceptance_rate", "mean_accepted", "mse", "fidelity_mse"),
    timing_keys=("device", "spec.batch_size", "spec.dtype", "spec.cuda_graphs", "spec.graph_rounds",
                 "spec.repeats", "spec.warmup"),
)
KINDS = (FINETUNE, LLM_SWEEP, RECIPE, TIMESERIES_SWEEP)  # the first whose columns are all there wins


def has(frame: pd.DataFrame, column: str) -> bool:
    return column in frame and frame[column].notna().any()


def kind_of(frame: pd.DataFrame) -> Kind | None:
    """The kind whose identifying columns are all filled in (finished rows), or None."""
    return next((k for k in KINDS if all(has(frame, c) for c in k.needs)), None)


def row_kinds(frame: pd.DataFrame) -> pd.Series:
    """The kind name of each row (its own filled-in columns), "" for none: CSVs of several kinds merged."""
    names = pd.Series("", index=frame.index)
    for kind in KINDS:
        filled = pd.Series(True, index=frame.index)
        for column in kind.needs:
            filled &= frame[column].notna() if column in frame else False
        names[(names == "") & filled] = kind.name
    return names


def require_kind(frame: pd.DataFrame, source: str) -> Kind:
    """The kind of `frame`'s results, or one line naming the columns of the closest kind that are missing."""
    kind = kind_of(frame)
    if kind is None:
        missing_of = {k.name: [c for c in k.needs if not has(frame, c)] for k in KINDS}
        closest = min(KINDS, key=lambda k: (len(missing_of[k.name]), len(missing_of[k.name]) - len(k.needs)))
        missing = missing_of[closest.name]
        raise SpecctlError(f"{source}: not a results CSV specctl knows: the closest, a {closest.name}, is missing "
                           f"column(s) {', '.join(missing)}")
    return kind


def is_param(column: str) -> bool:
    """Swept keys are dotted profile keys (spec.sigma) or top-level profile fields (seed); metrics never are."""
    return "." in column or column in Profile.model_fields


def read_results(path: Path) -> pd.DataFrame:
    """One results CSV; a file that is not one fails with one line naming what is wrong."""
    try:
        frame = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, "str"))
    except OSError as e:
        raise SpecctlError(f"{path}: cannot read: {e.strerror or e}") from None
    except pd.errors.EmptyDataError:
        raise SpecctlError(f"{path}: empty file, not a results CSV") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SpecctlError(f"{path}: not a readable CSV: {str(e).splitlines()[0]}") from None
    missing = [c for c in BASE if c not in frame.columns]
    if missing:
        raise SpecctlError(f"{path}: not a results CSV: missing column(s) {', '.join(missing)}")
    return frame


def load_results(paths: list[Path]) -> pd.DataFrame:
    """Several CSVs merged: one row per trial id (a finished row wins over a failed one), metrics numeric."""
    if not paths:
        raise SpecctlError("no results CSV given")
    frame = pd.concat([read_results(p) for p in paths], ignore_index=True)
    if frame.empty:
        raise SpecctlError(f"{', '.join(map(str, paths))}: no rows, only a header: no trial has been recorded yet")
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


def finished_or_fail(frame: pd.DataFrame, sources: list[str]) -> pd.DataFrame:
    """The finished trials; none is one line saying so, with the first trial's error (whatever columns exist)."""
    ok = finished(frame)
    if ok.empty:
        errors = frame["error"].dropna() if "error" in frame else pd.Series(dtype=str)
        errors = errors[errors.str.strip() != ""]
        reason = f"; the first error: {errors.iloc[0]}" if len(errors) else ""
        raise SpecctlError(f"no trial finished in {', '.join(sources)} ({len(frame)} failed){reason}")
    return ok


def swept_keys(frame: pd.DataFrame) -> list[str]:
    """Parameter columns that take at least two values."""
    return [c for c in frame.columns if is_param(c) and frame[c].nunique(dropna=True) > 1]


def settings(frame: pd.DataFrame, kind: Kind) -> list[str]:
    """What tells the trials apart: the swept keys, and the kind's own setting columns that vary."""
    own = [c for c in kind.keys if c in frame and frame[c].nunique(dropna=True) > 1]
    return [*own, *swept_keys(frame)]


def metric_columns(frame: pd.DataFrame, kind: Kind | None = None) -> list[str]:
    skip = set(TEXT_COLUMNS) | set(kind.keys if kind else ())
    return [c for c in frame.columns if c not in skip and not is_param(c) and frame[c].notna().any()
            and pd.api.types.is_numeric_dtype(frame[c])]


def shown_columns(frame: pd.DataFrame, kind: Kind) -> list[str]:
    return ["trial_id", *settings(frame, kind), *(m for m in kind.shown if has(frame, m))]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """JSON-ready rows: NaN becomes None, numpy scalars become Python numbers."""
    return [{k: clean(v) for k, v in row.items()} for row in frame.to_dict("records")]


def clean(value: Any) -> Any:
    value = value.item() if isinstance(value, np.generic) else value
    return None if isinstance(value, float) and math.isnan(value) else value


def fmt(value: Any) -> str:
    value = clean(value)
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def setting(key: str, value: Any) -> str:
    """`sigma=0.25`: a swept key's value, short (tables, legends, annotations)."""
    return f"{key.split('.')[-1]}={fmt(value)}"
