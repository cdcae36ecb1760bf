"""Scale-out on real (tiny) models: the quickstart sweep on a Dask LocalCluster, pretrain under torchrun (gloo)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from specctl.cli import app
from specctl.core.checkpoint import load_weights
from tests.conftest import REPO

# A tiny training (the quickstart checkpoints), few windows, one timing repeat; the gaussian rule, whose acceptance
# varies over the grid's sigma and bias even for drafts this undertrained (the tolerance rule would accept nothing)
SWEEP = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=4", "--set", "train.max_val_batches=1",
         "--set", "data.max_eval_windows=8", "--set", "data.synthetic.length=1200", "--set", "spec.max_windows=8",
         "--set", "spec.repeats=1", "--set", "spec.warmup=0", "--set", 'spec.rule="gaussian"',
         "--set", "spec.sliding_baseline=false", "--grid", "spec.sigma=[0.5, 2.0]", "--grid", "spec.k=[2, 4]",
         "--grid", "seed=[0]", "--grid", "spec.tol_relative=[0.5]"]  # 4 trials the gaussian rule tells apart
QUALITY = ("proposed", "accepted", "acceptance_rate", "mean_accepted", "mse", "mae", "mse_target", "mse_draft")
# constant lr: a 1-epoch run resumed to 2 epochs is then the same run as 2 epochs at once
TRAIN = ["--set", "train.max_steps_per_epoch=3", "--set", "train.max_val_batches=1", "--set", "data.max_eval_windows=8",
         "--set", 'train.schedule="constant"', "--set", "data.synthetic.length=1200"]


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def by_trial(path: str) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


@pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                    reason='dask[distributed] is not installed (pip install -e ".[dask]")')
def test_quickstart_sweep_on_a_local_cluster_gives_the_rows_of_one_process(one_thread):
    one = invoke("sweep", "--profile", "quickstart/sweep", *SWEEP, "--train-missing", "--out", "one.csv")
    two = invoke("sweep", "--profile", "quickstart/sweep", *SWEEP, "--cluster", "local:2", "--out", "two.csv")
    assert one["ran"] == two["ran"] == 4 and one["failed"] == two["failed"] == []
    single, cluster = by_trial("one.csv"), by_trial("two.csv")
    assert single.keys() == cluster.keys()
    assert len({r["acceptance_rate"] for r in single.values()}) > 2  # the comparison is not of constants
    for trial, row in single.items():
        for metric in QUALITY:  # timings (speedup, c_hat, wall_s) differ from run to run by nature
            assert math.isclose(float(row[metric]), float(cluster[trial][metric]), rel_tol=1e-6), (trial, metric)


def torchrun(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "specctl", *args, "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])  # rank 0 alone prints


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                    reason="torch.distributed with gloo is not available in this torch build")
def test_torchrun_pretrain_on_two_processes_matches_one_process_and_resumes(one_thread):
    one = invoke("pretrain", "--profile", "quickstart/target", *TRAIN, "--set", "train.epochs=2",
                 "--set", 'train.save_to="one"')
    first = torchrun("pretrain", "--profile", "quickstart/target", *TRAIN, "--set", "train.epochs=1",
                     "--set", 'train.save_to="two"')
    resumed = torchrun("pretrain", "--profile", "quickstart/target", *TRAIN, "--set", "train.epochs=2",
                       "--set", 'train.save_to="two"', "--resume")
    assert first["epochs"] == 1 and resumed["epochs"] == 2
    for a, b in zip(one["history"], resumed["history"]):  # the same global batch of 32: the same loss curve
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=1e-4)
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=1e-4)
    single, parallel = load_weights("one"), load_weights("two")
    assert all(torch.allclose(single[k], parallel[k], atol=1e-4) for k in single)
    runs = sorted(Path("runs/pretrain").iterdir())
    assert len(runs) == 3  # one run directory per command: rank 1 wrote none
    assert json.loads((runs[-1] / "manifest.json").read_text())["status"] == "finished"
    assert (runs[-1] / "metrics.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("distributed") is None,
                    reason='dask[distributed] is not installed (pip install -e ".[dask]")')
def test_the_sweep_benchmark_runs_at_tiny_scale(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    tiny = ["--train-set", "train.epochs=1", "--train-set", "train.max_steps_per_epoch=4", "--train-set",
            "data.synthetic.length=1200", "--set", "spec.max_windows=8", "--set", "spec.repeats=1",
            "--set", 'spec.rule="gaussian"', "--grid", "spec.k=[2]", "--grid", "spec.sigma=[0.5, 2.0]",
            "--grid", "seed=[0, 1]", "--grid", "spec.tol_relative=[0.5]"]
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "sweep_bench.py"), "--out", "bench", "--profile",
                           "quickstart/sweep", "--workers", "2", *tiny], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(Path("bench/sweep_bench.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["one worker", "--cluster local:2", "-w 2"]
    assert all(r["trials"] == 4 and r["failed"] == 0 and r["max_rel_diff"] <= 1e-4 for r in runs)
    report = Path("bench/sweep_bench.md").read_text()
    assert "| --cluster local:2 | 4 | 0 |" in report and "device: cpu" in report
