import pytest
import torch

from specctl.timeseries.forecast import (
    Norm,
    forecast_cached,
    forecast_recompute,
    forecast_sliding,
    next_patch_loss,
    rollout_mse,
    times_for,
)
from specctl.timeseries.model import TimerXL, count_parameters, drop_path, rope, rotation, scaled_config
from specctl.timeseries.profile import ModelConfig
from tests.helpers import smooth_series, tiny_timer

VARIANTS = [{}, {"norm_center": "last_patch"}, {"norm_position": "post"},
            {"norm_position": "post", "rope_fraction": 0.5, "activation": "relu"}, {"layer_scale": 0.1},
            {"channel_independent": True}]


@pytest.mark.parametrize("variant", VARIANTS,
                         ids=["paper", "last_patch", "post_norm", "reference_layer", "layer_scale",
                              "channel_independent"])
@pytest.mark.parametrize("n_vars", [1, 7])
def test_cached_decoding_equals_full_forward(n_vars, variant):
    model = tiny_timer(n_vars=n_vars, **variant)
    context = smooth_series(3, 32, n_vars)
    cached = forecast_cached(model, context, horizon=37)
    full = forecast_recompute(model, context, horizon=37)
    assert cached.shape == (3, 37, n_vars)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_outputs_at_time_n_ignore_later_inputs():
    model = tiny_timer(n_vars=3)
    x = smooth_series(2, 48, 3)
    tokens = Norm.fit(x[:, :16]).tokens(x, 8)
    changed = tokens.clone()
    changed[:, :, 4:] += 5.0
    times = times_for(2, 0, tokens.shape[2], x.device)
    before, _ = model(tokens, times)
    after, _ = model(changed, times)
    torch.testing.assert_close(before[:, :, :4], after[:, :, :4])
    assert not torch.allclose(before[:, :, 4:], after[:, :, 4:])


def test_variables_see_each_other_within_a_time_step():
    model = tiny_timer(n_vars=2)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.var_bias.fill_(0.5)
    tokens = torch.randn(1, 2, 3, 8)
    times = times_for(1, 0, 3, tokens.device)
    base, _ = model(tokens, times)
    other = tokens.clone()
    other[:, 1, 0] += 3.0  # variable 1 at time 0 changes variable 0's output at time 0
    moved, _ = model(other, times)
    assert not torch.allclose(base[:, 0, 0], moved[:, 0, 0])


def test_channel_independent_model_forecasts_each_variable_as_if_it_were_alone():
    model = tiny_timer(n_vars=3, channel_independent=True)
    alone = tiny_timer(n_vars=1, channel_independent=True)
    alone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in model.blocks:
            block.attn.var_bias.copy_(torch.randn_like(block.attn.var_bias))  # has no effect: nothing to weigh
    context = smooth_series(2, 32, 3)
    together = forecast_cached(model, context, horizon=24)
    for c in range(3):
        torch.testing.assert_close(together[..., c:c + 1], forecast_cached(alone, context[..., c:c + 1], 24),
                                   atol=1e-5, rtol=0)


def test_rollout_mse_is_the_forecasts_error_with_the_gradient_through_fed_back_tokens():
    model = tiny_timer(n_vars=2)  # patch 8: lookback 32, then 4 generated tokens
    window = smooth_series(3, 64, 2)
    loss = rollout_mse(model, window, 32)
    expected = torch.mean((forecast_recompute(model, window[:, :32], 32) - window[:, 32:]) ** 2)
    torch.testing.assert_close(loss, expected)
    fed = {}  # the last step's inputs: the gradient must reach the tokens the model generated itself
    hook = model.embed.register_forward_hook(lambda module, args, out: fed.update(x=args[0]))
    rollout_mse(model, window, 32).backward()
    hook.remove()
    assert fed["x"].requires_grad and model.embed.weight.grad is not None


