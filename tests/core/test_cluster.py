"""`specctl sweep --cluster`: trials on a Dask LocalCluster, against the fake trial session of test_sweep.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specctl.core.cluster import Cluster, check_workers, parse_cluster, pinned
from specctl.core.errors import SpecctlError
from tests.core.test_sweep import alive, cli, events, install_fake, rows, write_profile

needs_dask = pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                                reason='dask[distributed] is not installed (pip install -e ".[dask]")')
METRICS = ("acceptance_rate", "mse", "mse_target", "speedup", "predicted_speedup")


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return install_fake(tmp_path, monkeypatch)


def by_trial(path: Path) -> dict[str, dict[str, str]]:
    return {r["trial_id"]: r for r in rows(path)}


def test_cluster_option_is_parsed_and_bad_values_are_one_line_errors(tmp_path, fake):
    assert parse_cluster("local:4") == Cluster(workers=4)
    assert parse_cluster("tcp://10.0.0.5:8786") == Cluster(address="tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:x", "10.0.0.5:8786", "tcp://"):
        with pytest.raises(SpecctlError, match="expected local:N"):
            parse_cluster(bad)
    result = cli("--profile", write_profile(tmp_path), "--cluster", "local:two")
    assert result.exit_code == 2 and "expected local:N" in result.output
    result = cli("--profile", write_profile(tmp_path), "--cluster", "local:2", "--workers", "2")
    assert result.exit_code == 2 and "alternatives" in result.output
    assert events(tmp_path) == []


def test_without_dask_the_cluster_is_a_one_line_error_naming_the_install(tmp_path, fake, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "distributed" else real(name, *a))
    result = cli("--profile", write_profile(tmp_path), "--cluster", "local:2")
    assert result.exit_code == 2
    assert 'pip install -e ".[dask]"' in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


@needs_dask
def test_a_local_cluster_runs_each_trial_once_with_one_session_per_worker(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_DELAY", "0.2")
    result = cli("--profile", write_profile(tmp_path), "--cluster", "local:2", "--out", "c.csv", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ran"] == 8
    runs, loads = events(tmp_path), events(tmp_path, "load")
    workers = {e["pid"] for e in runs}
    assert len(workers) == 2 and os.getpid() not in workers
    assert len(runs) == 8 and len(loads) == 2  # each worker loaded its session once and kept it
    assert cli("--profile", write_profile(tmp_path), "--out", "one.csv").exit_code == 0
    cluster, single = by_trial(tmp_path / "c.csv"), by_trial(tmp_path / "one.csv")
    assert cluster.keys() == single.keys() and {r["status"] for r in cluster.values()} == {"ok"}
    assert all(cluster[t][m] == single[t][m] for t in single for m in METRICS)


@needs_dask
def test_a_worker_that_dies_mid_trial_is_replaced_and_the_trial_written_once(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_DELAY", "0.1")
    monkeypatch.setenv("FAKE_DIE_K", "2")  # the first trial with k = 2 kills its worker process
    result = cli("--profile", write_profile(tmp_path), "--cluster", "local:2", "--out", "c.csv")
    assert result.exit_code == 0, result.output
    table = rows(tmp_path / "c.csv")
    assert len(table) == 8 and len({r["trial_id"] for r in table}) == 8 and {r["status"] for r in table} == {"ok"}
    attempts: dict[str, list[int]] = {}
    for e in events(tmp_path):
        attempts.setdefault(e["trial_id"], []).append(e["pid"])
    retried = [pids for pids in attempts.values() if len(pids) > 1]
    assert len(retried) == 1 and len(set(retried[0])) == 2  # one trial ran twice, in two processes
    assert len(events(tmp_path, "done")) == 8
    assert "dask: a local cluster of 2 workers; dashboard http://" in result.output


@needs_dask
def test_a_running_scheduler_takes_the_trials_and_each_worker_thread_keeps_a_session(tmp_path, fake, monkeypatch):
    from distributed import LocalCluster

    monkeypatch.setenv("FAKE_DELAY", "0.1")
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0") as running:
        address = running.scheduler_address
        result = cli("--profile", write_profile(tmp_path), "--cluster", address, "--out", "c.csv")
    assert result.exit_code == 0, result.output
    assert f"dask: the scheduler at {address}, 1 worker;" in result.output
    assert len(rows(tmp_path / "c.csv")) == 8 and {r["status"] for r in rows(tmp_path / "c.csv")} == {"ok"}
    loads = events(tmp_path, "load")
    assert len({e["pid"] for e in loads}) == 1 and len(loads) <= 2  # one session per worker thread


@needs_dask
def test_a_killed_client_loses_at_most_one_trial_and_the_rerun_runs_only_the_rest(tmp_path, fake):
    script = tmp_path / "run_sweep.py"
    script.write_text("import sys, typer\nfrom specctl.commands import sweep\n"
                      "import specctl.backends\nspecctl.backends.BACKENDS['timeseries'] = 'fake_runner:FakeBackend'\n"
                      "app = typer.Typer()\napp.command()(sweep.sweep)\n"
                      "if __name__ == '__main__':\n    app(sys.argv[1:])\n")
    out = tmp_path / "r.csv"
    child = subprocess.Popen([sys.executable, str(script), "--profile", write_profile(tmp_path), "--out", str(out),
                              "--cluster", "local:2"], cwd=tmp_path, env={**os.environ, "FAKE_DELAY": "0.4"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out.exists() and len(rows(out)) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "the sweep did not start"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    recorded = {r["trial_id"] for r in rows(out)}
    workers = {e["pid"] for e in events(tmp_path)}
    while any(map(alive, workers)):  # the workers die with their client
        assert time.monotonic() < deadline, "dask workers outlived the killed sweep"
        time.sleep(0.1)
    finished = {e["trial_id"] for e in events(tmp_path, "done")}
    assert recorded <= finished and len(finished - recorded) <= 1 and {r["status"] for r in rows(out)} == {"ok"}

    before = len(events(tmp_path))
    assert cli("--profile", write_profile(tmp_path), "--out", str(out)).exit_code == 0
    rerun = [e["trial_id"] for e in events(tmp_path)[before:]]
    final = rows(out)
    assert len(final) == len({r["trial_id"] for r in final}) == 8 and sorted(rerun) == sorted(
        {r["trial_id"] for r in final} - recorded)


class StubClient:
    """What check_workers asks of a Dask client: two workers, of which `blind` cannot read `missing`."""

    class scheduler:
        address = "tcp://10.0.0.1:8786"

    def __init__(self, blind: str, missing: str, gpu: bool = True) -> None:
        self.blind, self.missing, self.gpu = blind, missing, gpu

    def wait_for_workers(self, n: int, timeout: float) -> None:
        pass

    def scheduler_info(self, n_workers: int) -> dict:
        resources = {"GPU": 1} if self.gpu else {}
        return {"workers": {"tcp://10.0.0.2:1": {"name": "gpu-a", "resources": resources},
                            "tcp://10.0.0.3:1": {"name": self.blind, "resources": resources}}}

    def run(self, fn, paths: list[str]) -> dict[str, list[str]]:
        return {"tcp://10.0.0.2:1": fn(paths), "tcp://10.0.0.3:1": [self.missing]}


def test_a_worker_that_cannot_read_a_checkpoint_stops_the_sweep_naming_the_worker(tmp_path):
    import torch

    (tmp_path / "ckpt").mkdir()
    client = StubClient("gpu-b", "ckpt")
    with pytest.raises(SpecctlError, match=r"dask worker gpu-b \(tcp://10.0.0.3:1\) cannot read ckpt: .*shared"):
        check_workers(client, torch.device("cpu"), ["ckpt"])
    with pytest.raises(SpecctlError, match="GPU=1"):
        check_workers(StubClient("gpu-b", "ckpt", gpu=False), torch.device("cuda"), [])


def test_local_workers_are_pinned_round_robin_to_the_visible_gpus(monkeypatch):
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert [pinned(torch.device("cuda"), name) for name in ("0", "1", "2", "3")] == [
        torch.device("cuda", i) for i in (0, 1, 0, 1)]
    assert current == [0, 1, 0, 1]  # each worker thread's current device is its own GPU too
    assert pinned(torch.device("cpu"), "3") == torch.device("cpu") and len(current) == 4
