"""The one training loop: pretrain, distill and finetune-head all call `fit`.

Checkpoints under ckpt_dir: `last/` after every epoch (what --resume continues from), `best/` whenever the
validation loss improves, `interrupted/` when Ctrl-C stops training mid-epoch (usable weights, not resumed).
With train.ema_decay every one of them holds the weight average, and `last/` adds the raw weights training
continues from (`training_weights.safetensors`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from specctl.core.checkpoint import (
    load_state,
    load_tensors,
    load_weights,
    restore_optimizer,
    save_checkpoint,
)
from specctl.core.errors import SpecctlError
from specctl.core.files import recover_dir
from specctl.core.schema import TrainConfig


@dataclass
class FitResult:
    best_val: float
    epochs_done: int
    stopped_early: bool
    interrupted: bool
    history: list[dict[str, float]] = field(default_factory=list)
    best_dir: Path | None = None
    last_dir: Path | None = None


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def learning_rate(cfg: TrainConfig, epoch: int, step: int | None = None) -> float:
    """lr for a 0-based epoch: step decays by step_gamma each epoch; cosine anneals to 0 over all epochs. Given
    the run's 0-based optimizer step, the first train.warmup_steps steps ramp it up linearly."""
    if cfg.schedule == "step":
        lr = cfg.lr * cfg.step_gamma**epoch
    elif cfg.schedule == "cosine":
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    else:
        lr = cfg.lr
    if step is not None and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps  # lr_t = lr * (t + 1) / warmup_steps
    return lr


RAW_WEIGHTS = "training_weights.safetensors"


class WeightAverage:
    """Exponential moving average of `params` (train.ema_decay). `swap()` exchanges the model's weights and the
    average in place, so validation and checkpoints see the average and training resumes on the raw weights."""

    def __init__(self, params: list[nn.Parameter], decay: float) -> None:
        self.params, self.decay, self.updates = params, decay, 0
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        # average += (1 - d) * (param - average), d warmed up as (1 + n) / (10 + n) so the start is soon forgotten
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def swap(self) -> None:
        for param, average in zip(self.params, self.average):
            raw = param.detach().clone()
            param.copy_(average)
            average.copy_(raw)

    def raw_weights(self) -> dict[str, torch.Tensor]:
        """While swapped in: the raw weights, by parameter index (what `last/` adds for --resume)."""
        return {str(i): t for i, t in enumerate(self.average)}

    @torch.no_grad()
    def restore(self, folder: Path) -> None:
        """After loading `folder`'s averaged weights into the model: the average from them, the raw weights from
        the file `raw_weights` wrote."""
        raw = load_tensors(folder / RAW_WEIGHTS, self.params[0].device, "raw training weights")
        for i, (param, average) in enumerate(zip(self.params, self.average)):
            average.copy_(param)
            param.copy_(raw[str(i)])
        self.updates = int(load_state(folder).get("ema_updates", 0))


def fit(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    train_loss: Callable[[Any], torch.Tensor],
    train_batches: Callable[[int], Iterable[Any]],
    validate: Callable[[], dict[str, float]],
    cfg: TrainConfig,
    ckpt_dir: Path,
    config: dict[str, Any],
    weights: Callable[[], dict[str, torch.Tensor]] | None = None,
    resume: bool = False,
    progress=None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    params = [p for p in params if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    weights = weights or model.state_dict
    ckpt_dir = Path(ckpt_dir)
    last_dir, best_dir = ckpt_dir / "last", ckpt_dir / "best"
    result = FitResult(best_val=math.inf, epochs_done=0, stopped_early=False, interrupted=False,
                       best_dir=best_dir, last_dir=last_dir)
    bad_epochs, optimizer_steps = 0, 0
    average = WeightAverage(params, cfg.ema_decay) if cfg.ema_decay is not None else None
    if resume:
        for folder in (last_dir, best_dir):
            recover_dir(folder)  # a save cut off between its two renames
        if not (last_dir / "state.json").is_file():
            raise SpecctlError(f"--resume: no finished epoch to resume from in {last_dir}")
        state = load_state(last_dir)
        model.load_state_dict(load_weights(last_dir, next(model.parameters()).device), strict=False)
        restore_optimizer(optimizer, last_dir)
        if average is not None:
            if not (last_dir / RAW_WEIGHTS).is_file():
                raise SpecctlError(f"--resume: {last_dir} was trained without train.ema_decay; resume without it")
            average.restore(last_dir)
        result.epochs_done, result.best_val = state["epoch"], state["best_val"]
        result.history, bad_epochs = state["history"], state["bad_epochs"]
        optimizer_steps = state.get("optimizer_steps", 0)
        if state.get("stopped_early"):
            result.stopped_early = True
            return result

    task = progress.add_task("train", total=None, info="") if progress is not None else None
    for epoch in range(result.epochs_done, cfg.epochs):
        model.train()
        started, total, steps = time.perf_counter(), 0.0, 0
        batches = list(train_batches(epoch)) if cfg.max_steps_per_epoch is None else None
        if progress is not None:
            n = len(batches) if batches is not None else cfg.max_steps_per_epoch
            progress.reset(task, total=n, description=f"epoch {epoch + 1}/{cfg.epochs}", info="")
        try:
            for batch in batches if batches is not None else train_batches(epoch):
                loss = train_loss(batch)
                if not torch.isfinite(loss):
                    raise SpecctlError(f"training diverged: loss is {loss.item()} at epoch {epoch + 1}, "
                                       f"step {steps + 1} (lower train.lr or set train.grad_clip)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, epoch, optimizer_steps)
                optimizer.step()
                optimizer_steps += 1
                if average is not None:
                    average.update()
                total, steps = total + loss.item(), steps + 1
                if progress is not None:
                    progress.update(task, advance=1, info=f"loss {total / steps:.4f}")
                if cfg.max_steps_per_epoch is not None and steps >= cfg.max_steps_per_epoch:
                    break
        except KeyboardInterrupt:
            if average is not None:
                average.swap()
            save_checkpoint(ckpt_dir / "interrupted", weights(), config, state={"epoch": epoch, "partial": True})
            result.interrupted = True
            raise
        if average is not None:
            average.swap()
        model.eval()
        with torch.no_grad():
            metrics = validate()
        record = {"epoch": epoch + 1, "train_loss": total / max(steps, 1), **metrics,
                  "lr": learning_rate(cfg, epoch), "seconds": time.perf_counter() - started}
        result.history.append(record)
        result.epochs_done = epoch + 1
        improved = metrics["val_loss"] < result.best_val
        if improved:
            result.best_val, bad_epochs = metrics["val_loss"], 0
            save_checkpoint(best_dir, weights(), config, state={"epoch": epoch + 1, "val_loss": metrics["val_loss"]})
        else:
            bad_epochs += 1
        result.stopped_early = bad_epochs >= cfg.patience
        raw = {RAW_WEIGHTS: average.raw_weights()} if average is not None else None
        save_checkpoint(last_dir, weights(), config, optimizer, extra=raw, state={
            "epoch": epoch + 1, "best_val": result.best_val, "bad_epochs": bad_epochs,
            "history": result.history, "stopped_early": result.stopped_early, "optimizer_steps": optimizer_steps,
            **({"ema_updates": average.updates} if average is not None else {}),
        })
        if average is not None:
            average.swap()
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        if result.stopped_early:
            break
    if progress is not None:
        progress.remove_task(task)
    return result
