"""`specctl plot RESULTS.csv --out DIR`: the sweep figures, each as PNG and PDF."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from specctl.commands.common import JsonOpt, console, handle_errors
from specctl.core.errors import SpecctlError


@handle_errors
def plot(
    results: Annotated[list[Path], typer.Argument(help="Sweep results CSV(s); several are merged by trial id.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for the figures (default: plots/ beside the first CSV).")] = None,
    only: Annotated[list[str] | None, typer.Option(
        "--only", help="Draw only this plot (repeatable; an unknown name lists them).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Figures as PNG and PDF from results CSVs (several kinds may be mixed: each plot uses its own kind's rows);
    a plot whose columns are missing or not swept is skipped, with a note."""
    from specctl.backends import register_all_plots
    from specctl.core.files import check_creatable
    from specctl.core.plots import PLOTS, render
    from specctl.core.results import finished_or_fail, load_results

    register_all_plots()
    unknown = [name for name in only or [] if name not in PLOTS]
    if unknown:
        raise SpecctlError(f"unknown plot '{unknown[0]}' (known: {', '.join(PLOTS)})")
    ok = finished_or_fail(load_results(results), [str(p) for p in results])  # each plot checks its own columns
    out_dir = out or results[0].parent / "plots"
    check_creatable(out_dir, "the figures' folder (--out)")
    written, skipped = render(ok, out_dir, only)
    if json_out:
        print(json.dumps({"out": str(out_dir), "files": [str(p) for p in written], "skipped": skipped}, indent=2))
        return
    for name, reason in skipped.items():
        console.print(f"note: skipped {name}: {reason}")
    console.print(f"{len(written)} files in {out_dir}: " + ", ".join(sorted({p.stem for p in written})))
