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

from specctl.timeseries import acceptance
from specctl.core.errors import SpecctlError
from specctl.timeseries.forecast import Norm, n_tokens, times_for
from specctl.timeseries.model import Stepper, TimerXL, check_compatible
from specctl.timeseries.rng import normal, uniform
from specctl.core.runtime import PhaseClock, capture_graph
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
        return self.spec.k

    @property
    def W(self) -> int:
        return self.hist.shape[1]

    @property
    def tries(self) -> int:
        return 1 if self.reflect else self.spec.exact_max_tries

    @property
    def block(self) -> int:
        """Random-number counters per round: K draft noises, K uniforms, residual draws, one bonus noise."""
        K, D = self.K, self.hist.shape[2]
        return K * D + K + self.tries * D + self.tries + D

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


def new_state(target: TimerXL, draft: TimerXL, batch: int, lookback: int, horizon: int, spec: SpecConfig,
              device) -> RoundState:
    P, C, K = target.cfg.patch_len, target.cfg.n_vars, spec.k
    steps, n0, D = n_tokens(horizon, P), lookback // P, C * P
    W = min(K + 1, n0)
    longs = lambda: torch.zeros(batch, dtype=torch.long, device=device)  # noqa: E731
    stats = SpecResult(torch.empty(0), longs(), longs(), longs(), longs(), longs(), longs(),
                       torch.zeros(K + 1, dtype=torch.long, device=device))
    return RoundState(
        spec, C, P, steps, draft.cfg.stochastic,
        longs(), torch.zeros(batch, 1, D, device=device), torch.zeros(batch, 1, D, device=device),
        torch.zeros(batch, W, D, device=device), longs(), longs(), torch.zeros(batch, steps + K + 1, D, device=device),
        torch.zeros((), dtype=torch.long, device=device), stats,
    )


def reset(state: RoundState, norm: Norm, tokens: torch.Tensor, seeds: torch.Tensor) -> None:
    """Start a new forecast in the same buffers: context tokens [B, C, n0, P], frozen lookback statistics."""
    B, C, n0, P = tokens.shape
    state.seeds.copy_(seeds)
    state.scale.copy_(flat(norm.std.transpose(1, 2).expand(B, C, P)[:, :, None]))
    state.shift.copy_(flat(norm.mean.transpose(1, 2).expand(B, C, P)[:, :, None]))
    state.hist.copy_(flat(tokens[:, :, n0 - state.W :]))
    state.p.fill_(n0 - 1)
    state.index.zero_()
    for t in (state.n_out, state.out, state.stats.proposed, state.stats.accepted, state.stats.evaluated,
              state.stats.rounds, state.stats.emitted, state.stats.cap_hits, state.stats.accepted_hist):
        t.zero_()


