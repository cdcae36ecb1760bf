"""Options and plumbing every command shares: profile loading, errors -> exit 2, console, JSON output.

Nothing here imports torch or the model code at module import, so `specctl --help` and a bad argument answer at
once; each command imports what it needs when it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from specctl.core.errors import SpecctlError
from specctl.core.schema import Profile

if TYPE_CHECKING:
    import torch

    from specctl.core.backend import Backend
    from specctl.core.rundir import RunDir

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
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace the checkpoint already at train.save_to (refused otherwise).")
]


def make_console(stderr: bool = False) -> Console:
    """A console that keeps a table whole when the output is piped (rich would squeeze it to 80 columns)."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 200
    return Console(stderr=stderr, width=width)


console = make_console()
err_console = make_console(stderr=True)


def show(items: Iterable[RenderableType]) -> None:
    """Print renderables; plain strings verbatim (no markup: values may hold brackets)."""
    for item in items:
        if isinstance(item, str):
            console.print(item, markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(item)


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
            console=err_console, disable=self.json or not err_console.is_terminal, transient=False,
        )

    def out(self, payload: dict[str, Any], render: Callable[[], None]) -> None:
        """Print JSON in --json mode, else the rich rendering."""
        if self.json:
            print(json.dumps(payload, indent=2, default=str))
        else:
            render()

    def say(self, message: str) -> None:
        """One line of progress on stderr (warnings in yellow); silent with --json."""
        if self.json:
            return
        if message.startswith("warning: "):
            err_console.print(f"[bold yellow]warning:[/] {escape(message[9:])}", highlight=False)
        else:
            err_console.print(message, markup=False, highlight=False)

    @property
    def backend(self) -> Backend:
        from specctl.backends import backend_for

        return backend_for(self.profile.kind)

    def open_run(self, command: str, resume: bool = False) -> RunDir:
        """A new run directory, or with --resume the latest resumable one of this profile; says where."""
        from specctl.core.rundir import RunDir

        make = RunDir.resume if resume else RunDir.create
        run = make(self.profile, command, str(self.device))
        self.say(f"run directory: {run.path}")
        return run

    @contextmanager
    def resumable(self, run: RunDir, command: str) -> Iterator[None]:
        """Training inside `run`: an error marks the run failed; Ctrl-C (or SIGTERM) marks it interrupted and says
        how to resume: the interrupted command itself, with its overrides, pointed at this run directory."""
        with run:
            try:
                yield
            except KeyboardInterrupt:
                self.say(f"interrupted: weights saved under {run.checkpoints}; `{resume_command(command, run)}` "
                         "continues from the last finished epoch")
                raise


def resume_command(command: str, run: RunDir) -> str:
    """The command line that resumes `run`: its profile as resolved there (every override included)."""
    return f"specctl {command} --profile {shlex.quote(str(run.path / 'profile.toml'))} --resume"


def run_training(session: Session, command: str, resume: bool, overwrite: bool,
                 train: Callable[[Backend], Callable]) -> None:
    """A training command: outputs checked before any work, a run directory (or the one --resume continues),
    `train(backend)(profile, device, run, resume, progress, say)`, metrics.json, then the result. Under torchrun
    (core/distributed.py) every process trains on its own device; rank 0 alone writes and prints."""
    from specctl.core import distributed
    from specctl.core.rundir import check_outputs

    p = session.profile
    entry = train(session.backend)  # a command the kind lacks fails here, before any folder is made
    check_outputs(p, overwrite or resume)
    with distributed.launched(session.device) as device:
        distributed.check_batch(p.train.batch_size)
        session = dataclasses.replace(session, device=device, json=session.json or not distributed.is_main())
        run = distributed.shared_run(lambda: session.open_run(command, resume))
        with session.resumable(run, command), session.progress() as progress:
            result = entry(p, session.device, run, resume, progress, session.say)
            run.write_result(result)
            run.finish()
        if distributed.is_main():
            finish(session, run, result)


def finish(session: Session, run: RunDir, result: Any) -> None:
    """--json: the result's metrics, its verdict and the run directory; else its tables."""
    from specctl.commands import render

    verdict = render.verdict(result)
    payload = {**result.metrics(), **({"verdict": verdict} if verdict else {}), "run_dir": str(run.path)}
    session.out(payload, lambda: show(render.view(result, session.profile.name)))


def open_session(
    profile: str, sets: list[str] | None, device: str | None, seed: int | None,
    json_out: bool = False, dry_run: bool = False, verbose: bool = False,
) -> Session:
    """Load and validate the profile with CLI overrides; on --dry-run print it and exit 0."""
    from specctl.backends import load_profile
    from specctl.core.rundir import profile_to_toml

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
    from specctl.core.runtime import resolve_device, seed_everything

    seed_everything(resolved.seed)
    return Session(resolved, resolve_device(resolved.device), json_out, verbose)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM ends a run as Ctrl-C does: saved, marked interrupted


def handle_errors(fn: Callable) -> Callable:
    """SpecctlError or an I/O failure -> one line on stderr and exit 2; Ctrl-C or SIGTERM -> exit 130 (commands save
    what they can first and mark their run interrupted)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            return fn(*args, **kwargs)
        except SpecctlError as e:
            fail(str(e))
        except OSError as e:
            fail(describe_os_error(e))
        except KeyboardInterrupt:
            err_console.print("interrupted")
            # CPython remembers a KeyboardInterrupt that ended an exec() or eval() of a string (a dataclass being
            # made when the signal lands during an import) and, under `python -m specctl`, then dies by SIGINT
            # instead of exiting 130; evaluating a string clears that flag
            exec("pass")
            sys.exit(130)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapper


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)
    raise typer.Exit(2) from None


def describe_os_error(e: OSError) -> str:
    """`path: cause` for a failed read or write that no writer in core named (the writers there raise their own
    SpecctlError naming the file they were writing)."""
    from specctl.core.files import io_cause

    return f"cannot write or read {e.filename or 'a file'}: {io_cause(e)}"
