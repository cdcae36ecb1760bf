"""Time-series GPU benchmark: train a dataset's target and draft, then measure the speculative frontier.

    python benchmarks/ts_bench.py --dataset etth1 --out DIR [--work /tmp/ts]   # train, then the frontier
    python benchmarks/ts_bench.py --dataset etth1 --dataset ettm1 --stage train --out DIR --work /tmp/ts
    python benchmarks/ts_bench.py --dataset etth1 --stage frontier --out DIR --work /tmp/ts
    python benchmarks/ts_bench.py --dataset etth1 --stage pretrain ...; ... --stage distill ...  # training, two calls
    python benchmarks/ts_bench.py --dataset etth1 --stage frontier --draft early-exit --batch 1 ...  # some rows
    python benchmarks/ts_bench.py --dataset etth1 --stage frontier --draft small --dtype bf16 --windows 2161 ...
    python benchmarks/ts_bench.py --dataset etth1 --stage profile --out DIR --work /tmp/ts  # batch 1, profiled
    python benchmarks/ts_bench.py --dataset quick --out DIR                     # the same code on the quick start

Training runs the shipped profiles through the CLI (every dataset's target and draft side by side on the GPU,
then the distillations). The frontier: for each batch size, one spec-test session (the baselines, target-only KV-cached
decoding, the draft alone and the sliding window, timed once), then every setting of SETTINGS on the same windows:
acceptance, speed against the target and the sliding window, predicted speed, MSE against the truth and the target,
fidelity. Writes DIR/<dataset>.md (command, device, date, tables), DIR/<dataset>.jsonl and
DIR/<dataset>_frontier.csv (a results CSV: `specctl plot` draws its frontier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import torch

from specctl.backends import load_profile
from specctl.commands.render import markdown_table
from specctl.core.files import write_csv
from specctl.core.profile import with_overrides
from specctl.core.runtime import resolve_device, synchronize, time_call
from specctl.timeseries.costs import predict
from specctl.timeseries.spectest import SpecTestSession


@dataclass(frozen=True)
class Dataset:
    """A profile folder's pair and drafts: the target and the drafts pretrained side by side, then the draft distilled
    and the early exit trained side by side; every draft gets its own frontier rows."""

    folder: str
    target: str  # the profiles, inside the folder
    draft: str  # pretrained, undistilled (a weaker draft)
    distilled: str  # the spec-test profile's draft
    early_exit: str  # the target's first blocks and a trained exit head
    small: str  # a much smaller draft, pretrained only: 6-7% worse than the target alone, which is worth verifying
    batches: dict[int, int | None]  # batch size -> windows timed (None: every test window)
    small_tolerances: tuple[tuple[float, ...], tuple[float, ...]] = ((0.15, 0.25), (0.25,))  # the small draft's
    # relative tolerances at K 7: fixed, then adaptive (where its acceptance moves, which differs per dataset)

    @property
    def spec(self) -> str:
        return f"{self.folder}/spec-test"

    def train(self, chosen: list[str]) -> list[list[tuple[str, str]]]:
        """Groups of (command, profile) that the chosen drafts need; a group's commands run side by side."""
        pretrain = [self.target, *([self.draft] if {"distilled", "pretrained"} & set(chosen) else []),
                    *([self.small] if "small" in chosen else [])]
        distill = [*([self.distilled] if "distilled" in chosen else []),
                   *([self.early_exit] if "early-exit" in chosen else [])]
        return [[("pretrain", f"{self.folder}/{p}") for p in dict.fromkeys(pretrain)],
                [("distill", f"{self.folder}/{p}") for p in distill]]


CHANNEL_INDEPENDENT = ("target-large-channel-independent", "draft-025-channel-independent",
                       "distill-025-channel-independent", "distill-early-exit-channel-independent",
                       "draft-00625-channel-independent")
