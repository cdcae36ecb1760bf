"""Choices made on validation windows only: spec.fidelity_budget (within the budget there, reported with the result)
and adaptive K's prior."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from specctl.backends import load_profile
from specctl.cli import app
from specctl.commands.render import spec_verdict
from specctl.timeseries import budget as budget_module
from specctl.timeseries.costs import EVIDENCE_SERIES, Prediction, adaptive_k
from specctl.timeseries.spectest import SpecTestSession

FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=4", "--set", "data.max_eval_windows=8",
        "--set", "data.synthetic.length=3000"]
CHECKPOINTS = ["spec.max_windows=16", "spec.repeats=1", "spec.sliding_baseline=false"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for command, name in (("pretrain", "quickstart/target"), ("distill", "quickstart/distill")):
            assert CliRunner().invoke(app, [command, "-p", name, *FAST]).exit_code == 0
    finally:
        os.chdir(cwd)
    return folder / "artifacts" / "quickstart"


def profile_for(pair, *more: str):
    return load_profile("quickstart", [f'spec.target="{pair / "target"}"', f'spec.draft="{pair / "distilled"}"',
                                       *CHECKPOINTS, "data.synthetic.length=3000", *more])


def predicted(speedup):
    """A stand-in for the cost model's prediction: `speedup(k)` for every candidate opening with draft length k."""
    return lambda costs, results: Prediction(1.0, 1.0 / speedup(results[0].opening))


def test_the_budget_is_chosen_on_validation_windows_only(pair, monkeypatch):
    profile = profile_for(pair, "spec.fidelity_budget=0.05", "spec.budget_ks=[2, 3]",
                          "spec.budget_tolerances=[0.1, 0.5, 2.0]")
    session = SpecTestSession(profile, torch.device("cpu"))
    # a CPU's launch-bound models predict no setting faster than the target: say that longer rounds pay here
    monkeypatch.setattr(budget_module, "predict", predicted(lambda k: 1.0 + k / 10))
    seen = []
    original = session.speculate
    monkeypatch.setattr(session, "speculate", lambda p, b, *a, **k: seen.append(b) or original(p, b, *a, **k))
    chosen, choice = budget_module.choose_within_budget(session, profile)
    assert seen and all(any(b is v for v in session.validation_batches()) for b in seen)
    assert not any(b is t for b in seen for t in session.batches)
    assert choice.candidates == 6 and choice.k in (2, 3) and chosen.spec.k == choice.k
    assert choice.val_delta_mse_pct <= 5.0
    assert chosen.spec.tol == pytest.approx(choice.tol_relative * session.validation_rmse())


@pytest.mark.parametrize("adaptive, target_opens", [("true", "false"), ("false", "false"), ("false", "true")])
def test_the_budget_runs_the_target_alone_when_no_setting_is_predicted_to_pay(pair, monkeypatch, adaptive,
                                                                              target_opens):
    """Measured on an H200 (weather, 2026-12-03): every setting within a 1% budget was predicted 0.34-0.86x and ran
    0.85-0.99x; the target's own loop is within every budget and 1x by definition."""
    profile = profile_for(pair, "spec.fidelity_budget=0.05", "spec.budget_ks=[2, 3]", f"spec.adaptive_k={adaptive}",
                          "spec.budget_tolerances=[0.1, 0.5]", f"spec.target_opens={target_opens}")
    session = SpecTestSession(profile, torch.device("cpu"))
    monkeypatch.setattr(budget_module, "predict", predicted(lambda k: 0.9))
    policies = []
    original = session.speculate
    monkeypatch.setattr(session, "speculate", lambda p, b, *a, policy=None, **k: policies.append(policy) or original(
        p, b, *a, policy=policy, **k))
    chosen, choice = budget_module.choose_within_budget(session, profile)
    # candidates are decoded as the test windows will be: with adaptive K's policy where the profile asks for it
    assert policies and all((p is not None) == (adaptive == "true") for p in policies)
    assert (choice.k, chosen.spec.k, choice.val_predicted_speedup, choice.candidates) == (0, 0, 1.0, 4)
    result = session.run(profile)
    assert result.k_rounds == {0: result.batches * session.steps} and result.proposed == 0
    assert result.fidelity_mse == 0.0 and result.mse == result.mse_target
    assert result.predicted_speedup == pytest.approx(1.0, abs=1e-12)
    assert "K = 0 drafts nothing" in spec_verdict(result) and "use the target" in spec_verdict(result)


