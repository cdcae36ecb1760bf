"""`specctl analyze RESULTS.csv [MORE.csv ...]`: what a sweep (time series or LLM, spec-test or recipe search) or
a finetune-head results.csv found, and which configuration to use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from specctl.commands.common import JsonOpt, handle_errors, show


@handle_errors
def analyze(
    results: Annotated[list[Path], typer.Argument(help="Results CSV(s) of one kind; several are merged by trial id.")],
    top_n: int = typer.Option(5, "--top", "-n", min=1, help="How many configurations each top list shows."),
    maintain_mse: float = typer.Option(1.053, help="'maintain quality' (time-series sweeps): mse ≤ this × mse_target."),
    maintain_acceptance: float = typer.Option(0.60, help="'maintain quality': acceptance_rate ≥ this (0-1)."),
    balanced_mse: float = typer.Option(1.095, help="'balanced': mse ≤ this × mse_target."),
    balanced_acceptance: float = typer.Option(0.75, help="'balanced': acceptance_rate ≥ this (0-1)."),
    json_out: JsonOpt = False,
    markdown: bool = typer.Option(False, "--markdown", help="Print the report as Markdown."),
) -> None:
    """Summary statistics, top configurations, Pareto frontiers, parameter effects and recommendations."""
    from specctl.commands import render
    from specctl.core.analysis import analyze_files, report_to_dict

    thresholds = (maintain_mse, maintain_acceptance, balanced_mse, balanced_acceptance)
    report = analyze_files(results, top_n, thresholds)
    if json_out:
        print(json.dumps(report_to_dict(report), indent=2))
    elif markdown:
        print(render.report_markdown(report))
    else:
        show(render.report_view(report))
