"""`specctl sweep`: run every configuration of a profile's [sweep] grid; one resumable results CSV."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

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
from specctl.core.errors import SpecctlError
from specctl.core.profile import parse_override, with_overrides
from specctl.core.schema import Profile

if TYPE_CHECKING:
    import pandas as pd

    from specctl.core.cluster import Cluster
    from specctl.core.rundir import RunDir
    from specctl.core.sweep import Results, Trial

TrainMissingOpt = Annotated[bool, typer.Option(
    "--train-missing", help="Train missing checkpoints first with the profiles that build them (the whole chain).")]


def with_grid(profile: Profile, items: list[str]) -> Profile:
    """`--grid spec.k=[3,4]` replaces (or adds) one dimension of the [sweep] table; each value is checked alone
    first, so that a bad one is an error naming its --grid item."""
    grid = dict(profile.sweep)
    for item in items:
        where = f"--grid '{item}'"
        try:
            keys, value = parse_override(item)
        except SpecctlError:
            raise SpecctlError(f"{where}: expected key.sub=[values]") from None
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SpecctlError(f"{where}: no values")
        for one in values:
            with_overrides(profile, {"sweep": {}, ".".join(keys): one}, where)
        grid[".".join(keys)] = values
    return with_overrides(profile, {"sweep": grid})


def warn_ignored(trials: list[Trial], keys: list[str], say: Callable[[str], None]) -> None:
    """A swept key that every trial's settings ignore measures nothing but timing noise: say so before any trial."""
    profiles = [t.profile for t in trials if t.profile is not None]
    for key in keys:
        reasons = [p.ignored_keys().get(key) for p in profiles]
        if profiles and all(reasons):
            say(f"warning: sweeping {key} changes nothing: {reasons[0]}; its trials differ only by timing noise")


def default_csv(profile: Profile) -> Path:
    """A path stable across reruns of the same profile, so that a rerun resumes."""
    return Path(profile.run_root) / "sweep" / profile.name.replace("/", "-") / "results.csv"


def plan_rows(trials: list[Trial], results: Results) -> list[dict[str, Any]]:
    done = results.finished()
    return [{"trial_id": t.trial_id, **{k: t.params[k] for k in results.keys},
             "state": "done" if t.trial_id in done else f"invalid: {t.error}" if t.error else "pending"}
            for t in trials]


