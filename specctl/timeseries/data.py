"""Time-series data: find a file, read it, fill missing values, split by time, scale, cut windows.

Splits follow the reference benchmark code (Time-Series-Library `Dataset_ETT_hour`, `Dataset_ETT_minute`,
`Dataset_Custom`) so that metrics are comparable with published numbers: ETTh* and ETTm* use fixed row
borders (12/4/4 months; the rest of the file is unused), everything else 70/10/20 by time. The val and test
splits start `lookback` rows early, so their first window's context lies in the previous split and every
target row of a split is its own. A StandardScaler (ddof 0, like sklearn) is fitted on the train rows only.

Formats, chosen by file suffix:
  .csv  first column a date (dropped), then numeric variables (ETT, weather, ...)
  .txt  header-less, comma-separated, all columns numeric (Solar)
  .npz  a `data` array [time, nodes, features]; feature 0 is used -> [time, nodes] (PEMS)

Missing values (NaN, or a value equal to one of `data.sentinels`, by default -9999 as in weather.csv) are
never passed on silently. With `data.missing = "interpolate"` (default) they are replaced by linear
interpolation along time within their column (leading/trailing gaps take the nearest valid value) and a
note records the count per column; with `"error"` loading stops, naming the file, columns and counts.
A column with no valid value at all is an error either way. Interpolation runs over the whole series
before splitting, so a gap on a split border borrows one neighbour from the next split; with 81 of
~1.1M values in weather.csv this is negligible, and it is the price of never dropping rows (which would
shift the reference split borders).

More training data (`data.extra_train`): the train splits of other files, each scaled by its own
train-fitted scaler, optionally cut into phases (`every`), are added to the training windows only; the
validation and test splits are always the main dataset's.

The embedded synthetic generator (`data.name = "synthetic"`, the default) needs no files: a deterministic
sum of seasonalities, a trend, a lagged coupling between variables and noise, split 70/10/20.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from specctl.core.data_dir import ENV_DATA_DIR, data_dir
from specctl.core.errors import SpecctlError
from specctl.timeseries.profile import DataConfig, SyntheticConfig

SPLITS = ("train", "val", "test")


_ETT_H = (12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)  # 8640, 11520, 14400
_ETT_M = tuple(4 * e for e in _ETT_H)  # 34560, 46080, 57600

# split protocols: fixed end rows of train/val/test, or None for 70/10/20 by time
SPLIT_ENDS: dict[str, tuple[int, int, int] | None] = {
    "ett-hourly": _ETT_H, "ett-15min": _ETT_M, "ratio-70-10-20": None,
}
SPLIT_TEXT = {"ett-hourly": "ETT hourly borders (12/4/4 months)", "ett-15min": "ETT 15-minute borders (12/4/4 months)",
              "ratio-70-10-20": "70/10/20 by time"}
KNOWN_FILES = {"ETTh1": "ETTh1.csv", "ETTh2": "ETTh2.csv", "ETTm1": "ETTm1.csv", "ETTm2": "ETTm2.csv",
               "weather": "weather.csv"}


def auto_split(name: str) -> str:
    """The reference code's protocol for a file name: ETT's fixed borders for ETTh*/ETTm*, else 70/10/20."""
    return "ett-hourly" if name.startswith("ETTh") else "ett-15min" if name.startswith("ETTm") else "ratio-70-10-20"


@dataclass
class SeriesData:
    """One dataset, split and scaled. val/test begin with the last `lookback` rows of the split before."""

    name: str
    columns: list[str]
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    lookback: int
    split: str = "ratio-70-10-20"  # the split protocol used (SPLIT_ENDS)
    split_chosen_by: str = "data.split"  # or "file name" (data.split = "auto")
    notes: list[str] = field(default_factory=list)
    extra_train: list[np.ndarray] = field(default_factory=list)  # more training series (data.extra_train)

    @property
    def n_vars(self) -> int:
        return len(self.columns)


def resolve_data_file(cfg: DataConfig) -> Path:
    """`data.path` if given; else `data.name` (a known benchmark or a file name) under the data directory."""
    if cfg.path:
        path = Path(cfg.path).expanduser()
        if path.is_file():
            return path
        raise SpecctlError(f"data file not found: {path} (from data.path)")
    folder = data_dir(cfg)
    file_name = KNOWN_FILES.get(cfg.name, cfg.name)
    if folder is None:
        raise SpecctlError(
            f"data '{cfg.name}' is looked up by name but no data directory is set: "
            f"set data.dir in the profile or {ENV_DATA_DIR}, or give data.path"
        )
    source = "data.dir" if cfg.dir else ENV_DATA_DIR
    candidates = [folder / file_name]
    if not Path(file_name).suffix:
        candidates += [folder / f"{file_name}{suffix}" for suffix in (".csv", ".txt", ".npz")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise SpecctlError(
        f"data file for '{cfg.name}' not found; looked in: {looked} (directory from {source}; "
        f"set data.dir or {ENV_DATA_DIR} to the folder holding it, or data.path to the file)"
    )


def synthetic_series(cfg: SyntheticConfig) -> np.ndarray:
    """[length, n_vars] float32: per-variable seasonalities with random amplitude and phase, a linear trend,
    each variable mixed with a lagged copy of its neighbour (cross-variable signal), then Gaussian noise.
    Everything random comes from one generator seeded with `cfg.seed`, so the series is reproducible."""
    rng = np.random.default_rng(cfg.seed)
    t = np.arange(cfg.length, dtype=np.float64)
    periods = np.asarray(cfg.periods, dtype=np.float64)
    amplitude = rng.uniform(0.5, 1.5, size=(cfg.n_vars, len(periods)))
    phase = rng.uniform(0.0, 2 * np.pi, size=(cfg.n_vars, len(periods)))
    slope = rng.uniform(-1.0, 1.0, size=cfg.n_vars) * cfg.trend
    angles = 2 * np.pi * t[:, None, None] / periods[None, None, :] + phase[None]
    base = (amplitude[None] * np.sin(angles)).sum(-1) + np.outer(t / cfg.length, slope)
    lag = max(1, int(periods.min()) // 4) if len(periods) else 1
    neighbour = np.roll(base, 1, axis=1)  # variable j is coupled to variable j-1
    lagged = np.concatenate([np.repeat(neighbour[:1], lag, axis=0), neighbour[:-lag]])[: cfg.length]
    mixed = (1 - cfg.coupling) * base + cfg.coupling * lagged
    return (mixed + cfg.noise * rng.standard_normal(mixed.shape)).astype(np.float32)


def split_bounds(n_rows: int, lookback: int, ends: tuple[int, int, int] | None = None) -> list[tuple[int, int]]:
    """[start, stop) rows of train, val, test, as the reference loaders compute them.

    `ends` are fixed end rows (ETT); without them 70/10/20: num_train = int(n*0.7), num_test = int(n*0.2),
    the rest is val. Val and test start `lookback` rows before their first target row."""
    if ends is None:
        num_train, num_test = int(n_rows * 0.7), int(n_rows * 0.2)
        ends = (num_train, n_rows - num_test, n_rows)
    starts = (0, ends[0] - lookback, ends[1] - lookback)
    return list(zip(starts, ends))


def _read_table(path: Path) -> tuple[list[str], np.ndarray]:
    """Raw column names and float64 values [time, vars] of one file, before any cleaning."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if "data" not in npz.files:
                raise SpecctlError(f"{path}: .npz has no 'data' array (found: {', '.join(npz.files) or 'nothing'})")
            data = npz["data"]
        if data.ndim == 3:
            data = data[:, :, 0]
        if data.ndim != 2 or not np.issubdtype(data.dtype, np.number):
            raise SpecctlError(f"{path}: 'data' must be a numeric [time, nodes(, features)] array, got {data.shape}")
        return [str(i) for i in range(data.shape[1])], data.astype(np.float64)
    if suffix == ".csv":
        frame = pd.read_csv(path, encoding_errors="replace").iloc[:, 1:]  # first column: the date
    elif suffix == ".txt":
        frame = pd.read_csv(path, header=None, encoding_errors="replace")
        frame.columns = [str(c) for c in frame.columns]
    else:
        raise SpecctlError(f"{path}: unknown data format '{path.suffix}' (expected .csv, .txt or .npz)")
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise SpecctlError(f"{path}: non-numeric column(s) {', '.join(bad)} (after the first, date, column for .csv)")
    if frame.shape[1] == 0:
        raise SpecctlError(f"{path}: no numeric columns")
    return [str(c) for c in frame.columns], frame.to_numpy(dtype=np.float64)


