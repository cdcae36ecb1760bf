"""Side-by-side timing: the calls whose ratio is a speedup take turns running first."""

from __future__ import annotations

import torch

from specctl.core.runtime import time_calls


def test_interleaved_calls_take_turns_running_first():
    """A call that always ran right after the other would carry any order effect (the device's state after the other's
    launch, a host that has just woken) into every ratio; a b, b a, a b, ... shares it."""
    order = []
    timings = time_calls([lambda: order.append("a"), lambda: order.append("b")], torch.device("cpu"), 4, 1)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]  # one warm-up round, then four repeats
    assert [t.repeats for t in timings] == [4, 4] and all(t.low <= t.median <= t.high for t in timings)