def plan_table(rows: list[dict[str, Any]], results: Results) -> Table:
    table = Table("trial_id", *results.keys, "state", title=f"{len(rows)} trials, results in {results.path}")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
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
    cluster: Annotated[str | None, typer.Option("--cluster", help=(
        "Run the trials on Dask: local:N (N worker processes here, one GPU each when there are GPUs) or "
        "tcp://HOST:PORT (a running dask scheduler). Needs the dask extra.")
    )] = None,
    top_n: int = typer.Option(10, "--top", "-n", min=1, help="How many configurations the final table shows."),
    train_missing: TrainMissingOpt = False,
    dry_run: bool = typer.Option(False, "--dry-run", help="List the trials (done, pending, invalid) and exit."),
    json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the \\[sweep] grid (cartesian product) through spec-test (or pretrain, for a recipe search with
    sweep_command = "pretrain"); rerunning resumes where it stopped."""
    from specctl.core.cluster import parse_cluster, require_dask
    from specctl.core.files import check_creatable

    where = parse_cluster(cluster) if cluster else None
    if where is not None:
        require_dask()
        if workers > 1:
            raise SpecctlError("--workers and --cluster are alternatives: local:N already runs N worker processes")
    session = open_session(profile, set_, device, seed, json_out, False, verbose)
    p = with_grid(session.profile, grid or [])
    csv_path = out or default_csv(p)
    if dry_run:
        list_trials(session, p, csv_path)
        return
    if workers > 1 and session.device.type == "cuda" and p.sweep_command != "pretrain":
        session.say("note: --workers ignored on cuda (parallel trials would share the GPU and distort timings)")
        workers = 1
    check_creatable(csv_path.parent, "the folder of the results CSV (--out)")
    check_creatable(Path(p.run_root), "the run root (run_root)")
    if p.sweep_command != "pretrain":  # every trial reads the same checkpoints: check them once, up front
        session.backend.ensure_checkpoints(p, session.device, train_missing, session.say)
    run_grid(session, p, csv_path, workers, where, cluster, top_n)


def list_trials(session: Session, p: Profile, csv_path: Path) -> None:
    """--dry-run: every trial of the grid, done, pending or invalid."""
    from specctl.core.sweep import Results, plan_trials

    results = Results.open(csv_path, list(p.sweep))
    trials = plan_trials(p)
    warn_ignored(trials, list(p.sweep), session.say)
    rows = plan_rows(trials, results)
    session.out({"results": str(csv_path), "trials": rows}, lambda: console.print(plan_table(rows, results)))


def run_grid(session: Session, p: Profile, csv_path: Path, workers: int, where: Cluster | None,
             cluster: str | None, top_n: int) -> None:
    """The pending trials into the one CSV (locked against a second sweep), the run directory, the final table;
    a sweep whose every trial failed is an error."""
    from specctl.core.rundir import RunDir
    from specctl.core.sweep import Results, exclusive, pending_trials, plan_trials

    with exclusive(csv_path):
        trials = plan_trials(p)
        warn_ignored(trials, list(p.sweep), session.say)
        results = Results.open(csv_path, list(p.sweep))
        todo = pending_trials(trials, results)
        others = len(set(results.rows) - {t.trial_id for t in trials})
        if others:
            session.say(f"note: {csv_path} also holds {others} trials of other settings (not in this grid); "
                        "`specctl analyze` includes them; pass --out for a separate file")
        run = RunDir.create(p, "sweep", str(session.device))
        run.manifest.update(results=str(csv_path), trials=len(trials), pending=len(todo), workers=workers,
                            cluster=cluster)
        session.say(f"{len(trials)} trials, {len(trials) - len(todo)} already done; results: {csv_path}; "
                    f"run directory: {run.path}")
        ran = run_with_progress(todo, results, session, workers, run, where)
    failed = [r["trial_id"] for r in ran if r["status"] != "ok"]
    run.manifest.update(ran=len(ran), failed=failed)
    run.finish("failed" if ran and len(failed) == len(ran) else "finished")
    report(session, [t.trial_id for t in trials], top_n, {
        "results": str(csv_path), "run_dir": str(run.path), "trials": len(trials),
        "skipped": len(trials) - len(todo), "ran": len(ran), "failed": failed,
    })
    if ran and len(failed) == len(ran):
        first = next(r for r in ran if r["status"] != "ok")
        raise SpecctlError(f"every trial failed ({len(ran)}); the first: {first['error']}")


def run_with_progress(todo: list[Trial], results: Results, session: Session, workers: int, run: RunDir,
                      cluster: Cluster | None = None) -> list[dict[str, Any]]:
    """The trials under a progress bar with ETA (and trials per worker on a cluster); a failure is printed as it
    happens, an interrupt recorded."""
    from specctl.backends import BACKENDS, open_trial_session
    from specctl.core.cluster import run_on_cluster
    from specctl.core.sweep import run_sweep

    try:
        with session.progress() as progress:
            task = progress.add_task("sweep", total=len(todo), info="")
            per_worker: Counter[str] = Counter()

            def on_row(row: dict[str, Any], worker: str | None = None) -> None:
                per_worker.update([worker] if worker else [])
                counts = " ".join(f"{'w' * name.isdigit()}{name}:{n}" for name, n in sorted(per_worker.items()))
                progress.update(task, advance=1, info=row_info(row) + (f" | {counts}" if counts else ""))
                if row["status"] != "ok":
                    session.say(f"warning: trial {row['trial_id']} failed: {row['error']}")

            factory = partial(open_trial_session, dict(BACKENDS))
            if cluster is not None:
                paths = sorted({path for t in todo if t.profile for path in session.backend.trial_inputs(t.profile)
                                if Path(path).exists()})
                return run_on_cluster(todo, results, factory, session.device, cluster, paths, on_row, session.say)
            return run_sweep(todo, results, factory, session.device, workers, progress, on_row)
    except KeyboardInterrupt:
        run.finish("interrupted")
        session.say(f"interrupted: finished trials are in {results.path}; rerun the same command to resume")
        raise
    except BaseException:
        run.finish("failed")
        raise


def report(session: Session, trial_ids: list[str], n: int, payload: dict[str, Any]) -> None:
    """The final table: this grid's best finished configurations (see analysis.rank_metric)."""
    from specctl.commands.render import frame_table
    from specctl.core.analysis import rank_metric, top
    from specctl.core.results import finished, kind_of, load_results, records

    frame: pd.DataFrame = load_results([Path(payload["results"])])
    ok = finished(frame[frame["trial_id"].isin(trial_ids)])
    kind, metric = kind_of(ok), rank_metric(ok)
    best = top(ok, metric, n, kind) if kind and metric else ok.head(0)

    def render() -> None:
        if metric:
            console.print(frame_table(best, f"top {len(best)} of {len(ok)} finished trials by {metric}"))
        console.print(f"{payload['ran']} trials run, {len(payload['failed'])} failed, {payload['skipped']} skipped "
                      f"(done before); `specctl analyze {payload['results']}` for Pareto fronts and recommendations",
                      markup=False, highlight=False)

    session.out({**payload, "ranked_by": metric, "top": json.loads(json.dumps(records(best), default=str))},
                render)