DATASETS = {
    # the small draft on ETTh1 at H = 720: tol 0.05 rejected every token, 0.1 accepted a quarter (0.3-0.8x), 0.125
    # 0.74, 0.15 0.955 at +0.9-1.3%, 0.2 every one; on ETTm1 0.15-0.2 ran 0.8-1.4x, 0.25-0.4 accepted 0.71-0.96 at
    # +0.2-1.6%, tol 1 everything at +2.3%
    "etth1": Dataset("etth1", *CHANNEL_INDEPENDENT, {1: 64, 32: 256, 256: 1024}, ((0.125, 0.15, 0.2), (0.15,))),
    "ettm1": Dataset("ettm1", *CHANNEL_INDEPENDENT, {1: 64, 32: 256, 256: 1024}, ((0.25, 0.3, 0.35), (0.3,))),
    "weather": Dataset("weather", *CHANNEL_INDEPENDENT, {1: 64, 32: 256, 256: 1024}),
    "quick": Dataset("quickstart", "target", "draft", "distill", "distill-early-exit", "draft", {1: 8, 16: 32}),
}
# (label, overrides): fixed tolerances (relative to the target's validation RMSE; on ETTm1 0.05 rejected almost every
# token and 0.25 accepted almost all, so 0.1 between them) and K, adaptive K, and the shipped choice, the fastest
# setting within a 1% MSE budget chosen on validation windows
FIXED = {"spec.adaptive_k": False, "spec.fidelity_budget": None}
ADAPTIVE = {"spec.adaptive_k": True, "spec.fidelity_budget": None}
SETTINGS = [
    *((f"tol {t:g}, K 7", {"spec.tol_relative": t, "spec.k": 7, **FIXED}) for t in (0.05, 0.1, 0.25)),
    ("tol 0.25, adaptive K <= 7", {"spec.tol_relative": 0.25, "spec.k": 7, **ADAPTIVE}),
    ("1% budget, adaptive K", {"spec.fidelity_budget": 0.01, "spec.adaptive_k": True}),
]
# the undistilled draft's rows (the weakest draft, 1.4-4.8% worse alone): the shipped choice and the fixed settings
PRETRAINED_SETTINGS = [SETTINGS[0], SETTINGS[2], SETTINGS[-1]]


def small_settings(dataset: Dataset) -> list[tuple[str, dict]]:
    """The small draft's rows (6-7% worse alone, so the rule must reject to stay within 1%): the dataset's fixed and
    adaptive tolerances, each as rounds drafting from the first token (K 7: 8 tokens, H = 720, in one round) and
    after the target's own first token (spec.target_opens, K 6), the latter also in each window's units
    (spec.tol_units); and the shipped choice, the budget, in either units."""
    fixed, adaptive = dataset.small_tolerances
    rows = []
    for opens, k, units, how in ((False, 7, "data", ""), (True, 6, "data", ", target opens"),
                                 (True, 6, "window", ", target opens, window units")):
        at = {"spec.k": k, "spec.target_opens": opens, "spec.tol_units": units}
        rows += [(f"tol {t:g}, K {k}{how}", {"spec.tol_relative": t, **at, **FIXED}) for t in fixed]
        rows += [(f"tol {t:g}, adaptive K <= {k}{how}", {"spec.tol_relative": t, **at, **ADAPTIVE}) for t in adaptive]
    label, budget = SETTINGS[-1]
    return [*rows, (label, budget), (f"{label}, window units", {**budget, "spec.tol_units": "window"})]


