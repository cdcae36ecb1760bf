"""`specctl sweep`: run every configuration of a profile's [sweep] grid; one resumable results CSV."""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import typer
from rich.markup import escape
from rich.table import Table

from specctl.commands.analyze import frame_table
from specctl.commands.common import (
    DeviceOpt,
    JsonOpt,
    ProfileOpt,
    SeedOpt,
    Session,
    SetOpt,
    VerboseOpt,
    console,
    handle_errors,
    open_session,
)
from specctl.core.analysis import finished, load_results, rank_metric, records, top
from specctl.core.errors import SpecctlError
from specctl.core.profile import parse_override, with_overrides
from specctl.core.rundir import RunDir
from specctl.core.schema import Profile
from specctl.core.sweep import Results, Trial, TrialSession, exclusive, pending_trials, plan_trials, run_sweep

# The trial session of each profile kind (spec-test sweeps) and of recipe searches (`sweep_command =
# "pretrain"`), "module:Class", imported when the first trial needs it.
RUNNERS: dict[str, str] = {"timeseries": "specctl.timeseries.spectest:SpecTestSession"}
RUNNERS["llm"] = "specctl.llm.sweep:LLMSpecSession"
RUNNERS["pretrain"] = "specctl.timeseries.pretrain:PretrainSession"


def runner_name(profile: Profile) -> str:
    return "pretrain" if profile.sweep_command == "pretrain" else profile.kind


def open_runner(runners: dict[str, str], profile: Profile, device: torch.device, progress: Any = None) -> TrialSession:
    name = runner_name(profile)
    if name not in runners:
        raise SpecctlError(f"no sweep runner for '{name}' (known: {', '.join(runners)})")
    module, _, cls = runners[name].partition(":")
    return getattr(importlib.import_module(module), cls)(profile, device, progress)


def with_grid(profile: Profile, items: list[str]) -> Profile:
    """`--grid spec.k=[3,4]` replaces (or adds) one dimension of the [sweep] table."""
    grid = dict(profile.sweep)
    for item in items:
        keys, value = parse_override(item)
        grid[".".join(keys)] = value if isinstance(value, list) else [value]
    return with_overrides(profile, {"sweep": grid})


def default_csv(profile: Profile) -> Path:
    """A path stable across reruns of the same profile, so that a rerun resumes."""
    return Path(profile.run_root) / "sweep" / profile.name.replace("/", "-") / "results.csv"


def plan_table(trials: list[Trial], results: Results) -> Table:
    done = results.finished()
    table = Table("trial_id", *results.keys, "state", title=f"{len(trials)} trials, results in {results.path}")
    for t in trials:
        state = "done" if t.trial_id in done else f"invalid: {t.error}" if t.error else "pending"
        table.add_row(t.trial_id, *(str(t.params[k]) for k in results.keys), state)
    return table


def row_info(row: dict[str, Any]) -> str:
    shown = " ".join(f"{k} {row[k]:.3g}" for k in ("acceptance_rate", "mse", "speedup")
                     if isinstance(row.get(k), (int, float)))
    return f"{row['trial_id']} {row['status']} {shown}"


@handle_errors
def sweep(
    profile: ProfileOpt, set_: SetOpt = None,
    grid: Annotated[list[str] | None, typer.Option(
        "--grid", "-g", help="Replace or add a sweep dimension: --grid 'spec.k=[3,4]' (repeatable).")] = None,
    workers: int = typer.Option(1, "--workers", "-w", min=1, help=(
        "Trials in parallel processes, each with its own models "
        "(CPU; on cuda only for pretrain sweeps, whose timings do not matter).")),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Results CSV (default: <run_root>/sweep/<profile name>/results.csv).")] = None,
    top_n: int = typer.Option(10, "--top", "-n", min=1, help="How many configurations the final table shows."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the trials (done, pending, invalid) and exit."),
    json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the \\[sweep] grid (cartesian product) through spec-test (or pretrain, for a recipe search with
    sweep_command = "pretrain"); rerunning resumes where it stopped."""
    session = open_session(profile, set_, device, seed, json_out, False, verbose)
    p = with_grid(session.profile, grid or [])
    csv_path = out or default_csv(p)
    if dry_run:
        console.print(plan_table(plan_trials(p), Results.open(csv_path, list(p.sweep))))
        return
    if workers > 1 and session.device.type == "cuda" and p.sweep_command != "pretrain":
        session.say("note: --workers ignored on cuda (parallel trials would share the GPU and distort timings)")
        workers = 1
    with exclusive(csv_path):
        trials = plan_trials(p)
        results = Results.open(csv_path, list(p.sweep))
        todo = pending_trials(trials, results)
        others = len(set(results.rows) - {t.trial_id for t in trials})
        if others:
            session.say(f"note: {csv_path} also holds {others} trials of other settings (not in this grid); "
                        "`specctl analyze` includes them; pass --out for a separate file")
        run = RunDir.create(p, "sweep", str(session.device))
        run.manifest.update(results=str(csv_path), trials=len(trials), pending=len(todo), workers=workers)
        session.say(f"{len(trials)} trials, {len(trials) - len(todo)} already done; results: {csv_path}; "
                    f"run directory: {run.path}")
        ran = run_with_progress(todo, results, session, workers, run)
    failed = [r["trial_id"] for r in ran if r["status"] != "ok"]
    run.manifest.update(ran=len(ran), failed=failed)
    run.finish()
    frame = load_results([csv_path], ("trial_id", "status"))
    show_top(frame[frame["trial_id"].isin([t.trial_id for t in trials])], top_n, session, {
        "results": str(csv_path), "run_dir": str(run.path), "trials": len(trials),
        "skipped": len(trials) - len(todo), "ran": len(ran), "failed": failed,
    })


def run_with_progress(todo: list[Trial], results: Results, session: Session, workers: int,
                      run: RunDir) -> list[dict[str, Any]]:
    """The trials under a progress bar with ETA; a failure is printed as it happens, an interrupt recorded."""
    try:
        with session.progress() as progress:
            task = progress.add_task("sweep", total=len(todo), info="")

            def on_row(row: dict[str, Any]) -> None:
                progress.update(task, advance=1, info=row_info(row))
                if row["status"] != "ok":
                    session.say(f"[yellow]trial {row['trial_id']} failed:[/] {escape(row['error'])}")

            runner = functools.partial(open_runner, dict(RUNNERS))
            return run_sweep(todo, results, runner, session.device, workers, progress, on_row)
    except KeyboardInterrupt:
        run.finish("interrupted")
        session.say(f"interrupted: finished trials are in {results.path}; rerun the same command to resume")
        raise
    except BaseException:
        run.finish("failed")
        raise


def show_top(frame: pd.DataFrame, n: int, session: Session, payload: dict[str, Any]) -> None:
    """The final table: this grid's best finished configurations (see analysis.rank_metric)."""
    ok = finished(frame)
    metric = rank_metric(ok)
    best = top(ok, metric, n) if metric else ok.head(0)

    def render() -> None:
        if metric:
            console.print(frame_table(best, f"top {len(best)} of {len(ok)} finished trials by {metric}"))
        hint = (f"; `specctl analyze {payload['results']}` for Pareto fronts and recommendations"
                if "acceptance_rate" in frame else "")
        console.print(f"{payload['ran']} trials run, {len(payload['failed'])} failed, {payload['skipped']} skipped "
                      f"(done before){hint}")

    session.out({**payload, "ranked_by": metric, "top": records(best)}, render)
