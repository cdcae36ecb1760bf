"""`specctl distill`: train a time-series draft to mimic a frozen target, then predict its acceptance."""

from __future__ import annotations

from specctl.commands.common import (
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    OverwriteOpt,
    ProfileOpt,
    ResumeOpt,
    SeedOpt,
    SetOpt,
    VerboseOpt,
    handle_errors,
    open_session,
    run_training,
)


@handle_errors
def distill(
    profile: ProfileOpt, set_: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a draft to mimic a frozen target (distill.target); predict its acceptance at distill.sigmas."""
    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    run_training(session, "distill", resume, overwrite, lambda backend: backend.distill)
