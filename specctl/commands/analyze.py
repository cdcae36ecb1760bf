"""`specctl analyze RESULTS.csv [MORE.csv ...]`: what a sweep found, and which configuration to use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer
from rich.table import Table

from specctl.commands.common import JsonOpt, console, handle_errors
from specctl.core.analysis import analyze as analyze_results
from specctl.core.analysis import (
    decision_criteria,
    fmt,
    load_results,
    recommendation_lines,
    report_to_dict,
    report_to_markdown,
    sections,
)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left", overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(fmt(v) for v in row))
    return table


@handle_errors
def analyze(
    results: Annotated[list[Path], typer.Argument(help="Sweep results CSV(s); several are merged by trial id.")],
    top_n: int = typer.Option(5, "--top", "-n", min=1, help="How many configurations each top list shows."),
    maintain_mse: float = typer.Option(1.053, help="'maintain quality': mse ≤ this × mse_target."),
    maintain_acceptance: float = typer.Option(0.60, help="'maintain quality': acceptance_rate ≥ this (0-1)."),
    balanced_mse: float = typer.Option(1.095, help="'balanced': mse ≤ this × mse_target."),
    balanced_acceptance: float = typer.Option(0.75, help="'balanced': acceptance_rate ≥ this (0-1)."),
    json_out: JsonOpt = False,
    markdown: bool = typer.Option(False, "--markdown", help="Print the report as Markdown."),
) -> None:
    """Summary statistics, top configurations, Pareto frontiers, parameter effects and recommendations."""
    criteria = decision_criteria(maintain_mse, maintain_acceptance, balanced_mse, balanced_acceptance)
    report = analyze_results(load_results(results), [str(p) for p in results], top_n, criteria)
    if json_out:
        print(json.dumps(report_to_dict(report), indent=2))
    elif markdown:
        print(report_to_markdown(report))
    else:
        console.print(f"{report.trials} trials ({report.failed} failed) from {', '.join(report.sources)}; "
                      f"swept: {', '.join(report.swept) or 'nothing'}")
        for title, frame in sections(report):
            console.print(frame_table(frame, title))
        title, bullets = recommendation_lines(report)
        console.print(f"[bold]{title}[/]")
        console.print("\n".join(bullets), markup=False, highlight=False)
