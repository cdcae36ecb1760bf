"""The one training loop: pretrain, distill and finetune-head all call `fit`.

Checkpoints under ckpt_dir: `last/` after every epoch (what --resume continues from), `best/` whenever the
validation loss improves, `interrupted/` when Ctrl-C stops training mid-epoch (usable weights, not resumed).
With train.ema_decay every one of them holds the weight average, and `last/` adds the raw weights training
continues from (`training_weights.safetensors`).

Under torchrun the same loop runs in every process (core/distributed.py): gradients and validation metrics are
averaged over the processes, and only rank 0 writes checkpoints.
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

from specctl.core import distributed
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


@dataclass
class Task:
    """What `fit` trains: the model and its trainable parameters, the loss of a batch, the batches of an epoch, the
    validation metrics (`val_loss` picks the best epoch), and what every checkpoint saves (config.json, and the
    weights: by default the model's state dict)."""

    model: nn.Module
    params: Iterable[nn.Parameter]
    loss: Callable[[Any], torch.Tensor]
    batches: Callable[[int], Iterable[Any]]
    validate: Callable[[], dict[str, float]]
    config: dict[str, Any]
    weights: Callable[[], dict[str, torch.Tensor]] | None = None


class Trainer:
    """The epoch loop: optimizer steps with the lr schedule (and the weight average), validation, early stopping,
    and the checkpoints of the module docstring; --resume continues from `last/` exactly."""

    def __init__(self, task: Task, cfg: TrainConfig, ckpt_dir: Path, progress=None,
                 on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> None:
        distributed.check_batch(cfg.batch_size)
        self.task, self.cfg, self.progress, self.on_epoch_end = task, cfg, progress, on_epoch_end
        self.params = [p for p in task.params if p.requires_grad]
        self.device_type = next(task.model.parameters()).device.type
        self.optimizer = make_optimizer(self.params, cfg)
        self.weights = task.weights or task.model.state_dict
        self.ckpt_dir = Path(ckpt_dir)
        self.last_dir, self.best_dir = self.ckpt_dir / "last", self.ckpt_dir / "best"
        self.result = FitResult(best_val=math.inf, epochs_done=0, stopped_early=False, interrupted=False,
                                best_dir=self.best_dir, last_dir=self.last_dir)
        self.bad_epochs, self.optimizer_steps = 0, 0
        self.average = WeightAverage(self.params, cfg.ema_decay) if cfg.ema_decay is not None else None
        self.task_id = None

    def restore(self) -> None:
        """Continue from `last/`: weights, optimizer, weight average, history and counters."""
        if distributed.is_main():
            for folder in (self.last_dir, self.best_dir):
                recover_dir(folder)  # a save cut off between its two renames
        distributed.barrier()
        if not (self.last_dir / "state.json").is_file():
            raise SpecctlError(f"--resume: no finished epoch to resume from in {self.last_dir}")
        state = load_state(self.last_dir)
        model = self.task.model
        model.load_state_dict(load_weights(self.last_dir, next(model.parameters()).device), strict=False)
        restore_optimizer(self.optimizer, self.last_dir)
        if self.average is not None:
            if not (self.last_dir / RAW_WEIGHTS).is_file():
                raise SpecctlError(f"--resume: {self.last_dir} was trained without train.ema_decay; resume without it")
            self.average.restore(self.last_dir)
        self.result.epochs_done, self.result.best_val = state["epoch"], state["best_val"]
        self.result.history, self.bad_epochs = state["history"], state["bad_epochs"]
        self.optimizer_steps = state.get("optimizer_steps", 0)
        self.result.stopped_early = bool(state.get("stopped_early"))

    def step(self, batch: Any, epoch: int, steps: int) -> float:
        """One optimizer step; returns the batch's loss (under torchrun: the global batch's)."""
        cfg = self.cfg
        with torch.autocast(self.device_type, torch.bfloat16, enabled=cfg.precision == "bf16"):
            loss = self.task.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = distributed.average_gradients(self.params, loss)
        if not math.isfinite(value):
            raise SpecctlError(f"training diverged: loss is {value} at epoch {epoch + 1}, "
                               f"step {steps + 1} (lower train.lr or set train.grad_clip)")
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(cfg, epoch, self.optimizer_steps)
        self.optimizer.step()
        self.optimizer_steps += 1
        if self.average is not None:
            self.average.update()
        return value

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """Every batch of an epoch (at most train.max_steps_per_epoch); returns (summed loss, steps). Ctrl-C saves
        the weights so far under `interrupted/`."""
        cfg, progress = self.cfg, self.progress
        self.task.model.train()
        limit = cfg.max_steps_per_epoch
        batches = list(self.task.batches(epoch)) if limit is None else self.task.batches(epoch)
        if progress is not None:
            progress.reset(self.task_id, total=len(batches) if limit is None else limit,
                           description=f"epoch {epoch + 1}/{cfg.epochs}", info="")
        total, steps = 0.0, 0
        try:
            for batch in batches:
                total, steps = total + self.step(batch, epoch, steps), steps + 1
                if progress is not None:
                    progress.update(self.task_id, advance=1, info=f"loss {total / steps:.4f}")
                if limit is not None and steps >= limit:
                    break
        except KeyboardInterrupt:
            if self.average is not None:
                self.average.swap()
            if distributed.is_main():
                save_checkpoint(self.ckpt_dir / "interrupted", self.weights(), self.task.config,
                                state={"epoch": epoch, "partial": True})
            self.result.interrupted = True
            raise
        return total, steps

    def end_epoch(self, epoch: int, total: float, steps: int, started: float) -> dict[str, float]:
        """Validate (on the weight average, if any), record, save `best/` if it improved and `last/` always."""
        cfg, result = self.cfg, self.result
        if self.average is not None:
            self.average.swap()
        self.task.model.eval()
        with torch.no_grad():
            metrics = distributed.mean_metrics(self.task.validate())
        record = {"epoch": epoch + 1, "train_loss": total / max(steps, 1), **metrics,
                  "lr": learning_rate(cfg, epoch), "seconds": time.perf_counter() - started}
        result.history.append(record)
        result.epochs_done = epoch + 1
        improved = metrics["val_loss"] < result.best_val
        if improved:
            result.best_val, self.bad_epochs = metrics["val_loss"], 0
        else:
            self.bad_epochs += 1
        result.stopped_early = self.bad_epochs >= cfg.patience
        self.save(epoch, improved)
        if self.average is not None:
            self.average.swap()
        return record

    def save(self, epoch: int, improved: bool) -> None:
        """`best/` if the epoch improved, `last/` always: written by rank 0 alone, and no process goes on (and may
        read them) before they are whole."""
        result = self.result
        if distributed.is_main():
            if improved:
                save_checkpoint(self.best_dir, self.weights(), self.task.config,
                                state={"epoch": epoch + 1, "val_loss": result.best_val})
            raw = {RAW_WEIGHTS: self.average.raw_weights()} if self.average is not None else None
            save_checkpoint(self.last_dir, self.weights(), self.task.config, self.optimizer, extra=raw, state={
                "epoch": epoch + 1, "best_val": result.best_val, "bad_epochs": self.bad_epochs,
                "history": result.history, "stopped_early": result.stopped_early,
                "optimizer_steps": self.optimizer_steps,
                **({"ema_updates": self.average.updates} if self.average is not None else {}),
            })
        distributed.barrier()

    def fit(self, resume: bool = False) -> FitResult:
        if resume:
            self.restore()
            if self.result.stopped_early:
                return self.result
        distributed.synchronize_start(self.task.model)
        if self.progress is not None:
            self.task_id = self.progress.add_task("train", total=None, info="")
        for epoch in range(self.result.epochs_done, self.cfg.epochs):
            started = time.perf_counter()
            total, steps = self.train_epoch(epoch)
            record = self.end_epoch(epoch, total, steps, started)
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch + 1, record)
            if self.result.stopped_early:
                break
        if self.progress is not None:
            self.progress.remove_task(self.task_id)
        return self.result


def fit(task: Task, cfg: TrainConfig, ckpt_dir: Path, resume: bool = False, progress=None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Train `task` under `cfg`, checkpointing into `ckpt_dir` (see Trainer)."""
    return Trainer(task, cfg, ckpt_dir, progress, on_epoch_end).fit(resume)
