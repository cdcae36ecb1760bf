"""benchmarks/ts_bench.py's datasets: every profile it trains and decodes with ships and resolves, --draft picks
the frontier's drafts, and the profile stage writes its tables and traces (the GPU run itself is docs/results.md's
business)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from specctl.backends import load_profile
from specctl.core.profile import with_overrides

spec = importlib.util.spec_from_file_location("ts_bench", Path(__file__).resolve().parents[2] / "benchmarks" /
                                              "ts_bench.py")
ts_bench = sys.modules["ts_bench"] = importlib.util.module_from_spec(spec)  # its dataclasses look themselves up
spec.loader.exec_module(ts_bench)


@pytest.mark.parametrize("name", list(ts_bench.DATASETS))
def test_every_dataset_trains_and_decodes_with_shipped_profiles(name):
    dataset = ts_bench.DATASETS[name]
    trained = {load_profile(p).train.save_to for group in dataset.train(list(ts_bench.DRAFTS)) for _, p in group}
    spec_test = load_profile(dataset.spec).spec
    assert {spec_test.target, spec_test.draft} <= trained  # spec-test reads what the training stage writes
    drafts = ts_bench.drafts(dataset, list(ts_bench.DRAFTS))
    checkpoints = [next(o.split("=", 1)[1] for o in overrides if o.startswith("spec.draft="))
                   for _, overrides, _ in drafts[1:]]
    assert [prefix for prefix, _, _ in drafts] == ["", "pretrained draft: ", "early exit: ", "small draft: "]
    assert set(checkpoints) <= trained and len(set(checkpoints)) == (2 if dataset.small == dataset.draft else 3)
    for _, _, settings in drafts:  # every row's overrides make a valid profile
        assert len({label for label, _ in settings}) == len(settings)
        for _, setting in settings:
            with_overrides(load_profile(dataset.spec), setting, "SETTINGS")


def test_training_covers_the_chosen_drafts_only():
    dataset = ts_bench.DATASETS["etth1"]
    small = dataset.train(["small"])
    assert small == [[("pretrain", "etth1/target-large-channel-independent"),
                      ("pretrain", "etth1/draft-00625-channel-independent")], []]
    distilled = dataset.train(["distilled"])
    assert [p for _, p in distilled[0]] == ["etth1/target-large-channel-independent",
                                            "etth1/draft-025-channel-independent"]
    assert distilled[1] == [("distill", "etth1/distill-025-channel-independent")]


def test_draft_picks_the_frontiers_drafts():
    drafts = ts_bench.drafts(ts_bench.DATASETS["quick"], ["early-exit"])
    assert [prefix for prefix, _, _ in drafts] == ["early exit: "] and drafts[0][2] == ts_bench.SETTINGS


def test_profile_stage_writes_both_decoders_traces_and_tables(tmp_path):
    from typer.testing import CliRunner

    from specctl.cli import app

    fast = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--set", "data.max_eval_windows=4"]
    for command, name in (("pretrain", "quickstart/target"), ("pretrain", "quickstart/draft"),
                          ("distill", "quickstart/distill")):
        assert CliRunner().invoke(app, [command, "-p", name, *fast]).exit_code == 0
    ts_bench.profile_forecasts(ts_bench.DATASETS["quick"], torch.device("cpu"), tmp_path, "quick", ["distilled"],
                               forecasts=1)
    report = (tmp_path / "quick_profile.md").read_text()
    assert "## target-only" in report and "## speculative (tol 0.25, K 7)" in report
    assert report.count("wall per forecast") == 2 and report.count("aten::") > 10
    assert {p.name for p in tmp_path.glob("*.json")} == {"quick_profile_target-only.json",
                                                         "quick_profile_speculative.json"}


@pytest.mark.parametrize("name, tol", [("etth1/spec-test-draft-00625", 0.125), ("ettm1/spec-test-draft-00625", 0.3)])
def test_the_best_setting_profiles_train_their_pair_and_decode_as_measured(name, tol):
    """Each dataset's best measured setting (docs/results.md, sixth run) ships as a profile: it trains the small draft
    ts_bench measured and decodes in bf16 at batch 1, H = 720, the target opening, then rounds of K 6 at that
    tolerance, with no budget."""
    from specctl.timeseries.builders import missing_builds, spec_test_inputs

    profile = load_profile(name)
    builds = missing_builds(spec_test_inputs(profile), profile)  # nothing is trained in this folder
    assert [b.profile.train.save_to for b in builds] == [profile.spec.target, profile.spec.draft]
    spec = profile.spec
    assert (spec.dtype, spec.tol_relative, spec.k, spec.target_opens, spec.adaptive_k, spec.batch_size, spec.horizon,
            spec.fidelity_budget) == ("bf16", tol, 6, True, False, 1, 720, None)
    assert spec.draft_profile == ts_bench.DATASETS[name.split("/")[0]].small


def test_a_row_says_why_adaptive_k_stopped_drafting():
    m = {"wall_s_spec": 0.0725, "batches": 8, "acceptance_rate": 0.0, "alpha_hat": 0.0, "tokens_per_target_call": 1.0,
         "k_rounds": {0: 64}, "c_hat": 0.119, "v_hat": 2.58, "speedup": 0.99, "predicted_speedup": 1.0,
         "predicted_speedup_leviathan": 0.58, "mse": 0.42, "delta_mse_pct": 0.0, "fidelity_mse": 0.0,
         "adaptive_drafted": 3, "adaptive_drafted_ms": 7.7, "adaptive_drafted_bound_ms": 16.9,
         "adaptive_target_ms": 7.1}  # ETTm1, batch 32, an H200
    assert ts_bench.row(32, "tol 0.3, adaptive K <= 6", m)["k_rounds"] == (
        "0:64 (drafting lost: 3 forecasts at 7.7 ms, bound 16.9, the target's 7.1)")
    assert ts_bench.row(32, "tol 0.3, K 6", {**m, "adaptive_drafted_bound_ms": 5.0})["k_rounds"] == "0:64"
    assert ts_bench.row(32, "tol 0.3, K 6", {**m, "adaptive_drafted_bound_ms": None})["k_rounds"] == "0:64"
