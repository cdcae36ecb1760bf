"""Sweep engine and `specctl sweep`, against a fake trial session (no models are loaded)."""

from __future__ import annotations

import csv
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from specctl import backends
from specctl.commands import sweep as sweep_cmd
from specctl.core.errors import SpecctlError
from specctl.core.sweep import Results, exclusive, expand_grid, plan_trials, run_sweep
from specctl.timeseries.profile import TimeseriesProfile as Profile

# Written to a temporary folder and imported by name, so that the sweep command (in this process, in spawned
# workers and in a subprocess) finds it through the backend table. Every load and run is logged to $FAKE_LOG.
FAKE_RUNNER = '''
import json, os, time
from specctl.core.errors import SpecctlError
from specctl.core.sweep import trial_hash


def log(event, profile):
    line = json.dumps({"event": event, "pid": os.getpid(), "trial_id": trial_hash(profile.model_dump())})
    with open(os.environ["FAKE_LOG"], "a") as f:
        f.write(line + "\\n")


def meet(processes, timeout=120.0):
    """Wait until trials have started in `processes` distinct processes (a rendezvous: the first trial of each
    worker holds its worker until the others have one too, so no worker can run every trial alone)."""
    deadline = time.monotonic() + timeout
    while processes and len({e["pid"] for e in map(json.loads, open(os.environ["FAKE_LOG"]))}) < processes:
        if time.monotonic() > deadline:
            raise RuntimeError(f"trials never ran in {processes} processes at once")
        time.sleep(0.01)


class FakeSession:
    def __init__(self, profile, device, progress=None):
        self.profile = profile
        log("load", profile)

    def compatible(self, profile):
        return profile.model == self.profile.model and profile.data == self.profile.data

    def run(self, profile):
        log("run", profile)
        meet(int(os.environ.get("FAKE_MEET", "0")))
        time.sleep(float(os.environ.get("FAKE_DELAY", "0")) * (1 + profile.spec.bias / 10))
        s = profile.spec
        if s.k == int(os.environ.get("FAKE_DIE_K", "0")) and not os.path.exists(os.environ["FAKE_LOG"] + ".died"):
            open(os.environ["FAKE_LOG"] + ".died", "w").close()
            os._exit(1)  # the worker process dies mid-trial, once
        if s.k == int(os.environ.get("FAKE_FAIL_K", "0")):
            raise RuntimeError("boom")
        if s.emit == "sample":
            raise SpecctlError("emit 'sample' needs a stochastic draft")
        acceptance = min(1.0, s.sigma * s.bias)
        log("done", profile)
        return {"acceptance_rate": acceptance, "mse": 0.4 + 0.01 * s.bias, "mse_target": 0.4,
                "speedup": 1.0 + acceptance * s.k / 4, "predicted_speedup": 1.1 + acceptance * s.k / 4}


class FakeBackend:
    def ensure_checkpoints(self, profile, device, train_missing, say):
        pass

    def sweep_session(self, profile, device, progress=None):
        return FakeSession(profile, device, progress)

    def trial_inputs(self, profile):
        return os.environ["FAKE_INPUTS"].split(",") if os.environ.get("FAKE_INPUTS") else []
'''

