"""A whole speculative forecast: both models' prefill, then rounds (speculative.py) until every series of the batch
has its horizon, each round eager or replayed as a CUDA graph per (k, w), each round's k fixed (K) or chosen by a
policy (adaptive K), with the target's own loop where no drafting is expected to pay; and the timing of a forecast's
opening and of one later round for the cost model. Graphed, a forecast's opening (statistics, prefill, reset and the
first round) is one replay: at batch 1 on an H200 its ~60 small eager ops cost about 1 ms of a 7 ms forecast. The
"is every series done" check is the only host sync, and runs only once a series could be done (a policy reads the
state once per round).
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from specctl.core.errors import SpecctlError
from specctl.core.runtime import PhaseClock, capture_graph, synchronize, time_call
from specctl.timeseries.early_exit import draft_stepper
from specctl.timeseries.forecast import Norm, forecast_cached, n_tokens, times_for
from specctl.timeseries.model import Stepper, TimerXL
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.speculative import (
    RoundLog,
    RoundState,
    SpecResult,
    cache_length,
    check_pair,
    forecast_of,
    new_state,
    open_with_target,
    refeed_width,
    reset,
    speculative_round,
)


def state_tensors(state: RoundState) -> list[torch.Tensor]:
    """Every tensor a round writes (for a snapshot around graph capture)."""
    st = state.stats
    return [state.hist, state.p, state.n_out, state.out, state.index, st.proposed, st.accepted, st.evaluated,
            st.rounds, st.emitted, st.cap_hits, st.accepted_hist]


class RoundGraphs:
    """Speculative rounds captured as CUDA graphs over one persistent RoundState and the steppers' caches, one graph
    per (k, w), captured the first time it is needed, which can be mid-forecast: capture's warm-up runs the round
    for real, so the state is saved before and put back before each run and after (the caches need no saving: the
    warm-up rewrites re-fed slots with the same values and writes later slots, which stay masked until a real round
    overwrites them). The model calls inside run eagerly during capture (graphs do not nest)."""

    def __init__(self, state: RoundState, tstep: Stepper, dstep: Stepper) -> None:
        self.state, self.tstep, self.dstep = state, tstep, dstep
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.openings: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, tuple[Norm, torch.Tensor]]] = {}
        self.inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # static context and seeds of the openings

    def open(self, context: torch.Tensor, seeds: torch.Tensor, k: int, w: int) -> tuple[Norm, torch.Tensor]:
        """A forecast's opening as one graph over static copies of the context and seeds: the statistics and tokens,
        the prefill (the draft's only if k > 0), the reset and a first round of k re-feeding w; returns the statistics
        and context tokens (static outputs). It starts from its inputs alone, so capture needs no saved state."""
        if self.inputs is None:
            self.inputs = context.clone(), seeds.clone()
        static_context, static_seeds = self.inputs
        if (k, w) not in self.openings:
            def opening() -> tuple[Norm, torch.Tensor]:
                norm, tokens, first_token = prefill(self.tstep, self.dstep if k > 0 else None, static_context,
                                                    self.state.spec, eager=True)
                open_forecast(self.state, norm, tokens, static_seeds, first_token)
                speculative_round(self.state, self.tstep.eager, self.dstep.eager, k, w)
                return norm, tokens

            self.openings[k, w] = capture_graph(opening)
        static_context.copy_(context)
        static_seeds.copy_(seeds)
        graph, out = self.openings[k, w]
        graph.replay()
        return out

    def replay(self, k: int, w: int) -> None:
        if (k, w) not in self.graphs:
            saved = [t.clone() for t in state_tensors(self.state)]

            def restore() -> None:
                for tensor, copy in zip(state_tensors(self.state), saved):
                    tensor.copy_(copy)

            self.graphs[k, w], _ = capture_graph(
                lambda: speculative_round(self.state, self.tstep.eager, self.dstep.eager, k, w), reset=restore)
        self.graphs[k, w].replay()


@dataclass
class Forecaster:
    """Both models' steppers with their prefill done, and the round state of one batch, ready to run rounds."""

    tstep: Stepper
    dstep: Stepper
    state: RoundState
    norm: Norm
    tokens: torch.Tensor
    graphs: RoundGraphs | None

    def round(self, k: int, w: int, mark: Callable[[str], None] | None = None, logs: list | None = None) -> None:
        if self.graphs is not None:
            self.graphs.replay(k, w)
        else:
            speculative_round(self.state, self.tstep, self.dstep, k, w, mark, logs)


def steppers(target: TimerXL | Stepper, draft: TimerXL | Stepper, batch: int, lookback: int, horizon: int,
             k: int) -> tuple[Stepper, Stepper]:
    """Steppers for both models (the given ones, checked, or new ones) sized for this batch and forecast."""
    need = cache_length(lookback, horizon, (target.model if isinstance(target, Stepper) else target).cfg.patch_len, k)
    tstep = target if isinstance(target, Stepper) else Stepper(target, batch, need)
    dstep = draft if isinstance(draft, Stepper) else draft_stepper(draft, tstep)
    if min(tstep.max_len, dstep.max_len) < need or tstep.batch != batch or dstep.batch != batch:
        raise SpecctlError(f"internal: steppers sized for batch {tstep.batch}/{dstep.batch} and {tstep.max_len} slots, "
                           f"need batch {batch} and {need}")
    check_pair(tstep.model, dstep.model, lookback)
    return tstep, dstep


def prefilled(tstep: Stepper, dstep: Stepper | None) -> list[Stepper]:
    """The steppers a speculative prefill runs: both, or the target alone when the draft will not run or runs on the
    target's cache (an early exit: the target's prefill fills the draft's layers too)."""
    return [tstep] if dstep is None or dstep.cache is tstep.cache else [tstep, dstep]


def prefill(tstep: Stepper, dstep: Stepper | None, context: torch.Tensor, spec: SpecConfig,
            eager: bool = False) -> tuple[Norm, torch.Tensor, torch.Tensor | None]:
    """Frozen statistics, the context's tokens, and the caches (`prefilled`) filled with all but the newest token (the
    first round re-feeds it); with `spec.target_opens` the target's with every token, and its prediction after them
    (normalised [B, C, 1, P], else None). `eager` skips the steppers' own graphs (inside a graph being captured)."""
    norm = Norm.fit(context, tstep.model.cfg)
    tokens = norm.tokens(context, tstep.model.cfg.patch_len)
    B, n0, first_token = context.shape[0], tokens.shape[2], None
    for step in prefilled(tstep, dstep):
        opens = step is tstep and spec.target_opens
        n = n0 if opens else n0 - 1
        if n > 0:
            mean, _ = (step.eager if eager else step)(tokens[:, :, :n], times_for(B, 0, n, context.device))
            if opens:
                first_token = mean[:, :, -1:]
    return norm, tokens, first_token


def open_forecast(state: RoundState, norm: Norm, tokens: torch.Tensor, seeds: torch.Tensor,
                  first_token: torch.Tensor | None) -> None:
    """Reset the round state to a new forecast, which opens with the target's token where the prefill made one."""
    reset(state, norm, tokens, seeds)
    if first_token is not None:
        open_with_target(state, first_token)


def start_forecast(tstep: Stepper, dstep: Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
                   seeds: torch.Tensor, round_graphs: dict | None, drafting: bool = True,
                   first: int | None = None) -> Forecaster:
    """Prefill the models (the draft only if `drafting`) and set up the round state, and with `first` run the first
    round, drafting that many tokens; with `round_graphs` (a dict the caller keeps) on a CUDA device, rounds are
    captured CUDA graphs over a persistent state, once per shape and setting, and the opening up to the first round is
    one of them."""
    B, L, device = context.shape[0], context.shape[1], context.device
    graphed = round_graphs is not None and device.type == "cuda"
    key = (B, L, horizon, id(tstep), id(dstep), spec.model_dump_json())
    if graphed and key not in round_graphs:
        round_graphs[key] = RoundGraphs(new_state(tstep.model, dstep.model, B, L, horizon, spec, device), tstep, dstep)
    graphs = round_graphs[key] if graphed else None
    if graphs is not None and first is not None:
        norm, tokens = graphs.open(context, seeds, first, refeed_width(spec, None, first))
        return Forecaster(tstep, dstep, graphs.state, norm, tokens, graphs)
    norm, tokens, first_token = prefill(tstep, dstep if drafting else None, context, spec)
    state = graphs.state if graphs else new_state(tstep.model, dstep.model, B, L, horizon, spec, device)
    open_forecast(state, norm, tokens, seeds, first_token)
    f = Forecaster(tstep, dstep, state, norm, tokens, graphs)
    if first is not None:
        f.round(first, refeed_width(spec, None, first))
    return f


class KPolicy(Protocol):
    """The draft length of each round (adaptive K)."""

    def opening(self) -> int:
        """The first round's k, before the batch has shown anything."""

    def __call__(self, state: RoundState) -> int:
        """The next round's k, from the state so far (a host sync)."""


@functools.cache
def nothing_drafted(batch: int, steps: int, k: int) -> tuple[torch.Tensor, ...]:
    """The counts of a batch's forecast that drafted nothing (proposed, accepted, evaluated, rounds, emitted, cap hits,
    accepted_hist): host tensors, made once per shape and shared, read-only (made per call, they were 8 of the 16 us
    of host work that the fallback added to the target's own forecast on a CPU)."""
    zeros, full = torch.zeros(batch, dtype=torch.long), torch.full((batch,), steps, dtype=torch.long)
    hist = torch.zeros(k + 1, dtype=torch.long)
    hist[0] = batch * steps
    return zeros, zeros, zeros, full, full, zeros, hist


def target_only(target: TimerXL | Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig) -> SpecResult:
    """A forecast that drafts nothing: the target's own KV-cached decoding (mean emission), counted as target steps.
    The counts are host tensors: the forecast is the baseline's call and nothing else runs on the device."""
    stepper = target if isinstance(target, Stepper) else None
    model = stepper.model if stepper is not None else target
    forecast = forecast_cached(model, context, horizon, stepper)
    steps = n_tokens(horizon, model.cfg.patch_len)
    return SpecResult(forecast, *nothing_drafted(context.shape[0], steps, spec.k), [], {0: steps}, opening=0)


@torch.no_grad()
def speculative_forecast(
    target: TimerXL | Stepper, draft: TimerXL | Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
    seeds: torch.Tensor, debug: bool = False, clock: PhaseClock | None = None,
    round_graphs: dict | None = None, policy: KPolicy | None = None,
) -> SpecResult:
    """Forecast `horizon` points for each series of `context` [B, L, C] with draft proposals verified by the target.

    `target` and `draft` are models, or Steppers (model + reusable cache, optionally CUDA graphs) sized for
    this batch and at least `cache_length` slots. With `round_graphs` on a CUDA device each whole round is replayed
    as one captured CUDA graph; debug logs and the clock need eager rounds. `policy` picks each round's k (0..K,
    reading the state: a host sync per round; after a k = 0 round every round is one); without it every round
    drafts K tokens."""
    opening = spec.k if policy is None else policy.opening()  # priced as a first round, which re-feeds one token
    drafting = opening > 0
    if not drafting and spec.emit != "sample" and not debug:  # nothing is expected to pay: the target's own loop
        return target_only(target, context, horizon, spec)  # (the draft does not run, so its fit is not checked)
    tstep, dstep = steppers(target, draft, context.shape[0], context.shape[1], horizon, spec.k)
    if clock is not None:
        clock.start()
    graphs = round_graphs if not debug and clock is None else None
    opened = clock is None and not debug  # the first round runs with the prefill (one graph replay where graphed)
    f = start_forecast(tstep, dstep, context, horizon, spec, seeds, graphs, drafting, opening if opened else None)
    if clock is not None:
        clock.mark("prefill")  # paid once per forecast, by both decoders
    logs: list[RoundLog] | None = [] if debug else None
    state = f.state
    k_rounds, previous = ({opening: 1}, opening) if opened else ({}, None if drafting else 0)
    # a round emits at most K+1 tokens (after the target's opening token where it opens): no series is done before
    sure_rounds = -(-(state.steps - spec.target_opens) // (spec.k + 1))
    while sum(k_rounds.values()) < sure_rounds or bool((state.n_out < state.steps).any()):  # the only host sync
        k = opening if previous is None else 0 if previous == 0 else policy(state) if policy is not None else spec.k
        f.round(k, refeed_width(spec, previous, k), clock.mark if clock is not None else None, logs)
        k_rounds[k], previous = k_rounds.get(k, 0) + 1, k
    st = state.stats
    # one copy of the per-series counts (graph state is reused by the next forecast): a launch, not six
    counts = torch.stack([st.proposed, st.accepted, st.evaluated, st.rounds, st.emitted, st.cap_hits]).unbind()
    return SpecResult(forecast_of(state, horizon), *counts, st.accepted_hist.clone(), logs or [], k_rounds, opening)


@torch.no_grad()
def round_seconds(tstep: Stepper, dstep: Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
                  seeds: torch.Tensor, round_graphs: dict | None, repeats: int, k: int, w: int,
                  decide: KPolicy | None = None) -> float:
    """Median wall time of one later round of k draft tokens re-feeding w (graph or eager, as the timed pass runs it),
    synchronised, after one untimed round; with `decide` (adaptive K) its decision first, as every later round of a
    run pays it: it reads the state, a host sync, and the device idles while the host plans."""
    f = start_forecast(tstep, dstep, context, horizon, spec, seeds, round_graphs)
    times = []
    for _ in range(repeats + 1):
        reset(f.state, f.norm, f.tokens, seeds)
        synchronize(context.device)
        start = time.perf_counter()
        if decide is not None:
            decide(f.state)
        f.round(k, w)
        synchronize(context.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


@torch.no_grad()
def opening_seconds(tstep: Stepper, dstep: Stepper, context: torch.Tensor, horizon: int, spec: SpecConfig,
                    seeds: torch.Tensor, round_graphs: dict | None, repeats: int, k: int) -> float:
    """Median wall time of a forecast's opening up to its first round of k draft tokens (statistics, prefill, reset,
    the round: one graph replay where graphed, as the timed pass runs it), synchronised, after one untimed opening."""
    return time_call(lambda: start_forecast(tstep, dstep, context, horizon, spec, seeds, round_graphs, k > 0, k),
                     context.device, repeats, warmup=1).median
