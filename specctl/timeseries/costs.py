"""What a speculative forecast costs, from measured per-call times, and the speedup that predicts.

Target-only decoding of `steps` tokens (one prefill of the n0 context tokens, then steps - 1 one-token steps) is timed
whole, as it runs: one CUDA graph where graphs are on. A speculative forecast is one prefill of n0 - 1 tokens in
each model (in the target alone for an early-exit draft, which runs on the target's cache), then rounds; a round is
K draft steps, one verification call over W + K tokens, and the acceptance and bookkeeping around them, all
measured together as one round (a forecast's first with everything before it). The prediction prices the rounds a
run took (a batch runs until its slowest series is done; the engine counts its rounds of each k) at these measured
costs, so it says where the time goes and a miss points at the cost model alone. An acceptance model of the rounds
(i.i.d. passes per series) predicted 0.56-0.90 of the measured speed where the tolerance rule rejected at batch
32-256 on an H200: its rejections cluster in a few series and late positions. Leviathan et al.'s formula, which
knows only the acceptance rate and one step-cost ratio, is kept for reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.speculative import SpecResult, slowest_series


@dataclass(frozen=True)
class StepCosts:
    """Measured seconds at one batch size (medians, synchronised)."""

    target_step: float  # one cached one-token target call
    draft_step: float  # one cached one-token draft call
    target_forecast: float  # one whole target-only forecast (one CUDA graph where graphs are on)
    prefill_spec: float  # the speculative forecast's prefills (n0 - 1 tokens, both models or a shared cache)
    verify: dict[int, float]  # k -> one target call over the w + k tokens a round of k verifies
    round: dict[int, float]  # k -> one whole round of k draft tokens (draft, verify, accept, bookkeeping)
    first: dict[int, float]  # k -> a forecast's first round (re-feeding one token): its opening, timed whole, less
    # prefill_spec (the statistics, the reset and, where graphed, the prefill's launches ride with the round); 0: a
    # whole forecast that drafts nothing (the target's own loop, or target steps), less prefill_spec

    @property
    def c_hat(self) -> float:
        return self.draft_step / self.target_step

    def v_hat(self, k: int) -> float:
        return self.verify[k] / self.target_step

    def o_hat(self, k: int) -> float:
        """Per-round cost beyond k draft steps and one verification, in target steps (acceptance, bookkeeping,
        launches)."""
        return self.round[k] / self.target_step - k * self.c_hat - self.v_hat(k)


def tokens_per_round(alpha: float, k: int, bonus: bool) -> float:
    """E[tokens emitted per round] when each drafted token passes with probability alpha until the first rejection:
    (1 - a^(K+1)) / (1 - a) with the bonus token, a^K fewer without it."""
    with_bonus = k + 1.0 if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return with_bonus - (0.0 if bonus else alpha**k)


def leviathan_speedup(alpha: float, k: int, c: float, bonus: bool = True) -> float:
    """Leviathan et al.: E[tokens per round] / (K c + 1), in target steps."""
    return tokens_per_round(alpha, k, bonus) / (k * c + 1)


@dataclass(frozen=True)
class Prediction:
    target_seconds: float
    spec_seconds: float

    @property
    def speedup(self) -> float:
        return self.target_seconds / self.spec_seconds


def forecast_seconds(first: dict[int, float], rounds: dict[int, float], opening: int,
                     k_rounds: dict[int, int]) -> float:
    """One forecast (a batch) priced at the measured costs, beyond the prefill: its first round (of its opening k) at
    the first-round cost and its later rounds (the engine's counts per k, the first among them) at the round costs;
    an opening of k = 0 is a whole forecast that drafts nothing (the target's own loop, or target steps): first[0]."""
    if opening == 0:
        return first[0]
    return first[opening] + sum(n * rounds[k] for k, n in k_rounds.items()) - rounds[opening]


def predict(costs: StepCosts, results: list[SpecResult]) -> Prediction:
    """Wall time of the run's target-only and speculative forecasts, each batch's as it ran (`forecast_seconds`)."""
    spec = sum(costs.prefill_spec + forecast_seconds(costs.first, costs.round, r.opening, r.k_rounds)
               for r in results)
    return Prediction(len(results) * costs.target_forecast, spec)


EVIDENCE_SERIES = 32  # series that drafted before adaptive K may judge drafting lost (one batch of 32, 32 of one)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)  # Student's t at 97.5%, df 1..10


def t_975(df: int) -> float:
    """Student's t quantile at 97.5% for df degrees of freedom: the table to 10, then the expansion in 1/df around
    z = 1.96 (within 0.003 of the exact quantile at 11, 2e-4 from 30)."""
    if df <= len(T_975):
        return T_975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


class AdaptiveK:
    """A round's draft length: the k in 0..K that finishes the tokens left soonest, in expected seconds at the
    measured round costs (k = 0 is a target step, one token, and every later round is one too), a forecast's first
    round at its own costs (it re-feeds one token, where a later one re-feeds the last round's k + 1 under
    target_mean). Finishing, not the steady rate E[tokens per round] / seconds per round, is what counts on a short
    horizon: at H = 720 a forecast is 8 tokens, and on an H200 at batch 32-256 the steady rate opened with rounds of
    3-4 (two rounds, 1.01-1.03x measured) where one round of 7 ran 1.23-1.44x. The acceptance rate it plans with is
    optimistic: the batch's running rate (after the run's earlier batches, `observe`, and one passing test as a
    prior) plus two standard errors, so that thin evidence keeps drafting lengths that could pay and a run is never
    locked out by one unlucky start; or, where lower, the same for the batch's slowest series, which the batch waits
    for. A setting that could not pay even if every token passed never drafts, and once the forecasts that drafted
    have not shown that they cost less, priced at these costs, than the target's own would have (their mean's upper
    bound at 97.5%), none drafts (`drafting_lost`). Reading the batch's counts syncs the host once per round."""

    def __init__(self, rounds: dict[int, float], bonus: bool, steps: int,
                 first: dict[int, float] | None = None) -> None:
        self.rounds, self.first, self.bonus, self.steps = rounds, first or rounds, bonus, steps
        self.whole = first[0] if first else None  # a whole forecast that drafts nothing, where first rounds are given
        self.accepted, self.evaluated = 1.0, 1.0  # the batches' drafted tokens, one passing test as a prior
        self.slow_accepted, self.slow_evaluated = 1.0, 1.0  # the same, of each batch's slowest series
        self.plans: dict[float, tuple[list[float], list[int]]] = {}  # rate (rounded) -> seconds_to_finish
        self.openings: dict[float, int] = {}  # rate (rounded) -> opening
        self.decided: int | None = None  # the next forecast's opening, until new evidence
        self.drafted, self.drafted_seconds = 0, 0.0  # forecasts that drafted, and their rounds priced at these costs
        self.drafted_squares = 0.0  # the sum of those prices squared (their spread)
        self.drafted_series = 0  # the series those forecasts decoded

    def options(self, alpha: float, n: int, later: list[float], costs: dict[int, float]) -> dict[int, float]:
        """k -> E[seconds] to emit n tokens with a round of k at `costs`, then `later[n']` for the n' left: each
        drafted token passes with probability alpha until the first rejection, a round of k emits j + 1 tokens after
        j passes (k + 1, or k without the bonus, after all k), never more than are left."""
        out = {0: n * self.rounds[0]}  # target steps to the end
        for k in (k for k in costs if k > 0):
            after = sum(alpha**j * (1 - alpha) * later[n - min(n, j + 1)] for j in range(k))  # a rejection at j + 1
            after += alpha**k * later[n - min(n, k + 1 if self.bonus else k)]  # all k passed
            out[k] = costs[k] + after
        return out

    def seconds_to_finish(self, alpha: float) -> tuple[list[float], list[int]]:
        """E[seconds] to emit n = 0..steps tokens in later rounds, and the best k for each n."""
        if (alpha := round(alpha, 3)) not in self.plans:
            seconds, plan = [0.0], [0]
            for n in range(1, self.steps + 1):
                options = self.options(alpha, n, seconds, self.rounds)
                plan.append(min(options, key=options.get))
                seconds.append(options[plan[-1]])
            self.plans[alpha] = seconds, plan
        return self.plans[alpha]

    def rate(self, accepted: int, evaluated: int, slowest: tuple[int, int] | None = None) -> float:
        """The optimistic acceptance rate of a batch that has accepted `accepted` of `evaluated` drafted tokens, or,
        where lower, of its slowest series, which has accepted slowest[0] of slowest[1]."""
        def optimistic(accepted: float, n: float) -> float:
            a = accepted / n
            return min(1.0, a + 2 * math.sqrt(a * (1 - a) / n) + 1 / n)

        batch = optimistic(self.accepted + accepted, self.evaluated + evaluated)
        if slowest is None:
            return batch
        return min(batch, optimistic(self.slow_accepted + slowest[0], self.slow_evaluated + slowest[1]))

    def best(self, alpha: float, left: int | None = None) -> int:
        """A later round's k with `left` tokens to emit in the batch's slowest series (default: a whole forecast)."""
        return self.seconds_to_finish(alpha)[1][min(self.steps, left or self.steps)]

    def opening(self) -> int:
        """A forecast's first round's k, at the first round's costs, where k = 0 is first[0], a whole forecast that
        drafts nothing. Decided once per evidence (`observe` clears it): a forecast that follows pays a look-up, not
        the bound and the plan (2 of the 7 us of host work a fallback added to the target's forecast on a CPU)."""
        if self.decided is None:
            self.decided = 0 if self.drafting_lost() else self.opening_at(round(self.rate(0, 0, (0, 0)), 3))
        return self.decided

    def opening_at(self, alpha: float) -> int:
        """The opening that finishes soonest at acceptance rate alpha (once per rate)."""
        if alpha not in self.openings:
            options = self.options(alpha, self.steps, self.seconds_to_finish(alpha)[0], self.first)
            options[0] = options[0] if self.whole is None else self.whole
            self.openings[alpha] = min(options, key=options.get)
        return self.openings[alpha]

    def drafting_lost(self) -> bool:
        """Whether the forecasts that drafted so far, over at least EVIDENCE_SERIES series, have not shown that they
        cost less, their rounds priced at these costs, than as many of the target's own (first[0], where it is
        given): their upper bound (`drafted_bound`) is above it. This evidence overrules the per-token model, which
        at batch 32 on an H200 (ETTm1) predicted 0.98x where drafting ran 0.86x, the batch waiting for series it does
        not model. The bound, not the mean: a batch's cost is its slowest series', so it swings with a few hard series:
        at batch 256 on ETTm1 (window units) four validation batches drafted at 13.9 ms on average against the
        target's 20.8, then the test split's four cost 13 (every token passed) to 45 ms (a second round or more); the
        mean stayed below 20.8 and drafting ran 0.85x. Student's t, not two standard errors: in a later run six
        forecasts at 13.9 ms and a dear one (about 30 priced) kept two standard errors under 20.84 and the next test
        batch drafted too (0.84x); t at six degrees of freedom puts the bound near 21.8. One series is not that
        evidence: on ETTh1 at batch 1, one hard validation window (10.1 ms against the target's 5.7) stopped
        drafting where the test windows then accepted every drafted token (fixed K: 2.24x)."""
        if self.whole is None or self.drafted_series < EVIDENCE_SERIES:  # then no bound is computed (every forecast)
            return False
        return self.drafted_bound() > self.whole

    def drafted_mean(self) -> float | None:
        """The mean priced cost of a forecast that drafted (None before one has)."""
        return self.drafted_seconds / self.drafted if self.drafted else None

    def drafted_bound(self) -> float | None:
        """The mean priced cost of a forecast that drafted, bounded above at 97.5%: mean + t(n - 1) standard errors,
        Student's t for n forecasts (12.7 at two, 2.45 at seven, 2.04 at thirty: two standard errors alone
        understate a few forecasts' spread); the mean alone after one."""
        if (mean := self.drafted_mean()) is None:
            return None
        n = self.drafted
        if n == 1:
            return mean
        variance = max(0.0, self.drafted_squares / n - mean**2) * n / (n - 1)  # sample variance
        return mean + t_975(n - 1) * math.sqrt(variance / n)

    def choose(self, accepted: int, evaluated: int, left: int | None = None,
               slowest: tuple[int, int] | None = None) -> int:
        return self.best(self.rate(accepted, evaluated, slowest), left)

    def __call__(self, state) -> int:
        """The next round's k for the tokens the batch's slowest series (the most tokens left; of those, the least
        accepting) has left, at the batch's rate or, where lower, that series' own: a batch runs until that series is
        done (on an H200, ETTm1 at batch 32-256, 224-1,792 series at acceptance 0.3-0.5, planning with the batch's
        rate alone kept drafting at 0.44-0.84x)."""
        st, left = state.stats, state.steps - state.n_out
        slowest = slowest_series(left, st.accepted, st.evaluated)
        counts = torch.stack([st.accepted.sum(), st.evaluated.sum(), st.accepted[slowest], st.evaluated[slowest],
                              left[slowest]])
        accepted, evaluated, slow_accepted, slow_evaluated, n = counts.tolist()  # one host sync
        return self.choose(accepted, evaluated, max(1, n), (slow_accepted, slow_evaluated))

    def observe(self, accepted: int, evaluated: int, slowest: tuple[int, int] = (0, 0)) -> None:
        """A finished batch's counts, and its slowest series' (`SpecResult.slowest_counts`): the next batch's prior."""
        self.accepted, self.evaluated = self.accepted + accepted, self.evaluated + evaluated
        self.slow_accepted, self.slow_evaluated = (self.slow_accepted + slowest[0], self.slow_evaluated + slowest[1])
        self.decided = None

    def learn(self, result: SpecResult) -> None:
        """Price a finished batch's forecast if it drafted, and `observe` it (a host sync)."""
        if result.opening:
            self.drafted, self.drafted_series = self.drafted + 1, self.drafted_series + len(result.accepted)
            seconds = forecast_seconds(self.first, self.rounds, result.opening, result.k_rounds)
            self.drafted_seconds += seconds
            self.drafted_squares += seconds**2
        self.observe(int(result.accepted.sum()), int(result.evaluated.sum()), result.slowest_counts())


def k_rounds_of(results: list[SpecResult], k_max: int) -> dict[int, int]:
    """Rounds of each draft length k over all batches."""
    return {k: n for k in range(k_max + 1) if (n := sum(r.k_rounds.get(k, 0) for r in results))}


def adaptive_k(rounds: dict[int, float], first: dict[int, float], spec: SpecConfig, steps: int) -> AdaptiveK | None:
    """Adaptive K over forecasts of `steps` tokens (their rounds emit all but the target's opening token where
    `spec.target_opens`) at the measured round costs (later and first rounds), if the setting asks for it."""
    return AdaptiveK(rounds, spec.emit != "draft_mean", steps - spec.target_opens, first) if spec.adaptive_k else None
