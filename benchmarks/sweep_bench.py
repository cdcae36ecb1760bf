"""Sweep throughput on one GPU: the ETTh1 sweep (etth1/sweep: 80 spec-test trials, sigma x bias x K) run with one
worker, with `-w N` and on a Dask LocalCluster of N workers sharing the GPU (`--cluster local:N`); trials per
minute, and whether every mode gives the rows of the one-worker run.

    pip install -e ".[dask]"
    SPECCTL_DATA_DIR=/path/to/data python benchmarks/sweep_bench.py --out docs/gpu/sweep_bench

One command: (1) trains the checkpoints the sweep reads and lacks (etth1/target-large, etth1/draft-025,
etth1/distill-025-stochastic: the `--train-missing` chain) with the fast settings TRAIN_FAST, so the models are
small-budget stand-ins, fine for throughput and not for quality claims; (2) runs the sweep once per mode, each into
a fresh CSV, with SWEEP_FAST (256 test windows: one batch of 256 per timing, two timed repeats, no sliding-window
baseline); (3) writes OUT/sweep_bench.md (device, date, commands, the table) and OUT/sweep_bench.json.
Everything runs in OUT/work (artifacts/, runs/, CSVs): a trained artifacts/etth1 of the caller is never touched.

Wall seconds include each command's start: model loads, baselines and, for the cluster, starting its workers.
Rows match when the trial ids are the same and every quality column (acceptance, MSE, ...) agrees within 1e-4
relative; timings (speedup, c_hat) differ by nature, and more so where workers share the GPU.
Note: on cuda `specctl sweep -w N` runs one worker for spec-test sweeps (it says so: parallel trials would distort
timings), so that row measures one worker again; `--cluster local:N` does share the GPU.

CPU check of the script itself (seconds):
    python benchmarks/sweep_bench.py --out /tmp/sweep_bench --profile quickstart/sweep --workers 2 \\
        --train-set train.epochs=1 --train-set train.max_steps_per_epoch=4 --set spec.max_windows=8 \\
        --grid 'spec.k=[2]'
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

TRAIN_FAST = ["train.epochs=1", "train.max_steps_per_epoch=200", "train.max_val_batches=4",
              "data.max_eval_windows=256"]
SWEEP_FAST = ["spec.max_windows=256", "spec.repeats=2", "spec.warmup=1", "spec.sliding_baseline=false"]
QUALITY = ("proposed", "accepted", "acceptance_rate", "mean_accepted", "mse", "mae", "mse_target", "mse_draft")
REL_TOL = 1e-4


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def specctl(args: list[str], work: Path) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m specctl ARGS` in `work` (this interpreter, so this install); its output and wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "specctl", *args], cwd=work, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    print(done.stderr[-3000:], file=sys.stderr, flush=True)
    return done, time.perf_counter() - started


def train(profile: str, work: Path, train_sets: list[str]) -> dict:
    """The checkpoints the sweep reads, trained now where missing (the first trial of a one-trial grid triggers it)."""
    args = ["sweep", "--profile", profile, "--train-missing", "--grid", "spec.k=[1]", "--grid", "spec.sigma=[1.0]",
            "--grid", "spec.bias=[1.0]", "--out", "train-check.csv", "--json", *sets([*train_sets, *SWEEP_FAST])]
    done, seconds = specctl(args, work)
    if done.returncode != 0:
        raise SystemExit(f"training failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    return {"command": "specctl " + " ".join(args), "seconds": seconds}


def read_rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["trial_id"]: r for r in csv.DictReader(f)}


def max_difference(rows: dict[str, dict[str, str]], reference: dict[str, dict[str, str]]) -> float:
    """The largest relative difference of a quality column between two runs (inf when the trials differ)."""
    if rows.keys() != reference.keys():
        return math.inf
    worst = 0.0
    for trial, row in reference.items():
        for column in QUALITY:
            if row.get(column, "") in ("", None):
                continue
            a, b = float(row[column]), float(rows[trial][column])
            worst = max(worst, abs(a - b) / max(abs(a), 1e-12))
    return worst


def sweep(profile: str, work: Path, mode: str, extra: list[str], sweep_sets: list[str]) -> dict:
    out = work / f"{mode.replace(' ', '_').replace(':', '').replace('-', '')}.csv"
    out.unlink(missing_ok=True)
    args = ["sweep", "--profile", profile, "--out", out.name, "--json", *extra, *sets(sweep_sets)]
    done, seconds = specctl(args, work)
    if done.returncode != 0:
        return {"mode": mode, "command": "specctl " + " ".join(args), "error": done.stderr.strip()[-300:]}
    payload = json.loads(done.stdout[done.stdout.index("{"):])
    rows = read_rows(out)
    speedups = [float(r["speedup"]) for r in rows.values() if r.get("speedup")]
    return {"mode": mode, "command": "specctl " + " ".join(args), "csv": str(out), "seconds": seconds,
            "trials": payload["ran"], "failed": len(payload["failed"]), "per_minute": 60 * payload["ran"] / seconds,
            "median_trial_s": statistics.median(float(r["wall_s"]) for r in rows.values()),
            "median_speedup": statistics.median(speedups) if speedups else None}


def table(runs: list[dict]) -> list[str]:
    lines = ["| mode | trials | failed | wall s | trials / min | median trial s | median measured speedup "
             "| rows match one worker (max rel. diff) |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        if "error" in run:
            lines.append(f"| {run['mode']} | failed: {run['error'].splitlines()[-1] if run['error'] else ''} |")
            continue
        diff = run["max_rel_diff"]
        match = (f"yes ({diff:.1e})" if diff <= REL_TOL else "no: other trials" if math.isinf(diff)
                 else f"no ({diff:.1e})")
        speedup = f"{run['median_speedup']:.2f}x" if run["median_speedup"] is not None else ""
        lines.append(f"| {run['mode']} | {run['trials']} | {run['failed']} | {run['seconds']:.0f} | "
                     f"{run['per_minute']:.1f} | {run['median_trial_s']:.2f} | {speedup} | {match} |")
    return lines


def report(out: Path, profile: str, workers: int, trained: dict, runs: list[dict]) -> None:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    lines = [f"# Sweep throughput: {profile}, one worker vs -w {workers} vs --cluster local:{workers}", "",
             f"- date: {date.today().isoformat()}", f"- device: {device} (one)", f"- torch {torch.__version__}",
             f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
             f"- training ({trained['seconds']:.0f} s): `{trained['command']}`", "", *table(runs), "",
             "Commands (run in the work folder):", ""]
    lines += [f"- {run['mode']}: `{run['command']}`" for run in runs]
    lines += ["", "Wall seconds include each command's start (model loads, baselines, the cluster's workers). On cuda "
              "`-w N` runs spec-test trials in one worker (the sweep says so), so it measures one worker again."]
    (out / "sweep_bench.md").write_text("\n".join(lines) + "\n")
    (out / "sweep_bench.json").write_text(json.dumps({"profile": profile, "trained": trained, "runs": runs},
                                                     indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where sweep_bench.md/.json go (and work/)")
    parser.add_argument("--profile", default="etth1/sweep")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--train-set", action="append", default=None, help=f"training --set (default {TRAIN_FAST})")
    parser.add_argument("--set", action="append", default=[], help=f"sweep --set, after {SWEEP_FAST}")
    parser.add_argument("--grid", action="append", default=[], help="sweep --grid (e.g. a smaller grid for a check)")
    args = parser.parse_args()
    work = (args.out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    trained = train(args.profile, work, args.train_set or TRAIN_FAST)
    sweep_sets = [*SWEEP_FAST, *args.set]
    grid = [x for item in args.grid for x in ("--grid", item)]
    n = args.workers
    # -w N last: on cuda it runs spec-test trials in one worker, so it measures one worker again
    modes = [("one worker", []), (f"--cluster local:{n}", ["--cluster", f"local:{n}"]),
             (f"-w {n}", ["--workers", str(n)])]
    runs = []
    for mode, extra in modes:  # the report is rewritten after each mode, so a cut-short run keeps what finished
        run = sweep(args.profile, work, mode, [*extra, *grid], sweep_sets)
        if "csv" in run:
            reference = read_rows(Path(runs[0]["csv"])) if runs and "csv" in runs[0] else read_rows(Path(run["csv"]))
            run["max_rel_diff"] = max_difference(read_rows(Path(run["csv"])), reference)
        runs.append(run)
        report(args.out, args.profile, n, trained, runs)
    print("\n".join(table(runs)))


if __name__ == "__main__":
    main()