TOY = """
name = "toy"
device = "cpu"

[sweep]
"spec.sigma" = [0.25, 0.5]
"spec.bias" = [1.0, 2.0]
"spec.k" = [1, 2]
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    return install_fake(tmp_path, monkeypatch)


def install_fake(tmp_path: Path, monkeypatch):
    """The fake backend as `timeseries` in the backend table (importable by spawned workers too)."""
    (tmp_path / "fake_runner.py").write_text(FAKE_RUNNER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.jsonl"))
    monkeypatch.setitem(backends.BACKENDS, "timeseries", "fake_runner:FakeBackend")
    sys.modules.pop("fake_runner", None)
    return importlib.import_module("fake_runner")


def events(tmp_path: Path, event: str = "run") -> list[dict]:
    log = tmp_path / "log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [e for e in map(json.loads, lines) if e["event"] == event]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def cli(*args: str):
    app = typer.Typer()
    app.command()(sweep_cmd.sweep)
    return CliRunner().invoke(app, list(args))


def write_profile(tmp_path: Path, text: str = TOY) -> str:
    (tmp_path / "toy.toml").write_text(text)
    return str(tmp_path / "toy.toml")


def test_grid_is_the_cartesian_product_in_written_order():
    grid = expand_grid({"spec.k": [1, 2], "spec.emit": ["target_mean", "draft_mean", "sample"]})
    assert len(grid) == 6
    assert grid[:2] == [{"spec.k": 1, "spec.emit": "target_mean"}, {"spec.k": 1, "spec.emit": "draft_mean"}]
    with pytest.raises(SpecctlError, match="no values"):
        expand_grid({"spec.k": []})


def test_trial_ids_hash_the_resolved_profile_and_invalid_values_fail_per_trial():
    base = Profile(spec={"emit": "sample"}, sweep={"spec.rule": ["gaussian", "exact"], "spec.bias": [1, 2.0]})
    trials = plan_trials(base)
    assert [t.params for t in trials][-1] == {"spec.rule": "exact", "spec.bias": 2.0}
    assert [bool(t.error) for t in trials] == [False, False, False, True]
    assert "exact" in trials[-1].error
    assert len({t.trial_id for t in trials}) == 4
    # the id depends on the resolved configuration, not on the grid it came from (bias 1 == 1.0)
    other = plan_trials(Profile(spec={"emit": "sample"}, sweep={"spec.bias": [1.0, 5.0]}))
    assert other[0].trial_id == trials[0].trial_id
    with pytest.raises(SpecctlError, match="no valid trial"):
        plan_trials(Profile(sweep={"spec.sigmaa": [1.0]}))
    with pytest.raises(SpecctlError, match="no \\[sweep\\] table"):
        plan_trials(Profile())


def test_session_is_reused_until_a_trial_needs_other_models(tmp_path, fake):
    trials = plan_trials(Profile(sweep={"model.d_model": [32, 64], "spec.k": [1, 2, 3]}))
    results = Results.open(tmp_path / "r.csv", ["model.d_model", "spec.k"])
    ran = run_sweep(trials, results, fake.FakeSession, torch.device("cpu"))
    assert [r["status"] for r in ran] == ["ok"] * 6
    assert len(events(tmp_path, "load")) == 2 and len(events(tmp_path)) == 6


def test_sweep_writes_one_csv_and_a_rerun_skips_finished_trials(tmp_path, fake):
    result = cli("--profile", write_profile(tmp_path))
    assert result.exit_code == 0, result.output
    csv_path = tmp_path / "runs" / "sweep" / "toy" / "results.csv"
    table = rows(csv_path)
    assert len(table) == 8 and {r["status"] for r in table} == {"ok"}
    header = list(table[0])
    assert header[:4] == ["trial_id", "spec.sigma", "spec.bias", "spec.k"]
    assert header[-3:] == ["wall_s", "status", "error"] and "acceptance_rate" in header
    assert len(events(tmp_path, "load")) == 1
    assert "top 8 of 8" in result.output
    run_dirs = [d for d in (tmp_path / "runs" / "sweep").iterdir() if d.name.startswith("toy-")]
    assert (run_dirs[0] / "profile.toml").is_file()
    assert json.loads((run_dirs[0] / "manifest.json").read_text())["status"] == "finished"

    again = cli("--profile", write_profile(tmp_path))
    assert again.exit_code == 0, again.output
    assert len(events(tmp_path)) == 8 and len(rows(csv_path)) == 8


def test_failed_trials_are_recorded_and_retried(tmp_path, fake, monkeypatch):
    toml = write_profile(tmp_path, TOY.replace('"spec.sigma" = [0.25, 0.5]', '"spec.emit" = ["target_mean", "sample"]'))
    out = tmp_path / "r.csv"
    monkeypatch.setenv("FAKE_FAIL_K", "2")
    assert cli("--profile", toml, "--out", str(out)).exit_code == 0
    table = rows(out)
    errors = {(r["spec.emit"], r["spec.k"], r["error"]) for r in table if r["status"] == "failed"}
    assert len(table) == 8 and sum(r["status"] == "failed" for r in table) == 6
    assert errors == {("target_mean", "2", "RuntimeError: boom"), ("sample", "2", "RuntimeError: boom"),
                      ("sample", "1", "emit 'sample' needs a stochastic draft")}

    monkeypatch.delenv("FAKE_FAIL_K")
    before = len(events(tmp_path))
    assert cli("--profile", toml, "--out", str(out)).exit_code == 0
    assert len(events(tmp_path)) - before == 6
    assert sorted(r["status"] for r in rows(out)) == ["failed"] * 4 + ["ok"] * 4


def test_invalid_trial_values_are_reported_without_running(tmp_path, fake):
    toml = write_profile(tmp_path, TOY.replace('"spec.sigma" = [0.25, 0.5]', '"spec.rule" = ["gaussian", "exact"]'))
    assert cli("--profile", toml, "--out", "r.csv").exit_code == 0
    failed = [r for r in rows(tmp_path / "r.csv") if r["status"] == "failed"]
    assert len(failed) == 4 and all("exact" in r["error"] for r in failed)  # exact needs bias 1 and emit sample
    assert len(events(tmp_path)) == 4


def test_workers_run_trials_in_parallel_processes(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_MEET", "2")  # each worker's first trial waits until the other worker has one running
    result = cli("--profile", write_profile(tmp_path), "--workers", "2", "--out", "r.csv", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["ran"] == 8
    assert {r["status"] for r in rows(tmp_path / "r.csv")} == {"ok"} and len(rows(tmp_path / "r.csv")) == 8
    pids = {e["pid"] for e in events(tmp_path)}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, neither the sweep's own
    assert sorted(e["trial_id"] for e in events(tmp_path)) == sorted(r["trial_id"] for r in rows(tmp_path / "r.csv"))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, 1), (signal.SIGINT, 1), (signal.SIGKILL, 2)])
def test_a_killed_sweep_keeps_its_csv_and_the_rerun_runs_only_missing_trials(tmp_path, fake, sig, workers):
    script = tmp_path / "run_sweep.py"
    script.write_text("import sys, typer\nfrom specctl.commands import sweep\n"
                      "import specctl.backends\nspecctl.backends.BACKENDS['timeseries'] = 'fake_runner:FakeBackend'\n"
                      "app = typer.Typer()\napp.command()(sweep.sweep)\n"
                      "if __name__ == '__main__':\n    app(sys.argv[1:])\n")  # spawned workers import this file
    out = tmp_path / "r.csv"
    # the child imports this checkout's specctl, whatever `pip install -e` points at
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")])
    child = subprocess.Popen([sys.executable, str(script), "--profile", write_profile(tmp_path), "--out", str(out),
                              "--workers", str(workers)], cwd=tmp_path,
                             env={**os.environ, "FAKE_DELAY": "0.4", "PYTHONPATH": path},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out.exists() and len(rows(out)) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "the sweep did not start"
        time.sleep(0.05)
    child.send_signal(sig)
    code = child.wait(timeout=30)
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    manifest = json.loads(next((tmp_path / "runs" / "sweep").glob("toy-*/manifest.json")).read_text())
    assert manifest["status"] == ("interrupted" if sig == signal.SIGINT else "running")
    done = {r["trial_id"] for r in rows(out)}
    assert 2 <= len(done) < 8 and {r["status"] for r in rows(out)} == {"ok"}
    orphans = {e["pid"] for e in events(tmp_path)} - {child.pid}
    while any(map(alive, orphans)):  # parallel workers notice that their sweep died and exit
        assert time.monotonic() < deadline, "worker processes outlived the sweep"
        time.sleep(0.1)

    before = len(events(tmp_path))
    assert cli("--profile", write_profile(tmp_path), "--out", str(out)).exit_code == 0
    rerun = [e["trial_id"] for e in events(tmp_path)[before:]]
    final = {r["trial_id"] for r in rows(out)}
    assert len(final) == 8 and sorted(rerun) == sorted(final - done)


def test_dry_run_lists_trials_and_grid_replaces_a_dimension(tmp_path, fake):
    result = cli("--profile", write_profile(tmp_path), "--grid", "spec.k=[3]", "--grid", "spec.bias=5.0", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "2 trials" in result.output and "pending" in result.output
    assert events(tmp_path) == []


def test_a_second_sweep_on_the_same_csv_is_refused(tmp_path, fake):
    with exclusive(tmp_path / "r.csv"):
        result = cli("--profile", write_profile(tmp_path), "--out", "r.csv")
    assert result.exit_code == 2 and "another sweep" in result.output


def test_a_foreign_csv_at_out_is_not_overwritten(tmp_path, fake):
    (tmp_path / "r.csv").write_text("a,b\n1,2\n")
    result = cli("--profile", write_profile(tmp_path), "--out", "r.csv")
    assert result.exit_code == 2 and "not a sweep results CSV" in result.output
    assert (tmp_path / "r.csv").read_text() == "a,b\n1,2\n"


@pytest.mark.parametrize("item, message", [
    ("spec.k=[-1,2]", "--grid 'spec.k=[-1,2]': key 'spec.k': Input should be greater than or equal to 0"),
    ("spec.kk=[1,2]", "--grid 'spec.kk=[1,2]': unknown key 'spec.kk'; did you mean 'spec.k'?"),
    ("spec.k=[]", "--grid 'spec.k=[]': no values"),
    ("spec.k", "--grid 'spec.k': expected key.sub=[values]"),
    ("=3", "--grid '=3': expected key.sub=[values]"),
])
def test_grid_errors_name_the_grid_item(tmp_path, fake, item, message):
    result = cli("--profile", write_profile(tmp_path), "--grid", item, "--dry-run")
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output
    assert "--set" not in result.output


def test_sweeping_keys_the_rule_ignores_is_warned_before_any_trial(tmp_path, fake):
    tolerance = cli("--profile", write_profile(tmp_path), "--set", 'spec.rule="tolerance"', "--dry-run")
    said = " ".join(tolerance.output.split())
    assert tolerance.exit_code == 0 and "warning: sweeping spec.sigma changes nothing: rule 'tolerance'" in said
    assert "warning: sweeping spec.bias changes nothing" in said and "spec.k changes nothing" not in said
    gaussian = cli("--profile", write_profile(tmp_path), "--dry-run")
    assert gaussian.exit_code == 0 and "warning" not in gaussian.output