def speculative_round(state: RoundState, target_call, draft_call, mark=None, logs: list | None = None) -> None:
    """One round for every series, in place: K draft steps, one verification pass, acceptance, bookkeeping.
    Series that are already done ride along (static shapes) and change nothing."""
    s, spec, K, W, C = state, state.spec, state.K, state.W, state.C
    mark = mark or (lambda phase: None)
    B, D = s.hist.shape[0], s.hist.shape[2]
    device = s.hist.device
    scale, shift, seeds = s.scale, s.shift, s.seeds
    back = torch.arange(-(W - 1), K + 1, device=device)  # offsets p-W+1..p+K
    pos = torch.arange(K + W, device=device)
    active = s.n_out < s.steps
    base = s.index * s.block + torch.zeros(B, 1, dtype=torch.long, device=device)
    # draft proposes K tokens autoregressively, after re-feeding the final values of the newest W tokens
    feed, feed_times = unflat(s.hist, C), s.p[:, None] + back[None, :W]
    mus, xs, feds, stds = [], [], [], []
    eps = normal(seeds, base[:, :, None] + torch.arange(K * D, device=device).view(1, K, D)) if s.sampling else None
    for i in range(K):
        mean, logvar = draft_call(feed, feed_times)
        mu = flat(mean[:, :, -1]) * scale[:, 0] + shift[:, 0]  # scaled units
        std_q = (flat(logvar[:, :, -1]).mul(0.5).exp() * scale[:, 0]) if logvar is not None else spec.sigma
        x = mu + std_q * eps[:, i] if s.sampling else mu  # x ~ q = N(mu, std_q^2)
        fed = x if s.feed_samples else mu
        mus.append(mu), xs.append(x), feds.append(fed), stds.append(std_q)
        feed, feed_times = unflat(((fed - shift[:, 0]) / scale[:, 0])[:, None], C), (s.p + i + 1)[:, None]
    mu, x, fed = torch.stack(mus, 1), torch.stack(xs, 1), torch.stack(feds, 1)  # [B, K, D]
    std_q = torch.stack(stds, 1) if s.stochastic else spec.sigma
    mark("draft")
    # target verifies all K in one pass: t_i for positions p+1..p+K+1
    verify_in = torch.cat([s.hist, (fed - shift) / scale], dim=1)  # [B, W+K, D] normalised
    t_norm, _ = target_call(unflat(verify_in, C), s.p[:, None] + back[None, :])
    t = flat(t_norm[:, :, W - 1 :]) * scale + shift  # [B, K+1, D]: predictions for p+1..p+K+1
    mark("verify")
    prob, log_ratio = acceptance.acceptance_probability(spec.rule, x, t, mu, std_q, spec.sigma, spec.bias, spec.tol)
    u = uniform(seeds, base + K * D + torch.arange(K, device=device))
    n_acc = acceptance.count_accepted(u < prob)  # [B]
    # the fed correction at j = n_acc (or the bonus when n_acc == K)
    t_j = t.gather(1, n_acc[:, None, None].expand(B, 1, D)).squeeze(1)
    correction = t_j
    if s.residual_needed:
        j = n_acc.clamp(max=K - 1)[:, None, None].expand(B, 1, D)
        mu_j, x_j = mu.gather(1, j).squeeze(1), x.gather(1, j).squeeze(1)
        std_j = std_q.gather(1, j).squeeze(1) if torch.is_tensor(std_q) else std_q
        off, tries = base + K * D + K, s.tries
        if s.reflect:  # reflection needs no extra draws
            noise, tries_u = x_j[:, None], torch.zeros(B, 1, device=device)
        else:
            noise = normal(seeds, off[:, :, None] + torch.arange(tries * D, device=device).view(1, tries, D))
            tries_u = uniform(seeds, off + tries * D + torch.arange(tries, device=device))
        residual, cap = acceptance.residual_sample(t_j, mu_j, x_j, std_j, spec.sigma, noise, tries_u)
        bonus = t_j + spec.sigma * normal(seeds, off + tries * D + tries + torch.arange(D, device=device))
        all_pass = n_acc == K
        correction = torch.where(all_pass[:, None], bonus, residual)
        s.stats.cap_hits += (cap & ~all_pass & active).long()
    mark("accept")
    take_bonus = spec.emit != "draft_mean"
    n_new = torch.where(n_acc == K, n_acc + int(take_bonus), n_acc + 1)
    shown = t_j if spec.emit == "target_mean" else correction
    emitted = acceptance.emit_tokens(spec.emit, x, mu, t, n_acc, shown)  # [B, K+1, D]
    # write this round's tokens at n_out.. for active series
    write = (pos[None, : K + 1] < n_new[:, None]) & active[:, None]
    slots = (s.n_out[:, None] + pos[None, : K + 1]).clamp(max=s.out.shape[1] - 1)[:, :, None].expand(B, K + 1, D)
    s.out.scatter_(1, slots, torch.where(write[:, :, None], emitted, s.out.gather(1, slots)))
    # advance: the newest W final values are the old ones followed by this round's emitted tokens
    seq = torch.cat([s.hist, (emitted - shift) / scale], dim=1)  # [B, W+K+1, D]
    newest = (n_new[:, None] + pos[None, :W])[:, :, None].expand(B, W, D)
    s.hist.copy_(torch.where(active[:, None, None], seq.gather(1, newest), s.hist))
    s.p.copy_(torch.where(active, s.p + n_new, s.p))
    s.n_out.add_(n_new * active)
    s.index.add_(1)
    act = active.long()
    s.stats.proposed += K * act
    s.stats.accepted += n_acc * act
    s.stats.evaluated += (n_acc + 1).clamp(max=K) * act
    s.stats.rounds += act
    s.stats.emitted += n_new * act
    s.stats.accepted_hist.scatter_add_(0, n_acc, act)
    if logs is not None:
        logs.append(RoundLog(active, n_acc, (t[:, :K] - mu).norm(dim=-1) / spec.sigma, log_ratio, prob))
    mark("overhead")


