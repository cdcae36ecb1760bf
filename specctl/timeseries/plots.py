"""Time-series sweep figures in the shared plot registry: acceptance against quality, measured against predicted
speedup, σ × bias heatmaps, the effect of K, and the Pareto frontiers."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import FRONTS, pareto_front, setting, swept_keys
from specctl.core.plots import LABELS, groups, label, panels, register, unit

LABELS.update({
    "spec.sigma": "σ, target std (scaled units)",
    "spec.bias": "acceptance bias b (×)",
    "spec.k": "K, draft tokens per round",
})


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
