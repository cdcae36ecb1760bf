"""Rolling-forecast evaluation on a split: MSE/MAE per horizon in the dataset's scaled space.

Window i of horizon H has context rows [i, i+L) and targets [i+L, i+L+H), so the windows of a longer
horizon are a prefix of the shorter horizon's: one forecast to the longest horizon serves every horizon.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from specctl.timeseries.data import count_windows
from specctl.timeseries.forecast import forecast_cached, forecast_sliding
from specctl.timeseries.model import TimerXL

FORECASTERS: dict[str, Callable[[TimerXL, torch.Tensor, int], torch.Tensor]] = {
    "cached": forecast_cached,
    "sliding": forecast_sliding,
}


@dataclass
class HorizonScore:
    horizon: int
    windows: int
    mse: dict[str, float]
    mae: dict[str, float]


def errors(forecasts: list[torch.Tensor], truths: list[torch.Tensor]) -> tuple[float, float]:
    """MSE and MAE of the forecasts to the truths, over every window and variable (in float64)."""
    pred, truth = torch.cat(forecasts).double(), torch.cat(truths).double()
    return float((pred - truth).pow(2).mean()), float((pred - truth).abs().mean())


def window_starts(n_rows: int, lookback: int, horizon: int, max_windows: int | None) -> np.ndarray:
    """Start rows of the evaluation windows; an evenly spaced subset when max_windows is set."""
    n = count_windows(n_rows, lookback + horizon)
    if max_windows is None or max_windows >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_windows).round().astype(int))


@torch.no_grad()
def evaluate_rolling(
    model: TimerXL, series: np.ndarray, lookback: int, horizons: list[int], batch_size: int,
    device: torch.device, modes: tuple[str, ...] = ("cached", "sliding"), max_windows: int | None = None,
    progress=None,
) -> list[HorizonScore]:
    horizons = sorted(horizons)
    longest = horizons[-1]
    starts = window_starts(len(series), lookback, horizons[0], max_windows)
    usable = {h: count_windows(len(series), lookback + h) for h in horizons}
    sq = {(m, h): 0.0 for m in modes for h in horizons}
    ab = dict(sq)
    counts = dict.fromkeys(horizons, 0)
    data = torch.from_numpy(np.ascontiguousarray(series, dtype=np.float32))
    task = progress.add_task("evaluate", total=len(starts), info="") if progress is not None else None
    for chunk in np.array_split(starts, max(1, -(-len(starts) // batch_size))):
        context = torch.stack([data[s : s + lookback] for s in chunk]).to(device)
        end = len(series)
        truth = torch.stack([
            torch.nn.functional.pad(data[s + lookback : min(s + lookback + longest, end)].T,
                                    (0, max(0, s + lookback + longest - end))).T
            for s in chunk
        ]).to(device)
        for mode in modes:
            pred = FORECASTERS[mode](model, context, longest)
            for h in horizons:
                keep = torch.from_numpy(chunk < usable[h]).to(device)
                err = (pred[keep, :h] - truth[keep, :h]).double()
                sq[mode, h] += err.pow(2).sum().item()
                ab[mode, h] += err.abs().sum().item()
        for h in horizons:
            counts[h] += int((chunk < usable[h]).sum())
        if progress is not None:
            progress.update(task, advance=len(chunk))
    if progress is not None:
        progress.remove_task(task)
    n_vars = series.shape[1]
    return [
        HorizonScore(h, counts[h], {m: sq[m, h] / (counts[h] * h * n_vars) for m in modes},
                     {m: ab[m, h] / (counts[h] * h * n_vars) for m in modes})
        for h in horizons
    ]


def scores_to_dict(scores: list[HorizonScore]) -> dict:
    """Per-horizon scores and their averages over the horizons, per decoding mode (metrics.json)."""
    modes = list(scores[0].mse)
    return {
        "horizons": [{"horizon": s.horizon, "windows": s.windows, "mse": s.mse, "mae": s.mae} for s in scores],
        "average": {m: {"mse": sum(s.mse[m] for s in scores) / len(scores),
                        "mae": sum(s.mae[m] for s in scores) / len(scores)} for m in modes},
    }
