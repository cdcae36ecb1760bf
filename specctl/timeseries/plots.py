"""Time-series sweep figures in the shared plot registry: acceptance against quality, measured against predicted
speedup, σ × bias heatmaps, the effect of K, and the Pareto frontiers. Speed axes carry the 1x break-even line."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from specctl.core.analysis import pareto_front
from specctl.core.plots import (
    LABELS,
    break_even,
    groups,
    label,
    measured_vs_predicted,
    panels,
    point_labels,
    register,
    unit,
)
from specctl.core.results import FRONTS, TIMESERIES_SWEEP, setting, swept_keys

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown")  # one per draft

LABELS.update({
    "spec.sigma": "σ, target std (scaled units)",
    "spec.bias": "acceptance bias b (×)",
    "spec.k": "K, draft tokens per round",
})
SPEEDS = ("speedup", "predicted_speedup")


def scatter_by_k(ax, ok: pd.DataFrame, x: str, y: str) -> None:
    """Scatter of y against x, one colour per K when K was swept."""
    for name, rows in groups(ok, "spec.k"):
        ax.scatter(rows[x] * unit(x), rows[y] * unit(y), s=18, alpha=0.8, label=name)
    ax.set_xlabel(label(x))
    ax.set_ylabel(label(y))


@register("acceptance_vs_mse", "Acceptance vs forecast quality", TIMESERIES_SWEEP, needs=("acceptance_rate", "mse"))
def acceptance_vs_mse(ok: pd.DataFrame, fig: Figure) -> None:
    ax = fig.add_subplot()
    scatter_by_k(ax, ok, "acceptance_rate", "mse")
    if "mse_target" in ok and ok["mse_target"].notna().any():
        ax.axhline(ok["mse_target"].mean(), color="k", ls="--", lw=1, label="target-only MSE")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(ncol=2)


register("speedup_vs_predicted", "Measured vs predicted speedup (1x: target-only)", TIMESERIES_SWEEP,
         needs=SPEEDS)(measured_vs_predicted("spec.k"))


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


register("acceptance_heatmap", "Acceptance rate over σ × bias", TIMESERIES_SWEEP, needs=("acceptance_rate",),
         swept=("spec.sigma", "spec.bias"))(heatmap("acceptance_rate", "viridis"))
register("mse_heatmap", "MSE over σ × bias", TIMESERIES_SWEEP, needs=("mse",),
         swept=("spec.sigma", "spec.bias"))(heatmap("mse", "magma_r"))


@register("k_effect", "Effect of K (mean ± sd over the other swept keys)", TIMESERIES_SWEEP,
          needs=("acceptance_rate", "mse"), swept=("spec.k",))
def k_effect(ok: pd.DataFrame, fig: Figure) -> None:
    metrics = [m for m in ("acceptance_rate", "mean_accepted", "speedup", "mse") if m in ok and ok[m].notna().any()]
    for ax, metric in zip(panels(fig, len(metrics), 2, (3.4, 2.4)), metrics):
        stats = (ok[metric] * unit(metric)).groupby(ok["spec.k"]).agg(["mean", "std"])
        ax.errorbar(stats.index, stats["mean"], yerr=stats["std"].fillna(0), marker="o", capsize=3)
        if metric in SPEEDS:
            break_even(ax)
        ax.set_xticks(stats.index)
        ax.set_xlabel(label("spec.k"))
        ax.set_ylabel(label(metric))


@register("pareto_frontier", "Pareto frontiers (numbered; settings below each panel)", TIMESERIES_SWEEP,
          needs=("acceptance_rate", "mse"))
def pareto_frontier(ok: pd.DataFrame, fig: Figure) -> None:
    """Every configuration in grey, the frontier in red, numbered; the numbers' settings listed below."""
    fronts = [(up, down) for up, down in FRONTS if up in ok and ok[up].notna().any()]
    keys = swept_keys(ok)
    for ax, (up, down) in zip(panels(fig, len(fronts), 2, (3.5, 3.0)), fronts):
        front = pareto_front(ok, up, down)
        ax.scatter(ok[down] * unit(down), ok[up] * unit(up), s=14, color="0.7", label="all configurations")
        xs, ys = front[down].to_numpy(float) * unit(down), front[up].to_numpy(float) * unit(up)
        ax.plot(xs, ys, "o-", color="tab:red", ms=4, label="Pareto frontier")
        numbers = [str(i) for i in range(1, len(front) + 1)]
        point_labels(ax, xs, ys, numbers, "tab:red")
        key = [f"{n}: " + " ".join(setting(k, row[k]) for k in keys) for n, (_, row) in zip(numbers, front.iterrows())]
        if up in SPEEDS:
            break_even(ax)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel(label(down))
        ax.set_ylabel(label(up))
        ax.legend(loc="best")
        ax.set_title(f"{up} vs {down}", fontsize=9)
        # the settings key hangs below the x label whatever its height (x: the axes' left edge, y: the label's bottom)
        ax.annotate("\n".join(key), (0, 0), xycoords=("axes fraction", ax.xaxis.label), xytext=(0, -3),
                    textcoords="offset points", va="top", fontsize=6, family="monospace")


@register("speed_quality_frontier", "Speed vs quality: every setting, the target and the draft alone",
          TIMESERIES_SWEEP, needs=("speedup", "delta_mse_pct", "speedup_draft", "delta_mse_pct_draft"))
def speed_quality_frontier(ok: pd.DataFrame, fig: Figure) -> None:
    """Speedup over the target's own KV-cached decoding against ΔMSE vs the target, one point per setting (a panel
    per batch size when the rows carry one), with the target (1x, 0%) and each draft alone marked; rows with a
    `draft` column get a colour per draft, its settings and its draft-only point alike."""
    by_batch = list(ok.groupby("batch", sort=True)) if "batch" in ok else [(None, ok)]
    colors = dict(zip(ok["draft"].unique(), COLORS)) if "draft" in ok else {None: COLORS[0]}  # the same in every panel
    for ax, (batch, rows) in zip(panels(fig, len(by_batch), 3, (3.4, 2.8)), by_batch):
        for name, group in rows.groupby("draft", sort=False) if "draft" in rows else [(None, rows)]:
            color = colors[name]
            ax.scatter(group["delta_mse_pct"], group["speedup"], s=18, color=color,
                       label=f"{name}: speculative" if name else "speculative settings")
            ax.scatter(group["delta_mse_pct_draft"].median(), group["speedup_draft"].median(), marker="^", s=50,
                       color=color, edgecolors="k", label=f"{name} alone" if name else "draft only")
            front = pareto_front(group, "speedup", "delta_mse_pct")
            ax.plot(front["delta_mse_pct"], front["speedup"], "-", color=color, lw=1)
        ax.scatter([0.0], [1.0], marker="s", s=40, color="k", label="target only")
        break_even(ax, "y")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        low, high = ax.get_ylim()
        # minor ticks labelled only within a decade: across decades their labels collide
        ax.yaxis.set_minor_formatter(ScalarFormatter() if high / low < 10 else NullFormatter())
        ax.set_xlabel("Δ MSE vs target (%)")
        ax.set_ylabel(label("speedup"))
        ax.set_title(f"batch {batch}" if batch is not None else "")
    entries = {}  # every panel's entries once: a draft may be missing from the last panel
    for panel in fig.axes:
        for handle, text in zip(*panel.get_legend_handles_labels()):
            entries.setdefault(text, handle)
    ax.legend(entries.values(), entries.keys(), fontsize=7)
