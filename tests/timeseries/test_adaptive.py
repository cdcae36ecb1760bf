"""Adaptive K: the chooser finishes a forecast soonest in expected time (on a long horizon, the argmax of the predicted
rate), it matches the best fixed K where that is known, and it falls back to target steps when no draft length
pays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from specctl.timeseries.costs import AdaptiveK, StepCosts, predict, t_975, tokens_per_round
from specctl.timeseries.forecast import Norm, forecast_cached, times_for
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.rng import series_seeds
from specctl.timeseries.speculative_forecast import speculative_forecast
from tests.helpers import smooth_series, tiny_timer

ROUNDS = {0: 1.0, 1: 1.3, 2: 1.6, 3: 1.9, 4: 2.2}  # seconds of a round of k draft tokens (k = 0: a target step)


@pytest.mark.parametrize("alpha, best", [(0.95, 4), (0.7, 2), (0.6, 1), (0.15, 0)])
def test_on_a_long_horizon_the_chooser_is_the_argmax_of_the_predicted_rate(alpha, best):
    policy = AdaptiveK(ROUNDS, bonus=True, steps=400)
    rates = {k: (1.0 if k == 0 else tokens_per_round(alpha, k, True)) / t for k, t in ROUNDS.items()}
    assert policy.best(alpha) == max(rates, key=rates.get) == best


SHORT = {0: 1.0, 1: 1.2, 2: 1.05, 3: 1.1, 4: 1.15, 5: 1.5, 6: 1.7, 7: 1.9}  # verification grows with the positions


def test_on_a_short_horizon_the_chooser_finishes_in_fewest_seconds():
    """8 tokens left, every draft accepted: a round of 4 has the best rate (5 tokens per 1.15 against 8 per 1.9 for
    7), but it leaves 3 tokens for a second round (1.15 + 1.05) where one round of 7 finishes (1.9). With 5 tokens
    left one round of 4 finishes; with 1 left, a target step."""
    policy = AdaptiveK(SHORT, bonus=True, steps=8)
    assert max(range(1, 8), key=lambda k: (k + 1) / SHORT[k]) == 4
    assert policy.best(1.0) == 7 and policy.best(1.0, left=5) == 4 and policy.best(1.0, left=1) == 0
    seconds, _ = policy.seconds_to_finish(1.0)
    assert seconds[8] == pytest.approx(1.9) and seconds[5] == pytest.approx(1.15) and seconds[3] == pytest.approx(1.05)


def test_a_forecast_opens_at_the_first_rounds_costs():
    """Under target_mean a later round of k re-feeds k + 1 tokens, so at a large batch a later round of 7 costs more
    than the first (which re-feeds one): the opening is priced at the first round's costs, the rest at later ones."""
    later = {**SHORT, 7: 2.6}
    # one round of 7 priced as a later one (2.6) loses to a round of 4 and one of 2, in either order (2.2)
    assert AdaptiveK(later, bonus=True, steps=8).opening() in (2, 4)
    assert AdaptiveK(later, bonus=True, steps=8, first={**SHORT, 0: 8.0}).opening() == 7


def test_an_opening_of_k_0_is_priced_as_the_targets_whole_forecast():
    """A forecast that opens drafting nothing runs the target's own loop (first[0]: here 6, cheaper than 8 loop steps
    at 1.0): a first round of 1 at 0.9 that emits two tokens (its draft passes, then the bonus) and 6 target steps
    (6.9) loses to it; against 8 loop steps (8.0) it wins."""
    rounds = {0: 1.0, 1: 9.0}
    assert AdaptiveK(rounds, bonus=True, steps=8, first={0: 6.0, 1: 0.9}).opening() == 0
    assert AdaptiveK(rounds, bonus=True, steps=8, first={0: 8.0, 1: 0.9}).opening() == 1


def test_a_later_round_is_timed_with_adaptive_ks_decision():
    """Every later round of an adaptive run waits for the policy's decision (a host sync, then planning): the round's
    measured cost includes it."""
    import time

    from specctl.timeseries.model import Stepper
    from specctl.timeseries.speculative import cache_length
    from specctl.timeseries.speculative_forecast import round_seconds

    target, draft = tiny_timer(d_model=32, e_layers=2, seed=0), tiny_timer(d_model=16, e_layers=1, seed=1)
    spec, context = SpecConfig(rule="tolerance", tol=0.5, k=2, adaptive_k=True), smooth_series(2, 32, 3)
    need = cache_length(32, 40, 8, 2)
    args = (Stepper(target, 2, need), Stepper(draft, 2, need), context, 40, spec, series_seeds(0, torch.arange(2)),
            None, 3, 2, 1)
    slow = lambda state: time.sleep(0.02) or 2  # noqa: E731
    assert round_seconds(*args, decide=slow) - round_seconds(*args) > 0.015