def forecast_of(state: RoundState, horizon: int) -> torch.Tensor:
    """The emitted tokens as a forecast [B, horizon, C] in scaled units (a copy)."""
    B, steps = state.out.shape[0], state.steps
    tokens = unflat(state.out[:, :steps], state.C).reshape(B, state.C, steps * state.P)
    return tokens.transpose(1, 2)[:, :horizon].clone()


class RoundGraph:
    """One speculative round captured as a CUDA graph over its own persistent RoundState and the steppers'
    caches; the model calls inside run eagerly during capture (graphs do not nest)."""

    def __init__(self, state: RoundState, tstep: Stepper, dstep: Stepper) -> None:
        self.state = state
        self.graph, _ = capture_graph(lambda: speculative_round(state, tstep.eager, dstep.eager))

    def replay(self) -> None:
        self.graph.replay()


@torch.no_grad()
def speculative_forecast(
    target: TimerXL | Stepper, draft: TimerXL | Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
    seeds: torch.Tensor, debug: bool = False, clock: PhaseClock | None = None,
    round_graphs: dict | None = None,
) -> SpecResult:
    """Forecast `horizon` points for each series of `context` [B, L, C] with draft proposals verified by the target.

    `target` and `draft` are models, or Steppers (model + reusable cache, optionally CUDA graphs) sized for
    this batch and at least `cache_length` slots. With `round_graphs` (a dict the caller keeps) on a CUDA
    device, each whole round is replayed as one captured CUDA graph; debug logs and the clock need eager rounds."""
    B, L, device = context.shape[0], context.shape[1], context.device
    need = cache_length(L, horizon, (target.model if isinstance(target, Stepper) else target).cfg.patch_len, spec.k)
    tstep = target if isinstance(target, Stepper) else Stepper(target, B, need)
    dstep = draft if isinstance(draft, Stepper) else Stepper(draft, B, need)
    if min(tstep.max_len, dstep.max_len) < need or tstep.batch != B or dstep.batch != B:
        raise SpecctlError(f"internal: steppers sized for batch {tstep.batch}/{dstep.batch} and {tstep.max_len} slots, "
                           f"need batch {B} and {need}")
    check_pair(tstep.model, dstep.model, L)
    if clock is not None:
        clock.start()
    norm = Norm.fit(context, tstep.model.cfg)
    tokens = norm.tokens(context, tstep.model.cfg.patch_len)
    n0 = tokens.shape[2]
    warm = times_for(B, 0, n0 - 1, device)
    tstep(tokens[:, :, : n0 - 1], warm)
    dstep(tokens[:, :, : n0 - 1], warm)
    if clock is not None:
        clock.mark("prefill")  # paid once per forecast, by both decoders: outside the predicted_speedup formula
    graphed = round_graphs is not None and device.type == "cuda" and not debug and clock is None
    key = (B, L, horizon, id(tstep), id(dstep), spec.model_dump_json())
    if graphed and key not in round_graphs:
        state = new_state(tstep.model, dstep.model, B, L, horizon, spec, device)
        reset(state, norm, tokens, seeds)
        round_graphs[key] = RoundGraph(state, tstep, dstep)
    state = round_graphs[key].state if graphed else new_state(tstep.model, dstep.model, B, L, horizon, spec, device)
    reset(state, norm, tokens, seeds)
    logs: list[RoundLog] | None = [] if debug else None
    if clock is not None:
        clock.start()  # setting up the round state is not forecast time
    sure_rounds = -(-state.steps // (spec.k + 1))  # a round emits at most K+1 tokens: no series is done before
    r = 0
    while r < sure_rounds or bool((state.n_out < state.steps).any()):  # the only host sync
        if graphed:
            round_graphs[key].replay()
        else:
            speculative_round(state, tstep, dstep, clock.mark if clock is not None else None, logs)
        r += 1
    stats = state.stats
    clone = lambda t: t.clone()  # noqa: E731  (graph state is reused by the next forecast)
    return SpecResult(forecast_of(state, horizon), clone(stats.proposed), clone(stats.accepted), clone(stats.evaluated),
                      clone(stats.rounds), clone(stats.emitted), clone(stats.cap_hits), clone(stats.accepted_hist),
                      logs or [])
