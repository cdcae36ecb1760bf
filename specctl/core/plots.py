"""Figures from result tables: a registry of named plots, each written as PNG and PDF, and drawing helpers.

A plot belongs to one kind of results (core/results.py) and declares the metric columns it needs and the keys
that must have been swept; `render` draws it from that kind's finished rows only (CSVs of several kinds may be
plotted together) and skips, saying why, a plot whose columns are missing. Every figure carries its registered
title. Each half adds its plots with `@register(...)` (timeseries/plots.py, llm/plots.py; specctl/backends.py
imports them). Figures are drawn on `matplotlib.figure.Figure` (Agg for PNG, no GUI, no pyplot state) at paper
size; all are drawn before any is written, so a failure leaves no partial set behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from specctl.core.errors import SpecctlError
from specctl.core.files import atomic_write
from specctl.core.results import Kind, row_kinds, setting, swept_keys

FORMATS = ("png", "pdf")
# offset notation as soon as it saves two digits: MSEs of 0.05420 and 0.05438 read as 0.0542 + 1.8e-4, not five
# overlapping 7-character tick labels
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3,
         "axes.formatter.offset_threshold": 2}
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
    title: str
    kind: Kind
    draw: Callable[[pd.DataFrame, Figure], None]
    needs: tuple[str, ...] = ()
    swept: tuple[str, ...] = ()

    def rows(self, ok: pd.DataFrame) -> pd.DataFrame:
        """The finished rows of this plot's kind that have every column it needs."""
        own = ok[row_kinds(ok) == self.kind.name]
        return own.dropna(subset=[c for c in self.needs if c in own]).reset_index(drop=True)

    def missing(self, rows: pd.DataFrame) -> str | None:
        """Why this plot cannot be drawn from `rows`, or None."""
        if rows.empty:
            return f"no {self.kind.name} rows with {', '.join(self.needs)}"
        absent = [c for c in self.needs if c not in rows]
        if absent:
            return f"no {', '.join(absent)} column"
        flat = [k for k in self.swept if k not in swept_keys(rows)]
        return f"{', '.join(flat)} not swept" if flat else None


PLOTS: dict[str, Plot] = {}


def register(name: str, title: str, kind: Kind, needs: tuple[str, ...] = (), swept: tuple[str, ...] = ()
             ) -> Callable:
    """Add a plot: `draw(rows, fig)` fills a 5.5 x 3.8 in figure (or resizes it) from the finished rows of `kind`;
    `title` becomes the figure's title."""

    def add(draw: Callable[[pd.DataFrame, Figure], None]) -> Callable:
        PLOTS[name] = Plot(name, title, kind, draw, needs, swept)
        return draw

    return add


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    return [atomic_write(out_dir / f"{name}.{fmt}", lambda tmp, fmt=fmt: fig.savefig(
        tmp, format=fmt, dpi=200, bbox_inches="tight")) for fmt in FORMATS]


def draw(plot: Plot, rows: pd.DataFrame) -> Figure:
    """One plot's figure, titled; a failure is one line naming the plot."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(5.5, 3.8), layout="constrained")
        try:
            plot.draw(rows, fig)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise SpecctlError(f"plot {plot.name} failed ({type(e).__name__}: {e}); no figure was written") from None
        fig.suptitle(plot.title)
    return fig


def render(ok: pd.DataFrame, out_dir: Path, names: list[str] | None = None) -> tuple[list[Path], dict[str, str]]:
    """Draw the selected plots (default: all) from finished trials, then write them; returns the files written
    and the reasons of the plots skipped."""
    figures: dict[str, Figure] = {}
    skipped: dict[str, str] = {}
    for name in names or list(PLOTS):
        plot = PLOTS[name]
        rows = plot.rows(ok)
        reason = plot.missing(rows)
        if reason:
            skipped[name] = reason
        else:
            figures[name] = draw(plot, rows)
    return [path for name, fig in figures.items() for path in save(fig, Path(out_dir), name)], skipped


def break_even(ax, axis: str = "y") -> None:
    """The 1x line of a speedup axis: above it speculation pays, below it the baseline is faster."""
    line = ax.axhline if axis == "y" else ax.axvline
    line(1.0, color="k", ls=":", lw=1, label="break-even (1x)" if axis == "y" else None)


def point_labels(ax, xs: np.ndarray, ys: np.ndarray, texts: list[str], color: str = "k") -> None:
    """Annotate points; points that fall on (nearly) the same spot share one label ("1,2,3") instead of
    printing their labels over each other."""
    spans = [max(np.ptp(v), 1e-12) for v in (xs, ys)]
    spots: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(zip(xs, ys)):
        spots.setdefault((round((x - xs.min()) / spans[0] * 40), round((y - ys.min()) / spans[1] * 40)), []).append(i)
    for members in spots.values():
        first = members[0]
        ax.annotate(",".join(texts[i] for i in members), (xs[first], ys[first]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points", color=color)


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


def measured_vs_predicted(group: str) -> Callable[[pd.DataFrame, Figure], None]:
    """Measured against predicted speedup, one colour per value of `group`, with y = x and the 1x lines."""

    def draw(ok: pd.DataFrame, fig: Figure) -> None:
        ax = fig.add_subplot()
        for name, rows in groups(ok, group):
            ax.scatter(rows["predicted_speedup"], rows["speedup"], s=18, alpha=0.8, label=name)
        both = pd.concat([ok["speedup"], ok["predicted_speedup"]]).dropna()
        line = [min(both.min(), 1.0) * 0.95, max(both.max(), 1.0) * 1.05]
        ax.plot(line, line, color="k", ls="--", lw=1, label="y = x")
        break_even(ax)
        break_even(ax, "x")
        ax.set_xlabel(label("predicted_speedup"))
        ax.set_ylabel(label("speedup"))
        ax.legend(ncol=2)

    return draw
