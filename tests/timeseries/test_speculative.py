"""Invariants of the speculative engine on tiny models (CPU, fp32)."""

import math

import pytest
import torch

from specctl.core.errors import SpecctlError
from specctl.timeseries.forecast import Norm, forecast_cached, step_distances, times_for
from specctl.timeseries.model import init_logvar_head
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.rng import series_seeds
from specctl.timeseries.speculative import flat_tokens
from specctl.timeseries.speculative_forecast import speculative_forecast
from tests.helpers import smooth_series, tiny_timer

H = 40  # 5 patches of 8


@pytest.fixture(scope="module", params=[False, True], ids=["multivariate", "channel_independent_target"])
def models(request):
    """A target and a draft; the second pair's target attends within each variable, its draft across them."""
    return (tiny_timer(d_model=32, e_layers=2, seed=0, channel_independent=request.param),
            tiny_timer(d_model=16, e_layers=1, seed=1))


def run(models, context, **spec):
    target, draft = models
    seeds = series_seeds(0, torch.arange(context.shape[0]))
    return speculative_forecast(target, draft, context, H, SpecConfig(**spec), seeds)


@pytest.mark.parametrize("target_opens", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_tolerance_zero_is_target_only(models, k, target_opens):
    context = smooth_series(4, 32, 3)
    result = run(models, context, rule="tolerance", tol=0.0, k=k, target_opens=target_opens)
    torch.testing.assert_close(result.forecast, forecast_cached(models[0], context, H), atol=1e-5, rtol=0)
    assert int(result.accepted.sum()) == 0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_tolerance_infinite_with_draft_mean_is_draft_only(models, k):
    context = smooth_series(4, 32, 3)
    result = run(models, context, rule="tolerance", tol=1e9, k=k, emit="draft_mean", target_opens=False)
    torch.testing.assert_close(result.forecast, forecast_cached(models[1], context, H), atol=1e-5, rtol=0)
    assert int(result.accepted.sum()) == int(result.proposed.sum())


def test_a_tolerance_in_window_units_holds_each_window_to_its_own_scale(models):
    """Decoding is scale-free (each window is normalised by its own statistics), so a window scaled by 5 gets the
    forecast scaled by 5; a tolerance in each window's units then accepts the same tokens there, one in the data's
    units fewer (its distances grew five-fold)."""
    context = smooth_series(4, 32, 3)
    scaled = context * 5 + 2
    window = {"rule": "tolerance", "k": 3, "tol_units": "window"}
    # a tolerance among the draft's distances to the target (window units), so that some tokens pass and some do not
    tol = (step_distances(*models, context, 5, "window") / 4).sqrt().median()
    small, large = run(models, context, tol=float(tol), **window), run(models, scaled, tol=float(tol), **window)
    assert 0 < int(small.accepted.sum()) < int(small.proposed.sum())
    assert torch.equal(small.accepted, large.accepted)
    torch.testing.assert_close(large.forecast, small.forecast * 5 + 2, atol=1e-4, rtol=1e-4)
    data = run(models, scaled, tol=float(tol), rule="tolerance", k=3)
    assert int(data.accepted.sum()) < int(large.accepted.sum())


def test_verification_pass_equals_step_by_step_decoding(models):
    target, _ = models
    context = smooth_series(2, 32, 3)
    norm = Norm.fit(context)
    tokens = norm.tokens(context, 8)
    proposals = torch.randn(2, 3, 3, 8)  # K = 3 arbitrary draft tokens
    sequence = torch.cat([tokens, proposals], dim=2)
    cache = target.new_cache(2, 16)
    target(tokens[:, :, :-1], times_for(2, 0, 3, "cpu"), cache)
    one_pass, _ = target(sequence[:, :, 3:], times_for(2, 3, 4, "cpu"), cache)  # [last, d1, d2, d3]
    step_cache = target.new_cache(2, 16)
    target(tokens[:, :, :-1], times_for(2, 0, 3, "cpu"), step_cache)
    steps = [target(sequence[:, :, n : n + 1], times_for(2, n, 1, "cpu"), step_cache)[0] for n in range(3, 7)]
    torch.testing.assert_close(one_pass, torch.cat(steps, dim=2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", [
    {"rule": "tolerance", "tol": 0.5, "k": 3, "target_opens": False},
    {"rule": "tolerance", "tol": 0.44, "k": 3, "target_opens": True},
    {"rule": "gaussian", "sigma": 2.5, "k": 3},
    {"rule": "exact", "sigma": 2.5, "k": 2, "emit": "sample"},
    {"rule": "exact", "sigma": 2.5, "k": 2, "emit": "sample", "target_opens": True},
])
def test_mixed_acceptance_in_a_batch_matches_batch_of_one(models, spec):
    context = smooth_series(5, 32, 3, seed=3)
    target, draft = models
    seeds = series_seeds(7, torch.arange(5))
    batch = speculative_forecast(target, draft, context, H, SpecConfig(**spec), seeds)
    assert len(set(batch.accepted.tolist())) > 1, "the test needs series that accept different counts"
    for b in range(5):
        alone = speculative_forecast(target, draft, context[b : b + 1], H, SpecConfig(**spec), seeds[b : b + 1])
        torch.testing.assert_close(batch.forecast[b : b + 1], alone.forecast, atol=1e-5, rtol=0)
        assert int(alone.accepted) == int(batch.accepted[b])


@pytest.mark.parametrize("stochastic", [False, True])
def test_exact_rule_reproduces_target_distribution(stochastic):
    """Many series with one context: the first emitted token, which the draft proposes (target_opens off), must be
    distributed as N(t_1, sigma^2)."""
    target = tiny_timer(n_vars=1, d_model=32, e_layers=1, seed=0)
    draft = tiny_timer(n_vars=1, d_model=16, e_layers=1, seed=1, stochastic=stochastic)
    init_logvar_head(draft, math.log(1.5))  # a learned std of the same order as sigma, but not equal to it
    with torch.no_grad():
        draft.head.weight[8:].mul_(0.05)
    n, sigma = 4000, 1.0
    context = smooth_series(1, 32, 1).expand(n, -1, -1).contiguous()
    spec = SpecConfig(rule="exact", sigma=sigma, k=2, emit="sample", exact_max_tries=200, target_opens=False)
    result = speculative_forecast(target, draft, context, 8, spec, series_seeds(11, torch.arange(n)))
    t1 = forecast_cached(target, context[:1], 8)[0]  # the target's mean for the first forecast token [8, 1]
    first = result.forecast[:, :8, 0]
    accepted = result.accepted.sum().item() / result.proposed.sum().item()
    assert 0.05 < accepted < 0.95, "the test needs both accepts and rejects"
    z = (first.mean(0) - t1[:, 0]) / (sigma / math.sqrt(n))
    assert z.abs().max() < 4.5
    torch.testing.assert_close(first.std(0), torch.full((8,), sigma), atol=0.04, rtol=0)
    assert int(result.cap_hits.sum()) == 0


def test_equal_variance_acceptance_matches_closed_form():
    """gaussian rule, deterministic draft, first round: P(accept d_1) = 2 Phi(-Delta/2)."""
    target = tiny_timer(n_vars=1, d_model=32, e_layers=1, seed=0)
    draft = tiny_timer(n_vars=1, d_model=16, e_layers=1, seed=1)
    n, sigma = 6000, 1.5
    context = smooth_series(1, 32, 1).expand(n, -1, -1).contiguous()
    spec = SpecConfig(rule="gaussian", sigma=sigma, k=1, target_opens=False)
    result = speculative_forecast(target, draft, context, 8, spec, series_seeds(3, torch.arange(n)))
    t1, d1 = forecast_cached(target, context[:1], 8), forecast_cached(draft, context[:1], 8)
    delta = (t1 - d1).norm() / sigma
    expected = math.erfc(delta.item() / (2 * math.sqrt(2)))
    assert result.accepted.float().mean().item() == pytest.approx(expected, abs=0.02)


def test_incompatible_draft_is_rejected():
    with pytest.raises(SpecctlError, match="n_vars"):
        speculative_forecast(tiny_timer(n_vars=3), tiny_timer(n_vars=2), smooth_series(1, 32, 3), H,
                             SpecConfig(), series_seeds(0, torch.arange(1)))
    with pytest.raises(SpecctlError, match="norm_center last_patch does not match mean"):  # one normalisation for both
        speculative_forecast(tiny_timer(), tiny_timer(norm_center="last_patch"), smooth_series(1, 32, 3), H,
                             SpecConfig(), series_seeds(0, torch.arange(1)))


def test_a_forecast_the_target_opens_starts_with_the_targets_token(models):
    """With spec.target_opens the first token is the target's own (the draft proposes from the second); a draft
    accepted everywhere then gives the draft's rollout from that token on (frozen lookback statistics)."""
    target, draft = models
    context = smooth_series(4, 32, 3, seed=5)
    result = run(models, context, rule="tolerance", tol=1e9, k=3, emit="draft_mean", target_opens=True)
    norm = Norm.fit(context, target.cfg)
    tokens = norm.tokens(context, 8)
    with torch.no_grad():
        for model in (target, draft, draft, draft, draft):  # H = 5 tokens: the target's, then the draft's
            mean, _ = model(tokens, times_for(4, 0, tokens.shape[2], "cpu"))
            tokens = torch.cat([tokens, mean[:, :, -1:]], dim=2)
    torch.testing.assert_close(result.forecast, norm.series(tokens[:, :, 4:]), atol=1e-5, rtol=0)
    assert result.k_rounds == {3: 2}  # 1 + 3 + 3 >= 5 tokens: two rounds of 3 (draft_mean takes no bonus)


def test_flat_layout_round_trip():
    x = torch.randn(2, 3, 4, 8)
    assert flat_tokens(x).shape == (2, 4, 24)


def test_a_reused_round_state_gives_the_same_forecasts(models):
    """Whole-round CUDA graphs replay over one persistent state: `reset` must leave nothing behind."""
    from specctl.timeseries.model import Stepper
    from specctl.timeseries.speculative import cache_length, forecast_of, new_state, reset, speculative_round

    target, draft = models
    spec = SpecConfig(rule="exact", sigma=2.5, k=2, emit="sample", target_opens=False)  # the draft opens, as below
    tstep, dstep = Stepper(target, 3, cache_length(32, H, 8, 2)), Stepper(draft, 3, cache_length(32, H, 8, 2))
    state = new_state(target, draft, 3, 32, H, spec, "cpu")
    for seed in (1, 2):
        context, seeds = smooth_series(3, 32, 3, seed=seed), series_seeds(seed, torch.arange(3))
        fresh = speculative_forecast(target, draft, context, H, spec, seeds)
        norm = Norm.fit(context)
        tokens = norm.tokens(context, 8)
        tstep(tokens[:, :, :3], times_for(3, 0, 3, "cpu"))
        dstep(tokens[:, :, :3], times_for(3, 0, 3, "cpu"))
        reset(state, norm, tokens, seeds)
        while bool((state.n_out < state.steps).any()):
            speculative_round(state, tstep.eager, dstep.eager)
        reused = forecast_of(state, H)
        torch.testing.assert_close(reused, fresh.forecast, atol=1e-5, rtol=0)
        assert torch.equal(state.stats.accepted, fresh.accepted)



def test_step_distances_follow_the_targets_own_path():
    """Step j's distance is the draft's and the target's next token given the target's forecast so far, recomputed
    here one growing context at a time; a draft equal to the target is at distance 0 at every step."""
    target, draft = tiny_timer(n_vars=2, seed=0), tiny_timer(n_vars=2, seed=1)
    context, steps = smooth_series(3, 32, 2) * 4 + 1, 4
    norm = Norm.fit(context, target.cfg)
    tokens, expected = norm.tokens(context, 8), []
    with torch.no_grad():
        for _ in range(steps):
            times = torch.arange(tokens.shape[2]).expand(3, -1)
            t, d = target(tokens, times)[0][:, :, -1], draft(tokens, times)[0][:, :, -1]  # [B, C, P]
            expected.append(((d - t) * norm.std.transpose(1, 2)).pow(2).mean(dim=(1, 2)).sum())
            tokens = torch.cat([tokens, t[:, :, None]], dim=2)
    torch.testing.assert_close(step_distances(target, draft, context, steps), torch.stack(expected))
    assert step_distances(target, target, context, steps).abs().max() == 0
    # in each window's units the same distances, over the window's std
    scaled = smooth_series(3, 32, 2) * 40 + 1  # ten times the context above: the same normalised path
    torch.testing.assert_close(step_distances(target, draft, scaled, steps, "window"),
                               step_distances(target, draft, context, steps, "window"), atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("spec", [SpecConfig(rule="tolerance", tol=0.35, k=3),
                                  SpecConfig(rule="tolerance", tol=0.35, k=3, target_opens=True),
                                  SpecConfig(rule="exact", sigma=2.5, k=2, emit="sample")],
                         ids=["tolerance", "tolerance-target-opens", "exact"])
def test_graphed_openings_and_rounds_match_eager_forecasts(models, spec):
    """With round graphs, a forecast's opening (statistics, prefill, reset, first round) is one replay over static
    inputs: forecast after forecast on new contexts, it must accept and round as eager decoding does, and give its
    forecast where that is well conditioned. The exact rule's emitted samples are compared by their acceptances
    only: on an H200 they matched there while values differed beyond 1e-4, which the residual's reflection across
    the bisector of mu and t (divided by |t - mu|^2) can make of last-bit differences between graphed and eager
    kernels (2026-12-03; not proven)."""
    from specctl.timeseries.model import Stepper
    from specctl.timeseries.speculative import cache_length

    target, draft = (m.cuda() for m in models)
    B, graphs = 3, {}
    tstep = Stepper(target, B, cache_length(32, H, 8, spec.k), graphs=True)
    dstep = Stepper(draft, B, cache_length(32, H, 8, spec.k), graphs=True)
    for seed in (1, 2, 3):
        context, seeds = smooth_series(B, 32, 3, seed=seed).cuda(), series_seeds(seed, torch.arange(B)).cuda()
        eager = speculative_forecast(target, draft, context, H, spec, seeds)
        graphed = speculative_forecast(tstep, dstep, context, H, spec, seeds, round_graphs=graphs)
        gap = (graphed.forecast - eager.forecast).abs().max().item()
        assert torch.equal(graphed.accepted, eager.accepted) and graphed.k_rounds == eager.k_rounds, (
            f"seed {seed}: accepted {graphed.accepted.tolist()} vs {eager.accepted.tolist()}, rounds "
            f"{graphed.k_rounds} vs {eager.k_rounds}, forecast gap {gap:.2e}")
        if spec.rule == "tolerance":
            torch.testing.assert_close(graphed.forecast, eager.forecast, atol=1e-4, rtol=0)
    assert sum(len(g.openings) for g in graphs.values()) == 1
