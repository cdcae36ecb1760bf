"""Counter-based random numbers: draw = hash(series seed, stream, counter).

Each series gets its own streams, so a series draws the same numbers alone or in any batch, and no generator
state lives on the host (safe inside CUDA graphs). A 32-bit integer hash (lowbias32) is computed in int64 with
explicit masking. Normals and uniforms come from disjoint streams: a normal at counter c is Box-Muller of the
normal stream's uniforms 2c and 2c+1, which no uniform drawn for an acceptance test ever shares.
"""

from __future__ import annotations

import math

import torch

MASK = 0xFFFFFFFF
UNIFORM_STREAM, NORMAL_STREAM = 0x2545F491, 0x5BD1E995  # salts that separate the two streams


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK
    return x ^ (x >> 16)


def series_seeds(seed: int, series_ids: torch.Tensor) -> torch.Tensor:
    """One seed per series from the run seed and a stable id (e.g. the window's start row)."""
    return hash32(hash32(torch.as_tensor(seed, dtype=torch.int64)) ^ series_ids.to(torch.int64))


def _bits(seeds: torch.Tensor, stream: int, counter: torch.Tensor) -> torch.Tensor:
    s = hash32(seeds.view(-1, *([1] * (counter.dim() - 1))) ^ stream)
    return hash32(hash32(s ^ (counter * 0x9E3779B1)) + counter)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    return (bits >> 8).to(torch.float32).add_(0.5).mul_(1.0 / 2**24)  # 24 bits -> (0, 1), never 0 or 1


def uniform(seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """U(0,1) (open interval) of shape seeds.shape + counter.shape[1:]; counter [B, ...] int64 per series."""
    return _unit(_bits(seeds, UNIFORM_STREAM, counter))


def normal(seeds: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """N(0,1) of the same shape as `uniform`, from the normal stream's counters 2c and 2c+1."""
    u1, u2 = _unit(_bits(seeds, NORMAL_STREAM, 2 * counter)), _unit(_bits(seeds, NORMAL_STREAM, 2 * counter + 1))
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
