"""Speculative rolling forecasts with continuous patch tokens (docs/design.md, "Speculative decoding").

State per series b: `hist`, the final values of the K+1 newest tokens, at positions p-K..p (positions before 0,
which only a lookback shorter than K+1 tokens has, repeat token 0 at time 0). A round of k <= K draft tokens
re-feeds the newest w of them, rewriting those cache slots with what was finally emitted there, before proposing:
  draft:  hist at p-w+1..p -> mu_1; then fed_i at p+i -> mu_{i+1}                    (k calls)
  target: [hist, fed_1..fed_k] at p-w+1..p+k -> t_1..t_{k+1}                         (1 call)
so the context is exactly the emitted forecast when w covers every slot the last round wrote with a value other
than the one emitted there. With `sample` and `draft_mean` emission an accepted token is the value that was fed, so
only the newest token (the correction, or a draft token the draft never fed itself) needs it: w = 1. With
`target_mean` every token the last round emitted differs from what was fed: w = its k + 1. Slots beyond the new p
hold stale values but are masked until they are overwritten. With `spec.target_opens` (the default) a forecast's
first token is the target's, from its prefill (`open_with_target`), and its first round re-feeds the newest context
token and that one (w = 2). A round with k = 0 is a plain target step (the fallback of adaptive K); the draft does
not see it, so once a forecast takes a target step it takes only target steps (the draft would have to catch up on
tokens it never fed). Every call has a static shape per (k, w).
Acceptance scans i = 1..K and stops at the first rejection j; the fed sequence continues with x_1..x_{j-1} and
a correction at j (residual sample for `exact`, t_j otherwise), or with the bonus t_{K+1} when all K pass.
With `draft_mean` emission the bonus is not taken, so the forecast is the draft's wherever it was accepted.
Only `emit = "sample"` feeds the draft's samples x ~ q forward (the exact rule then reproduces p); the mean
emissions feed the draft means and use the sample only in the accept test, which keeps the context free of
sampling noise, and their correction is the target mean t_j.
Random numbers: every round takes fresh counters of two disjoint streams (rng.py), normals (draft noise, residual
candidates, the bonus) and uniforms (accept tests, residual tests).
Nothing syncs with the host inside a round. Running rounds over a whole forecast (prefill, CUDA graphs, the
schedule of adaptive K, timing a round) is speculative_forecast.py's business.

Acceptance works in the dataset's scaled space (where `sigma` and `tol` are meant; `tol` in each window's own units,
the models', with spec.tol_units = "window"), the models in instance-normalised units; tokens are flattened to
D = C*P values for the rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from specctl.core.errors import SpecctlError
from specctl.timeseries import acceptance
from specctl.timeseries.forecast import Norm, n_tokens
from specctl.timeseries.model import TimerXL, check_compatible
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.rng import normal, uniform

ModelCall = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


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
    emitted: torch.Tensor  # tokens emitted inside the horizon
    cap_hits: torch.Tensor
    accepted_hist: torch.Tensor  # [K+1] rounds that accepted 0..K tokens
    logs: list[RoundLog] = field(default_factory=list)
    k_rounds: dict[int, int] = field(default_factory=dict)  # rounds of the batch per draft length k (0: target step)
    opening: int = 0  # the k of its first round (0: it drafted nothing, a whole target forecast)

    def slowest_counts(self) -> tuple[int, int]:
        """(accepted, evaluated) of the series that needed the most rounds (of those, the least accepting): what a
        batch waits for, and what adaptive K learns from between batches."""
        i = slowest_series(self.rounds, self.accepted, self.evaluated)
        accepted, evaluated = torch.stack([self.accepted[i], self.evaluated[i]]).tolist()
        return accepted, evaluated

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


def slowest_series(behind: torch.Tensor, accepted: torch.Tensor, evaluated: torch.Tensor) -> torch.Tensor:
    """The index of the series furthest behind (`behind`: tokens left, or rounds taken) and, of those, the least
    accepting: the one a batch waits for (a device scalar; no host sync)."""
    return torch.argmax(2 * behind - (accepted + 1) / (evaluated + 1))  # a rate in (0, 1] only breaks ties


def cache_length(lookback: int, horizon: int, patch_len: int, k: int) -> int:
    """Cache slots a speculative forecast needs: a finished series rides along at p <= n0 + steps + K - 1
    (static shapes) and writes K further slots."""
    return lookback // patch_len + n_tokens(horizon, patch_len) + 2 * k + 1


def check_pair(target: TimerXL, draft: TimerXL, lookback: int) -> None:
    check_compatible(target.cfg, draft.cfg, "draft")
    if lookback // target.cfg.patch_len < 1:
        raise SpecctlError("speculative decoding needs a lookback of at least 1 patch")


def flat_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """[B, C, ..., P] -> [B, ..., C*P]: one token's values as a vector."""
    return tokens.movedim(1, -2).flatten(-2)


