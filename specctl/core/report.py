"""Rich tables for results. Pure rendering: every number shown comes from a result object."""

from __future__ import annotations

from rich.table import Table

from specctl.core.evaluate import HorizonScore


def horizon_table(scores: list[HorizonScore], title: str) -> Table:
    """MSE/MAE per horizon and their average, one column pair per decoding mode."""
    modes = list(scores[0].mse)
    table = Table(title=title)
    table.add_column("horizon", justify="right")
    table.add_column("windows", justify="right")
    for mode in modes:
        table.add_column(f"MSE {mode}", justify="right")
        table.add_column(f"MAE {mode}", justify="right")
    for s in scores:
        table.add_row(str(s.horizon), str(s.windows), *(f"{v:.4f}" for m in modes for v in (s.mse[m], s.mae[m])))
    averages = [sum(getattr(s, k)[m] for s in scores) / len(scores) for m in modes for k in ("mse", "mae")]
    table.add_row("avg", "", *(f"{v:.4f}" for v in averages), style="bold")
    return table


def scores_to_dict(scores: list[HorizonScore]) -> dict:
    modes = list(scores[0].mse)
    return {
        "horizons": [{"horizon": s.horizon, "windows": s.windows, "mse": s.mse, "mae": s.mae} for s in scores],
        "average": {m: {"mse": sum(s.mse[m] for s in scores) / len(scores),
                        "mae": sum(s.mae[m] for s in scores) / len(scores)} for m in modes},
    }
