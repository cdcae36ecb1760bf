"""Options and plumbing every command shares: profile loading, errors -> exit 2, console, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from specctl.core.errors import SpecctlError
from specctl.core.profile import load_profile
from specctl.core.rundir import RunDir, profile_to_toml
from specctl.core.runtime import resolve_device, seed_everything
from specctl.core.schema import Profile

ProfileOpt = Annotated[
    str, typer.Option("--profile", "-p", help="Profile: a TOML path or a shipped name (quickstart/target).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s",
                 help="Override a key: --set spec.sigma=0.5 (repeatable; =null unsets an optional key)."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved profile and exit.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda (overrides the profile).")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the profile).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="More detail while running.")]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Continue the latest run of this profile from its last finished epoch.")
]

console = Console()
err_console = Console(stderr=True)


@dataclass
class Session:
    """What a command works with once its options are resolved."""

    profile: Profile
    device: torch.device
    json: bool
    verbose: bool

    def progress(self) -> Progress:
        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=err_console, disable=self.json, transient=False,
        )

    def out(self, payload: dict[str, Any], render: Callable[[], None]) -> None:
        """Print JSON in --json mode, else the rich rendering."""
        if self.json:
            print(json.dumps(payload, indent=2, default=str))
        else:
            render()

    def say(self, message: str) -> None:
        if not self.json:
            err_console.print(message)

    def open_run(self, command: str, resume: bool = False) -> RunDir:
        """A new run directory, or with --resume the latest resumable one of this profile; says where."""
        run = RunDir.latest(self.profile, command) if resume else RunDir.create(self.profile, command, str(self.device))
        self.say(f"run directory: {run.path}")
        return run

    @contextmanager
    def resumable(self, run: RunDir, command: str, profile: str) -> Iterator[None]:
        """Training inside `run`: an error marks the run failed; Ctrl-C marks it interrupted and says how to resume
        (the training loop has saved the last weights under the run's checkpoints)."""
        with run:
            try:
                yield
            except KeyboardInterrupt:
                self.say(f"interrupted: weights saved under {run.checkpoints}; `specctl {command} --profile {profile} "
                         "--resume` continues from the last finished epoch")
                raise


def open_session(
    profile: str, sets: list[str] | None, device: str | None, seed: int | None,
    json_out: bool = False, dry_run: bool = False, verbose: bool = False,
) -> Session:
    """Load and validate the profile with CLI overrides; on --dry-run print it and exit 0."""
    overrides = list(sets or [])
    if device is not None:
        overrides.append(f"device={json.dumps(device)}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    resolved = load_profile(profile, overrides)
    if dry_run:
        if json_out:
            print(json.dumps(resolved.model_dump(), indent=2))
        else:
            console.print(profile_to_toml(resolved), markup=False, highlight=False)
        raise typer.Exit(0)
    seed_everything(resolved.seed)
    return Session(resolved, resolve_device(resolved.device), json_out, verbose)


def handle_errors(fn: Callable) -> Callable:
    """SpecctlError -> one line on stderr and exit 2; Ctrl-C -> exit 130 (commands save what they can first)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpecctlError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True, highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            sys.exit(130)

    return wrapper