def unflat_tokens(values: torch.Tensor, n_vars: int) -> torch.Tensor:
    """Inverse of `flat_tokens` for [B, ..., C*P] -> [B, C, ..., P]."""
    return values.unflatten(-1, (n_vars, -1)).movedim(-2, 1)


@dataclass
class RoundState:
    """Everything a speculative round reads and writes, as static-shape device tensors updated in place, so
    that a round can be replayed as one CUDA graph. The Python fields are fixed for the state's lifetime."""

    spec: SpecConfig
    C: int
    P: int
    steps: int
    stochastic: bool
    seeds: torch.Tensor  # [B]
    scale: torch.Tensor  # [B, 1, D]: scaled = normalised * scale + shift, per variable
    shift: torch.Tensor
    hist: torch.Tensor  # [B, W, D] normalised final values at positions p-W+1..p
    p: torch.Tensor  # [B]
    n_out: torch.Tensor  # [B] tokens emitted so far
    out: torch.Tensor  # [B, steps+K+1, D] emitted tokens, scaled
    index: torch.Tensor  # round number (a device scalar, so a replayed graph advances it too)
    stats: SpecResult

    @property
    def K(self) -> int:
        """The largest k a round may have (random-number blocks and buffers are laid out for it)."""
        return self.spec.k

    @property
    def W(self) -> int:
        return self.hist.shape[1]

    @property
    def D(self) -> int:
        return self.hist.shape[2]

    @property
    def tries(self) -> int:
        return 1 if self.reflect else self.spec.exact_max_tries

    @property
    def normals(self) -> int:
        """Normal-stream counters per round: K draft noises, the residual candidates, one bonus noise (D each)."""
        return (self.K + self.tries + 1) * self.D

    @property
    def uniforms(self) -> int:
        """Uniform-stream counters per round: K accept tests, the residual candidates' tests."""
        return self.K + self.tries

    @property
    def sampling(self) -> bool:
        return self.spec.rule in ("gaussian", "exact")

    @property
    def feed_samples(self) -> bool:
        return self.sampling and self.spec.emit == "sample"

    @property
    def residual_needed(self) -> bool:
        return self.feed_samples and self.spec.rule == "exact"

    @property
    def reflect(self) -> bool:  # sigma_q = sigma: the residual is sampled by reflection, no extra draws
        return self.residual_needed and not self.stochastic

    def times(self, offsets: torch.Tensor) -> torch.Tensor:
        """[B, len(offsets)] positions p + offset; those before 0 are time 0 (`hist` repeats token 0 there)."""
        return (self.p[:, None] + offsets[None, :]).clamp(min=0)


def new_state(target: TimerXL, draft: TimerXL, batch: int, lookback: int, horizon: int, spec: SpecConfig,
              device) -> RoundState:
    P, C, K = target.cfg.patch_len, target.cfg.n_vars, spec.k
    steps, D = n_tokens(horizon, P), C * P
    longs = lambda: torch.zeros(batch, dtype=torch.long, device=device)  # noqa: E731
    stats = SpecResult(torch.empty(0), longs(), longs(), longs(), longs(), longs(), longs(),
                       torch.zeros(K + 1, dtype=torch.long, device=device))
    return RoundState(
        spec, C, P, steps, draft.cfg.stochastic,
        longs(), torch.zeros(batch, 1, D, device=device), torch.zeros(batch, 1, D, device=device),
        torch.zeros(batch, K + 1, D, device=device), longs(), longs(),
        torch.zeros(batch, steps + K + 1, D, device=device), torch.zeros((), dtype=torch.long, device=device), stats,
    )


