"""Speculative rolling forecasts with continuous patch tokens (SPEC section 4).

State per series b: `hist`, the final values of the W = min(K+1, n0) newest tokens, at positions p-W+1..p.
Each round re-feeds them (rewriting those cache slots with what was finally emitted there) before proposing,
so every call has a static shape and the context is exactly the emitted forecast:
  draft:  hist at p-W+1..p -> mu_1; then fed_i at p+i -> mu_{i+1}                    (K calls)
  target: [hist, fed_1..fed_K] at p-W+1..p+K -> t_1..t_{K+1}                         (1 call)
Acceptance scans i = 1..K and stops at the first rejection j; the fed sequence continues with x_1..x_{j-1} and
a correction at j (residual sample for `exact`, t_j otherwise), or with the bonus t_{K+1} when all K pass.
With `draft_mean` emission the bonus is not taken, so the forecast is the draft's wherever it was accepted.
Only `emit = "sample"` feeds the draft's samples x ~ q forward (the exact rule then reproduces p); the mean
emissions feed the draft means and use the sample only in the accept test, which keeps the context free of
sampling noise, and their correction is the target mean t_j.
Nothing syncs with the host inside a round; the "is every series done" check runs only once a series could be.

Acceptance works in the dataset's scaled space (where `sigma` and `tol` are meant), the models in
instance-normalised units; tokens are flattened to D = C*P values for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specctl.core import acceptance
from specctl.core.errors import SpecctlError
from specctl.core.forecast import Norm, n_tokens, times_for
from specctl.core.model import Stepper, TimerXL, check_compatible
from specctl.core.rng import normal, uniform
from specctl.core.runtime import PhaseClock
from specctl.core.schema import SpecConfig


@dataclass
class RoundLog:
    """Per-round, per-series diagnostics for --debug-csv (device tensors until `SpecResult.debug_rows`)."""

    active: torch.Tensor  # [B] bool
    n_accepted: torch.Tensor  # [B]
    delta: torch.Tensor  # [B, K] ||t_i - mu_i|| / sigma
    log_ratio: torch.Tensor  # [B, K] (tolerance: the RMSE)
    prob: torch.Tensor  # [B, K]


@dataclass
class SpecResult:
    forecast: torch.Tensor  # [B, H, C] scaled
    proposed: torch.Tensor  # [B] per-series sums
    accepted: torch.Tensor
    evaluated: torch.Tensor
    rounds: torch.Tensor  # rounds while active = target verify calls
    emitted: torch.Tensor
    cap_hits: torch.Tensor
    accepted_hist: torch.Tensor  # [K+1] rounds that accepted 0..K tokens
    logs: list[RoundLog] = field(default_factory=list)

    def debug_rows(self, series_ids: list[int]) -> list[dict]:
        rows = []
        for r, log in enumerate(self.logs):
            active, n_acc = log.active.cpu(), log.n_accepted.cpu()
            delta, ratio, prob = log.delta.cpu(), log.log_ratio.cpu(), log.prob.cpu()
            for b, sid in enumerate(series_ids):
                if not active[b]:
                    continue
                for i in range(delta.shape[1]):
                    rows.append({"series": sid, "round": r, "position": i + 1, "accepted": int(n_acc[b]),
                                 "delta": float(delta[b, i]), "log_ratio": float(ratio[b, i]),
                                 "accept_prob": float(prob[b, i]), "evaluated": i <= int(n_acc[b])})
        return rows


def cache_length(lookback: int, horizon: int, patch_len: int, k: int) -> int:
    """Cache slots a speculative forecast needs: a finished series rides along at p <= n0 + steps + K - 1
    (static shapes) and writes K further slots."""
    return lookback // patch_len + n_tokens(horizon, patch_len) + 2 * k + 1


def check_pair(target: TimerXL, draft: TimerXL, lookback: int) -> None:
    check_compatible(target.cfg, draft.cfg, "draft")
    if lookback // target.cfg.patch_len < 2:
        raise SpecctlError("speculative decoding needs a lookback of at least 2 patches")


def flat(tokens: torch.Tensor) -> torch.Tensor:
    """[B, C, ..., P] -> [B, ..., C*P]: one token's values as a vector."""
    return tokens.movedim(1, -2).flatten(-2)


def unflat(values: torch.Tensor, n_vars: int) -> torch.Tensor:
    """Inverse of `flat` for [B, ..., C*P] -> [B, C, ..., P]."""
    return values.unflatten(-1, (n_vars, -1)).movedim(-2, 1)


