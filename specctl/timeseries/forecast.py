"""Rolling forecasts with Timer-XL: KV-cached growing context, and the reference sliding-window loop; and a draft's
distance to its target along the target's own forecast (what a spec-test's acceptance depends on).

Shapes: series x [B, T, C] in the dataset's scaled space; tokens [B, C, N, P] in instance-normalised units.
Generation normalises with statistics of the real lookback only and keeps them frozen, so the model sees
exactly what it saw in training (`next_patch_loss`) and one cached step equals a full recompute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from specctl.timeseries.model import Stepper, TimerConfig, TimerXL

EPS = 1e-5


@dataclass
class Norm:
    """Per-series, per-variable statistics [B, 1, C] taken from the lookback."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, context: torch.Tensor, cfg: TimerConfig | None = None) -> Norm:
        """Statistics of a real context [B, L, C]: the std over all of it; the centre is its mean, or with
        the model's norm_center = "last_patch" the mean of its last patch."""
        recent = context[:, -cfg.patch_len :] if cfg is not None and cfg.norm_center == "last_patch" else context
        mean = recent.mean(dim=1, keepdim=True)
        std = torch.sqrt(context.var(dim=1, keepdim=True, unbiased=False) + EPS)
        return cls(mean, std)

    def tokens(self, x: torch.Tensor, patch_len: int) -> torch.Tensor:
        """[B, T, C] scaled -> [B, C, T/P, P] normalised."""
        B, T, C = x.shape
        z = (x - self.mean) / self.std
        return z.permute(0, 2, 1).reshape(B, C, T // patch_len, patch_len)

    def series(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, C, N, P] normalised -> [B, N*P, C] scaled."""
        B, C, N, P = tokens.shape
        return tokens.reshape(B, C, N * P).permute(0, 2, 1) * self.std + self.mean

    def variance(self, logvar: torch.Tensor) -> torch.Tensor:
        """Normalised log-variance [B, C, N, P] -> variance in scaled units, [B, N*P, C]."""
        B, C, N, P = logvar.shape
        return logvar.exp().reshape(B, C, N * P).permute(0, 2, 1) * self.std**2


def n_tokens(horizon: int, patch_len: int) -> int:
    return math.ceil(horizon / patch_len)


def times_for(batch: int, start: int, count: int, device) -> torch.Tensor:
    return torch.arange(start, start + count, device=device).expand(batch, -1)


def next_patch_loss(model: TimerXL, window: torch.Tensor, lookback: int, self_feed: float = 0.0) -> torch.Tensor:
    """MSE of the next patch at every position, in scaled units; statistics from the lookback only.

    With `self_feed` > 0, that share of the windows (drawn per window) gets, after the lookback, the model's
    own rolling forecast as inputs instead of the truth (`rollout`, no gradient through it): generation feeds
    the model its forecasts there, and teacher forcing alone never shows it such inputs."""
    P = model.cfg.patch_len
    norm = Norm.fit(window[:, :lookback], model.cfg)
    tokens = norm.tokens(window, P)
    inputs, times = tokens[:, :, :-1], times_for(window.shape[0], 0, tokens.shape[2] - 1, window.device)
    if self_feed > 0:
        own = torch.rand(window.shape[0], device=window.device) < self_feed
        inputs = torch.where(own[:, None, None, None], rollout(model, inputs, lookback // P), inputs)
    mean, _ = model(inputs, times)
    return torch.mean((norm.series(mean) - window[:, P:]) ** 2)


def rollout_mse(model: TimerXL, window: torch.Tensor, lookback: int) -> torch.Tensor:
    """MSE of the model's own growing-context forecast after the lookback, with the gradient through every
    fed-back token: the test metric as a training loss (multi-step training; no cache, which would cut it)."""
    forecast = forecast_recompute(model, window[:, :lookback], window.shape[1] - lookback)
    return torch.mean((forecast - window[:, lookback:]) ** 2)


def roll(step: Stepper, tokens: torch.Tensor, steps: int) -> torch.Tensor:
    """The `steps` tokens [B, C, steps, P] that follow `tokens` [B, C, n0, P], each forecast fed back: one
    prefill call, then one call per token on the stepper's KV cache."""
    B, _, n0, _ = tokens.shape
    mean, _ = step(tokens, times_for(B, 0, n0, tokens.device))
    out = [mean[:, :, -1:]]  # the forecast of token n0
    for i in range(steps - 1):
        mean, _ = step(out[-1], times_for(B, n0 + i, 1, tokens.device))  # feed forecast n0+i, get n0+i+1
        out.append(mean)
    return torch.cat(out, dim=2)


@torch.no_grad()
def rollout(model: TimerXL, tokens: torch.Tensor, n0: int) -> torch.Tensor:
    """`tokens` [B, C, N, P] with positions n0.. replaced by the model's rolling forecast from the first n0,
    made as generation makes it: eval mode (no dropout), KV-cached, one token per step."""
    training = model.training
    model.eval()
    B, _, N, _ = tokens.shape
    forecast = roll(Stepper(model, B, N), tokens[:, :, :n0], N - n0)
    model.train(training)
    return torch.cat([tokens[:, :, :n0], forecast], dim=2)


@torch.no_grad()
def step_distances(target: TimerXL, draft: torch.nn.Module, context: torch.Tensor, steps: int,
                   units: str = "data") -> torch.Tensor:
    """[steps], summed over the batch: per step j of the horizon, the mean squared distance per value (scaled units;
    `units` "window": over each window's std) between the draft's and the target's next token, both given the
    target's own forecast as the context so far, which is the distance the tolerance rule tests at step j when every
    token before it was accepted (target_mean emission keeps the context on the target's path)."""
    P = target.cfg.patch_len
    norm = Norm.fit(context, target.cfg)  # the statistics both models decode with
    tokens = norm.tokens(context, P)
    B, C, n0, _ = tokens.shape
    path = rollout(target, torch.cat([tokens, tokens.new_zeros(B, C, steps - 1, P)], dim=2), n0)
    times = times_for(B, 0, path.shape[2], context.device)
    gap = (draft(path, times)[0] - target(path, times)[0])[:, :, n0 - 1 :].float()  # token n0-1+j predicts step j
    if units == "data":
        gap = gap * norm.std.transpose(1, 2)[..., None]
    return gap.pow(2).mean(dim=(1, 3)).sum(0)


@torch.no_grad()
def forecast_cached(
    model: TimerXL, context: torch.Tensor, horizon: int, stepper: Stepper | None = None
) -> torch.Tensor:
    """Growing-context rolling forecast with a KV cache: one prefill, then one token per step; with a stepper that
    has CUDA graphs, the whole forecast is one graph per context shape and horizon."""
    if stepper is not None and stepper.graphs:  # the eager view is made only where the forecast is captured
        return stepper.replay_whole(("forecast", tuple(context.shape), horizon),
                                    lambda c: forecast_cached(model, c, horizon, stepper.eager_view()), context)
    P = model.cfg.patch_len
    steps = n_tokens(horizon, P)
    norm = Norm.fit(context, model.cfg)
    tokens = norm.tokens(context, P)
    B, _, n0, _ = tokens.shape
    forecast = roll(stepper or Stepper(model, B, n0 + steps), tokens, steps)
    return norm.series(forecast)[:, :horizon]


def forecast_recompute(model: TimerXL, context: torch.Tensor, horizon: int) -> torch.Tensor:
    """Growing-context rolling forecast without a cache (full forward each step): the cache's reference, and with
    gradients enabled the differentiable rollout of `rollout_mse`."""
    P = model.cfg.patch_len
    norm = Norm.fit(context, model.cfg)
    tokens = norm.tokens(context, P)
    for _ in range(n_tokens(horizon, P)):
        mean, _ = model(tokens, times_for(tokens.shape[0], 0, tokens.shape[2], tokens.device))
        tokens = torch.cat([tokens, mean[:, :, -1:]], dim=2)
    n0 = context.shape[1] // P
    return norm.series(tokens[:, :, n0:])[:, :horizon]


@torch.no_grad()
def forecast_sliding(model: TimerXL, context: torch.Tensor, horizon: int) -> torch.Tensor:
    """The reference code's loop: each step re-normalises and recomputes the last L points."""
    P, L = model.cfg.patch_len, context.shape[1]
    window, out = context, []
    for _ in range(n_tokens(horizon, P)):
        norm = Norm.fit(window, model.cfg)
        tokens = norm.tokens(window, P)
        mean, _ = model(tokens, times_for(tokens.shape[0], 0, tokens.shape[2], tokens.device))
        patch = norm.series(mean[:, :, -1:])
        out.append(patch)
        window = torch.cat([window, patch], dim=1)[:, -L:]
    return torch.cat(out, dim=1)[:, :horizon]
