"""Train the checkpoints a profile names but does not have yet (the quick start's first run)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from specctl.core.profile import load_profile
from specctl.core.rundir import RunDir
from specctl.core.schema import Profile


def ensure_checkpoint(ref: str | None, builder: str | None, device: torch.device, say: Callable[[str], None]) -> None:
    """If checkpoint `ref` is missing and a `builder` profile is named, train it with that profile first."""
    if not ref or not builder or Path(ref).exists():
        return
    profile = load_profile(builder)
    say(f"checkpoint {ref} is missing: training it first with profile '{builder}'")
    if profile.distill.target:
        from specctl.timeseries.distill import distill, prepare

        ensure_checkpoint(profile.distill.target, profile.spec.target_profile, device, say)
        ensure_checkpoint(profile.train.init_from, profile.spec.draft_profile, device, say)
        with RunDir.create(profile, "distill", str(device)) as run:
            distill(profile, prepare(profile, device), device, run, resume=False)
            run.finish()
    else:
        from specctl.timeseries.pretrain import pretrain

        with RunDir.create(profile, "pretrain", str(device)) as run:
            pretrain(profile, device, run, resume=False)
            run.finish()


def ensure_checkpoints(profile: Profile, device: torch.device, say: Callable[[str], None]) -> None:
    ensure_checkpoint(profile.spec.target, profile.spec.target_profile, device, say)
    ensure_checkpoint(profile.spec.draft, profile.spec.draft_profile, device, say)