def test_last_patch_centre_and_lookback_scale():
    context = smooth_series(2, 32, 3) + torch.linspace(0, 4, 32)[None, :, None]  # a level that drifts
    model = tiny_timer(n_vars=3, norm_center="last_patch")
    norm, paper = Norm.fit(context, model.cfg), Norm.fit(context)
    torch.testing.assert_close(norm.mean, context[:, -8:].mean(dim=1, keepdim=True))
    torch.testing.assert_close(norm.std, paper.std)
    assert norm.tokens(context, 8)[:, :, -1].mean().abs() < 1e-5  # the last patch sits at zero
    shift = forecast_cached(model, context + 3.0, 20) - forecast_cached(model, context, 20)
    torch.testing.assert_close(shift, torch.full_like(shift, 3.0), atol=1e-4, rtol=0)


def test_partial_rope_rotates_the_first_channels_by_relative_time_and_leaves_the_rest():
    q, k = torch.randn(2, 1, 1, 3, 8), torch.randn(2, 1, 1, 3, 8)
    times = torch.tensor([[0, 1, 2]]).expand(2, -1)
    rotated = rope(q, rotation(times, 4, q.dtype))
    torch.testing.assert_close(rotated[..., 4:], q[..., 4:])
    assert not torch.allclose(rotated[..., 1:, :4], q[..., 1:, :4])

    def scores(shift: int) -> torch.Tensor:  # q at each time against k at each time, everything shifted in time
        angles = rotation(times + shift, 4, q.dtype)
        return rope(q, angles) @ rope(k, angles).transpose(-1, -2)

    torch.testing.assert_close(scores(5), scores(0))
    assert tiny_timer(rope_fraction=0.5).cfg.rotated_dim == 4  # head_dim 8
    assert tiny_timer(rope_fraction=0.1).cfg.rotated_dim == 2


def test_post_norm_block_normalises_each_residual_sum():
    model = tiny_timer(n_vars=2, e_layers=1, norm_position="post")
    tokens, times = torch.randn(1, 2, 3, 8), times_for(1, 0, 3, "cpu")

    def block(m: TimerXL) -> torch.Tensor:
        return m.blocks[0](m.embed(tokens) * 10, times, rotation(times, m.cfg.rotated_dim, tokens.dtype), None, 0)

    out = block(model)
    torch.testing.assert_close(out.mean(-1), torch.zeros(1, 2, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1, unbiased=False), torch.ones(1, 2, 3), atol=1e-3, rtol=0)
    assert not torch.allclose(block(tiny_timer(n_vars=2, e_layers=1)).std(-1), torch.ones(1, 2, 3), atol=1e-2)