def _fill_missing(values: np.ndarray, columns: list[str], cfg: DataConfig, source: str) -> tuple[np.ndarray, list[str]]:
    """Apply the missing-value policy of the module docstring; returns the filled copy and notes."""
    missing = np.isnan(values) | np.isin(values, cfg.sentinels)
    counts = missing.sum(axis=0)
    if not counts.any():
        return values, []
    what = "NaN" + "".join(f" or {s:g}" for s in cfg.sentinels)
    empty = [c for c, n in zip(columns, counts) if n == len(values)]
    if empty:
        raise SpecctlError(f"{source}: column(s) {', '.join(empty)} have no valid value ({what})")
    per_column = ", ".join(f"{c} {n}" for c, n in zip(columns, counts) if n)
    if cfg.missing == "error":
        raise SpecctlError(
            f"{source}: {counts.sum()} missing values ({what}) in column(s) {per_column}; "
            f"set data.missing = \"interpolate\" to fill them"
        )
    filled = values.copy()
    rows = np.arange(len(values))
    for j in np.flatnonzero(counts):
        ok = ~missing[:, j]
        filled[~ok, j] = np.interp(rows[~ok], rows[ok], values[ok, j])
    return filled, [f"{source}: {counts.sum()} missing values ({what}) replaced by linear interpolation: {per_column}"]


