"""`specctl spec-test`: target-only vs speculative decoding on the same inputs; quality, acceptance, speed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from specctl.commands.common import (
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    ProfileOpt,
    SeedOpt,
    SetOpt,
    VerboseOpt,
    console,
    handle_errors,
    open_session,
)
from specctl.timeseries.report import spec_tables

DebugOpt = Annotated[
    bool, typer.Option("--debug-csv", help="Write per-series, per-round acceptance details (debug.csv).")
]


@handle_errors
def spec_test(
    profile: ProfileOpt, set_: SetOpt = None, debug_csv: DebugOpt = False, dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Run target-only and speculative decoding on the same inputs and report quality, acceptance and speedup."""
    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    p = session.profile
    if p.kind == "llm":
        from specctl.llm.spectest import run_llm_spec_test

        run = session.open_run("spec-test")
        with run, session.progress() as progress:
            metrics = run_llm_spec_test(p, session.device, run, progress)
            run.write_json("metrics.json", metrics)
            run.finish()
        from specctl.llm.report import spec_table

        session.out(metrics, lambda: console.print(spec_table(metrics, p.name)))
        return
    from specctl.timeseries.spectest import METRICS, SpecTestSession, append_results_log, summary_line
    from specctl.timeseries.builders import ensure_checkpoints

    ensure_checkpoints(p, session.device, session.say)
    run = session.open_run("spec-test")
    with run:
        with session.progress() as progress:
            tester = SpecTestSession(p, session.device, progress)
            metrics = tester.run(p, run.path / "debug.csv" if debug_csv else None)
        run.write_json("metrics.json", {"metrics": metrics, "definitions": METRICS})
        append_results_log(Path(p.run_root) / "spec-test" / "results.log", summary_line(p, metrics))
        run.finish()
    session.out(metrics, lambda: [console.print(t) for t in spec_tables(metrics, p.name)])