COLUMNS = ["batch", "setting", "acceptance", "alpha_hat", "tau", "k_rounds", "c_hat", "v_hat", "speedup",
           "predicted (Leviathan)", "pred/meas", "vs sliding", "MSE", "ΔMSE %", "fidelity", "ms/batch"]


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def train(datasets: dict[str, Dataset], out: Path, stage: str, chosen: list[str]) -> None:
    """Group i of every dataset's training for the chosen drafts runs side by side (pretraining, then distillation;
    `stage` names one of them or "train" for both); DIR/<dataset>_<stage>.md and .jsonl per dataset."""
    groups = {"train": (0, 1), "pretrain": (0,), "distill": (1,)}[stage]
    lines = {name: [f"# Training ({stage}): {name}", "", f"- date: {date.today().isoformat()}",
                    f"- device: {device_name()}",
                    "- commands of a group ran side by side on the one device, so their seconds overlap", "",
                    "| command | seconds | result |", "|---|---|---|"] for name in datasets}
    for i, runs in enumerate(zip(*(d.train(chosen) for d in datasets.values()))):  # pretraining, then distillation
        if i not in groups:
            continue
        started, procs = time.perf_counter(), []
        for name, group in zip(datasets, runs):
            for command, profile in group:
                argv = [sys.executable, "-m", "specctl", command, "--profile", profile, "--json", "--overwrite"]
                procs.append((name, f"specctl {command} --profile {profile}",
                              subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        failed = []
        for name, shown, proc in procs:  # a failure is reported after its group, so the others' results are kept
            stdout, stderr = proc.communicate()
            seconds = time.perf_counter() - started
            if proc.returncode:
                failed.append(f"{shown} failed:\n{stderr[-3000:]}")
                lines[name].append(f"| `{shown}` | {seconds:.0f} | failed: {stderr.strip().splitlines()[-1:]} |")
            else:
                metrics = json.loads(stdout[stdout.index("{"):])
                append_jsonl(out / f"{name}_{stage}.jsonl", {"command": shown, "seconds": seconds, "metrics": metrics})
                lines[name].append(f"| `{shown}` | {seconds:.0f} | {train_summary(metrics)} |")
            (out / f"{name}_{stage}.md").write_text("\n".join(lines[name]) + "\n")
            print(f"{shown}: {seconds:.0f} s", file=sys.stderr, flush=True)
        if failed:
            raise SystemExit("\n".join(failed))


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def train_summary(m: dict) -> str:
    if "average" in m:
        cached = m["average"]["cached"]
        return (f"test MSE {cached['mse']:.4f} / MAE {cached['mae']:.4f} (cached, avg over horizons), "
                f"{m['epochs']} epochs")
    q = m["quality"]
    return (f"draft MSE {q['draft_mse']:.4f}, target MSE {q['target_mse']:.4f}, draft-vs-target MSE "
            f"{q['draft_target_mse']:.4f} (teacher-forced test windows)")


def row(batch: int, label: str, m: dict) -> dict:
    per_batch = 1e3 * m["wall_s_spec"] / m["batches"]
    k_rounds = " ".join(f"{k}:{n}" for k, n in sorted(m["k_rounds"].items()))
    if (m.get("adaptive_drafted_bound_ms") or 0) > m.get("adaptive_target_ms", math.inf):  # why drafting stopped
        k_rounds += (f" (drafting lost: {m['adaptive_drafted']} forecasts at {m['adaptive_drafted_ms']:.1f} ms, "
                     f"bound {m['adaptive_drafted_bound_ms']:.1f}, the target's {m['adaptive_target_ms']:.1f})")
    return {"batch": batch, "setting": label, "acceptance": f"{m['acceptance_rate']:.3f}",
            "alpha_hat": f"{m['alpha_hat']:.3f}", "tau": f"{m['tokens_per_target_call']:.2f}", "k_rounds": k_rounds,
            "c_hat": f"{m['c_hat']:.3f}", "v_hat": f"{m['v_hat']:.2f}", "speedup": f"**{m['speedup']:.2f}x**",
            "predicted (Leviathan)": f"{m['predicted_speedup']:.2f}x ({m['predicted_speedup_leviathan']:.2f}x)",
            "pred/meas": f"{m['predicted_speedup'] / m['speedup']:.2f}",
            "vs sliding": f"{m['speedup_sliding']:.1f}x" if m.get("speedup_sliding") else "", "MSE": f"{m['mse']:.4f}",
            "ΔMSE %": f"{m['delta_mse_pct']:+.2f}", "fidelity": f"{m['fidelity_mse']:.1e}",
            "ms/batch": f"{per_batch:.2f}"}


def baseline_rows(batch: int, prefix: str, m: dict, with_target: bool) -> list[dict]:
    """The target itself (once per batch) and the draft alone, on the same windows."""
    blank = dict.fromkeys(COLUMNS, "")
    target = [] if not with_target else [{**blank, "batch": batch, "setting": "target-only (KV cache)",
                                 "speedup": f"1x (itself {m['speedup_target_self']:.3f}x)",
                                 "MSE": f"{m['mse_target']:.4f}", "ΔMSE %": "0",
                                 "ms/batch": f"{1e3 * m['wall_s_target'] / m['batches']:.2f}"}]
    return [*target,
            {**blank, "batch": batch, "setting": f"{prefix}draft only", "speedup": f"{m['speedup_draft']:.2f}x",
             "MSE": f"{m['mse_draft']:.4f}", "ΔMSE %": f"{m['delta_mse_pct_draft']:+.2f}",
             "ms/batch": f"{1e3 * m['wall_s_draft'] / m['batches']:.2f}"}]


DRAFTS = ("distilled", "pretrained", "early-exit", "small")


def drafts(dataset: Dataset, chosen: list[str]) -> list[tuple[str, list[str], list]]:
    """(label prefix, spec-test overrides, settings) per chosen draft: the shipped (distilled) one, the pretrained one,
    the early exit, the small one."""
    out = []
    for key, prefix, name, settings in (("distilled", "", None, SETTINGS),
                                        ("pretrained", "pretrained draft: ", dataset.draft, PRETRAINED_SETTINGS),
                                        ("early-exit", "early exit: ", dataset.early_exit, SETTINGS),
                                        ("small", "small draft: ", dataset.small, small_settings(dataset))):
        if key not in chosen:
            continue
        checkpoint = load_profile(f"{dataset.folder}/{name}").train.save_to if name else None
        out.append((prefix, [f"spec.draft={checkpoint}", f"spec.draft_profile={name}"] if name else [], settings))
    return out


def frontier(dataset: Dataset, device: torch.device, lines: list[str], out: Path, name: str,
             batches: list[int] | None, chosen: list[str], dtype: str = "fp32", every: int | None = None) -> None:
    """The frontier rows of the chosen drafts at each batch size, on the dataset's windows for that size (`every`:
    that many at every size)."""
    log = lambda record: append_jsonl(out / f"{name}.jsonl", record)  # noqa: E731
    rows, csv_rows, distances, chosen_drafts = [], [], [], drafts(dataset, chosen)
    for batch, windows in dataset.batches.items():
        if batches and batch not in batches:
            continue
        windows = every or windows
        overrides = [f"spec.batch_size={batch}", "spec.repeats=5" if batch < 256 else "spec.repeats=3",
                     "spec.warmup=2", f"spec.dtype={dtype}", *([f"spec.max_windows={windows}"] if windows else [])]
        for d, (prefix, draft_overrides, settings) in enumerate(chosen_drafts):
            # the sliding window is the target's: timed once per batch size, with the first draft
            once = [] if d == 0 else ["spec.sliding_baseline=false"]
            base = load_profile(dataset.spec, [*overrides, *draft_overrides, *once])
            try:  # a draft that fails (on a device its tests never met, say) costs its own rows, not the others'
                session = SpecTestSession(base, device)
                for i, (label, setting) in enumerate(settings):
                    label = prefix + label
                    profile = with_overrides(base, setting, "SETTINGS")
                    started = time.perf_counter()
                    m = session.run(profile).metrics()
                    if "budget" in m:  # what the budget chose on validation windows
                        b = m["budget"]
                        label += f" (chose tol {b['tol_relative']:g}, K {b['k']})" if b["k"] else " (chose the target)"
                    log({"stage": "frontier", "batch": batch, "setting": label,
                         "seconds": time.perf_counter() - started, "metrics": m})
                    if i == 0:
                        rows += baseline_rows(batch, prefix, m, with_target=d == 0)
                        distances.append(f"| {batch} | {prefix.removesuffix(': ') or 'distilled draft'} | "
                                         + " ".join(f"{x:.3g}" for x in m["draft_rmse_by_step"]) + " |")
                    rows.append(row(batch, label, m))
                    csv_rows.append({"trial_id": f"b{batch}-{len(csv_rows)}", "status": "ok", "batch": batch,
                                     "draft": prefix.removesuffix(": ") or "distilled draft", "setting": label,
                                     **{k: v for k, v in m.items() if not isinstance(v, (list, dict))}})
                    write_report(out, name, lines, rows, distances)
                    write_csv(out / f"{name}_frontier.csv", csv_rows)
            except Exception:  # reported in the table and the log, with its traceback
                log({"stage": "frontier", "batch": batch, "draft": prefix, "error": traceback.format_exc()})
                rows.append({**dict.fromkeys(COLUMNS, ""), "batch": batch,
                             "setting": f"{prefix}failed: {traceback.format_exc(limit=0).strip()}"})
                write_report(out, name, lines, rows, distances)
                print(traceback.format_exc(), file=sys.stderr, flush=True)
        print(f"batch {batch} done", file=sys.stderr, flush=True)


def profile_forecasts(dataset: Dataset, device: torch.device, out: Path, name: str, chosen: list[str],
                      forecasts: int = 5) -> None:
    """Batch-1 forecasts of both decoders under torch.profiler, after warm-up, the speculative one at the frontier's
    fastest setting (tol 0.25, K 7) with the first chosen draft: DIR/<dataset>_profile.md (wall time per forecast
    beside what the cost model adds up from its timed calls, and the ops by host and device time) and a Chrome trace
    per decoder. What it is for: at batch 1 the prediction missed by about 1 ms per forecast, spent outside the timed
    calls."""
    from torch.profiler import ProfilerActivity, profile

    label, setting = SETTINGS[2]
    prefix, draft_overrides, _ = drafts(dataset, chosen)[0]
    label = prefix + label
    base = load_profile(dataset.spec, ["spec.batch_size=1", "spec.max_windows=8", "spec.repeats=1", "spec.warmup=1",
                                       "spec.sliding_baseline=false", *draft_overrides])
    session = SpecTestSession(base, device)
    spec_profile = session.resolve_tolerance(with_overrides(base, setting, "SETTINGS"))
    whole_rounds = session.whole_rounds(spec_profile)
    costs = session.costs(spec_profile, whole_rounds)
    batch = session.batches[0]
    decoders = {"target-only": lambda: session.forecast("target", batch),
                f"speculative ({label})": lambda: session.speculate(spec_profile, batch, rounds=whole_rounds)}
    priced = predict(costs, [session.speculate(spec_profile, batch, rounds=whole_rounds)])  # at the measured costs
    predicted = dict(zip(decoders, (priced.target_seconds, priced.spec_seconds)))
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    lines = [f"# One forecast under the profiler: {name}", "", f"- date: {date.today().isoformat()}",
             f"- device: {device_name()}, torch {torch.__version__}",
             f"- command: `python benchmarks/ts_bench.py --dataset {name} --stage profile --out OUT`",
             f"- batch 1, H = {session.horizon}, whole-round graphs: {whole_rounds}; after warm-up, the wall time is "
             f"the median of {forecasts} synchronised forecasts without the profiler; then one is profiled", ""]
    for decoder, run in decoders.items():
        wall = time_call(run, device, forecasts, warmup=3).median
        with profile(activities=activities) as prof:  # one forecast: a trace small enough to bring back
            run()
            synchronize(device)
        stem = "target-only" if decoder == "target-only" else "speculative"
        prof.export_chrome_trace(str(out / f"{name}_profile_{stem}.json"))
        sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        lines += [f"## {decoder}", "", f"- wall per forecast: {1e3 * wall:.3f} ms; the cost "
                  f"model's sum of timed calls: {1e3 * predicted[decoder]:.3f} ms", "", "```",
                  prof.key_averages().table(sort_by=sort, row_limit=25), "```", ""]
        (out / f"{name}_profile.md").write_text("\n".join(lines) + "\n")


def write_report(out: Path, name: str, lines: list[str], rows: list[dict], distances: list[str]) -> None:
    """The header, the frontier table, and each draft's distance to the target per step (what decides acceptance)."""
    import pandas as pd

    table = markdown_table(pd.DataFrame(rows, columns=COLUMNS)) if rows else ""
    steps = ["## The drafts' RMSE to the target per step of the horizon", "",
             "Both given the target's own forecast so far (scaled units; what the tolerance rule tests at that step "
             "when every earlier token was accepted; compare tol = tol_relative x the target's validation RMSE).", "",
             "| batch | draft | RMSE at step 1, 2, ... |", "|---|---|---|", *distances]
    (out / f"{name}.md").write_text("\n".join([*lines, "", "## Frontier", "", table, "", *steps]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=list(DATASETS), action="append", required=True)
    parser.add_argument("--stage", choices=["all", "train", "pretrain", "distill", "frontier", "profile"],
                        default="all", help="train = pretrain, then distill; profile: one batch-1 forecast of each "
                        "decoder under torch.profiler (after training)")
    parser.add_argument("--out", type=Path, required=True, help="where the reports, JSONL and CSV go")
    parser.add_argument("--work", type=Path, default=None, help="working folder for artifacts/ and runs/")
    parser.add_argument("--batch", type=int, action="append", default=None,
                        help="frontier batch sizes to run (default: the dataset's own)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="the frontier's decoding dtype, both models and every baseline (spec.dtype)")
    parser.add_argument("--windows", type=int, default=None,
                        help="test windows timed at every batch size (default: the dataset's own per batch size)")
    parser.add_argument("--draft", choices=DRAFTS, action="append", default=None,
                        help="drafts to train and whose frontier rows to run (default: all)")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
        os.chdir(args.work)
    datasets = {name: DATASETS[name] for name in args.dataset}
    if args.stage == "profile":
        for name, dataset in datasets.items():
            profile_forecasts(dataset, resolve_device("auto"), args.out, name, args.draft or list(DRAFTS))
        return
    if args.stage != "frontier":
        train(datasets, args.out, "train" if args.stage == "all" else args.stage, args.draft or list(DRAFTS))
    if args.stage in ("all", "frontier"):
        device = resolve_device("auto")
        only = ("".join(f" --batch {b}" for b in args.batch or []) + "".join(f" --draft {d}" for d in args.draft or [])
                + (f" --dtype {args.dtype}" if args.dtype != "fp32" else "")
                + (f" --windows {args.windows}" if args.windows else ""))
        for name, dataset in datasets.items():
            lines = [f"# Speculative frontier: {name}", "", f"- date: {date.today().isoformat()}",
                     f"- device: {device_name()}, torch {torch.__version__}",
                     f"- command: `python benchmarks/ts_bench.py --dataset {name} --stage frontier{only} --out OUT` "
                     "(after the training stage; its tables are in <dataset>_<stage>.md)",
                     f"- spec-test profile `{dataset.spec}`; per batch size the windows timed: "
                     + ", ".join(f"{b}: {args.windows or w or 'all'}" for b, w in dataset.batches.items()),
                     "- speedup: target-only KV-cached wall time / speculative wall time, same windows, one process, "
                     "median of repeats per batch, warm-up excluded, synchronised; ΔMSE against target-only; fidelity "
                     "= MSE between the speculative and the target-only forecast", ""]
            # a run of some batch sizes or drafts writes files of its own (<dataset>_batch_1_32_early-exit.md), so
            # split runs add up
            stem = "_".join([name, *(["batch", *map(str, args.batch)] if args.batch else []), *(args.draft or []),
                             *([args.dtype] if args.dtype != "fp32" else []),
                             *([f"windows_{args.windows}"] if args.windows else [])])
            frontier(dataset, device, lines, args.out, stem, args.batch, args.draft or list(DRAFTS), args.dtype,
                     args.windows)


if __name__ == "__main__":
    main()
