"""Figures from sweep results: a registry of named plots, each written as PNG and PDF.

A plot declares the metric columns it needs and the keys that must have been swept; `render` skips (and says
why) a plot whose columns are missing. Other modules add plots with `@register(...)` without touching these.
Figures are drawn on `matplotlib.figure.Figure` (Agg for PNG, no GUI, no pyplot state) at paper size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import FRONTS, pareto_front, setting, swept_keys
from specctl.core.files import atomic_write

FORMATS = ("png", "pdf")
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3}
LABELS = {
    "acceptance_rate": "acceptance rate (%)",
    "mean_accepted": "E[accepted] per round (tokens)",
    "speedup": "measured speedup (×)",
    "predicted_speedup": "predicted speedup (×)",
    "mse": "MSE vs truth (scaled units²)",
    "spec.sigma": "σ, target std (scaled units)",
    "spec.bias": "acceptance bias b (×)",
    "spec.k": "K, draft tokens per round",
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


def scatter_by_k(ax, ok: pd.DataFrame, x: str, y: str) -> None:
    """Scatter of y against x, one colour per K when K was swept."""
    for name, rows in groups(ok, "spec.k"):
        ax.scatter(rows[x] * unit(x), rows[y] * unit(y), s=18, alpha=0.8, label=name)
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))


@register("acceptance_vs_mse", needs=("acceptance_rate", "mse"))
def acceptance_vs_mse(ok: pd.DataFrame, fig: Figure) -> None:
    ax = fig.add_subplot()
    scatter_by_k(ax, ok, "acceptance_rate", "mse")
    if "mse_target" in ok and ok["mse_target"].notna().any():
        ax.axhline(ok["mse_target"].mean(), color="k", ls="--", lw=1, label="target-only MSE")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(ncol=2)
    ax.set_title("Acceptance vs forecast quality")


@register("speedup_vs_predicted", needs=("speedup", "predicted_speedup"))
def speedup_vs_predicted(ok: pd.DataFrame, fig: Figure) -> None:
    ax = fig.add_subplot()
    scatter_by_k(ax, ok, "predicted_speedup", "speedup")
    both = pd.concat([ok["speedup"], ok["predicted_speedup"]]).dropna()
    line = [min(both.min(), 1.0), max(both.max(), 1.0)]
    ax.plot(line, line, color="k", ls="--", lw=1, label="y = x")
    ax.legend(ncol=2)
    ax.set_title("Measured vs predicted speedup")


def panels(fig: Figure, n: int, ncols: int, size: tuple[float, float], **kwargs) -> list:
    """`n` axes in rows of `ncols`, each about `size` inches (a paper column is ~3.4 in, a page ~7 in)."""
    cols, rows = min(n, ncols), -(-n // ncols)
    fig.set_size_inches(size[0] * cols, size[1] * rows)
    axes = list(fig.subplots(rows, cols, squeeze=False, **kwargs).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def heatmap(metric: str, cmap: str) -> Callable[[pd.DataFrame, Figure], None]:
    """σ × bias grid of `metric` (mean over the other swept keys), one panel per K, one colour scale."""

    def draw(ok: pd.DataFrame, fig: Figure) -> None:
        per_k = list(groups(ok, "spec.k"))
        grids = [rows.pivot_table(index="spec.bias", columns="spec.sigma", values=metric, aggfunc="mean")
                 * unit(metric) for _, rows in per_k]
        low, high = min(np.nanmin(g.to_numpy()) for g in grids), max(np.nanmax(g.to_numpy()) for g in grids)
        axes = panels(fig, len(per_k), 3, (2.4, 2.2))
        for ax, (name, _), grid in zip(axes, per_k, grids):
            image = ax.imshow(grid.to_numpy(), cmap=cmap, vmin=low, vmax=high, origin="lower", aspect="auto")
            ax.set_xticks(range(len(grid.columns)), [f"{v:g}" for v in grid.columns])
            ax.set_yticks(range(len(grid.index)), [f"{v:g}" for v in grid.index])
            for (i, j), v in np.ndenumerate(grid.to_numpy()):
                red, green, blue, _ = image.cmap(image.norm(v))
                ink = "k" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "w"
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color=ink)
            ax.set_title(name or "")
            ax.set_xlabel(label("spec.sigma"))
            ax.set_ylabel(label("spec.bias"))
            ax.grid(False)
        fig.colorbar(image, ax=axes, label=label(metric))

    return draw


register("acceptance_heatmap", needs=("acceptance_rate",), swept=("spec.sigma", "spec.bias"))(
    heatmap("acceptance_rate", "viridis"))
register("mse_heatmap", needs=("mse",), swept=("spec.sigma", "spec.bias"))(heatmap("mse", "magma_r"))


@register("k_effect", needs=("acceptance_rate", "mse"), swept=("spec.k",))
def k_effect(ok: pd.DataFrame, fig: Figure) -> None:
    """Mean ± sd over the other swept keys of each key metric against K."""
    metrics = [m for m in ("acceptance_rate", "mean_accepted", "speedup", "mse") if m in ok and ok[m].notna().any()]
    for ax, metric in zip(panels(fig, len(metrics), 2, (3.4, 2.4)), metrics):
        stats = (ok[metric] * unit(metric)).groupby(ok["spec.k"]).agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3)
        ax.set_xticks(stats.index)
        ax.set_xlabel(label("spec.k"))
        ax.set_ylabel(label(metric))


@register("pareto_frontier", needs=("acceptance_rate", "mse"))
def pareto_frontier(ok: pd.DataFrame, fig: Figure) -> None:
    """Every configuration in grey, the frontier in red, numbered; the numbers' settings listed below."""
    fronts = [(up, down) for up, down in FRONTS if up in ok and ok[up].notna().any()]
    keys = swept_keys(ok)
    for ax, (up, down) in zip(panels(fig, len(fronts), 2, (3.5, 3.0)), fronts):
        front = pareto_front(ok, up, down)
        ax.scatter(ok[down] * unit(down), ok[up] * unit(up), s=14, color="0.7", label="all configurations")
        ax.plot(front[down] * unit(down), front[up] * unit(up), "o-", color="tab:red", ms=4, label="Pareto frontier")
        key = []
        for number, (_, row) in enumerate(front.iterrows(), start=1):
            ax.annotate(str(number), (row[down] * unit(down), row[up] * unit(up)), fontsize=7,
                        xytext=(3, -9), textcoords="offset points", color="tab:red")
            key.append(f"{number}: " + " ".join(setting(k, row[k]) for k in keys))
        ax.text(0, -0.2, "\n".join(key), transform=ax.transAxes, va="top", fontsize=6, family="monospace")
        ax.set_xlabel(label(down))
        ax.set_ylabel(label(up))
        ax.legend(loc="lower right")