def forecast_result(k_rounds: dict[int, int], series: int, opening: int):
    """A forecast of `series` series that opened with `opening`, with these rounds per k; every drafted token passed."""
    from specctl.timeseries.speculative import SpecResult

    zeros, counts = torch.zeros(series, dtype=torch.long), torch.full((series,), 3)
    return SpecResult(torch.empty(0), zeros, counts, counts, zeros + 1, zeros, zeros, zeros, k_rounds=k_rounds,
                      opening=opening)


COSTS = {0: 0.4, 1: 0.7, 2: 0.85, 3: 1.0}  # seconds per round of k; the target's whole forecast: 4.0
CHEAP, DEAR = {3: 1, 0: 6}, {3: 5}  # opened with 3, then target steps (1.0 + 6 x 0.4 = 3.4) or four rounds of 3 (5.0)


@pytest.mark.parametrize("forecasts, series, drafts", [
    ([CHEAP], 32, True), ([DEAR], 32, False), ([DEAR], 1, True), ([DEAR] * 31, 1, True), ([DEAR] * 32, 1, False),
    ([DEAR, *[CHEAP] * 31], 1, True), ([DEAR] * 2 + [CHEAP] * 30, 16, False), ([CHEAP] * 8, 256, True),
    ([CHEAP] * 6 + [DEAR] * 2, 256, False)],
    ids=["cheap", "dear", "one window", "31 windows", "32 windows", "one dear window", "two dear batches first",
         "steadily cheap", "cheaper on average, but swinging"])
def test_once_drafting_has_not_shown_it_costs_less_than_the_target_none_drafts(forecasts, series, drafts):
    """Each forecast that drafted is priced at the measured costs, whatever the per-token counts say (here every
    drafted token passed): once those over at least 32 series have not shown they cost less than the target's own
    forecasts (their mean's upper bound, by Student's t, is above it), none drafts. Six cheap batches and two dear ones
    average 3.8 against the target's 4.0, but swing (the bound is 4.19 after the seventh); on an H200 such a mean
    (ETTm1, batch 256) drafted on the test split at 0.85x. One window's forecast is not that evidence (on an H200, one
    hard ETTh1 validation window at batch 1 stopped drafting where the test windows then accepted every token)."""
    policy = AdaptiveK(COSTS, bonus=True, steps=8, first={**COSTS, 0: 4.0})
    assert policy.opening() == 3
    for k_rounds in forecasts:  # a forecast that opens with k = 0 drafts nothing: it is not priced
        opening = policy.opening()
        policy.learn(forecast_result(k_rounds if opening else {0: 8}, series, opening))
    assert policy.drafting_lost() != drafts and (policy.opening() > 0) == drafts


def test_a_few_forecasts_are_bounded_by_students_t():
    """As run on an H200 (ETTm1, batch 256, window units; ms): four validation and two test forecasts drafted in one
    round of 6 (13.9), then one needed a second round of 5 (about 16 more), against the target's 20.84. The mean plus
    two standard errors (20.76) kept drafting on, and the next test batch lost too (0.84x); Student's t at six
    degrees of freedom (21.78) stops it."""
    costs = {0: 3.15, 5: 16.0, 6: 18.1}
    policy = AdaptiveK(costs, bonus=True, steps=7, first={0: 20.84, 5: 12.7, 6: 13.9})
    for k_rounds in [{6: 1}] * 6 + [{6: 1, 5: 1}]:
        policy.learn(forecast_result(k_rounds, 256, 6))
    mean, n = policy.drafted_mean(), policy.drafted
    two_se = mean + 2 * math.sqrt((policy.drafted_squares / n - mean**2) / (n - 1))
    assert two_se < 20.84 < policy.drafted_bound() == pytest.approx(21.78, abs=0.01)
    assert policy.drafting_lost() and policy.opening() == 0


@pytest.mark.parametrize("df", [1, 2, 6, 10, 11, 30, 31, 100, 10_000])
def test_the_t_quantile_is_students(df):
    from scipy.stats import t

    assert t_975(df) == pytest.approx(t.ppf(0.975, df), abs=3e-3)