def test_spec_test_reports_the_choice(pair):
    args = ["spec-test", "-p", "quickstart", *FAST, "--set", f'spec.target="{pair / "target"}"',
            "--set", f'spec.draft="{pair / "distilled"}"', *(x for c in CHECKPOINTS for x in ("--set", c)),
            "--set", "spec.fidelity_budget=0.02"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    budget = json.loads(result.output[result.output.index("{"):])["budget"]
    assert budget["budget"] == 0.02 and budget["val_delta_mse_pct"] <= 2.0
    table = CliRunner().invoke(app, args)
    assert "fidelity budget (validation)" in table.output


def test_a_budget_needs_the_tolerance_rule():
    result = CliRunner().invoke(app, ["spec-test", "-p", "quickstart", "--set", "spec.fidelity_budget=0.01",
                                      "--set", 'spec.rule="gaussian"'])
    assert result.exit_code == 2 and 'set spec.rule = "tolerance"' in result.output


def test_adaptive_k_learns_its_prior_on_validation_windows(pair, monkeypatch):
    """A draft the rule never accepts (tolerance 0), at round costs that make drafting pay if tokens pass: the
    validation windows teach adaptive K so before the test split, every batch of which then runs the target's own
    loop; from its prior of one passing test alone, the first test batch would draft."""
    profile = profile_for(pair, "spec.rule=tolerance", "spec.tol=0.0", "spec.adaptive_k=true", "spec.k=3",
                          "spec.batch_size=4", "spec.max_windows=48", "spec.fidelity_budget=null")
    session = SpecTestSession(profile, torch.device("cpu"))
    assert sum(len(b.ids) for b in session.validation_batches()) > EVIDENCE_SERIES  # enough to judge drafting lost
    cheap = {0: 1.0, **{k: 1.0 + 0.2 * k for k in range(1, 4)}}  # seconds: a round of k emits up to k + 1 tokens
    first = {**cheap, 0: 3.0}  # an opening of k = 0: the target's whole forecast (4 tokens, its loop cheaper)
    original_costs = session.costs
    monkeypatch.setattr(session, "costs", lambda *a, **k: replace(original_costs(*a, **k), round=cheap, first=first))
    seen = []
    original = session.speculate
    monkeypatch.setattr(session, "speculate", lambda p, b, *a, **k: seen.append(b) or original(p, b, *a, **k))
    result = session.run(profile)
    assert any(b is v for b in seen for v in session.validation_batches())
    assert set(result.k_rounds) == {0} and result.proposed == 0
    # what it learnt is reported: the drafted validation forecasts cost more than the target's whole forecast
    assert result.adaptive_drafted >= 1 and result.adaptive_target_ms == 3e3
    assert result.adaptive_drafted_ms > result.adaptive_target_ms
    assert adaptive_k(cheap, first, profile.spec, session.steps).opening() > 0  # its prior alone would draft


def test_a_tolerance_in_window_units_is_relative_to_the_targets_rmse_in_them(pair, monkeypatch):
    """spec.tol_units = "window": tol_relative (and the budget's tolerances) are shares of the target's validation RMSE
    in each window's units, and the draft's distances per step are reported in them."""
    profile = profile_for(pair, 'spec.rule="tolerance"', "spec.tol_relative=0.5", 'spec.tol_units="window"',
                          "spec.fidelity_budget=null")
    session = SpecTestSession(profile, torch.device("cpu"))
    window, data = session.validation_rmse("window"), session.validation_rmse("data")
    assert window is not None and data is not None and window != pytest.approx(data)
    result = session.run(profile)
    assert result.tol_units == "window" and result.tol == pytest.approx(0.5 * window)
    assert result.draft_rmse_by_step == session.draft_rmse_by_step("window") != session.draft_rmse_by_step("data")
    budget = profile_for(pair, "spec.fidelity_budget=0.05", "spec.budget_tolerances=[0.1, 0.5]",
                         'spec.tol_units="window"')
    monkeypatch.setattr(budget_module, "predict", predicted(lambda k: 1.5))
    chosen, choice = budget_module.choose_within_budget(session, budget)
    assert chosen.spec.tol == pytest.approx(choice.tol_relative * window)
