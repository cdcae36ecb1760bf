"""Rich tables for the LLM commands (finetune-head results, spec-test metrics, pretrain summary)."""

from __future__ import annotations

from rich.table import Table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return "" if value is None else str(value)


def results_table(rows: list[dict], title: str) -> Table:
    """One line per draft: KL at the training temperature, perplexity, top-1 accuracy and top-1 agreement with the
    target on every held-out set."""
    sets = [k[: -len("_kl")] for k in rows[0] if k.endswith("_kl") and not k.endswith("_kl_t1")] if rows else []
    metrics = {"kl": "KL", "ppl": "ppl", "top1": "top1", "agreement": "agree"}
    table = Table("layer", "head", *[f"{s} {m}" for s in sets for m in metrics.values()], title=title)
    for r in rows:
        cells = [_fmt(r[f"{s}_{m}"]) for s in sets for m in metrics]
        table.add_row(str(r["exit_layer"]), r["head"], *cells)
    return table


SPEC_KEYS = ("mean_accepted", "acceptance_rate", "alpha_hat", "position_acceptance", "overlap", "tv",
             "tokens_per_target_call", "target_calls_per_token", "tok_s_vanilla", "tok_s_spec", "speedup",
             "c_hat", "predicted_speedup", "v_hat", "predicted_speedup_v", "identical_fraction", "peak_mem_gb",
             "cuda_graphs")


def spec_table(metrics: dict, title: str) -> Table:
    """spec-test metrics with their bootstrap intervals."""
    table = Table("metric", "value", "CI", title=title)
    for key in SPEC_KEYS:
        if metrics.get(key) is not None:
            table.add_row(key, _fmt(metrics[key]), _fmt(metrics.get("ci", {}).get(key)))
    return table


def summary_table(metrics: dict, title: str) -> Table:
    """Scalar entries of a metrics dict (lists and nested tables left out)."""
    table = Table("metric", "value", title=title)
    for key, value in metrics.items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, _fmt(value))
    return table
