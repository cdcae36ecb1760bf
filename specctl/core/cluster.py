"""Sweep trials on a Dask distributed cluster: `specctl sweep --cluster local:N | tcp://HOST:PORT`.

core/sweep.py stays the engine of record (trials, sessions, the results CSV); this module only carries trials to
Dask workers and their rows back. The client is the one writer: it records every row the moment it arrives
(`record_rows`: an atomic rewrite of the CSV), so a killed client resumes like any sweep, losing at most the
trials in flight.

- `local:N` starts a LocalCluster of N worker processes of one thread each. On cuda every worker offers the
  resource GPU=1 and is pinned to one GPU (worker i -> visible GPU i mod count, so N > GPUs share them); on a CPU
  the cores are split between the workers.
- `tcp://HOST:PORT` submits to a running scheduler (`dask scheduler`); on cuda its workers must offer GPU=1
  (`CUDA_VISIBLE_DEVICES=0 dask worker tcp://HOST:PORT --nthreads 1 --resources GPU=1`, one per GPU).
- Every worker thread keeps one `Runner`, hence one loaded trial session while its trials stay compatible.
- A worker that dies mid-trial is restarted by its nanny and the trial rescheduled by Dask (on any worker, up to
  distributed.scheduler.allowed-failures times); only the one result that comes back is written.
- Workers open the checkpoints through their own file system: the paths the trials read must exist on every worker
  (a shared file system, workers started in the sweep's working directory, or absolute paths). A worker that
  cannot see one stops the sweep before any trial runs, with a line naming the worker.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specctl.core.errors import SpecctlError
from specctl.core.sweep import Results, Runner, SessionFactory, Trial, record_rows, trial_row

if TYPE_CHECKING:
    from distributed import Client

INSTALL = 'pip install -e ".[dask]"'
OnRow = Callable[[dict[str, Any], str], None]  # a recorded row and the name of the worker that ran it


@dataclass(frozen=True)
class Cluster:
    """Where trials run: `workers` processes started here, or the running scheduler at `address`."""

    workers: int = 0
    address: str | None = None


def parse_cluster(text: str) -> Cluster:
    """`local:N` or a scheduler address (`tcp://HOST:PORT`, any Dask protocol)."""
    if text.startswith("local:") and text[6:].isdigit() and int(text[6:]) >= 1:
        return Cluster(workers=int(text[6:]))
    if "://" in text and text.split("://", 1)[1]:
        return Cluster(address=text)
    raise SpecctlError(f"--cluster '{text}': expected local:N (N worker processes on this machine) or "
                       "tcp://HOST:PORT (a running dask scheduler)")


def require_dask() -> None:
    if importlib.util.find_spec("distributed") is None:
        raise SpecctlError(f"--cluster needs Dask distributed, which is not installed: {INSTALL}")


@contextmanager
def connect(cluster: Cluster, device: torch.device) -> Iterator[Client]:
    """A client of the running scheduler, or of a LocalCluster that lives as long as the `with`."""
    require_dask()
    from distributed import Client, LocalCluster

    if cluster.address:
        try:
            client = Client(cluster.address, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise SpecctlError(f"cannot reach the dask scheduler at {cluster.address}: {e}") from None
        with client:
            yield client
        return
    gpu = {"GPU": 1} if device.type == "cuda" else None
    # memory_limit=0: the OS, not Dask's memory monitor, decides whether a worker with a large model may live
    with LocalCluster(n_workers=cluster.workers, threads_per_worker=1, processes=True, resources=gpu,
                      memory_limit=0, dashboard_address=":0", silence_logs=logging.ERROR) as local, \
            Client(local) as client:
        yield client


def unreadable(paths: list[str]) -> list[str]:
    """The paths this process cannot read (run on every worker)."""
    return [p for p in paths if not os.access(p, os.R_OK)]


def check_workers(client: Client, device: torch.device, paths: list[str]) -> dict[str, Any]:
    """The scheduler's workers (address -> info) once every one can run the trials: some worker offers GPU=1 when
    the trials need it, and every worker reads every path in `paths`."""
    try:
        client.wait_for_workers(1, timeout=30)
    except TimeoutError:
        raise SpecctlError(f"the dask scheduler at {client.scheduler.address} has no workers: start some with "
                           f"`dask worker {client.scheduler.address}`") from None
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if device.type == "cuda" and not any(w.get("resources", {}).get("GPU") for w in workers.values()):
        raise SpecctlError("no dask worker offers the resource GPU=1 that cuda trials need: start them with "
                           f"`dask worker {client.scheduler.address} --nthreads 1 --resources GPU=1`")
    for address, missing in client.run(unreadable, paths).items():
        if missing:
            raise SpecctlError(f"dask worker {workers[address]['name']} ({address}) cannot read {missing[0]}: every "
                               "worker must see the sweep's checkpoints (a shared file system with workers started "
                               "in this directory, or absolute paths)")
    return workers


def describe(client: Client, workers: dict[str, Any], cluster: Cluster, device: torch.device) -> str:
    """One line: the workers, the GPU sharing if any, and the dashboard address."""
    n = f"{len(workers)} worker{'s' * (len(workers) != 1)}"
    where = f"a local cluster of {n}" if cluster.workers else f"the scheduler at {client.scheduler.address}, {n}"
    line = f"dask: {where}; dashboard {client.dashboard_link}"
    if cluster.workers and importlib.util.find_spec("bokeh") is None:
        line += f" (it needs bokeh: {INSTALL})"
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    if cluster.workers > gpus > 0:
        line += f"; note: {cluster.workers} workers share {gpus} GPU(s), so trial timings include their contention"
    return line


def run_on_cluster(trials: list[Trial], results: Results, factory: SessionFactory, device: torch.device,
                   cluster: Cluster, paths: list[str], on_row: OnRow | None = None,
                   say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run `trials` on the cluster, recording each row in `results` as it arrives; returns the rows of this run.
    `paths` are the files and folders the trials read (checked on every worker first)."""
    if not trials:
        return []
    with connect(cluster, device) as client:
        workers = check_workers(client, device, paths)
        say(describe(client, workers, cluster, device))
        ran_on: dict[str, str] = {}
        rows = collect(client, trials, factory, device, cluster, ran_on)
        if on_row is None:
            return record_rows(rows, results)
        return record_rows(rows, results, lambda row: on_row(row, ran_on[row["trial_id"]]))


