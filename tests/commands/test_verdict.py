"""spec-test's verdict line: the advice follows what ran, not a speed within timing noise."""

from __future__ import annotations

from types import SimpleNamespace

from specctl.commands.render import spec_verdict

RUN = {"speedup": 1.04, "delta_mse_pct": 0.0, "fidelity_mse": 0.0, "speedup_draft": 3.3, "delta_mse_pct_draft": 390.0,
       "target_step_ms": 5.1, "c_hat": 0.4, "rule": "tolerance", "acceptance_rate": 0.0, "mse_draft": 0.22,
       "mse_target": 0.045, "predicted_speedup": 1.0, "adaptive_k": True, "k_rounds": {0: 8}, "k": 2, "v_hat": 3.0,
       "o_hat": 0.7, "tokens_per_target_call": 1.0, "device": "cpu", "target_opens": False,
       "draft_rmse_by_step": [0.18, 0.14, 0.17, 0.2], "adaptive_drafted": 1, "adaptive_drafted_ms": 2.0,
       "adaptive_drafted_bound_ms": 2.0, "adaptive_target_ms": 3.0}  # the quick start on a 2-core CPU


def test_a_run_that_drafted_nothing_says_use_the_target_whatever_its_noise():
    said = spec_verdict(SimpleNamespace(**RUN))
    assert "use the target: adaptive K drafted nothing" in said and "speculation pays" not in said


def test_a_fallback_after_drafting_lost_says_what_drafting_cost():
    """ETTh1 on an H200 (batch 1, tol 0.15): the validation windows' drafted forecasts cost more than the target's."""
    said = spec_verdict(SimpleNamespace(**{**RUN, "adaptive_drafted": 64, "adaptive_drafted_ms": 6.1,
                                            "adaptive_drafted_bound_ms": 6.1, "adaptive_target_ms": 5.33}))
    assert "the 64 forecasts that drafted (validation windows first) cost 6.10 ms each at" in said and "5.33 ms" in said


def test_a_fallback_whose_drafting_was_cheaper_on_average_names_its_spread():
    """ETTm1 on an H200 (batch 256, window units): eight batches (validation, then test) drafted at 19.6 ms on average
    against the target's 20.8, but swung from 13 to 45 ms."""
    said = spec_verdict(SimpleNamespace(**{**RUN, "adaptive_drafted": 8, "adaptive_drafted_ms": 19.58,
                                            "adaptive_drafted_bound_ms": 27.1, "adaptive_target_ms": 20.83}))
    assert "cost 19.58 ms each (up to 27.10 at 97.5%, by Student's t) at the measured costs against 20.83" in said


def test_a_run_that_drafted_and_won_says_it_pays():
    said = spec_verdict(SimpleNamespace(**{**RUN, "speedup": 1.5, "predicted_speedup": 1.5, "k_rounds": {2: 8},
                                            "acceptance_rate": 0.9}))
    assert "speculation pays here (the draft alone is faster still" in said


def test_a_draft_furthest_at_the_first_token_is_pointed_at_the_target_opening():
    """ETTm1's small draft on an H200: RMSE 0.229 at the first token, 0.171 at most after; with rejections the
    verdict names spec.target_opens, and not once it is on, nor where the first token is not the worst."""
    ettm1 = {**RUN, "speedup": 1.83, "predicted_speedup": 2.0, "k_rounds": {7: 78}, "acceptance_rate": 0.82,
             "draft_rmse_by_step": [0.229, 0.171, 0.163, 0.129]}
    assert "spec.target_opens = true" in spec_verdict(SimpleNamespace(**ettm1))
    assert "target_opens" not in spec_verdict(SimpleNamespace(**{**ettm1, "target_opens": True}))
    assert "target_opens" not in spec_verdict(SimpleNamespace(**{**ettm1, "draft_rmse_by_step": [0.1, 0.2]}))
