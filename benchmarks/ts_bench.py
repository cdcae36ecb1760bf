"""Time-series GPU benchmark: train the ETTh1 targets and drafts, then measure speculative decoding.

    python benchmarks/ts_bench.py train --out DIR   # pretrain targets/drafts, distill drafts (exact CLI commands)
    python benchmarks/ts_bench.py spec --out DIR    # quality search at batch 256, then timing at batch 1/32/256

Every stage writes DIR/<stage>.md (a markdown report with commands, device and date) and DIR/<stage>.jsonl.
`--quick` runs the same code on the quick start profiles (CPU, seconds) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from specctl.core.profile import load_profile, with_overrides
from specctl.core.runtime import resolve_device
from specctl.timeseries.spectest import SpecTestSession

# Training commands in groups: the commands of a group are independent and run in parallel on the one GPU
# (each is launch-bound at these sizes); a group starts when the previous one has finished.
TRAIN = {
    "full": [
        [("pretrain", "etth1/target"), ("pretrain", "etth1/target-large"),
         ("pretrain", "etth1/draft-025"), ("pretrain", "etth1/draft-050"), ("pretrain", "etth1/pretrain-etth2")],
        [("distill", "etth1/distill-025"), ("distill", "etth1/distill-025-stochastic"),
         ("distill", "etth1/distill-050"), ("distill", "etth1/distill-050-stochastic"),
         ("pretrain", "etth1/target-from-etth2")],
    ],
    "quick": [[("pretrain", "quickstart/target"), ("pretrain", "quickstart/draft")], [("distill", "quickstart/distill")]],
}


def log(out: Path, stage: str, record: dict) -> None:
    with open(out / f"{stage}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def header(title: str) -> list[str]:
    return [f"# {title}", "", f"- date: {date.today().isoformat()}", f"- device: {device_name()}",
            f"- torch {torch.__version__}", ""]


def train(out: Path, quick: bool, extra: list[str], only: list[str]) -> None:
    lines = header("Training: ETTh1 targets and drafts")
    lines += ["Commands of one group ran side by side on the GPU, so their seconds overlap.", "",
              "| command | seconds | test MSE avg (cached / sliding) | MAE avg (cached / sliding) | notes |",
              "|---|---|---|---|---|"]
    for group in TRAIN["quick" if quick else "full"]:
        started = time.perf_counter()
        procs = []
        for command, profile in group:
            if only and profile not in only:
                continue
            argv = ["specctl", command, "--profile", profile, "--json", *extra]  # run as `python -m specctl`
            procs.append((argv, subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE, text=True)))
        for argv, proc in procs:
            stdout, stderr = proc.communicate()
            lines.append(train_row(out, argv, proc.returncode, stdout, stderr, time.perf_counter() - started))
            (out / "train.md").write_text("\n".join(lines) + "\n")
    (out / "train.md").write_text("\n".join(lines) + "\n")


def distill_notes(metrics: dict) -> str:
    q = metrics["quality"]
    accept = ", ".join(f"σ {a['sigma']}: {a['acceptance']:.3g}" for a in metrics["acceptance"])
    return (f"draft-vs-target MSE {q['draft_target_mse']:.4f}; draft MSE {q['draft_mse']:.4f}; "
            f"target MSE {q['target_mse']:.4f}; predicted acceptance {accept}")


def train_row(out: Path, argv: list[str], returncode: int, stdout: str, stderr: str, seconds: float) -> str:
    """Log one finished training command and return its markdown row."""
    print(stderr[-3000:], file=sys.stderr, flush=True)
    if returncode != 0:
        log(out, "train", {"argv": argv, "error": stderr[-2000:]})
        last = stderr.strip().splitlines()[-1][:120] if stderr.strip() else f"exit {returncode}"
        return f"| `{' '.join(argv)}` | {seconds:.0f} | failed | | {last} |"
    metrics = json.loads(stdout[stdout.index("{"):])
    log(out, "train", {"argv": argv, "seconds": seconds, "metrics": metrics})
    avg = metrics.get("average", {})
    mse = " / ".join(f"{avg[m]['mse']:.4f}" for m in avg) if avg else ""
    mae = " / ".join(f"{avg[m]['mae']:.4f}" for m in avg) if avg else ""
    per_h = "; ".join(f"{h['horizon']}: {h['mse']['cached']:.3f}" for h in metrics.get("horizons", []))
    notes = per_h or distill_notes(metrics)
    return f"| `{' '.join(argv)}` | {seconds:.0f} | {mse} | {mae} | {notes} |"


ROW = ("| batch | dtype | H | rule | k | tol/sigma | acceptance | alpha_hat | tau | c_hat | predicted | speedup vs cached "
       "| vs sliding | ms/batch spec | ms/batch target | ms/batch sliding | ΔMSE % | fidelity | graphs "
       "| ms/batch by phase (instrumented pass) |")


def row(batch: int, dtype: str, m: dict, cfg: dict) -> str:
    knob = cfg.get("spec.tol", cfg.get("spec.sigma", ""))
    per = lambda key: 1e3 * m[key] / m["batches"] if key in m else float("nan")  # noqa: E731
    phases = ", ".join(f"{name} {1e3 * seconds / m['batches']:.2f}" for name, seconds in m["breakdown_s"].items())
    return (f"| {batch} | {dtype} | {m['horizon']} | {cfg['spec.rule']} | {cfg['spec.k']} | {knob} | "
            f"{m['acceptance_rate']:.3f} | {m['alpha_hat']:.3f} | {m['tokens_per_target_call']:.2f} | {m['c_hat']:.3f} | "
            f"{m['predicted_speedup']:.2f}x | **{m['speedup']:.2f}x** | {m.get('speedup_sliding', float('nan')):.2f}x | "
            f"{per('wall_s_spec'):.2f} | {per('wall_s_target'):.2f} | {per('wall_s_sliding'):.2f} | "
            f"{m['delta_mse_pct']:+.2f} | {m['fidelity_mse']:.1e} | "
            f"{'rounds' if m.get('graph_rounds') else 'calls' if m.get('cuda_graphs') else 'off'} | "
            f"{phases} |")


def search_grid(quick: bool) -> list[dict]:
    """Acceptance rules and knobs tried at batch 256 to find the fastest setting within 1% of target MSE."""
    ks = [2, 3, 4]
    tols = [0.05, 0.1, 0.15, 0.2, 0.3]
    sigmas = [1.0, 2.0, 4.0, 8.0]
    grid = [{"spec.rule": "tolerance", "spec.tol": t, "spec.k": k} for t in tols for k in ks]
    grid += [{"spec.rule": "gaussian", "spec.sigma": s, "spec.k": k} for s in sigmas for k in ks]
    return grid[:4] if quick else grid


def spec(out: Path, quick: bool, profile_name: str, device: torch.device, configs: list[str],
         batches: list[int]) -> None:
    base = load_profile(profile_name, ["spec.repeats=1", "spec.warmup=1", "spec.emit=\"target_mean\""])
    lines = header(f"Speculative decoding: {base.name} ({base.data.name}, lookback {base.data.lookback})")
    lines += [f"- target `{base.spec.target}`, draft `{base.spec.draft}`, emission `target_mean`", "",
              f"## Quality search (batch {base.spec.batch_size}, fp32, all test windows)", "", ROW, "|" + "---|" * 20]
    found = []
    fixed = [json.loads(c) for c in configs]
    session = None if fixed else SpecTestSession(base, device)
    for cfg in [] if fixed else search_grid(quick):
        m = session.run(with_overrides(base, cfg))
        log(out, "spec", {"stage": "search", "cfg": cfg, "metrics": m})
        found.append((cfg, m))
        lines.append(row(base.spec.batch_size, "fp32", m, cfg))
        (out / "spec.md").write_text("\n".join(lines) + "\n")
    ok = [(c, m) for c, m in found if m["delta_mse_pct"] <= 1.0] or found
    best = [(c, None) for c in fixed] or sorted(ok, key=lambda cm: -cm[1]["predicted_speedup"])[:2]
    lines += ["", "Timed settings" + (" (given with --config)" if fixed else
              " (highest predicted speedup with ΔMSE ≤ 1%)") + ": " + "; ".join(json.dumps(c) for c, _ in best), ""]
    lines += ["## Timing (median of repeats per batch, warm-up excluded, synchronised, one process)", "", ROW,
              "|" + "---|" * 20]
    settings = [(1, "fp32", 64, None), (1, "bf16", 64, None), (1, "fp32", 32, 1440), (32, "fp32", 256, None),
                (32, "bf16", 256, None), (256, "fp32", None, None), (256, "bf16", None, None)]
    if quick:
        settings = [(1, "fp32", 8, None), (16, "fp32", 32, None)]
    for batch, dtype, windows, horizon in settings:
        if batches and batch not in batches:
            continue
        overrides = [f"spec.batch_size={batch}", f'spec.dtype="{dtype}"', "spec.repeats=5", "spec.warmup=2"]
        if windows:
            overrides.append(f"spec.max_windows={windows}")
        if horizon:
            overrides.append(f"spec.horizon={horizon}")
        profile = load_profile(profile_name, [*overrides, "spec.emit=\"target_mean\""])
        try:
            session = SpecTestSession(profile, device)
        except Exception as e:  # report and go on: one setting must not cost the others
            lines.append(f"| {batch} | {dtype} | {horizon} | session failed: {e} |")
            continue
        for cfg, _ in best:
            for rounds in (False, True):  # per-call CUDA graphs, then whole-round graphs, side by side
                m = session.run(with_overrides(profile, {**cfg, "spec.graph_rounds": rounds}))
                log(out, "spec", {"stage": "timing", "batch": batch, "dtype": dtype, "cfg": cfg, "metrics": m})
                lines.append(row(batch, dtype, m, cfg))
                (out / "spec.md").write_text("\n".join(lines) + "\n")
    (out / "spec.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["train", "spec"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--profile", default=None, help="spec-test profile (default etth1/spec-test)")
    parser.add_argument("--set", action="append", default=[], help="extra --set for the training commands")
    parser.add_argument("--config", action="append", default=[], help='time this setting instead of searching, '
                        'e.g. \'{"spec.rule": "tolerance", "spec.tol": 0.2, "spec.k": 3}\'')
    parser.add_argument("--only", action="append", default=[], help="train only these profiles")
    parser.add_argument("--batch", action="append", type=int, default=[], help="time only these batch sizes")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device("auto")
    if args.stage == "train":
        train(args.out, args.quick, [x for s in args.set for x in ("--set", s)], args.only)
    else:
        default = "quickstart/spec-test" if args.quick else "etth1/spec-test"
        spec(args.out, args.quick, args.profile or default, device, args.config, args.batch)


if __name__ == "__main__":
    main()
