"""Device choice, seeding and synchronised timing."""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from specctl.core.errors import SpecctlError

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecctlError("device 'cuda' requested but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Median and spread of repeated, synchronised wall times (seconds), warm-up excluded."""

    median: float
    low: float
    high: float
    repeats: int


def capture_graph(fn: Callable[[], T], warmup: int = 2,
                  reset: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, T]:
    """fn() captured as a CUDA graph, and its outputs: replaying the graph reruns fn's kernels on the same tensors
    and refreshes those outputs in place. fn may only read and write tensors that outlive the graph. Raises
    RuntimeError where capture fails; the warm-up calls (on a side stream, as capture requires) run fn for real,
    each after `reset` (outside the graph)."""
    reset = reset or (lambda: None)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            reset()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> Timing:
    return time_calls([fn], device, repeats, warmup)[0]


def time_calls(fns: list[Callable[[], object]], device: torch.device, repeats: int, warmup: int) -> list[Timing]:
    """Each of fns timed `repeats` times, interleaved (a b, b a, a b, ...) so that a ratio of their medians is measured
    side by side whatever the device's clocks and the host's load do over the run, and neither call always runs
    first; synchronised around every call."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    pairs = list(zip(fns, times))
    for repeat in range(repeats):
        for fn, seconds in pairs[::-1] if repeat % 2 else pairs:
            start = time.perf_counter()
            fn()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    return [Timing(statistics.median(t), min(t), max(t), repeats) for t in times]


class PhaseClock:
    """Accumulates synchronised wall time per phase (draft, verify, ...) for a time breakdown.

    Synchronising between phases slows the run down, so breakdowns come from a separate instrumented pass,
    never from the pass whose speedup is reported.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}
        self.last = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now
