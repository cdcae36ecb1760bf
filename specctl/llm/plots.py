"""LLM figures in the shared plot registry, the research plan's: draft quality per exit layer (a finetune-head
results.csv: KL, CE, top-1; agreement and overlap), acceptance, speed and accepted lengths per exit layer (an LLM
sweep CSV with column llm.exit_layer, or the benchmark's, one line per draft option `draft.option`), and speedup
against draft quality labelled by layer (TV from spec-test, or held-out KL where the rows carry it)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import pareto_front
from specctl.core.plots import groups, label, panels, register, unit

LAYER = "llm.exit_layer"
GAMMA = "llm.spec.gamma"
OPTION = "draft.option"  # the benchmark's draft options (untuned, tuned head, adapter, layer skip)
LLM_LABELS = {
    LAYER: "exit layer ℓ (0-based block index)",
    "exit_layer": "exit layer ℓ (0-based block index)",
    "val_kl": "val KL(target ‖ draft) (nats/token)",
    "val_ce": "val draft cross-entropy (nats/token)",
    "val_ppl": "val draft perplexity (×)",
    "val_top1": "val top-1 accuracy (%)",
    "val_agreement": "val top-1 agreement with the target (%)",
    "val_overlap": "val overlap Σ min(p, q) (%)",
    "tv": "total variation 1 − overlap (fraction)",
    GAMMA: "γ, draft tokens per round",
}
PERCENT = {"val_top1", "val_agreement", "val_overlap"}


def llm_label(column: str) -> str:
    return LLM_LABELS.get(column, label(column))


def llm_unit(column: str) -> float:
    return 100.0 if column in PERCENT else unit(column)


def mean_by(rows: pd.DataFrame, x: str, y: str) -> pd.Series:
    """y (in plotted units) averaged over every other setting, per value of x."""
    return (rows[y] * llm_unit(y)).groupby(rows[x]).mean()


def layer_lines(fig: Figure, x: str, metrics: tuple[str, ...], lines: list[tuple[str | None, pd.DataFrame]]) -> None:
    """One panel per metric against x, one line per (legend label, rows)."""
    for ax, metric in zip(panels(fig, len(metrics), 3, (2.6, 2.4)), metrics):
        for name, rows in lines:
            stats = mean_by(rows, x, metric)
            ax.plot(stats.index, stats.to_numpy(), "o-", ms=4, label=name)
        ax.set_xticks(sorted(pd.concat([rows[x] for _, rows in lines]).unique()))
        ax.set_xlabel(llm_label(x))
        ax.set_ylabel(llm_label(metric))
        if ax.get_legend_handles_labels()[1]:
            ax.legend()


def series(ok: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """One line (or panel) per draft option where the rows have several, else per swept γ."""
    return list(groups(ok, OPTION if OPTION in ok and ok[OPTION].nunique() > 1 else GAMMA))


@register("layer_quality", needs=("exit_layer", "head", "val_kl", "val_ce", "val_top1"))
def layer_quality(ok: pd.DataFrame, fig: Figure) -> None:
    """Draft quality per exit layer (finetune-head results.csv), each tuned head against the untuned copy."""
    heads = [(f"{head} head", rows) for head, rows in ok.groupby("head", sort=True)]
    layer_lines(fig, "exit_layer", ("val_kl", "val_ce", "val_top1"), heads)
    fig.suptitle("Early-exit draft quality by exit layer")


@register("layer_agreement", needs=("exit_layer", "head", "val_agreement", "val_overlap"))
def layer_agreement(ok: pd.DataFrame, fig: Figure) -> None:
    """Teacher-forced acceptance per exit layer: top-1 agreement (greedy) and overlap (sampling at T = 1)."""
    heads = [(f"{head} head", rows) for head, rows in ok.groupby("head", sort=True)]
    layer_lines(fig, "exit_layer", ("val_agreement", "val_overlap"), heads)
    fig.suptitle("Teacher-forced acceptance by exit layer")


@register("layer_acceptance", needs=(LAYER, "mean_accepted", "acceptance_rate", "tv"), swept=(LAYER,))
def layer_acceptance(ok: pd.DataFrame, fig: Figure) -> None:
    layer_lines(fig, LAYER, ("mean_accepted", "acceptance_rate", "tv"), series(ok))
    fig.suptitle("Acceptance by exit layer (mean over the other swept keys)")


def pareto(ok: pd.DataFrame, fig: Figure, quality: str) -> None:
    """Every row (one colour per series), labelled by its exit layer; the speed/quality frontier in red."""
    ax = fig.add_subplot()
    for name, rows in series(ok):
        ax.scatter(rows[quality], rows["speedup"], s=18, alpha=0.8, label=name)
    for _, row in ok.iterrows():  # a layer-skip draft has no exit layer
        name = f"ℓ{int(row[LAYER])}" if pd.notna(row[LAYER]) else "skip"
        ax.annotate(name, (row[quality], row["speedup"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front(ok, "speedup", quality)
    ax.plot(front[quality], front["speedup"], "o-", color="tab:red", mfc="none", ms=8, lw=1, label="Pareto frontier")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xlabel(llm_label(quality))
    ax.set_ylabel(llm_label("speedup"))
    ax.legend()
    ax.set_title("Speedup vs draft quality, labelled by exit layer")


@register("layer_pareto", needs=(LAYER, "speedup", "tv"))
def layer_pareto(ok: pd.DataFrame, fig: Figure) -> None:
    pareto(ok, fig, "tv")


@register("layer_pareto_kl", needs=(LAYER, "speedup", "val_kl"))
def layer_pareto_kl(ok: pd.DataFrame, fig: Figure) -> None:
    pareto(ok, fig, "val_kl")


@register("acceptance_lengths", needs=(LAYER, "accepted_len_0"))
def acceptance_lengths(ok: pd.DataFrame, fig: Figure) -> None:
    """Histogram of tokens accepted per round, bars per exit layer, one panel per series (draft option or γ)."""
    per_gamma = series(ok)
    for ax, (name, rows) in zip(panels(fig, len(per_gamma), 2, (3.4, 2.6)), per_gamma):
        columns = sorted((c for c in ok if c.startswith("accepted_len_") and rows[c].notna().any()),
                         key=lambda c: int(c.rpartition("_")[2]))
        layers = sorted(rows[LAYER].unique())
        width = 0.8 / len(layers)
        for i, layer in enumerate(layers):
            share = rows.loc[rows[LAYER] == layer, columns].mean() * 100
            ax.bar([k + (i - (len(layers) - 1) / 2) * width for k in range(len(columns))], share.to_numpy(),
                   width, label=f"ℓ={layer:g}")
        ax.set_xticks(range(len(columns)))
        ax.set_xlabel("draft tokens accepted per round (tokens)")
        ax.set_ylabel("rounds (%)")
        ax.set_title(name or "")
        ax.legend()
