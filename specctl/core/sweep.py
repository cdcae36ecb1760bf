"""The sweep engine: expand a profile's [sweep] grid into trials, run each through a pluggable session, and
keep ONE results CSV (one row per trial, rewritten atomically after each trial) so a rerun resumes.

A trial is identified by a short hash of its resolved profile, so a rerun skips the trials that already
finished (status ok) and retries the failed ones. The engine knows nothing about time series: it calls a
`SessionFactory` (chosen by the caller, usually by `profile.kind`) and records whatever flat metrics the
session's `run` returns.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import itertools
import json
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from specctl.core.errors import SpecctlError
from specctl.core.files import check_creatable, write_csv, writing
from specctl.core.profile import with_overrides
from specctl.core.schema import Profile

TRAILING = ("wall_s", "status", "error")


class TrialSession(Protocol):
    def compatible(self, profile: Profile) -> bool: ...

    def run(self, profile: Profile) -> dict[str, Any]: ...


SessionFactory = Callable[[Profile, torch.device, Any], TrialSession]


@dataclass(frozen=True)
class Trial:
    trial_id: str
    params: dict[str, Any]
    profile: Profile | None = None
    error: str | None = None


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the [sweep] table in a stable order (first key slowest, values as written)."""
    empty = [key for key, values in grid.items() if not values]
    if empty:
        raise SpecctlError(f"[sweep] key '{empty[0]}' has no values")
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def trial_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_trial(base: Profile, params: dict[str, Any]) -> Trial:
    """One resolved trial profile (its own [sweep] table emptied); an invalid value makes a failed trial."""
    try:
        profile = with_overrides(base, {"sweep": {}, **params}, "[sweep]")
    except SpecctlError as e:
        return Trial(trial_hash({"base": base.model_dump(exclude={"sweep"}), "params": params}), params, error=str(e))
    return Trial(trial_hash(profile.model_dump()), params, profile)


def plan_trials(base: Profile) -> list[Trial]:
    """Every distinct trial of the profile's grid, in grid order."""
    if not base.sweep:
        raise SpecctlError(f"profile '{base.name}' has no [sweep] table (add e.g. \"spec.sigma\" = [0.1, 0.25])")
    trials: dict[str, Trial] = {}
    for params in expand_grid(base.sweep):
        trial = make_trial(base, params)
        trials.setdefault(trial.trial_id, trial)
    if all(t.error for t in trials.values()):
        raise SpecctlError(f"no valid trial in the grid: {next(iter(trials.values())).error}")
    return list(trials.values())


def cell(value: Any) -> Any:
    """A CSV-friendly scalar: containers as JSON, numpy/torch scalars as Python numbers."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value.item() if hasattr(value, "item") else value


@dataclass
class Results:
    """The results CSV: rows keyed by trial id, swept keys first, then metrics, then wall_s/status/error."""

    path: Path
    keys: list[str]
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    header: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, keys: list[str]) -> Results:
        results = cls(Path(path), keys)
        if results.path.is_file():
            with open(results.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                results.header = list(reader.fieldnames or [])
                missing = [c for c in ("trial_id", "status") if c not in results.header]
                if missing:
                    raise SpecctlError(f"{path} exists but is not a sweep results CSV "
                                       f"(no column {', '.join(missing)}); pass another --out")
                results.rows = {row["trial_id"]: row for row in reader}
        return results

    def finished(self) -> set[str]:
        return {tid for tid, row in self.rows.items() if row.get("status") == "ok"}

    def columns(self) -> list[str]:
        seen = dict.fromkeys(["trial_id", *self.keys, *self.header, *(k for r in self.rows.values() for k in r)])
        return [c for c in seen if c not in TRAILING] + list(TRAILING)

    def record(self, row: dict[str, Any]) -> None:
        """Keep `row` and rewrite the CSV whole; a failed write is one SpecctlError line and the CSV keeps the rows
        it had."""
        self.rows[row["trial_id"]] = row
        write_csv(self.path, list(self.rows.values()), self.columns())


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Refuse a second sweep writing the same CSV at the same time (the lock dies with its process); a folder the
    CSV cannot be written in is refused here, before any trial runs."""
    check_creatable(path.parent, "the folder of the results CSV")
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(f".{path.name}.lock"), "w")  # noqa: SIM115 (closed by the `with lock` below)
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SpecctlError(f"another sweep is writing {path}; wait for it or pass --out") from None
        yield