def reset(state: RoundState, norm: Norm, tokens: torch.Tensor, seeds: torch.Tensor) -> None:
    """Start a new forecast in the same buffers: context tokens [B, C, n0, P], frozen lookback statistics."""
    B, C, n0, P = tokens.shape
    state.seeds.copy_(seeds)
    state.scale.copy_(flat_tokens(norm.std.transpose(1, 2).expand(B, C, P)[:, :, None]))
    state.shift.copy_(flat_tokens(norm.mean.transpose(1, 2).expand(B, C, P)[:, :, None]))
    newest = flat_tokens(tokens[:, :, max(0, n0 - state.W):])  # [B, min(W, n0), D]
    state.hist.copy_(torch.cat([newest[:, :1].expand(B, state.W - newest.shape[1], -1), newest], dim=1))
    state.p.fill_(n0 - 1)
    state.index.zero_()
    for t in (state.n_out, state.out, state.stats.proposed, state.stats.accepted, state.stats.evaluated,
              state.stats.rounds, state.stats.emitted, state.stats.cap_hits, state.stats.accepted_hist):
        t.zero_()


@dataclass
class Proposal:
    """The draft's K tokens in scaled units [B, K, D]: means, samples x ~ q, what was fed forward, and q's std."""

    mu: torch.Tensor
    x: torch.Tensor
    fed: torch.Tensor
    std_q: torch.Tensor | float


@dataclass
class Decision:
    n_acc: torch.Tensor  # [B] accepted draft tokens
    correction: torch.Tensor  # [B, D] what follows them: the residual sample, the bonus, or t_j
    t_j: torch.Tensor  # [B, D] the target's mean at that position
    prob: torch.Tensor  # [B, K]
    log_ratio: torch.Tensor  # [B, K]


def normal_block(s: RoundState, start: int, count: int) -> torch.Tensor:
    """[B, count * D] normals of this round's block of the normal stream, from offset `start` (in D-vectors)."""
    base = s.index * s.normals + start * s.D
    return normal(s.seeds, base + torch.arange(count * s.D, device=s.seeds.device)[None, :].expand(len(s.seeds), -1))


def uniform_block(s: RoundState, start: int, count: int) -> torch.Tensor:
    """[B, count] uniforms of this round's block of the uniform stream, from offset `start`."""
    base = s.index * s.uniforms + start
    return uniform(s.seeds, base + torch.arange(count, device=s.seeds.device)[None, :].expand(len(s.seeds), -1))


def propose(s: RoundState, draft_call: ModelCall, k: int, w: int) -> Proposal:
    """k autoregressive draft steps after re-feeding the newest w final values."""
    spec, C, B, D = s.spec, s.C, s.hist.shape[0], s.D
    scale, shift = s.scale[:, 0], s.shift[:, 0]
    if k == 0:
        empty = s.hist.new_zeros(B, 0, D)
        return Proposal(empty, empty, empty, spec.sigma if not s.stochastic else empty)
    feed, feed_times = unflat_tokens(s.hist[:, -w:], C), s.times(torch.arange(1 - w, 1, device=s.p.device))
    eps = normal_block(s, 0, k).view(B, k, D) if s.sampling else None
    mus, xs, feds, stds = [], [], [], []
    for i in range(k):
        mean, logvar = draft_call(feed, feed_times)
        mu = flat_tokens(mean[:, :, -1]) * scale + shift  # scaled units
        std_q = (flat_tokens(logvar[:, :, -1]).mul(0.5).exp() * scale) if logvar is not None else spec.sigma
        x = mu + std_q * eps[:, i] if s.sampling else mu  # x ~ q = N(mu, std_q^2)
        fed = x if s.feed_samples else mu
        mus.append(mu), xs.append(x), feds.append(fed), stds.append(std_q)
        feed, feed_times = unflat_tokens(((fed - shift) / scale)[:, None], C), (s.p + i + 1)[:, None]
    std = torch.stack(stds, 1) if s.stochastic else spec.sigma
    return Proposal(torch.stack(mus, 1), torch.stack(xs, 1), torch.stack(feds, 1), std)


def verify(s: RoundState, target_call: ModelCall, fed: torch.Tensor, w: int) -> torch.Tensor:
    """One target pass over [newest w of hist, fed_1..fed_k]: t_1..t_{k+1} [B, k+1, D] (scaled), for positions
    p+1..p+k+1."""
    k = fed.shape[1]
    verify_in = torch.cat([s.hist[:, -w:], (fed - s.shift) / s.scale], dim=1)  # [B, w+k, D] normalised
    t_norm, _ = target_call(unflat_tokens(verify_in, s.C), s.times(torch.arange(1 - w, k + 1, device=s.p.device)))
    return flat_tokens(t_norm[:, :, w - 1:]) * s.scale + s.shift


