"""End to end, not one position at a time: the exact rule's emitted forecast has the target's joint law over several
rounds, and the context the models see is exactly the emitted forecast, also when the lookback holds fewer than K+1
tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from specctl.timeseries.forecast import Norm, times_for
from specctl.timeseries.model import TimerConfig
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.rng import series_seeds
from specctl.timeseries.speculative_forecast import speculative_forecast
from tests.helpers import smooth_series, tiny_timer


class LinearModel(nn.Module):
    """A Markov-1 stand-in for Timer-XL: the next token is a * this token + b in every value (normalised units); a
    stochastic one also outputs a constant log-variance. It reads no cache, so any context bug shows in the law."""

    def __init__(self, a: float, b: float, n_vars: int, patch_len: int, logvar: float | None = None) -> None:
        super().__init__()
        self.cfg = TimerConfig(patch_len=patch_len, d_model=8, n_heads=2, d_ff=8, e_layers=1, n_vars=n_vars,
                               stochastic=logvar is not None)
        self.a, self.b, self.logvar = a, b, logvar
        self.anchor = nn.Parameter(torch.zeros(1))  # device and dtype for the Stepper

    def new_cache(self, batch: int, max_len: int, dtype=None):
        return None

    def forward(self, tokens: torch.Tensor, times: torch.Tensor, cache=None):
        mean = self.a * tokens + self.b
        return mean, (None if self.logvar is None else torch.full_like(mean, self.logvar))


SERIES, TOKENS, K, SIGMA = 100_000, 5, 3, 0.5  # 5 tokens of 2 values of 2 variables (D = 4): at least 2 rounds
TARGET_A, TARGET_B = 0.8, 0.3


@pytest.mark.parametrize("std_ratio, target_opens", [(None, False), (2.0, False), (0.5, False), (None, True)],
                         ids=["equal-variances-reflection", "stochastic-wider", "stochastic-narrower", "target-opens"])
def test_exact_rule_emits_the_targets_joint_law(std_ratio, target_opens):
    """The draft's std is sigma (deterministic draft: reflection), or std_ratio x sigma (stochastic: the envelope);
    with target_opens the first token is the target's own sample and rounds start at the second."""
    P, C = 2, 2
    context = smooth_series(1, 2 * P, C, seed=4).expand(SERIES, -1, -1).contiguous()
    target = LinearModel(TARGET_A, TARGET_B, C, P)
    s0 = float(Norm.fit(context[:1], target.cfg).std.min())
    logvar = None if std_ratio is None else 2 * math.log(std_ratio * SIGMA / s0)  # normalised units
    draft = LinearModel(0.7, 0.2, C, P, logvar)  # another map: the rule must correct it
    spec = SpecConfig(rule="exact", emit="sample", sigma=SIGMA, k=K, exact_max_tries=24, target_opens=target_opens)
    result = speculative_forecast(target, draft, context, TOKENS * P, spec, series_seeds(5, torch.arange(SERIES)))
    assert int(result.cap_hits.sum()) == 0
    assert 0.1 < int(result.accepted.sum()) / int(result.proposed.sum()) < 0.9, "needs accepts and rejects"
    assert float((result.rounds >= 2).double().mean()) > 0.2  # several rounds: every series without target_opens

    # the target's law in scaled units: y_1 = t(x_0) + sigma e, y_{n+1} = a y_n + c + sigma e per value, with
    # t(y) = (a (y - m) / s + b) s + m = a y + (1 - a) m + b s (m, s the frozen lookback statistics)
    norm = Norm.fit(context[:1], target.cfg)
    m, s = norm.mean[0, 0].double(), norm.std[0, 0].double()  # [C]
    last = context[0, -P:].double()  # [P, C]: the context's newest token
    y = result.forecast.double().reshape(SERIES, TOKENS, P, C)  # token n, value p, variable c
    mean, var = [], []
    m_n, v_n = last, torch.zeros_like(last)
    for _ in range(TOKENS):
        m_n = TARGET_A * m_n + (1 - TARGET_A) * m + TARGET_B * s
        v_n = TARGET_A**2 * v_n + SIGMA**2
        mean.append(m_n), var.append(v_n)
    for n in range(TOKENS):  # every coordinate of every token: Kolmogorov-Smirnov against its marginal
        for p in range(P):
            for c in range(C):
                z = ((y[:, n, p, c] - mean[n][p, c]) / var[n][p, c].sqrt()).numpy()
                assert stats.kstest(z, "norm").pvalue > 1e-4, (n, p, c)
    for n in range(TOKENS - 1):  # consecutive tokens: cov(y_n, y_{n+1}) = a var(y_n); other values independent
        pairs = torch.stack([y[:, n].flatten(1), y[:, n + 1].flatten(1)], dim=1)  # [S, 2, P*C]
        centred = pairs - pairs.mean(0)
        cov = (centred[:, 0] * centred[:, 1]).mean(0)  # per value
        expected = TARGET_A * var[n].flatten()
        se = (var[n].flatten() * var[n + 1].flatten() / SERIES).sqrt()
        assert torch.all((cov - expected).abs() < 5 * se), (n, cov, expected)
        cross = (centred[:, 0, 0] * centred[:, 1, 1]).mean()  # value 0 of token n against value 1 of token n+1
        assert abs(float(cross)) < 5 * float(se[0])