@dataclass
class Table:
    """One file (or the synthetic series) read and cleaned, before splitting: values [time, vars]."""

    name: str
    columns: list[str]
    values: np.ndarray
    split: str
    notes: list[str]

    @property
    def ends(self) -> tuple[int, int, int] | None:
        return SPLIT_ENDS[self.split]


def read_table(cfg: DataConfig) -> Table:
    """Find, read and clean `data.name` / `data.path` (or generate the synthetic series)."""
    if cfg.name == "synthetic" and not cfg.path:
        values = synthetic_series(cfg.synthetic).astype(np.float64)
        split = "ratio-70-10-20" if cfg.split == "auto" else cfg.split
        return Table("synthetic", [f"x{j}" for j in range(values.shape[1])], values, split, [])
    path = resolve_data_file(cfg)
    name = cfg.name if cfg.name in KNOWN_FILES else path.stem
    split = auto_split(name) if cfg.split == "auto" else cfg.split
    ends = SPLIT_ENDS[split]
    try:
        columns, values = _read_table(path)
    except (ValueError, OSError, zipfile.BadZipFile) as e:  # unparsable content: one line, no traceback
        raise SpecctlError(f"{path}: cannot read as {path.suffix} data: {str(e).splitlines()[0]}") from None
    values, notes = _fill_missing(values, columns, cfg, path.name)
    if ends and len(values) < ends[2]:
        raise SpecctlError(f"{path}: {len(values)} rows, but the {SPLIT_TEXT[split]} split needs {ends[2]} "
                           '(set data.split = "ratio-70-10-20" for 70/10/20 by time)')
    if ends and len(values) > ends[2]:
        notes.append(f"{path.name}: rows {ends[2]}..{len(values)} are unused ({SPLIT_TEXT[split]}, as in the "
                     "reference)")
    return Table(name, columns, values, split, notes)