def accept(s: RoundState, q: Proposal, t: torch.Tensor) -> tuple[Decision, torch.Tensor]:
    """The rule's accept tests up to the first rejection, and what is emitted after the accepted tokens; also the
    residual draws that hit the try cap ([B] bool). Random numbers come from the round's blocks laid out for K."""
    spec, k, K, B, D = s.spec, q.mu.shape[1], s.K, s.hist.shape[0], s.D
    mu, t_tested = q.mu, t
    if spec.rule == "tolerance" and spec.tol_units == "window":  # a token's values over its window's std
        mu, t_tested = mu / s.scale, t / s.scale
    prob, log_ratio = acceptance.acceptance_probability(spec.rule, q.x, t_tested, mu, q.std_q, spec.sigma, spec.bias,
                                                        spec.tol)
    n_acc = acceptance.count_accepted(uniform_block(s, 0, k) < prob)  # [B]
    t_j = t.gather(1, n_acc[:, None, None].expand(B, 1, D)).squeeze(1)  # t at the correction (or bonus) position
    cap = torch.zeros(B, dtype=torch.bool, device=t.device)
    if not s.residual_needed:
        return Decision(n_acc, t_j, t_j, prob, log_ratio), cap
    bonus = t_j + spec.sigma * normal_block(s, K + s.tries, 1)  # all k passed: t_{k+1} + sigma eps ~ p_{k+1}
    if k == 0:
        return Decision(n_acc, bonus, t_j, prob, log_ratio), cap
    j = n_acc.clamp(max=k - 1)[:, None, None].expand(B, 1, D)
    mu_j, x_j = q.mu.gather(1, j).squeeze(1), q.x.gather(1, j).squeeze(1)
    std_j = q.std_q.gather(1, j).squeeze(1) if torch.is_tensor(q.std_q) else q.std_q
    if s.reflect:  # reflection needs no extra draws
        noise, tries_u = x_j[:, None], torch.zeros(B, 1, device=t.device)
    else:
        noise = normal_block(s, K, s.tries).view(B, s.tries, D)
        tries_u = uniform_block(s, K, s.tries)
    residual, cap = acceptance.residual_sample(t_j, mu_j, x_j, std_j, spec.sigma, noise, tries_u)
    all_pass = n_acc == k
    return Decision(n_acc, torch.where(all_pass[:, None], bonus, residual), t_j, prob, log_ratio), cap & ~all_pass


def advance(s: RoundState, q: Proposal, t: torch.Tensor, d: Decision, cap: torch.Tensor) -> torch.Tensor:
    """Write this round's tokens, move each active series on, count; returns the active mask of the round."""
    spec, k, W, B, D = s.spec, q.mu.shape[1], s.W, s.hist.shape[0], s.D
    pos = torch.arange(k + 1 + W, device=s.p.device)
    active = s.n_out < s.steps
    take_bonus = spec.emit != "draft_mean" or k == 0  # a k = 0 round is a target step: it emits the target's token
    n_new = torch.where(d.n_acc == k, d.n_acc + int(take_bonus), d.n_acc + 1)
    shown = d.t_j if spec.emit == "target_mean" else d.correction
    emitted = acceptance.emit_tokens(spec.emit, q.x, q.mu, t, d.n_acc, shown)  # [B, K+1, D]
    write = (pos[None, : k + 1] < n_new[:, None]) & active[:, None]
    slots = (s.n_out[:, None] + pos[None, : k + 1]).clamp(max=s.out.shape[1] - 1)[:, :, None].expand(B, k + 1, D)
    s.out.scatter_(1, slots, torch.where(write[:, :, None], emitted, s.out.gather(1, slots)))
    # the newest W final values: the old ones followed by this round's emitted tokens
    seq = torch.cat([s.hist, (emitted - s.shift) / s.scale], dim=1)  # [B, W+k+1, D]
    newest = (n_new[:, None] + pos[None, :W])[:, :, None].expand(B, W, D)
    s.hist.copy_(torch.where(active[:, None, None], seq.gather(1, newest), s.hist))
    act = active.long()
    s.stats.emitted += torch.minimum(n_new, s.steps - s.n_out).clamp(min=0) * act  # tokens inside the horizon
    s.p.copy_(torch.where(active, s.p + n_new, s.p))
    s.n_out.add_(n_new * act)
    s.index.add_(1)
    s.stats.proposed += k * act
    s.stats.accepted += d.n_acc * act
    s.stats.evaluated += (d.n_acc + 1).clamp(max=k) * act
    s.stats.rounds += act
    s.stats.cap_hits += (cap & active).long()
    s.stats.accepted_hist.scatter_add_(0, d.n_acc, act)
    return active


