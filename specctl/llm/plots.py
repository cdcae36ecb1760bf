"""LLM figures in the shared plot registry, the research plan's: draft quality per exit layer (a finetune-head
results.csv: KL, CE, top-1; agreement and overlap), acceptance, speed and accepted lengths per exit layer (an LLM
sweep CSV, or the benchmark's, one line per draft option `draft.option`), and speedup against draft quality
labelled by layer (TV from spec-test, or held-out KL where the rows carry it). Speed axes carry the 1x line."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from specctl.core.analysis import pareto_front
from specctl.core.plots import break_even, groups, label, measured_vs_predicted, panels, point_labels, register, unit
from specctl.core.results import FINETUNE, LLM_SWEEP

LAYER = "llm.exit_layer"
EXIT = "exit_layer"  # every LLM sweep row and finetune-head row has it, swept or not
GAMMA = "llm.spec.gamma"
OPTION = "draft.option"  # the benchmark's draft options (untuned, tuned head, adapter, layer skip)
LLM_LABELS = {
    LAYER: "exit layer ℓ (0-based block)",
    EXIT: "exit layer ℓ (0-based block)",
    "val_kl": "val KL(target ‖ draft) (nats/token)",
    "val_ce": "val draft cross-entropy (nats/token)",
    "val_ppl": "val draft perplexity (×)",
    "val_top1": "val top-1 accuracy (%)",
    "val_agreement": "val top-1 agreement with the target (%)",
    "val_overlap": "val overlap Σ min(p, q) (%)",
    "tv": "TV distance, 1 − overlap",
    "mean_accepted": "E[accepted] per round",
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
    for ax, metric in zip(panels(fig, len(metrics), 3, (2.7, 2.6)), metrics):
        for name, rows in lines:
            stats = mean_by(rows, x, metric)
            ax.plot(stats.index, stats.to_numpy(), "o-", ms=4, label=name)
        ax.set_xticks(sorted(pd.concat([rows[x] for _, rows in lines]).dropna().unique()))
        ax.set_xlabel(llm_label(x))
        ax.set_ylabel(llm_label(metric))
        if ax.get_legend_handles_labels()[1]:
            ax.legend()


def series(ok: pd.DataFrame) -> list[tuple[str | None, pd.DataFrame]]:
    """One line (or panel) per draft option where the rows have several, else per swept γ."""
    return list(groups(ok, OPTION if OPTION in ok and ok[OPTION].nunique() > 1 else GAMMA))


def heads(ok: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(f"{head} head", rows) for head, rows in ok.groupby("head", sort=True)]


@register("layer_quality", "Early-exit draft quality by exit layer", FINETUNE,
          needs=(EXIT, "head", "val_kl", "val_ce", "val_top1"))
def layer_quality(ok: pd.DataFrame, fig: Figure) -> None:
    """Draft quality per exit layer (finetune-head results.csv), each tuned head against the untuned copy."""
    layer_lines(fig, EXIT, ("val_kl", "val_ce", "val_top1"), heads(ok))


@register("layer_agreement", "Teacher-forced acceptance by exit layer", FINETUNE,
          needs=(EXIT, "head", "val_agreement", "val_overlap"))
def layer_agreement(ok: pd.DataFrame, fig: Figure) -> None:
    """Top-1 agreement (greedy acceptance) and overlap (sampling at T = 1) per exit layer."""
    layer_lines(fig, EXIT, ("val_agreement", "val_overlap"), heads(ok))


@register("layer_acceptance", "Acceptance by exit layer (mean over the other swept keys)", LLM_SWEEP,
          needs=(LAYER, "mean_accepted", "acceptance_rate", "tv"), swept=(LAYER,))
def layer_acceptance(ok: pd.DataFrame, fig: Figure) -> None:
    layer_lines(fig, LAYER, ("mean_accepted", "acceptance_rate", "tv"), series(ok))


register("llm_speedup_vs_predicted", "Measured vs predicted speedup (1x: vanilla decoding)", LLM_SWEEP,
         needs=("speedup", "predicted_speedup"))(measured_vs_predicted(GAMMA))


def pareto(ok: pd.DataFrame, fig: Figure, quality: str) -> None:
    """Every row (one colour per series), labelled by its exit layer; the speed/quality frontier in red."""
    ax = fig.add_subplot()
    for name, rows in series(ok):
        ax.scatter(rows[quality], rows["speedup"], s=18, alpha=0.8, label=name)
    names = [f"ℓ{v:g}" if pd.notna(v) else "skip" for v in ok[EXIT]]  # a layer-skip draft has no exit layer
    point_labels(ax, ok[quality].to_numpy(float), ok["speedup"].to_numpy(float), names)
    front = pareto_front(ok, "speedup", quality)
    ax.plot(front[quality], front["speedup"], "o-", color="tab:red", mfc="none", ms=8, lw=1, label="Pareto frontier")
    break_even(ax)
    ax.set_xlabel(llm_label(quality))
    ax.set_ylabel(llm_label("speedup"))
    ax.legend()


@register("layer_pareto", "Speedup vs draft distance (TV), labelled by exit layer", LLM_SWEEP,
          needs=(EXIT, "speedup", "tv"))
def layer_pareto(ok: pd.DataFrame, fig: Figure) -> None:
    pareto(ok, fig, "tv")


@register("layer_pareto_kl", "Speedup vs held-out KL, labelled by exit layer", LLM_SWEEP,
          needs=(EXIT, "speedup", "val_kl"))
def layer_pareto_kl(ok: pd.DataFrame, fig: Figure) -> None:
    pareto(ok, fig, "val_kl")


@register("acceptance_lengths", "Tokens accepted per round, by exit layer", LLM_SWEEP, needs=(EXIT, "accepted_len_0"))
def acceptance_lengths(ok: pd.DataFrame, fig: Figure) -> None:
    """Histogram of tokens accepted per round, bars per exit layer, one panel per series (draft option or γ)."""
    per_series = series(ok)
    for ax, (name, rows) in zip(panels(fig, len(per_series), 2, (3.4, 2.6)), per_series):
        columns = sorted((c for c in ok if c.startswith("accepted_len_") and rows[c].notna().any()),
                         key=lambda c: int(c.rpartition("_")[2]))
        layers = sorted(rows[EXIT].dropna().unique())
        width = 0.8 / max(len(layers), 1)
        for i, layer in enumerate(layers):
            share = rows.loc[rows[EXIT] == layer, columns].mean() * 100
            ax.bar([k + (i - (len(layers) - 1) / 2) * width for k in range(len(columns))], share.to_numpy(),
                   width, label=f"ℓ={layer:g}")
        ax.set_xticks(range(len(columns)))
        ax.set_xlabel("draft tokens accepted per round (tokens)")
        ax.set_ylabel("rounds (%)")
        ax.set_title(name or "")
        ax.legend()
