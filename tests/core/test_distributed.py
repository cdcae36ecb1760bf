"""Sharding of training batches under torchrun, simulated in one process: the processes' parts of every batch put
together are the batch one process would draw."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from specctl.core import distributed
from specctl.core.errors import SpecctlError
from specctl.timeseries.training import loader


def as_rank(monkeypatch, rank: int, world: int) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


def per_rank(monkeypatch, world: int, draw) -> list[list]:
    parts = []
    for rank in range(world):
        as_rank(monkeypatch, rank, world)
        parts.append(list(draw()))
    return parts


def test_timeseries_batches_split_into_contiguous_parts_of_the_single_process_batches(monkeypatch):
    series = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float32)
    single = list(loader([series], 8, 6, True, seed=3))  # 33 windows: five batches of 6, then 3
    parts = per_rank(monkeypatch, 2, lambda: loader([series], 8, 6, True, seed=3, shard=True))
    assert [len(b) for b in parts[0]] == [3] * 5 + [1] and [len(b) for b in parts[1]] == [3] * 5 + [2]
    for whole, first, second in zip(single, *parts):
        assert torch.equal(torch.cat([first, second]), whole)
    parts = per_rank(monkeypatch, 4, lambda: loader([series], 8, 6, True, seed=3, shard=True))
    assert all(len(p) == 5 for p in parts)  # the last batch (3 windows) cannot feed 4 processes: dropped
    assert torch.equal(torch.cat([p[0] for p in parts]), single[0][:6])


def test_batches_of_teacher_rows_split_into_contiguous_parts(monkeypatch):
    """finetune-head trains on batches of cached teacher rows: each process takes its contiguous share."""
    single = list(torch.randperm(30, generator=torch.Generator().manual_seed(1)).split(8))  # 8, 8, 8, 6 rows
    parts = per_rank(monkeypatch, 2, lambda: distributed.shard_batches(single))
    for whole, first, second in zip(single, *parts):
        assert torch.equal(torch.cat([first, second]), whole)
    assert all(len(p) == 4 for p in parts)


def test_the_global_batch_must_split_evenly(monkeypatch):
    as_rank(monkeypatch, 0, 4)
    distributed.check_batch(32)
    with pytest.raises(SpecctlError, match="global batch.*4 processes"):
        distributed.check_batch(30)
