"""`specctl pretrain`: train a Timer-XL target or draft, or (kind "llm") a small causal LM."""

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
def pretrain(
    profile: ProfileOpt, set_: SetOpt = None, resume: ResumeOpt = False, overwrite: OverwriteOpt = False,
    dry_run: DryRunOpt = False, json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a model from scratch, or from train.init_from (fine-tuning); evaluate the rolling forecast."""
    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    run_training(session, "pretrain", resume, overwrite, lambda backend: backend.pretrain)