def collect(client: Client, trials: list[Trial], factory: SessionFactory, device: torch.device, cluster: Cluster,
            ran_on: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Every trial submitted at once; rows as they finish (`ran_on[trial_id]` names the worker of each)."""
    from distributed import as_completed

    threads = max(1, (os.cpu_count() or 1) // cluster.workers) if cluster.workers else None
    resources = {"GPU": 1} if device.type == "cuda" else None
    run = uuid.uuid4().hex[:8]  # a scheduler may outlive a sweep: keys must not meet those of an earlier run
    futures = {client.submit(run_trial, factory, str(device), trial, threads, cluster.workers > 0,
                             key=f"trial-{trial.trial_id}-{run}", resources=resources): trial for trial in trials}
    for future in as_completed(futures):
        trial = futures[future]
        try:
            row, worker = future.result()
        except CancelledError:
            raise SpecctlError("the dask scheduler dropped the sweep's trials (did it stop?); finished trials are "
                               "in the results CSV, rerun to resume") from None
        except Exception as e:  # e.g. KilledWorker: the trial took down allowed-failures workers in a row
            row, worker = trial_row(trial, {}, 0.0, f"on the dask cluster: {type(e).__name__}: {e}"), "?"
        ran_on[trial.trial_id] = worker
        yield row


_thread = threading.local()  # on a worker: the Runner of each worker thread


def run_trial(factory: SessionFactory, device: str, trial: Trial, threads: int | None,
              pin: bool) -> tuple[dict[str, Any], str]:
    """On a Dask worker: one trial through this thread's Runner; returns (its row, the worker's name)."""
    from distributed import get_worker

    name = str(get_worker().name)
    if threads:
        torch.set_num_threads(threads)
    where = torch.device(device)
    runner = thread_runner(factory, pinned(where, name) if pin else where)
    return runner.run(trial), name


def pinned(device: torch.device, name: str) -> torch.device:
    """A local worker's own GPU: worker i takes visible GPU i mod count (made its thread's current device too)."""
    if device.type != "cuda" or device.index is not None:
        return device
    index = int(name) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def thread_runner(factory: SessionFactory, device: torch.device) -> Runner:
    """This thread's Runner, kept across trials (and its loaded session with it) while factory and device stay."""
    key = (pickle.dumps(factory), str(device))
    if getattr(_thread, "key", None) != key:
        _thread.runner, _thread.key = Runner(factory, device), key
    return _thread.runner
