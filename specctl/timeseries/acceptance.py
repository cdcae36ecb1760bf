"""Acceptance rules for continuous-token speculative decoding: pure, batched torch functions (docs/design.md,
"Acceptance rules").

Shapes: B series, K drafted tokens, D = P*C values per token. Draft means mu [B,K,D], draft std std_q (a tensor
broadcastable to [B,K,D], or the float sigma), proposals x [B,K,D], target means t [B,K+1,D] (t[:, K] is the
bonus). Target p_i = N(t_i, sigma^2 I), draft q_i = N(mu_i, std_q^2). Randomness (uniforms, noise) is always
passed in, so the caller owns the per-series generators; nothing here syncs with the host, and a float std or
sigma never becomes a device tensor (CUDA-graph friendly).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _log(std: float | Tensor) -> float | Tensor:
    return torch.log(std) if isinstance(std, Tensor) else math.log(std)


def _log_density_terms(x: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - _log(std) - HALF_LOG_2PI  # log N(x_d; mean_d, std_d^2) per value


def gaussian_log_density(x: Tensor, mean: Tensor, std: float | Tensor) -> Tensor:
    """log N(x; mean, diag(std^2)) with the full normalising terms, summed over the last dim."""
    return _log_density_terms(x, mean, std).sum(-1)


def log_acceptance_ratio(
    x: Tensor, t: Tensor, mu: Tensor, std_q: float | Tensor, sigma: float, bias: float
) -> Tensor:
    """[B,K]: log b + log p(x) - log q(x). Differences are taken per value before the sum, so the normalising
    terms cancel exactly when std_q == sigma instead of leaving float error of order D * log(sigma)."""
    t = t[..., : x.shape[-2], :]
    return math.log(bias) + (_log_density_terms(x, t, sigma) - _log_density_terms(x, mu, std_q)).sum(-1)


def acceptance_probability(
    rule: str, x: Tensor, t: Tensor, mu: Tensor, std_q: float | Tensor, sigma: float, bias: float, tol: float
) -> tuple[Tensor, Tensor]:
    """(prob [B,K], log_ratio [B,K]). gaussian/exact: prob = min(1, b p(x)/q(x)) (exact demands b = 1).
    tolerance: prob = 1 if RMSE(mu_i, t_i) over the D values <= tol else 0, and the second output is that RMSE
    (not a log ratio: the rule is deterministic)."""
    if rule == "tolerance":
        rmse = (mu - t[..., : mu.shape[-2], :]).pow(2).mean(-1).sqrt()  # sqrt(mean_d (mu_d - t_d)^2)
        return (rmse <= tol).to(mu.dtype), rmse
    if rule not in ("gaussian", "exact"):
        raise ValueError(f"unknown acceptance rule {rule!r}")
    if rule == "exact" and bias != 1.0:
        raise ValueError("rule 'exact' needs bias 1")
    log_ratio = log_acceptance_ratio(x, t, mu, std_q, sigma, bias)
    return log_ratio.clamp(max=0.0).exp(), log_ratio  # min(1, b p/q)


def count_accepted(accepted: Tensor) -> Tensor:
    """[B,K] bool -> [B] long: length of the all-true prefix (the scan stops at the first rejection)."""
    return accepted.long().cumprod(-1).sum(-1)


def equal_variance(std_q: float | Tensor, sigma: float) -> bool:
    """True iff std_q is the float sigma itself: the residual is then sampled by reflection. A tensor std_q (a
    stochastic draft's learned std) counts as unequal without reading its values, which would sync the device;
    the envelope path is exact for any std_q, only slower."""
    return not isinstance(std_q, Tensor) and float(std_q) == float(sigma)


def residual_sample(
    t_j: Tensor, mu_j: Tensor, x_j: Tensor, std_q_j: float | Tensor, sigma: float, noise: Tensor, uniforms: Tensor
) -> tuple[Tensor, Tensor]:
    """A draw from norm(max(0, p - q)) at the rejected position, per series: (sample [B,D], cap_hit [B]).

    Equal variances: reflect the rejected x_j ~ q across the hyperplane bisecting mu_j and t_j; the reflection
    swaps p and q, so it maps the rejected mass max(0, q - p) onto max(0, p - q). noise/uniforms are unused.
    Otherwise: rejection sampling with envelope p over R = noise.shape[1] candidates y_r = t_j + sigma noise_r,
    each kept with prob max(0, 1 - q(y_r)/p(y_r)); the first kept one wins, and if none is, cap_hit is set and the
    last candidate is returned. Expected tries are 1/TV(p, q), so the cap bites when p and q nearly coincide.
    """
    if equal_variance(std_q_j, sigma):
        d = t_j - mu_j
        along = ((x_j - 0.5 * (t_j + mu_j)) * d).sum(-1, keepdim=True)  # (x - m)·d, m the midpoint
        sq = (d * d).sum(-1, keepdim=True).clamp_min(torch.finfo(d.dtype).tiny)  # ||d||^2; d = 0 leaves x as is
        return x_j - 2 * along / sq * d, torch.zeros(x_j.shape[:-1], dtype=torch.bool, device=x_j.device)
    if isinstance(std_q_j, Tensor):
        std_q_j = std_q_j.expand_as(mu_j).unsqueeze(1)
    y = t_j.unsqueeze(1) + sigma * noise  # [B,R,D] candidates from the envelope p
    log_q = _log_density_terms(y, mu_j.unsqueeze(1), std_q_j)
    log_q_over_p = (log_q - _log_density_terms(y, t_j.unsqueeze(1), sigma)).sum(-1)  # [B,R]
    keep = uniforms < -torch.expm1(log_q_over_p)  # u < 1 - q(y)/p(y)
    first = count_accepted(~keep)  # index of the first kept candidate; R if none
    R = noise.shape[1]
    idx = first.clamp(max=R - 1)[:, None, None].expand(-1, 1, y.shape[-1])
    return y.gather(1, idx).squeeze(1), first == R


def acceptance_closed_form(delta: Tensor) -> Tensor:
    """P(accept) for shared sigma and bias 1, Delta = ||t - mu|| / sigma: 2 Phi(-Delta/2) = erfc(Delta / (2 sqrt 2))."""
    return torch.special.erfc(torch.as_tensor(delta) / (2 * math.sqrt(2)))


def emit_tokens(emit: str, x: Tensor, mu: Tensor, t: Tensor, n_accepted: Tensor, correction: Tensor) -> Tensor:
    """[B,K+1,D]: positions < n_accepted[b] hold the accepted token chosen by `emit`, position n_accepted[b]
    holds correction[b] (the correction, or the bonus when all K passed), later positions repeat it."""
    K = x.shape[-2]
    tokens = {"sample": x, "draft_mean": mu, "target_mean": t[:, :K]}[emit]
    corr = correction.unsqueeze(1)  # [B,1,D]
    pos = torch.arange(K + 1, device=x.device)
    keep = (pos[None, :] < n_accepted[:, None]).unsqueeze(-1)  # [B,K+1,1]: position i < n_accepted[b]
    return torch.where(keep, torch.cat([tokens, corr], dim=1), corr)
