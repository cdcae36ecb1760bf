"""The checkpoints a spec-test reads and the profiles that build them.

A missing checkpoint is an error naming the command that trains it, unless the user asks `--train-missing`:
then its builder profile (spec.target_profile / spec.draft_profile, else the shipped profile whose own
train.save_to is that path) is trained first, with the user's --set overrides (all but spec.*), and so is every
checkpoint that builder itself reads (a distillation's target and train.init_from), recursively. A builder
writes exactly the missing path or is refused: a typo in spec.target never retrains, and overwrites, another
model. Builder names resolve from the folder of the profile that names them first, then as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from specctl.core.backend import Say
from specctl.core.errors import SpecctlError
from specctl.core.profile import find_profile, load_profile, load_raw, read_toml, shipped_profiles
from specctl.core.rundir import RunDir, check_outputs
from specctl.timeseries.profile import TimeseriesProfile

SCHEMAS = {"timeseries": TimeseriesProfile}


@dataclass
class Build:
    """How to train one missing checkpoint: the command and the (resolved) builder profile."""

    checkpoint: str
    ref: str  # the builder as the user names it (a shipped name or a path)
    profile: TimeseriesProfile

    @property
    def command(self) -> str:
        return "distill" if self.profile.distill.target else "pretrain"

    def hint(self) -> str:
        return f"specctl {self.command} --profile {self.ref}"


def training_command(checkpoint: str) -> str | None:
    """`specctl pretrain|distill --profile NAME` for the shipped profile that itself sets train.save_to =
    `checkpoint` (what to suggest when it is missing)."""
    name = shipped_builder(checkpoint)
    if name is None:
        return None
    merged, _ = load_raw(find_profile(name))
    return f"specctl {'distill' if merged.get('distill', {}).get('target') else 'pretrain'} --profile {name}"


def shipped_builder(checkpoint: str) -> str | None:
    """The shipped profile whose own file (not one it extends) sets train.save_to = `checkpoint`."""
    for name in shipped_profiles():
        try:
            if read_toml(find_profile(name)).get("train", {}).get("save_to") == checkpoint:
                return name
        except SpecctlError:
            continue
    return None


def same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def find_build(checkpoint: str, builder: str | None, parent: TimeseriesProfile, key: str) -> Build | None:
    """The build of missing `checkpoint` (named by `key` of `parent`), or None when nothing is known to build it."""
    ref = builder or shipped_builder(checkpoint)
    if not ref:
        return None
    overrides = [o for o in parent.overrides if not o.split("=", 1)[0].strip().startswith("spec.")]
    folder = parent.source.parent if parent.source else None
    profile = load_profile(ref, overrides, SCHEMAS, relative_to=folder)
    assert isinstance(profile, TimeseriesProfile)
    if not profile.train.save_to or not same_path(profile.train.save_to, checkpoint):
        raise SpecctlError(f"{key} {checkpoint} does not exist, and its builder profile {ref} trains "
                           f"{profile.train.save_to or 'no exported checkpoint (train.save_to unset)'}: fix {key}"
                           + (f" or {key}_profile" if key.startswith("spec.") else ""))
    return Build(checkpoint, ref, profile)


def inputs(profile: TimeseriesProfile) -> list[tuple[str, str | None, str]]:
    """(checkpoint, builder, key) of every checkpoint `profile`'s own command reads."""
    if profile.distill.target:  # a distillation reads its target, and maybe a draft to start from
        return [(profile.distill.target, profile.spec.target_profile, "distill.target"),
                *([(profile.train.init_from, profile.spec.draft_profile, "train.init_from")]
                  if profile.train.init_from else [])]
    return [(profile.train.init_from, None, "train.init_from")] if profile.train.init_from else []


def missing_builds(pairs: list[tuple[str, str | None, str]], parent: TimeseriesProfile) -> list[Build]:
    """Builds of the missing checkpoints among `pairs`, inputs first (the whole chain, in training order)."""
    builds: list[Build] = []
    for checkpoint, builder, key in pairs:
        if not checkpoint or Path(checkpoint).exists():
            continue
        build = find_build(checkpoint, builder, parent, key)
        if build is None:
            raise SpecctlError(f"{key}: checkpoint not found: {checkpoint} (and no profile is known to train it: "
                               f"set {key}_profile or train it first)" if key.startswith("spec.") else
                               f"{key}: checkpoint not found: {checkpoint}")
        for earlier in missing_builds(inputs(build.profile), build.profile):
            if not any(same_path(earlier.checkpoint, b.checkpoint) for b in builds):
                builds.append(earlier)
        if not any(same_path(build.checkpoint, b.checkpoint) for b in builds):
            builds.append(build)
    return builds


def spec_test_inputs(profile: TimeseriesProfile) -> list[tuple[str, str | None, str]]:
    spec = profile.spec
    if not spec.target or not spec.draft:
        raise SpecctlError("spec.target and spec.draft must name checkpoints (folders with model.safetensors)")
    return [(spec.target, spec.target_profile, "spec.target"), (spec.draft, spec.draft_profile, "spec.draft")]


def ensure_checkpoints(profile: TimeseriesProfile, device: torch.device, train_missing: bool, say: Say) -> None:
    """spec-test's checkpoints exist, or are trained now (`train_missing`); else one line naming the commands."""
    builds = missing_builds(spec_test_inputs(profile), profile)
    if not builds:
        return
    if not train_missing:
        steps = " && ".join(b.hint() for b in builds)
        raise SpecctlError(f"checkpoint {builds[-1].checkpoint} is missing: train it with `{steps}`, "
                           "or pass --train-missing to train it now")
    for build in builds:  # every output writable before the first build trains
        check_outputs(build.profile, overwrite=False)
    for build in builds:
        say(f"checkpoint {build.checkpoint} is missing: training it first with `{build.hint()}`")
        train(build, device, say)


def train(build: Build, device: torch.device, say: Say) -> None:
    """One build, as its own command would run it (its own run directory and seed)."""
    from specctl.timeseries.distill import distill
    from specctl.timeseries.pretrain import pretrain

    fn = distill if build.command == "distill" else pretrain
    with RunDir.create(build.profile, build.command, str(device)) as run:
        result = fn(build.profile, device, run, False, None, say)
        run.write_result(result)
        run.finish()
