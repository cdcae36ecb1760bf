"""`specctl spec-test`: target-only vs speculative decoding on the same inputs; quality, acceptance, speed."""

from __future__ import annotations

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
    finish,
    handle_errors,
    open_session,
)

DebugOpt = Annotated[
    bool, typer.Option("--debug-csv", help="Write per-series, per-round acceptance details (debug.csv).")
]
TrainMissingOpt = Annotated[bool, typer.Option(
    "--train-missing", help="Train missing checkpoints first with the profiles that build them (the whole chain).")]


@handle_errors
def spec_test(
    profile: ProfileOpt, set_: SetOpt = None, train_missing: TrainMissingOpt = False, debug_csv: DebugOpt = False,
    dry_run: DryRunOpt = False, json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run target-only and speculative decoding on the same inputs and report quality, acceptance and speedup."""
    from pathlib import Path

    from specctl.core.backend import SpecTestOptions
    from specctl.core.files import check_creatable

    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    p, backend = session.profile, session.backend
    check_creatable(Path(p.run_root), "the run root (run_root)")  # before --train-missing trains anything
    backend.ensure_checkpoints(p, session.device, train_missing, session.say)
    run = session.open_run("spec-test")
    options = SpecTestOptions(debug_csv=run.path / "debug.csv" if debug_csv else None)
    with run, session.progress() as progress:
        result = backend.spec_test(p, session.device, run, progress, session.say, options)
        run.write_result(result)
        run.finish()
    finish(session, run, result)
