"""What a kind of model offers the commands: one backend per kind (specctl/timeseries/backend.py,
specctl/llm/backend.py), chosen through the one table in specctl/backends.py.

Every training entry point takes the same arguments in the same order: (profile, device, run, resume, progress,
say), `say` printing one line of progress (epoch lines, notes) for a person. Each returns a typed result that knows
its metrics (the JSON and CSV keys) and their definitions; how a result looks in a terminal is
specctl/commands/render.py's business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from specctl.core.errors import SpecctlError
from specctl.core.schema import Profile

if TYPE_CHECKING:  # specctl.backends imports this module to answer a bad profile at once: no torch here
    import torch

    from specctl.core.rundir import RunDir
    from specctl.core.sweep import TrialSession

Say = Callable[[str], None]


class Result(Protocol):
    """A command's result: `metrics()` are the keys written to metrics.json, --json and sweep CSVs."""

    definitions: ClassVar[dict[str, str]]

    def metrics(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SpecTestOptions:
    debug_csv: Path | None = None  # per-series, per-round acceptance details (time series)


class Backend(Protocol):
    def ensure_checkpoints(self, profile: Profile, device: torch.device, train_missing: bool, say: Say) -> None:
        """Every checkpoint the profile's spec-test reads exists, or is trained now with `train_missing`; else a
        SpecctlError naming the command that trains it."""

    def pretrain(self, profile: Profile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                 say: Say) -> Result: ...

    def distill(self, profile: Profile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                say: Say) -> Result: ...

    def finetune_head(self, profile: Profile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                      say: Say) -> Result: ...

    def spec_test(self, profile: Profile, device: torch.device, run: RunDir, progress: Any, say: Say,
                  options: SpecTestOptions) -> Result: ...

    def sweep_session(self, profile: Profile, device: torch.device, progress: Any) -> TrialSession:
        """What runs one sweep trial (spec-test, or pretrain for a recipe search) and keeps models between trials."""

    def trial_inputs(self, profile: Profile) -> list[str]:
        """The checkpoint paths one sweep trial of `profile` reads: what every worker of a cluster must see."""

    def register_plots(self) -> None:
        """Add this kind's figures to the plot registry (core/plots.py)."""


def unsupported(command: str, kind: str, hint: str) -> SpecctlError:
    """The error of a command a kind does not have, e.g. finetune-head on a time-series profile."""
    return SpecctlError(f"{command} does not apply to this profile: its kind is '{kind}' ({hint})")
