"""Acceptance rules: densities, acceptance rates, exactness of the residual draw, batching, emitted tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from specctl.timeseries.acceptance import (
    acceptance_closed_form,
    acceptance_probability,
    count_accepted,
    emit_tokens,
    equal_variance,
    gaussian_log_density,
    log_acceptance_ratio,
    residual_sample,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


def rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(*shape, generator=g, dtype=F64)


def test_log_density_matches_scipy():
    g = gen(0)
    x, mean = randn(4, 3, 5, g=g), randn(4, 3, 5, g=g)
    std = 0.2 + rand(4, 3, 5, g=g)
    ours = gaussian_log_density(x, mean, std)
    want = stats.norm.logpdf(x.numpy(), mean.numpy(), std.numpy()).sum(-1)
    np.testing.assert_allclose(ours.numpy(), want, rtol=1e-12)
    for b in range(4):  # one diagonal-covariance multivariate normal per (b, k)
        for k in range(3):
            mvn = stats.multivariate_normal(mean[b, k].numpy(), np.diag(std[b, k].numpy() ** 2))
            assert ours[b, k].item() == pytest.approx(mvn.logpdf(x[b, k].numpy()), rel=1e-12)
    scalar = gaussian_log_density(x, mean, 0.7)  # a float std broadcasts over every value
    np.testing.assert_allclose(scalar.numpy(), stats.norm.logpdf(x.numpy(), mean.numpy(), 0.7).sum(-1), rtol=1e-12)


def test_log_ratio_keeps_normalising_terms():
    g = gen(1)
    x, t, mu = randn(2, 3, 4, g=g), randn(2, 4, 4, g=g), randn(2, 3, 4, g=g)
    std_q = 0.1 + rand(2, 3, 4, g=g)
    got = log_acceptance_ratio(x, t, mu, std_q, 0.5, 1.5)
    want = math.log(1.5) + gaussian_log_density(x, t[:, :3], 0.5) - gaussian_log_density(x, mu, std_q)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert got.shape == (2, 3)


@pytest.mark.parametrize("delta", [0.0, 0.5, 1.0, 2.0, 3.5])
def test_empirical_acceptance_matches_closed_form(delta):
    g, n, d, sigma = gen(2), 200_000, 5, 0.3
    mu = randn(1, 1, d, g=g)
    e = randn(d, g=g)
    t = (mu + delta * sigma * e / e.norm()).expand(n, 2, d)  # [n, K+1, D] with the bonus row equal, unused
    x = mu + sigma * randn(n, 1, d, g=g)  # x ~ q
    prob, _ = acceptance_probability("exact", x, t, mu.expand(n, 1, d), sigma, sigma, 1.0, 0.0)
    rate = (rand(n, 1, g=g) < prob).double().mean().item()
    closed = acceptance_closed_form(torch.tensor(delta, dtype=F64)).item()
    assert closed == pytest.approx(2 * stats.norm.cdf(-delta / 2), rel=1e-12)
    assert abs(rate - closed) < 0.01


MU = torch.tensor([0.2, -0.1, 0.4], dtype=F64)
T = MU + torch.tensor([0.5, 0.3, -0.4], dtype=F64)


def simulate_one_position(std_q, sigma: float, n: int, tries: int, seed: int):
    """x ~ q, accept with prob min(1, p/q), else emit the residual draw: returns (outputs, cap hits, proposals)."""
    g, d, mu, t = gen(seed), 3, MU, T
    x = mu + std_q * randn(n, d, g=g)
    prob, _ = acceptance_probability("exact", x[:, None], t.expand(n, 2, d), mu.expand(n, 1, d), std_q, sigma, 1.0, 0.0)
    rejected = ~(rand(n, g=g) < prob[:, 0])
    m = int(rejected.sum())
    std_r = std_q.expand(n, d)[rejected] if isinstance(std_q, torch.Tensor) else std_q
    res, cap = residual_sample(
        t.expand(m, d), mu.expand(m, d), x[rejected], std_r, sigma, randn(m, tries, d, g=g), rand(m, tries, g=g)
    )
    out = x.clone()
    out[rejected] = res
    return out, int(cap.sum()), x


@pytest.mark.parametrize(
    "std_q",
    [0.5, torch.tensor([0.3, 0.6, 0.45], dtype=F64), torch.full((3,), 0.5, dtype=F64)],
    ids=["equal-reflection", "unequal-envelope", "equal-tensor-envelope"],
)
def test_exact_rule_outputs_the_target_distribution(std_q):
    sigma, n = 0.5, 200_000
    assert equal_variance(std_q, sigma) == (not isinstance(std_q, torch.Tensor))
    out, caps, x = simulate_one_position(std_q, sigma, n, tries=64, seed=3)
    assert caps == 0
    assert torch.all((out.mean(0) - T).abs() < 5 * sigma / math.sqrt(n))
    assert torch.all((out.std(0) - sigma).abs() < 5 * sigma / math.sqrt(2 * n))
    direction = (T - MU) / (T - MU).norm()  # along t - mu, where p and q differ most
    assert stats.kstest(((out - T) @ direction / sigma).numpy(), "norm").pvalue > 0.01
    assert stats.kstest(((out[:, 0] - T[0]) / sigma).numpy(), "norm").pvalue > 0.01
    assert stats.kstest(((x - T) @ direction / sigma).numpy(), "norm").pvalue < 1e-6  # the test has power


def test_envelope_cap_returns_last_candidate():
    g, b, r, d, sigma = gen(4), 6, 5, 4, 0.5
    t, mu, x = randn(b, d, g=g), randn(b, d, g=g), randn(b, d, g=g)
    std_q, noise = 0.3 + rand(b, d, g=g), randn(b, r, d, g=g)
    sample, cap = residual_sample(t, mu, x, std_q, sigma, noise, torch.ones(b, r, dtype=F64))  # u = 1 keeps none
    assert cap.all()
    torch.testing.assert_close(sample, t + sigma * noise[:, -1])
    sample, cap = residual_sample(t, mu, x, std_q, sigma, noise, torch.zeros(b, r, dtype=F64))
    y = t[:, None] + sigma * noise
    q_below_p = gaussian_log_density(y, mu[:, None], std_q[:, None]) < gaussian_log_density(y, t[:, None], sigma)
    first = q_below_p.long().argmax(1)  # u = 0 keeps every candidate with q < p
    assert not cap.any()
    torch.testing.assert_close(sample, t + sigma * noise[torch.arange(b), first])


def test_reflection_geometry():
    g, sigma = gen(5), 0.5
    t, mu, x = randn(4, 6, g=g), randn(4, 6, g=g), randn(4, 6, g=g)
    unused = torch.full((4, 1, 6), float("nan"), dtype=F64)
    y, cap = residual_sample(t, mu, mu, sigma, sigma, unused, unused[..., 0])
    torch.testing.assert_close(y, t)  # the draft mean maps onto the target mean
    assert not cap.any()
    y, _ = residual_sample(t, mu, x, sigma, sigma, unused, unused[..., 0])
    torch.testing.assert_close((y - t).norm(dim=-1), (x - mu).norm(dim=-1))  # an isometry swapping mu and t
    torch.testing.assert_close((y - mu).norm(dim=-1), (x - t).norm(dim=-1))
    y, _ = residual_sample(t, t, x, sigma, sigma, unused, unused[..., 0])
    torch.testing.assert_close(y, x)  # p == q: no direction to reflect along, x comes back unchanged (no NaN)


def test_bias_raises_acceptance_and_exact_refuses_it():
    g, sigma = gen(6), 0.25
    mu, t = randn(8, 3, 4, g=g), randn(8, 4, 4, g=g)
    x = mu + sigma * randn(8, 3, 4, g=g)
    p1, l1 = acceptance_probability("gaussian", x, t, mu, sigma, sigma, 1.0, 0.0)
    p2, l2 = acceptance_probability("gaussian", x, t, mu, sigma, sigma, 2.0, 0.0)
    torch.testing.assert_close(l2 - l1, torch.full_like(l1, math.log(2.0)))
    assert torch.all(p2 >= p1) and torch.all(p2[p1 < 0.5] > p1[p1 < 0.5]) and p2.max() <= 1.0
    with pytest.raises(ValueError, match="bias 1"):
        acceptance_probability("exact", x, t, mu, sigma, sigma, 2.0, 0.0)
    with pytest.raises(ValueError, match="unknown"):
        acceptance_probability("nope", x, t, mu, sigma, sigma, 1.0, 0.0)


def test_tolerance_rule():
    g = gen(7)
    mu, t = randn(2, 3, 4, g=g), randn(2, 4, 4, g=g)
    t[0, 1], t[1, 0] = mu[0, 1], mu[1, 0]
    rmse = ((mu - t[:, :3]) ** 2).mean(-1).sqrt()
    prob, stat = acceptance_probability("tolerance", mu + 9.0, t, mu, 0.1, 0.1, 1.0, 0.0)
    torch.testing.assert_close(stat, rmse)  # the second output is the RMSE, and x plays no part
    assert prob.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    prob, _ = acceptance_probability("tolerance", mu, t, mu, 0.1, 0.1, 1.0, math.inf)
    assert torch.all(prob == 1.0)
    tol = rmse[0, 0].item()
    prob, _ = acceptance_probability("tolerance", mu, t, mu, 0.1, 0.1, 1.0, tol)
    assert torch.equal(prob.bool(), rmse <= tol) and prob[0, 0] == 1.0  # the boundary is inclusive


def test_count_accepted():
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert count_accepted(mask).tolist() == [2, 0, 4, 0, 1]
    assert count_accepted(mask).dtype == torch.long
    assert count_accepted(torch.ones(2, 0, dtype=torch.bool)).tolist() == [0, 0]


@pytest.mark.parametrize("emit", ["sample", "draft_mean", "target_mean"])
def test_emit_tokens(emit):
    g, b, k, d = gen(8), 4, 3, 2
    x, mu, t, corr = randn(b, k, d, g=g), randn(b, k, d, g=g), randn(b, k + 1, d, g=g), randn(b, d, g=g)
    n = torch.tensor([0, 2, 3, 1])
    out = emit_tokens(emit, x, mu, t, n, corr)
    source = {"sample": x, "draft_mean": mu, "target_mean": t[:, :k]}[emit]
    assert out.shape == (b, k + 1, d)
    for i in range(b):
        for j in range(k + 1):
            want = source[i, j] if j < n[i] else corr[i]
            assert torch.equal(out[i, j], want)


def test_batch_invariance():
    """Every output for a batch equals the same function applied one series at a time with the same randomness."""
    g, b, k, d, r, sigma = gen(9), 5, 4, 6, 8, 0.4
    mu, t, std_q = randn(b, k, d, g=g), randn(b, k + 1, d, g=g), 0.2 + rand(b, k, d, g=g)
    x = mu + std_q * randn(b, k, d, g=g)
    t[2, :2] = mu[2, :2]  # some exact matches for the tolerance rule
    noise, uniforms, corr, mask = randn(b, r, d, g=g), rand(b, r, g=g), randn(b, d, g=g), rand(b, k, g=g) < 0.7
    n = torch.tensor([0, 4, 2, 1, 3])
    j = n.clamp(max=k - 1)  # the rejected position, gathered per series

    def outputs(s):  # every function on the series selected by s; tuples flattened
        rows, jj = torch.arange(b)[s], j[s]
        at = (t[rows, jj], mu[rows, jj], x[rows, jj])
        return [
            *acceptance_probability("gaussian", x[s], t[s], mu[s], std_q[s], sigma, 1.3, 0.0),
            *acceptance_probability("exact", x[s], t[s], mu[s], std_q[s], sigma, 1.0, 0.0),
            *acceptance_probability("tolerance", x[s], t[s], mu[s], std_q[s], sigma, 1.0, 0.5),
            *residual_sample(*at, std_q[rows, jj], sigma, noise[s], uniforms[s]),
            *residual_sample(*at, sigma, sigma, noise[s], uniforms[s]),
            count_accepted(mask[s]),
            *(emit_tokens(emit, x[s], mu[s], t[s], n[s], corr[s]) for emit in ("sample", "draft_mean", "target_mean")),
        ]

    batched = outputs(slice(None))
    for i in range(b):
        for got, want in zip(batched, outputs(slice(i, i + 1))):
            if got.is_floating_point():
                torch.testing.assert_close(got[i : i + 1], want, rtol=1e-12, atol=1e-12)
            else:
                assert torch.equal(got[i : i + 1], want)


def test_float32_large_token():
    """fp32 at D = 672 (P = 96, C = 7) agrees with fp64 and keeps its dtype."""
    g, sigma = gen(10), 0.25
    mu = randn(3, 2, 672, g=g)
    t = mu[:, [0, 1, 1]] + 0.005 * randn(3, 3, 672, g=g)
    x = mu + sigma * randn(3, 2, 672, g=g)
    p64, l64 = acceptance_probability("exact", x, t, mu, sigma, sigma, 1.0, 0.0)
    p32, l32 = acceptance_probability("exact", x.float(), t.float(), mu.float(), sigma, sigma, 1.0, 0.0)
    assert p32.dtype == torch.float32 and l32.dtype == torch.float32
    torch.testing.assert_close(l32.double(), l64, rtol=0.0, atol=2e-3)
    torch.testing.assert_close(p32.double(), p64, rtol=0.0, atol=2e-3)