def fit_scaler(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-variable mean and std (ddof 0) of the train rows; a constant column scales to zeros, as in sklearn."""
    mean, std = train.mean(axis=0), train.std(axis=0)
    return mean, np.where(std > 0, std, 1.0)


def load_series(cfg: DataConfig, min_length: int, extra_train: bool = False, splits: tuple[str, ...] = SPLITS,
                horizon: int | None = None) -> SeriesData:
    """Load, clean, split and scale one dataset. Each split in `splits` (those the caller cuts windows from) must
    hold `min_length` rows (its longest window: lookback + `horizon`, rounded up to whole patches where the caller
    trains on whole patches), else a SpecctlError says which split falls short and which knobs fix it. With
    `extra_train` (training commands), the series of `data.extra_train` are loaded too."""
    table = read_table(cfg)
    bounds = split_bounds(len(table.values), cfg.lookback, table.ends)
    if bounds[0][1] < cfg.lookback:  # the val/test starts move back by the lookback into the train rows
        raise SpecctlError(f"{table.name}: the train split has {bounds[0][1]} rows, fewer than data.lookback "
                           f"{cfg.lookback}; choose a shorter data.lookback")
    for split, (start, stop) in zip(SPLITS, bounds):
        if split in splits and stop - start < min_length:
            raise SpecctlError(split_too_short(table, split, stop - start, cfg.lookback, min_length, horizon))
    mean, std = fit_scaler(table.values[: bounds[0][1]])
    scaled = ((table.values - mean) / std).astype(np.float32)
    extra, extra_notes = load_extra_train(cfg, len(table.columns), min_length) if extra_train else ([], [])
    table.notes += extra_notes
    if extra:
        windows = sum(count_windows(len(a), min_length) for a in extra)
        names = ", ".join(f"{e.name} (every {e.every})" for e in cfg.extra_train)
        table.notes.append(f"data.extra_train: {windows} more training windows from {len(extra)} series of {names}, "
                           f"beside {count_windows(bounds[0][1] - bounds[0][0], min_length)} from {table.name}")
    return SeriesData(
        name=table.name,
        columns=table.columns,
        train=scaled[bounds[0][0] : bounds[0][1]],
        val=scaled[bounds[1][0] : bounds[1][1]],
        test=scaled[bounds[2][0] : bounds[2][1]],
        mean=mean.astype(np.float32),
        std=std.astype(np.float32),
        lookback=cfg.lookback,
        split=table.split,
        split_chosen_by="the file name" if cfg.split == "auto" and table.name != "synthetic" else "data.split",
        notes=table.notes,
        extra_train=extra,
    )


def split_too_short(table: Table, split: str, rows: int, lookback: int, need: int, horizon: int | None) -> str:
    """Why a split cannot hold the longest window, and the knobs that fix it."""
    window = need - lookback
    horizon = horizon or window
    rounded = f" rounded up to whole patches ({window})" if window > horizon else ""
    fits = rows - lookback - (window - horizon)  # the longest horizon (same rounding) that fits
    knobs = (f"a horizon of at most {fits}" if fits > 0 else "a shorter data.lookback") + (
        ", a patch length dividing the horizon" if rounded else "") + ", or a shorter data.lookback"
    return (f"{table.name}: the {split} split ({SPLIT_TEXT[table.split]}) has {rows} rows but a window needs {need} "
            f"(data.lookback {lookback} + horizon {horizon}{rounded}); choose {knobs} (the series has "
            f"{len(table.values)} rows)")


def load_extra_train(cfg: DataConfig, n_vars: int, min_length: int) -> tuple[list[np.ndarray], list[str]]:
    """The train splits of `data.extra_train` as [time, vars] arrays to add to the training windows, and their
    files' notes: each scaled by its own train-fitted scaler (as the main set is) and cut into its `every`
    phases. Each must have `n_vars` variables and every phase must hold one window of `min_length` rows."""
    arrays, notes = [], []
    for i, extra in enumerate(cfg.extra_train):
        where = f"data.extra_train[{i}] ('{extra.name}')"
        table = read_table(cfg.model_copy(update={"name": extra.name, "path": extra.path, "extra_train": []}))
        if len(table.columns) != n_vars:
            raise SpecctlError(f"{where} has {len(table.columns)} variables; the main dataset has {n_vars}")
        stop = split_bounds(len(table.values), 0, table.ends)[0][1]
        mean, std = fit_scaler(table.values[:stop])
        train = ((table.values[:stop] - mean) / std).astype(np.float32)
        phases = [train[k :: extra.every] for k in range(extra.every)]
        if min(len(p) for p in phases) < min_length:
            raise SpecctlError(
                f"{where}: its train split has {stop} rows, {min(len(p) for p in phases)} per phase at every = "
                f"{extra.every}, fewer than one training window ({min_length} rows)"
            )
        arrays += phases
        notes += table.notes
    return arrays, notes


def count_windows(n_rows: int, length: int) -> int:
    """Stride-1 windows of `length` rows in `n_rows` rows."""
    return max(0, n_rows - length + 1)


class Windows(torch.utils.data.Dataset):
    """Windows of `length` rows every `stride` rows of a [T, C] array, as float32 tensors [length, C]."""

    def __init__(self, array: np.ndarray, length: int, stride: int = 1):
        self.data = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
        self.length, self.stride = length, stride
        self.count = (count_windows(len(array), length) + stride - 1) // stride

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError(f"window {index} out of range ({self.count} windows)")
        start = index * self.stride
        return self.data[start : start + self.length]


def eval_windows(
    array: np.ndarray, lookback: int, horizon: int, max_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All stride-1 (context [N, lookback, C], target [N, horizon, C]) pairs of a split. With `max_windows`,
    an evenly spaced subset that always includes the first and last window, so a quick evaluation still
    spans the whole split and is the same on every run."""
    total = count_windows(len(array), lookback + horizon)
    if total == 0:
        raise SpecctlError(f"{len(array)} rows cannot hold one window of lookback {lookback} + horizon {horizon}")
    n = total if max_windows is None else min(max_windows, total)
    starts = np.arange(n) * (total - 1) // (n - 1) if n > 1 else np.zeros(1, dtype=np.int64)
    data = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)
    windows = data.unfold(0, lookback + horizon, 1)[torch.as_tensor(starts)].transpose(1, 2)
    return windows[:, :lookback].contiguous(), windows[:, lookback:].contiguous()


def describe_split(data: SeriesData) -> str:
    """The split protocol in words, and what chose it (for terminals and metrics.json)."""
    return f"{SPLIT_TEXT[data.split]} ({data.split}, chosen by {data.split_chosen_by})"