def test_drop_path_skips_whole_samples_in_training_and_nothing_in_evaluation():
    torch.manual_seed(0)
    branch = torch.ones(4000, 2, 3)
    dropped = drop_path(branch, 0.25, training=True)
    per_sample = dropped.flatten(1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()  # a sample is kept or skipped whole
    assert (per_sample[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(drop_path(branch, 0.25, training=False), branch)

    model = tiny_timer(e_layers=3, drop_path=0.4)
    assert [block.drop_rate for block in model.blocks] == pytest.approx([0.0, 0.2, 0.4])
    plain = tiny_timer(e_layers=3)
    plain.load_state_dict(model.state_dict())
    tokens, times = torch.randn(2, 3, 4, 8), torch.arange(4).expand(2, 4)
    assert torch.equal(model(tokens, times)[0], plain(tokens, times)[0])  # evaluation: stochastic depth is off


def test_layer_scale_starts_each_block_near_the_identity_and_is_learned():
    model = tiny_timer(n_vars=2, e_layers=2, layer_scale=1e-4)
    x, times = torch.randn(1, 2, 3, 32), times_for(1, 0, 3, "cpu")
    angles = rotation(times, model.cfg.rotated_dim, x.dtype)
    torch.testing.assert_close(model.blocks[0](x, times, angles, None, 0), x, atol=1e-3, rtol=0)
    scales = [name for name, _ in model.named_parameters() if "scales" in name]
    assert len(scales) == 4 and not any("scales" in name for name, _ in tiny_timer().named_parameters())


def test_sliding_forecast_shape_and_window():
    model = tiny_timer(n_vars=3)
    out = forecast_sliding(model, smooth_series(2, 32, 3), horizon=20)
    assert out.shape == (2, 20, 3) and torch.isfinite(out).all()


def test_draft_scaling_keeps_rope_compatible_heads():
    base = ModelConfig(d_model=1024, n_heads=8, d_ff=2048, e_layers=8)
    target = scaled_config(base, n_vars=7)
    assert count_parameters(TimerXL(target)) == pytest.approx(67.4e6, rel=0.01)
    for scale, layers in ((0.25, 2), (0.5, 4)):
        scales = {f"scale_{k}": scale for k in ("d_model", "n_heads", "d_ff", "e_layers")}
        cfg = scaled_config(base.model_copy(update=scales), 7)
        assert cfg.d_model == int(1024 * scale) and cfg.e_layers == layers and cfg.d_ff == int(2048 * scale)
        assert cfg.head_dim % 4 == 0 and cfg.d_model == cfg.head_dim * cfg.n_heads
        assert count_parameters(TimerXL(cfg)) < count_parameters(TimerXL(target)) * scale


def test_odd_scales_round_to_valid_heads():
    cfg = scaled_config(ModelConfig(d_model=1024, n_heads=8, scale_d_model=0.7, scale_n_heads=0.7), 7)
    assert cfg.head_dim % 4 == 0 and cfg.d_model % cfg.n_heads == 0


def test_stochastic_head_bounds_log_variance():
    model = tiny_timer(stochastic=True)
    mean, logvar = model(torch.randn(2, 3, 4, 8) * 100, times_for(2, 0, 4, "cpu"))
    assert mean.shape == logvar.shape == (2, 3, 4, 8)
    assert (logvar >= model.cfg.logvar_min).all() and (logvar <= model.cfg.logvar_max).all()


def test_next_patch_loss_trains_every_position():
    model = tiny_timer(n_vars=2)
    window = smooth_series(4, 64, 2)
    loss = next_patch_loss(model, window, lookback=32)
    loss.backward()
    assert loss.item() > 0 and model.embed.weight.grad is not None


def test_self_feed_replaces_inputs_after_the_lookback_with_the_models_rolling_forecast():
    model = tiny_timer(n_vars=2)  # patch 8: lookback 32 = 4 tokens, window 64 = 8 tokens
    model.train()
    window = smooth_series(4, 64, 2)
    seen = []
    hook = model.embed.register_forward_hook(lambda module, args, out: seen.append(args[0].detach().clone()))
    next_patch_loss(model, window, lookback=32, self_feed=1.0)
    hook.remove()
    trained = seen[-1]  # the rollout's calls, then the pass the loss trains
    assert model.training  # the rollout ran in eval mode and put the model back
    norm = Norm.fit(window[:, :32])
    truth = norm.tokens(window, 8)[:, :, :-1]
    assert torch.equal(trained[:, :, :4], truth[:, :, :4])  # the lookback stays real
    model.eval()
    forecast = norm.tokens(forecast_recompute(model, window[:, :32], 24), 8)  # what generation feeds
    assert torch.allclose(trained[:, :, 4:], forecast, atol=1e-5)
    assert not torch.equal(trained[:, :, 4:], truth[:, :, 4:])
    torch.manual_seed(0)
    assert next_patch_loss(model, window, 32, self_feed=0.0).item() == next_patch_loss(model, window, 32).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_a_whole_graphed_forecast_matches_eager_decoding():
    """With a graphed stepper a forecast is one captured graph over a static context: forecast after forecast on new
    contexts, it gives what eager decoding gives."""
    from specctl.timeseries.forecast import forecast_cached
    from specctl.timeseries.model import Stepper

    model = tiny_timer(d_model=32, e_layers=2, seed=0).cuda()
    step = Stepper(model, 3, 32 // 8 + 5, graphs=True)
    for seed in (1, 2, 3):
        context = smooth_series(3, 32, 3, seed=seed).cuda()
        torch.testing.assert_close(forecast_cached(model, context, 40, step), forecast_cached(model, context, 40),
                                   atol=1e-4, rtol=0)
    assert len(step.wholes) == 1 and step.graphs