def reference_forecast(target, draft, context: torch.Tensor, horizon: int, k: int, tol: float,
                       emit: str = "target_mean", target_opens: bool = False) -> torch.Tensor:
    """Speculative decoding with the tolerance rule, without any cache: every model call is a full forward over the
    context followed by exactly the tokens emitted so far (and the round's proposals). Emitted: the target's means
    and its bonus token (target_mean), or the accepted draft means then the target's correction (draft_mean); with
    target_opens the target's mean first."""
    P = target.cfg.patch_len
    norm = Norm.fit(context, target.cfg)
    seq = norm.tokens(context, P)  # [B=1, C, n0, P]: the context, then the emitted tokens
    n0, steps = seq.shape[2], -(-horizon // P)

    def predict(model, tokens):
        mean, _ = model(tokens, times_for(1, 0, tokens.shape[2], tokens.device))
        return mean

    if target_opens:
        seq = torch.cat([seq, predict(target, seq)[:, :, -1:]], dim=2)
    while seq.shape[2] - n0 < steps:
        proposals = seq
        for _ in range(k):  # the draft's own rollout from the emitted context
            proposals = torch.cat([proposals, predict(draft, proposals)[:, :, -1:]], dim=2)
        verified = predict(target, proposals)[:, :, seq.shape[2] - 1:]  # t_1..t_{K+1}
        drafted = proposals[:, :, seq.shape[2]:]
        scale = norm.std.transpose(1, 2)[..., None]  # the rule compares in scaled units
        rmse = ((drafted - verified[:, :, :k]) * scale).pow(2).mean(dim=(1, 3)).sqrt()[0]  # [K]
        accepted = int(torch.cumprod((rmse <= tol).long(), 0).sum())
        if emit == "target_mean":
            seq = torch.cat([seq, verified[:, :, : accepted + 1]], dim=2)  # t_1..t_{n+1} (t_{K+1}: the bonus)
        else:  # the accepted draft means, then the correction t_{n+1} unless all K passed (no bonus)
            tail = verified[:, :, accepted : accepted + 1] if accepted < k else verified[:, :, :0]
            seq = torch.cat([seq, drafted[:, :, :accepted], tail], dim=2)
    return norm.series(seq[:, :, n0 : n0 + steps])[:, :horizon]


@pytest.mark.parametrize("n0, emit, target_opens", [(2, "target_mean", False), (3, "target_mean", False),
                                                    (2, "draft_mean", False), (1, "target_mean", True),
                                                    (2, "draft_mean", True)])
def test_context_is_the_emitted_forecast_with_a_short_lookback(n0, emit, target_opens):
    """K+1 > n0: the cache slots a round wrote with draft values are rewritten with what was emitted (target_mean
    re-feeds the last round's k + 1 tokens; draft_mean only the newest one, since accepted tokens are what was fed)."""
    torch.manual_seed(0)
    target = tiny_timer(n_vars=2, d_model=32, e_layers=2, seed=0)
    draft = tiny_timer(n_vars=2, d_model=16, e_layers=1, seed=1)
    P, horizon = target.cfg.patch_len, 15 * target.cfg.patch_len
    contexts = smooth_series(6, n0 * P, 2, seed=2)
    mixed = 0
    for tol in (0.05, 0.2, 0.6):
        spec = SpecConfig(rule="tolerance", tol=tol, emit=emit, k=3, target_opens=target_opens)
        result = speculative_forecast(target, draft, contexts, horizon, spec, series_seeds(0, torch.arange(6)))
        for b in range(6):
            expected = reference_forecast(target, draft, contexts[b : b + 1], horizon, 3, tol, emit, target_opens)
            torch.testing.assert_close(result.forecast[b : b + 1], expected, atol=2e-4, rtol=0)
        mixed += 0 < int(result.accepted.sum()) < int(result.proposed.sum())
    assert mixed, "the test needs settings that accept some tokens and reject others"
    assert np.isfinite(result.forecast.numpy()).all()
