"""Tiny models and series shared by the tests."""

from __future__ import annotations

import torch

from specctl.timeseries.model import TimerXL, scaled_config
from specctl.timeseries.profile import ModelConfig


def tiny_timer(n_vars: int = 3, d_model: int = 32, e_layers: int = 2, stochastic: bool = False, seed: int = 0,
               patch_len: int = 8, **model) -> TimerXL:
    torch.manual_seed(seed)
    cfg = ModelConfig(patch_len=patch_len, d_model=d_model, n_heads=4, d_ff=2 * d_model, e_layers=e_layers,
                      dropout=0.0, stochastic=stochastic, **model)
    return TimerXL(scaled_config(cfg, n_vars)).eval()


def smooth_series(batch: int, length: int, n_vars: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)[None, :, None]
    phase = torch.rand(batch, 1, n_vars, generator=g) * 6.28
    return torch.sin(t / 5 + phase) + 0.1 * torch.randn(batch, length, n_vars, generator=g)