def test_the_prediction_prices_each_batch_as_it_ran():
    """A batch that fell back to the target's own loop at first[0]; one that opened with 3, then ran a round of 2, at
    first[3] + round[2] (its opening is among its rounds); each after the prefill (on an H200 in the seventh run, a
    prediction that priced every batch at one opening said 0.61-1.10x for runs that fell back and ran 0.99x)."""
    costs = StepCosts(target_step=1.0, draft_step=0.1, target_forecast=5.0, prefill_spec=0.5, verify={},
                      round={0: 0.4, 2: 0.8, 3: 1.0}, first={0: 4.5, 3: 1.2})
    prediction = predict(costs, [forecast_result({0: 8}, 1, 0), forecast_result({3: 1, 2: 1}, 1, 3)])
    assert prediction.target_seconds == 10.0 and prediction.spec_seconds == pytest.approx(0.5 + 4.5 + 0.5 + 1.2 + 0.8)


def simulate(alpha: float, steps: int, choose, rng: np.random.Generator, bonus: bool = True) -> tuple[float, int, int]:
    """Seconds to emit `steps` tokens of one series whose drafted tokens each pass with probability alpha; and the
    series' accepted and evaluated counts."""
    emitted = accepted = evaluated = 0
    seconds = 0.0
    while emitted < steps:
        k = choose(accepted, evaluated, steps - emitted)
        if k == 0:
            emitted, seconds = emitted + 1, seconds + ROUNDS[0]
            continue
        n = int(np.cumprod(rng.random(k) < alpha).sum())
        emitted += n + 1 if n < k or bonus else n
        accepted, evaluated, seconds = accepted + n, evaluated + min(n + 1, k), seconds + ROUNDS[k]
    return seconds, accepted, evaluated


@pytest.mark.parametrize("alpha", [0.9, 0.55, 0.2])
def test_adaptive_k_is_as_fast_as_the_best_fixed_k(alpha):
    """Where the best fixed K is known (a stationary acceptance rate), learning the rate as it goes (each forecast
    the prior of the next, as batches are) costs little."""
    policy = AdaptiveK(ROUNDS, bonus=True, steps=64)

    adaptive = policy.choose

    def total(choose, learn: bool = False) -> float:
        rng, seconds = np.random.default_rng(0), 0.0
        for _ in range(300):
            spent, accepted, evaluated = simulate(alpha, 64, choose, rng)
            seconds += spent
            if learn:
                policy.observe(accepted, evaluated)
        return seconds

    fixed = {k: total(lambda a, e, left, k=k: k) for k in ROUNDS}
    assert total(adaptive, learn=True) <= 1.03 * min(fixed.values())


def test_a_draft_that_is_never_accepted_falls_back_to_target_steps():
    target, draft = tiny_timer(d_model=32, e_layers=2, seed=0), tiny_timer(d_model=16, e_layers=1, seed=1)
    context, horizon = smooth_series(4, 32, 3), 80
    spec = SpecConfig(rule="tolerance", tol=0.0, k=4, adaptive_k=True)
    policy = AdaptiveK({0: 1.0, 1: 1.5, 2: 2.0, 3: 2.5, 4: 3.0}, bonus=True, steps=10)
    result = speculative_forecast(target, draft, context, horizon, spec, series_seeds(0, torch.arange(4)),
                                  policy=policy)
    torch.testing.assert_close(result.forecast, forecast_cached(target, context, horizon), atol=1e-5, rtol=0)
    assert result.k_rounds.get(0, 0) >= 6 and sum(result.k_rounds.values()) == int(result.rounds.max())


