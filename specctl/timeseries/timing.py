"""Timing for spec-test (docs/design.md, "Performance protocol"): every batch is run warm-up + repeats times with the
device synchronised around each call, batch by batch, a baseline side by side with what it is compared to in one
process; the median per batch is summed over batches. Decoding is deterministic given the seeds (counter-based
per-series random numbers), so the warm-up call's output is the one scored. Single calls (a decode step, a
verification, a prefill) are timed the same way for the cost model (costs.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from specctl.core.runtime import Timing, time_call, time_calls
from specctl.timeseries.forecast import Norm, times_for
from specctl.timeseries.model import Stepper


@dataclass
class Measured:
    forecasts: list[torch.Tensor]
    timings: list[Timing]
    again: list[Timing] = field(default_factory=list)  # the same calls, interleaved with these (a timing's noise)

    @property
    def seconds(self) -> float:
        return sum(t.median for t in self.timings)

    @property
    def against_itself(self) -> float | None:
        """The ratio that identical calls measure (again / these), where they were timed twice."""
        return sum(t.median for t in self.again) / self.seconds if self.again else None


def time_batches(fn: Callable[[Any], Any], batches: list, device, repeats: int, warmup: int,
                 progress=None, label: str = "", after: Callable[[Any], None] | None = None,
                 beside: Callable[[Any], Any] | None = None) -> tuple[list, list[Timing], list[Timing]]:
    """Run fn on every batch: the first call's output is kept, then the batch is timed (warm-up excluded), with
    `beside` (the baseline) on the same batch, their calls interleaved so that a ratio of the two is measured side by
    side, then `after(output)` (e.g. what adaptive K learns from the batch, for the next one). Returns the outputs,
    fn's timings and beside's."""
    outputs, timings, beside_timings = [], [], []
    task = progress.add_task(label, total=len(batches), info="") if progress is not None else None
    for batch in batches:
        outputs.append(fn(batch))
        calls = [partial(fn, batch)] + ([partial(beside, batch)] if beside is not None else [])
        timed = time_calls(calls, device, repeats, max(0, warmup - 1))
        timings.append(timed[0])
        beside_timings += timed[1:]
        if after is not None:
            after(outputs[-1])
        if progress is not None:
            progress.update(task, advance=1, info=f"{1e3 * timings[-1].median:.1f} ms/batch")
    if progress is not None:
        progress.remove_task(task)
    return outputs, timings, beside_timings


@torch.no_grad()
def call_seconds(step: Stepper, context: torch.Tensor, tokens: int, device, repeats: int = 20) -> float:
    """Median time of one cached call over `tokens` new tokens after the context (a decode step at 1, a verification
    at W + K), at this batch size."""
    cfg = step.model.cfg
    x = Norm.fit(context, cfg).tokens(context, cfg.patch_len)
    B, n0 = x.shape[0], x.shape[2]
    step(x, times_for(B, 0, n0, device))
    fed, at = x[:, :, -1:].expand(-1, -1, tokens, -1).contiguous(), times_for(B, n0, tokens, device)
    return time_call(lambda: step(fed, at), device, repeats, 3).median


@torch.no_grad()
def prefill_seconds(steps: list[Stepper], context: torch.Tensor, tokens: int, device, repeats: int = 10) -> float:
    """Median time of prefilling the first `tokens` context tokens into each of `steps`."""
    cfg = steps[0].model.cfg
    x = Norm.fit(context, cfg).tokens(context, cfg.patch_len)[:, :, :tokens]
    at = times_for(x.shape[0], 0, tokens, device)
    return time_call(lambda: [s(x, at) for s in steps], device, repeats, 2).median if tokens else 0.0
