"""Figures from result tables: a registry of named plots, each written as PNG and PDF, and drawing helpers.

A plot declares the metric columns it needs and the keys that must have been swept; `render` skips (and says
why) a plot whose columns are missing. Each half adds its plots with `@register(...)` (timeseries/plots.py,
llm/plots.py; specctl/backends.py imports them).
Figures are drawn on `matplotlib.figure.Figure` (Agg for PNG, no GUI, no pyplot state) at paper size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import setting, swept_keys
from specctl.core.files import atomic_write

FORMATS = ("png", "pdf")
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3}
# axis labels with units; each half adds its own columns' labels
LABELS = {
    "acceptance_rate": "acceptance rate (%)",
    "mean_accepted": "E[accepted] per round (tokens)",
    "speedup": "measured speedup (×)",
    "predicted_speedup": "predicted speedup (×)",
    "mse": "MSE vs truth (scaled units²)",
}
PERCENT = {"acceptance_rate"}


def label(column: str) -> str:
    return LABELS.get(column, column)


def unit(column: str) -> float:
    """The factor from a column's stored value to its plotted unit (rates in percent)."""
    return 100.0 if column in PERCENT else 1.0


@dataclass(frozen=True)
class Plot:
    name: str
    draw: Callable[[pd.DataFrame, Figure], None]
    needs: tuple[str, ...] = ()
    swept: tuple[str, ...] = ()

    def missing(self, ok: pd.DataFrame) -> str | None:
        """Why this plot cannot be drawn from `ok`, or None."""
        absent = [c for c in self.needs if c not in ok or ok[c].isna().all()]
        if absent:
            return f"no {', '.join(absent)} column"
        flat = [k for k in self.swept if k not in swept_keys(ok)]
        return f"{', '.join(flat)} not swept" if flat else None


PLOTS: dict[str, Plot] = {}


def register(name: str, needs: tuple[str, ...] = (), swept: tuple[str, ...] = ()) -> Callable:
    """Add a plot: `draw(ok, fig)` fills a 5.5 x 3.8 in figure (or resizes it) from the finished trials."""

    def add(draw: Callable[[pd.DataFrame, Figure], None]) -> Callable:
        PLOTS[name] = Plot(name, draw, needs, swept)
        return draw

    return add


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    return [atomic_write(out_dir / f"{name}.{fmt}", lambda tmp, fmt=fmt: fig.savefig(
        tmp, format=fmt, dpi=200, bbox_inches="tight")) for fmt in FORMATS]


def render(ok: pd.DataFrame, out_dir: Path, names: list[str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Draw the selected plots (default: all) from finished trials; returns files written and skipped reasons."""
    written: list[Path] = []
    skipped: dict[str, str] = {}
    for name in names or list(PLOTS):
        plot = PLOTS[name]
        reason = plot.missing(ok)
        if reason:
            skipped[name] = reason
            continue
        with matplotlib.rc_context(STYLE):
            fig = Figure(figsize=(5.5, 3.8), layout="constrained")
            plot.draw(ok, fig)
            written += save(fig, Path(out_dir), name)
    return written, skipped


def groups(ok: pd.DataFrame, key: str) -> Iterator[tuple[str | None, pd.DataFrame]]:
    """(legend label, rows) per value of `key` when it was swept, else one unlabelled group."""
    if key not in swept_keys(ok):
        yield None, ok
        return
    for value, rows in ok.groupby(key, sort=True):
        yield setting(key, value), rows


def panels(fig: Figure, n: int, ncols: int, size: tuple[float, float], **kwargs) -> list:
    """`n` axes in rows of `ncols`, each about `size` inches (a paper column is ~3.4 in, a page ~7 in)."""
    cols, rows = min(n, ncols), -(-n // ncols)
    fig.set_size_inches(size[0] * cols, size[1] * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False, **kwargs).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]