def take_target_token(s: RoundState, t: torch.Tensor) -> torch.Tensor:
    """Emit the target's token after each active series' newest (t [B, D], scaled: its mean, or a sample of p where
    the exact rule emits samples) and move on; returns the active mask as 0/1."""
    B, D = s.hist.shape[0], s.D
    token = t + s.spec.sigma * normal_block(s, s.K + s.tries, 1) if s.residual_needed else t
    active = s.n_out < s.steps
    act = active.long()
    slot = s.n_out.clamp(max=s.out.shape[1] - 1)[:, None, None].expand(B, 1, D)
    s.out.scatter_(1, slot, torch.where(active[:, None, None], token[:, None], s.out.gather(1, slot)))
    newest = torch.cat([s.hist[:, 1:], ((token - s.shift[:, 0]) / s.scale[:, 0])[:, None]], dim=1)
    s.hist.copy_(torch.where(active[:, None, None], newest, s.hist))
    s.p.add_(act), s.n_out.add_(act), s.index.add_(1)
    s.stats.emitted += act
    return act


def target_step(s: RoundState, target_call: ModelCall, w: int) -> None:
    """A round of k = 0, lean: the target's token after re-feeding the newest w, written and counted; no draft, no
    acceptance."""
    act = take_target_token(s, verify(s, target_call, s.hist[:, :0], w)[:, 0])
    s.stats.rounds += act
    s.stats.accepted_hist[0] += act.sum()


def open_with_target(s: RoundState, mean: torch.Tensor) -> None:
    """`spec.target_opens`: the forecast's first token is the target's, from its prefill's prediction after the
    context (`mean` [B, C, n, P] normalised, the newest position used); the first round drafts from the second."""
    take_target_token(s, flat_tokens(mean[:, :, -1]) * s.scale[:, 0] + s.shift[:, 0])


def speculative_round(state: RoundState, target_call: ModelCall, draft_call: ModelCall, k: int | None = None,
                      w: int = 1, mark: Callable[[str], None] | None = None, logs: list | None = None) -> None:
    """One round for every series, in place: k draft steps (default K) after re-feeding the newest w tokens, one
    verification pass, acceptance, bookkeeping (k = 0: a target step). Series that are already done ride along
    (static shapes) and change nothing."""
    k = state.K if k is None else k
    mark = mark or (lambda phase: None)
    if k == 0:
        target_step(state, target_call, w)
        mark("verify")
        return
    proposal = propose(state, draft_call, k, w)
    mark("draft")
    t = verify(state, target_call, proposal.fed, w)
    mark("verify")
    decision, cap = accept(state, proposal, t)
    mark("accept")
    active = advance(state, proposal, t, decision, cap)
    if logs is not None:
        delta = (t[:, :k] - proposal.mu).norm(dim=-1) / state.spec.sigma
        logs.append(RoundLog(active, decision.n_acc, delta, decision.log_ratio, decision.prob))
    mark("overhead")


def refeed_width(spec: SpecConfig, previous_k: int | None, k: int) -> int:
    """The newest tokens a round of k must re-feed (module docstring): 1, or the last round's k + 1 with target_mean;
    a forecast's first round (previous_k None) that drafts after the target's own first token (`open_with_target`) 2:
    the newest context token, which the draft's prefill left out, and that token, which neither model has fed."""
    if previous_k is None:
        return 2 if spec.target_opens and k > 0 else 1
    return previous_k + 1 if spec.emit == "target_mean" else 1


def forecast_of(state: RoundState, horizon: int) -> torch.Tensor:
    """The emitted tokens as a forecast [B, horizon, C] in scaled units (a copy)."""
    B, steps = state.out.shape[0], state.steps
    tokens = unflat_tokens(state.out[:, :steps], state.C).reshape(B, state.C, steps * state.P)
    return tokens.transpose(1, 2)[:, :horizon].clone()
