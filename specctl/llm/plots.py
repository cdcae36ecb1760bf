"""LLM figures in the shared plot registry: draft quality per exit layer (a finetune-head results.csv) and
acceptance, speed and accepted lengths per exit layer (an LLM sweep CSV). Speed axes carry the 1x line."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import pareto_front
from specctl.core.plots import break_even, groups, label, measured_vs_predicted, panels, point_labels, register, unit
from specctl.core.results import FINETUNE, LLM_SWEEP

LAYER = "llm.exit_layer"
EXIT = "exit_layer"  # every LLM sweep row and finetune-head row has it, swept or not
GAMMA = "llm.spec.gamma"
LLM_LABELS = {
    LAYER: "exit layer ℓ (0-based block)",
    EXIT: "exit layer ℓ (0-based block)",
    "val_kl": "val KL(target ‖ draft) (nats/token)",
    "val_ppl": "val draft perplexity (×)",
    "val_top1": "val top-1 accuracy (%)",
    "tv": "TV distance, 1 − overlap",
    "mean_accepted": "E[accepted] per round",
    GAMMA: "γ, draft tokens per round",
}
PERCENT = {"val_top1"}


def llm_label(column: str) -> str:
    return LLM_LABELS.get(column, label(column))


def llm_unit(column: str) -> float:
    return 100.0 if column in PERCENT else unit(column)


def mean_by(rows: pd.DataFrame, x: str, y: str) -> pd.Series:
    """y (in plotted units) averaged over every other setting, per value of x."""
    return (rows[y] * llm_unit(y)).groupby(rows[x]).mean()


def layer_lines(fig: Figure, x: str, metrics: tuple[str, ...], lines: list[tuple[str | None, pd.DataFrame]]) -> None:
    """One panel per metric against x, one line per (legend label, rows)."""
    for ax, metric in zip(panels(fig, len(metrics), 3, (2.7, 2.6)), metrics):
        for name, rows in lines:
            stats = mean_by(rows, x, metric)
            ax.plot(stats.index, stats.to_numpy(), "o-", ms=4, label=name)
        ax.set_xticks(sorted(pd.concat([rows[x] for _, rows in lines]).unique()))
        ax.set_xlabel(llm_label(x))
        ax.set_ylabel(llm_label(metric))
        if ax.get_legend_handles_labels()[1]:
            ax.legend()


@register("layer_quality", "Early-exit draft quality by exit layer", FINETUNE,
          needs=(EXIT, "head", "val_kl", "val_ppl", "val_top1"))
def layer_quality(ok: pd.DataFrame, fig: Figure) -> None:
    """Draft quality per exit layer (finetune-head results.csv), the tuned head against the untuned copy."""
    heads = [(f"{head} head", rows) for head, rows in ok.groupby("head", sort=True)]
    layer_lines(fig, EXIT, ("val_kl", "val_ppl", "val_top1"), heads)


@register("layer_acceptance", "Acceptance by exit layer (mean over the other swept keys)", LLM_SWEEP,
          needs=(LAYER, "mean_accepted", "acceptance_rate", "tv"), swept=(LAYER,))
def layer_acceptance(ok: pd.DataFrame, fig: Figure) -> None:
    layer_lines(fig, LAYER, ("mean_accepted", "acceptance_rate", "tv"), list(groups(ok, GAMMA)))


register("llm_speedup_vs_predicted", "Measured vs predicted speedup (1x: vanilla decoding)", LLM_SWEEP,
         needs=("speedup", "predicted_speedup"))(measured_vs_predicted(GAMMA))


@register("layer_pareto", "Speedup vs draft distance, labelled by exit layer", LLM_SWEEP,
          needs=(EXIT, "speedup", "tv"))
def layer_pareto(ok: pd.DataFrame, fig: Figure) -> None:
    """Every trial (one colour per γ), labelled by its exit layer; the speed/quality frontier in red."""
    ax = fig.add_subplot()
    for name, rows in groups(ok, GAMMA):
        ax.scatter(rows["tv"], rows["speedup"], s=18, alpha=0.8, label=name)
    point_labels(ax, ok["tv"].to_numpy(float), ok["speedup"].to_numpy(float), [f"ℓ{v:g}" for v in ok[EXIT]])
    front = pareto_front(ok, "speedup", "tv")
    ax.plot(front["tv"], front["speedup"], "o-", color="tab:red", mfc="none", ms=8, lw=1, label="Pareto frontier")
    break_even(ax)
    ax.set_xlabel(llm_label("tv"))
    ax.set_ylabel(llm_label("speedup"))
    ax.legend()


@register("acceptance_lengths", "Tokens accepted per round, by exit layer", LLM_SWEEP, needs=(EXIT, "accepted_len_0"))
def acceptance_lengths(ok: pd.DataFrame, fig: Figure) -> None:
    """Histogram of tokens accepted per round, bars per exit layer, one panel per γ."""
    per_gamma = list(groups(ok, GAMMA))
    for ax, (name, rows) in zip(panels(fig, len(per_gamma), 2, (3.4, 2.6)), per_gamma):
        columns = sorted((c for c in ok if c.startswith("accepted_len_") and rows[c].notna().any()),
                         key=lambda c: int(c.rpartition("_")[2]))
        layers = sorted(rows[EXIT].unique())
        width = 0.8 / len(layers)
        for i, layer in enumerate(layers):
            share = rows.loc[rows[EXIT] == layer, columns].mean() * 100
            ax.bar([k + (i - (len(layers) - 1) / 2) * width for k in range(len(columns))], share.to_numpy(),
                   width, label=f"ℓ={layer:g}")
        ax.set_xticks(range(len(columns)))
        ax.set_xlabel("draft tokens accepted per round (tokens)")
        ax.set_ylabel("rounds (%)")
        ax.set_title(name or "")
        ax.legend()