class Scripted:
    """A policy that plays a fixed schedule, its first entry as the opening."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def opening(self) -> int:
        return next(self.schedule)

    def __call__(self, state) -> int:
        return next(self.schedule)


def test_a_forecast_opens_with_the_opening_and_goes_on_at_later_rounds_costs():
    """The first round drafts what `opening` chose at first-round costs, later rounds what the later costs say: here a
    first round of 2 is cheap and a later one dear, so one round of 2, then target steps."""
    target, draft = tiny_timer(d_model=32, e_layers=2, seed=0), tiny_timer(d_model=16, e_layers=1, seed=1)
    context, horizon = smooth_series(2, 32, 3), 48  # 6 tokens of 8
    policy = AdaptiveK({0: 1.0, 1: 9.0, 2: 9.0}, bonus=True, steps=6, first={0: 6.0, 1: 0.4, 2: 0.5})
    assert policy.opening() == 2 and policy.choose(0, 0) == 0
    spec = SpecConfig(rule="tolerance", tol=1e9, k=2, adaptive_k=True, target_opens=False)
    result = speculative_forecast(target, draft, context, horizon, spec, series_seeds(0, torch.arange(2)),
                                  policy=policy)
    assert result.k_rounds == {2: 1, 0: 3}


def test_adaptive_rounds_keep_the_context_exact():
    """Rounds of different k, then target steps, in one forecast, each with its own re-feed width: with an always-
    accepting rule and draft_mean, a round of k emits k draft means and a target step the target's mean, each
    predicted from exactly the emitted context (checked against full forwards without a cache). Once a target step
    is taken, the rest are target steps."""
    target, draft = tiny_timer(d_model=32, e_layers=2, seed=0), tiny_timer(d_model=16, e_layers=1, seed=1)
    context, horizon, P = smooth_series(3, 32, 3), 160, 8
    plan = [3, 1, 4, 2, 4, 1, 0, 3, 2, 4] + [0] * 12  # the 3 and later after the first 0 become target steps
    schedule = iter(plan)
    spec = SpecConfig(rule="tolerance", tol=1e9, k=4, emit="draft_mean", target_opens=False)
    result = speculative_forecast(target, draft, context, horizon, spec, series_seeds(0, torch.arange(3)),
                                  policy=Scripted(schedule))
    norm = Norm.fit(context, target.cfg)
    seq, n0 = norm.tokens(context, P), context.shape[1] // P
    taken = plan[: plan.index(0)] + [0] * 12
    for k in taken:
        for _ in range(max(k, 1)):
            model = target if k == 0 else draft
            mean, _ = model(seq, times_for(3, 0, seq.shape[2], "cpu"))
            seq = torch.cat([seq, mean[:, :, -1:]], dim=2)
        if seq.shape[2] - n0 >= horizon // P:
            break
    expected = norm.series(seq[:, :, n0 : n0 + horizon // P])
    torch.testing.assert_close(result.forecast, expected, atol=1e-4, rtol=0)
    assert result.k_rounds[0] >= 1 and len(result.k_rounds) == 5


@pytest.mark.parametrize("emit, target_opens", [("target_mean", False), ("sample", False), ("sample", True)])
def test_a_policy_that_expects_nothing_runs_the_targets_own_loop(emit, target_opens):
    """Mean emission: the target's own KV-cached forecast, no draft call. Samples: lean target steps drawing from p
    (after the target's opening token, one fewer)."""
    target, draft = tiny_timer(d_model=32, e_layers=2, seed=0), tiny_timer(d_model=16, e_layers=1, seed=1)
    context, horizon = smooth_series(4, 32, 3), 40
    policy = AdaptiveK({0: 1.0, 1: 10.0}, bonus=True, steps=5)  # a draft step costs 9 target steps: never worth it
    rule = {"rule": "exact", "sigma": 0.5} if emit == "sample" else {"rule": "tolerance", "tol": 1e9}
    spec = SpecConfig(k=1, adaptive_k=True, emit=emit, target_opens=target_opens, **rule)
    calls = []
    draft.register_forward_hook(lambda *a: calls.append(1))
    result = speculative_forecast(target, draft, context, horizon, spec, series_seeds(0, torch.arange(4)),
                                  policy=policy)
    cached = forecast_cached(target, context, horizon)
    assert result.k_rounds == {0: 5 - target_opens} and int(result.proposed.sum()) == 0 and calls == []
    if emit == "target_mean":
        torch.testing.assert_close(result.forecast, cached, atol=1e-5, rtol=0)
    else:  # one draw from N(t, sigma^2) per value, the first token around the target's mean
        assert 0.2 < float((result.forecast[:, :8] - cached[:, :8]).std()) < 0.8


def test_a_batch_is_planned_for_its_slowest_series():
    """A batch runs until its slowest series is done: with two series through and one that has accepted nothing, the
    batch's per-token rate (14 of 20) would keep drafting, the slowest series' own (0 of 6), lower, says target
    steps; and a finished batch teaches the next one what its slowest series saw."""
    from types import SimpleNamespace

    from specctl.timeseries.speculative import SpecResult

    policy = AdaptiveK({0: 1.0, **{k: 1.9 + 0.1 * k for k in range(1, 8)}}, bonus=True, steps=8)
    stats = SimpleNamespace(accepted=torch.tensor([7, 7, 0]), evaluated=torch.tensor([7, 7, 6]))
    state = SimpleNamespace(steps=8, n_out=torch.tensor([8, 8, 2]), stats=stats)
    assert policy.choose(14, 20, 6) > 0 and policy(state) == 0
    zeros = torch.zeros(3, dtype=torch.long)
    done = SpecResult(torch.empty(0), zeros, stats.accepted, stats.evaluated, torch.tensor([1, 1, 3]), zeros, zeros,
                      zeros)
    assert done.slowest_counts() == (0, 6)
    policy.observe(14, 20, done.slowest_counts())
    assert policy.opening() == 0  # one passing test of prior against 0 of 6: the next batch runs the target