@torch.no_grad()
def speculative_forecast(
    target: TimerXL | Stepper, draft: TimerXL | Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
    seeds: torch.Tensor, debug: bool = False, clock: PhaseClock | None = None,
) -> SpecResult:
    """Forecast `horizon` points for each series of `context` [B, L, C] with draft proposals verified by the target.

    `target` and `draft` are models, or Steppers (model + reusable cache, optionally CUDA graphs) sized for
    this batch and at least `cache_length` slots."""
    B, L, device = context.shape[0], context.shape[1], context.device
    need = cache_length(L, horizon, (target.model if isinstance(target, Stepper) else target).cfg.patch_len, spec.k)
    tstep = target if isinstance(target, Stepper) else Stepper(target, B, need)
    dstep = draft if isinstance(draft, Stepper) else Stepper(draft, B, need)
    if min(tstep.max_len, dstep.max_len) < need or tstep.batch != B or dstep.batch != B:
        raise SpecctlError(f"internal: steppers sized for batch {tstep.batch}/{dstep.batch} and {tstep.max_len} slots, "
                           f"need batch {B} and {need}")
    check_pair(tstep.model, dstep.model, L)
    stochastic = dstep.model.cfg.stochastic
    P, C, K = tstep.model.cfg.patch_len, tstep.model.cfg.n_vars, spec.k
    steps = n_tokens(horizon, P)
    norm = Norm.fit(context)
    tokens = norm.tokens(context, P)
    n0 = tokens.shape[2]
    # scaled = normalised * scale + shift, per variable, laid out like a flattened token [B, 1, C*P]
    scale = flat(norm.std.transpose(1, 2).expand(B, C, P)[:, :, None])
    shift = flat(norm.mean.transpose(1, 2).expand(B, C, P)[:, :, None])
    sampling = spec.rule in ("gaussian", "exact")
    feed_samples = sampling and spec.emit == "sample"
    residual_needed = feed_samples and spec.rule == "exact"
    reflect = residual_needed and not stochastic  # sigma_q = sigma: residual by reflection
    tries = 1 if reflect else spec.exact_max_tries
    D = C * P
    # counters per round: K draft noises, K accept uniforms, residual noises + uniforms, one bonus noise
    block = K * D + K + tries * D + tries + D
    ar_kd = torch.arange(K * D, device=device).view(1, K, D)

    W = min(K + 1, n0)
    warm = times_for(B, 0, n0 - 1, device)
    tstep(tokens[:, :, : n0 - 1], warm)
    dstep(tokens[:, :, : n0 - 1], warm)
    hist = flat(tokens[:, :, n0 - W :])  # [B, W, D] normalised: final values at p-W+1..p
    p = torch.full((B,), n0 - 1, device=device)
    back = torch.arange(-(W - 1), K + 1, device=device)  # offsets p-W+1..p+K
    out = torch.zeros(B, steps + K + 1, D, device=device)
    n_out = torch.zeros(B, dtype=torch.long, device=device)
    zeros = lambda: torch.zeros(B, dtype=torch.long, device=device)  # noqa: E731
    res = SpecResult(torch.empty(0), zeros(), zeros(), zeros(), zeros(), zeros(), zeros(),
                     torch.zeros(K + 1, dtype=torch.long, device=device))
    pos = torch.arange(K + W, device=device)
    mark = clock.mark if clock is not None else (lambda phase: None)
    if clock is not None:
        clock.start()
    sure_rounds = -(-steps // (K + 1))  # a round emits at most K+1 tokens: no series is done before this
    r = 0
    while True:
        active = n_out < steps
        if r >= sure_rounds and not bool(active.any()):  # the only host sync, skipped while surely active
            break
        base = (r * block + torch.zeros(B, 1, dtype=torch.long, device=device))
        # draft proposes K tokens autoregressively
        feed, feed_times = unflat(hist, C), p[:, None] + back[None, :W]
        mus, xs, feds, stds = [], [], [], []
        eps = normal(seeds, base[:, :, None] + ar_kd) if sampling else None  # [B, K, D]
        for i in range(K):
            mean, logvar = dstep(feed, feed_times)
            mu = flat(mean[:, :, -1]) * scale[:, 0] + shift[:, 0]  # scaled units
            std_q = (flat(logvar[:, :, -1]).mul(0.5).exp() * scale[:, 0]) if logvar is not None else spec.sigma
            x = mu + std_q * eps[:, i] if sampling else mu  # x ~ q = N(mu, std_q^2)
            fed = x if feed_samples else mu
            mus.append(mu), xs.append(x), feds.append(fed), stds.append(std_q)
            feed, feed_times = unflat(((fed - shift[:, 0]) / scale[:, 0])[:, None], C), (p + i + 1)[:, None]
        mu, x, fed = torch.stack(mus, 1), torch.stack(xs, 1), torch.stack(feds, 1)  # [B, K, D]
        std_q = torch.stack(stds, 1) if stochastic else spec.sigma
        mark("draft")
        # target verifies all K in one pass: t_i for positions p+1..p+K+1
        verify_in = torch.cat([hist, (fed - shift) / scale], dim=1)  # [B, W+K, D] normalised
        t_norm, _ = tstep(unflat(verify_in, C), p[:, None] + back[None, :])
        t = flat(t_norm[:, :, W - 1 :]) * scale + shift  # [B, K+1, D]: predictions for p+1..p+K+1
        mark("verify")
        prob, log_ratio = acceptance.acceptance_probability(spec.rule, x, t, mu, std_q, spec.sigma, spec.bias, spec.tol)
        u = uniform(seeds, base + K * D + torch.arange(K, device=device))
        n_acc = acceptance.count_accepted(u < prob)  # [B]
        # the fed correction at j = n_acc (or the bonus when n_acc == K)
        idx = n_acc[:, None, None].expand(B, 1, D)
        t_j = t.gather(1, idx).squeeze(1)
        correction = t_j
        if residual_needed:
            j = n_acc.clamp(max=K - 1)[:, None, None].expand(B, 1, D)
            mu_j, x_j = mu.gather(1, j).squeeze(1), x.gather(1, j).squeeze(1)
            std_j = std_q.gather(1, j).squeeze(1) if torch.is_tensor(std_q) else std_q
            off = base + K * D + K
            if reflect:  # reflection needs no extra draws
                noise, tries_u = x_j[:, None], torch.zeros(B, 1, device=device)
            else:
                noise = normal(seeds, off[:, :, None] + torch.arange(tries * D, device=device).view(1, tries, D))
                tries_u = uniform(seeds, off + tries * D + torch.arange(tries, device=device))
            residual, cap = acceptance.residual_sample(t_j, mu_j, x_j, std_j, spec.sigma, noise, tries_u)
            bonus = t_j + spec.sigma * normal(seeds, off + tries * D + tries + torch.arange(D, device=device))
            all_pass = n_acc == K
            correction = torch.where(all_pass[:, None], bonus, residual)
            res.cap_hits += (cap & ~all_pass & active).long()
        mark("accept")
        take_bonus = spec.emit != "draft_mean"
        n_new = torch.where(n_acc == K, n_acc + int(take_bonus), n_acc + 1)
        shown = t_j if spec.emit == "target_mean" else correction
        emitted = acceptance.emit_tokens(spec.emit, x, mu, t, n_acc, shown)  # [B, K+1, D]
        # write this round's tokens at n_out.. for active series
        write = (pos[None, : K + 1] < n_new[:, None]) & active[:, None]
        slots = (n_out[:, None] + pos[None, : K + 1]).clamp(max=out.shape[1] - 1)[:, :, None].expand(B, K + 1, D)
        out.scatter_(1, slots, torch.where(write[:, :, None], emitted, out.gather(1, slots)))
        # advance: the newest W final values are the old ones followed by this round's emitted tokens
        seq = torch.cat([hist, (emitted - shift) / scale], dim=1)  # [B, W+K+1, D]
        newest = (n_new[:, None] + pos[None, :W])[:, :, None].expand(B, W, D)
        hist = torch.where(active[:, None, None], seq.gather(1, newest), hist)
        p = torch.where(active, p + n_new, p)
        n_out = n_out + n_new * active
        act = active.long()
        res.proposed += K * act
        res.accepted += n_acc * act
        res.evaluated += (n_acc + 1).clamp(max=K) * act
        res.rounds += act
        res.emitted += n_new * act
        res.accepted_hist += torch.bincount(n_acc[active], minlength=K + 1)
        if debug:
            delta = (t[:, :K] - mu).norm(dim=-1) / spec.sigma
            res.logs.append(RoundLog(active, n_acc, delta, log_ratio, prob))
        mark("overhead")
        r += 1
    res.forecast = unflat(out[:, :steps], C).reshape(B, C, steps * P).transpose(1, 2)[:, :horizon]
    return res