@dataclass
class Runner:
    """Runs trials one by one, keeping the loaded session while the trial profiles stay compatible."""

    factory: SessionFactory
    device: torch.device
    progress: Any = None
    session: TrialSession | None = None

    def metrics(self, profile: Profile) -> dict[str, Any]:
        if self.session is None or not self.session.compatible(profile):
            self.session = None
            self.session = self.factory(profile, self.device, self.progress)
        return self.session.run(profile)

    def run(self, trial: Trial) -> dict[str, Any]:
        """One CSV row; any exception is caught and recorded as a failed trial."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        error = trial.error
        if error is None:
            try:
                metrics = {k: cell(v) for k, v in self.metrics(trial.profile).items()}
            except SpecctlError as e:
                error = str(e)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
        return trial_row(trial, metrics, time.perf_counter() - start, error)


def trial_row(trial: Trial, metrics: dict[str, Any], seconds: float, error: str | None) -> dict[str, Any]:
    """The CSV row of a trial (the engine's own columns win over same-named metrics)."""
    return {
        **metrics,
        "trial_id": trial.trial_id, **{k: cell(v) for k, v in trial.params.items()},
        "wall_s": round(seconds, 3), "status": "failed" if error else "ok", "error": error or "",
    }


_worker: Runner | None = None


def _exit_with(parent: int) -> None:
    """A worker whose sweep process died (even by SIGKILL) exits instead of idling with its models loaded."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(factory: SessionFactory, device: str, threads: int) -> None:
    global _worker
    threading.Thread(target=_exit_with, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    _worker = Runner(factory, torch.device(device))


def _run_in_worker(trial: Trial) -> dict[str, Any]:
    assert _worker is not None
    return _worker.run(trial)


def run_parallel(trials: list[Trial], factory: SessionFactory, device: torch.device,
                 workers: int) -> Iterator[dict[str, Any]]:
    """Trials in `workers` spawned processes, each with its own session; rows come back as they finish."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(factory, str(device), threads))
    try:
        futures = {pool.submit(_run_in_worker, trial): trial for trial in trials}
        for future in as_completed(futures):
            try:
                yield future.result()
            except Exception as e:  # the worker process died (e.g. out of memory)
                yield trial_row(futures[future], {}, 0.0, f"worker process failed: {e!r}")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def pending_trials(trials: list[Trial], results: Results) -> list[Trial]:
    """The trials a run still has to do: all but those already finished with status ok."""
    done = results.finished()
    return [t for t in trials if t.trial_id not in done]


def run_sweep(
    trials: list[Trial], results: Results, factory: SessionFactory, device: torch.device, workers: int = 1,
    progress: Any = None, on_row: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run `trials`, recording each row in `results` as soon as it arrives; returns the rows of this run."""
    workers = min(workers, len(trials))
    rows = (run_parallel(trials, factory, device, workers) if workers > 1
            else map(Runner(factory, device, progress).run, trials))
    return record_rows(rows, results, on_row)


def record_rows(rows: Iterable[dict[str, Any]], results: Results,
                on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """The one writer: each row is recorded in `results` (an atomic rewrite of the CSV) the moment it arrives, so
    a sweep killed at any point keeps every row it had received."""
    ran = []
    for row in rows:
        results.record(row)
        ran.append(row)
        if on_row is not None:
            on_row(row)
    return ran
