"""What pretrain and distill share: the training window, the data loaders, building (or initialising) a Timer-XL
from a profile, and the time-series side of the one training loop (core/train.py).

Train as you generate: every window covers lookback + the longest horizon (rounded up to whole patches),
the loss covers every position, and normalisation statistics come from the lookback part only.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from specctl.core import distributed
from specctl.core.backend import Say
from specctl.core.errors import SpecctlError
from specctl.core.rundir import RunDir
from specctl.core.train import FitResult, Task, fit
from specctl.timeseries.builders import training_command
from specctl.timeseries.data import SeriesData, Windows
from specctl.timeseries.evaluate import evaluate_rolling
from specctl.timeseries.forecast import n_tokens, next_patch_loss
from specctl.timeseries.model import (
    TimerXL,
    checkpoint_config,
    freeze_early_layers,
    init_logvar_head,
    load_timer,
    scaled_config,
)
from specctl.timeseries.profile import TimeseriesProfile


def window_length(profile: TimeseriesProfile) -> int:
    """lookback + the longest horizon in whole patches: the longest context generation will reach."""
    P = profile.model.patch_len
    return profile.data.lookback + n_tokens(max(profile.data.horizons), P) * P


def check_lookback(lookback: int, patch_len: int, source: str = "model.patch_len") -> None:
    """The lookback must be whole patches (`source` names where the patch length comes from)."""
    if lookback % patch_len:
        raise SpecctlError(f"data.lookback {lookback} is not a multiple of {source} {patch_len}")


def loader(arrays: list[np.ndarray], length: int, batch_size: int, shuffle: bool, seed: int,
           shard: bool = False) -> DataLoader:
    """Batches of stride-1 windows from all `arrays` (the train split and data.extra_train, or the val split). With
    `shard` under torchrun: this process's part of each batch one process would draw (core/distributed.py)."""
    generator = torch.Generator().manual_seed(seed)
    windows = ConcatDataset([Windows(a, length) for a in arrays])
    if not shard or distributed.world_size() == 1:
        return DataLoader(windows, batch_size=batch_size, shuffle=shuffle, generator=generator)
    # the same sampler and generator over the indices give exactly one process's batches, to be split
    whole = DataLoader(range(len(windows)), batch_size=batch_size, shuffle=shuffle, generator=generator)
    return DataLoader(windows, batch_sampler=list(distributed.shard_batches(b.tolist() for b in whole)))


def build_model(profile: TimeseriesProfile, data: SeriesData, device: torch.device) -> TimerXL:
    """A fresh model at the profile's (scaled) size, initialised from `train.init_from` if set."""
    model = TimerXL(scaled_config(profile.model, data.n_vars))
    init_logvar_head(model)
    if profile.train.init_from:
        try:
            load_into(model, profile.train.init_from)
        except SpecctlError as e:
            command = None if Path(profile.train.init_from).exists() else training_command(profile.train.init_from)
            hint = f" (train it first: {command})" if command else ""
            raise SpecctlError(f"train.init_from: {e}{hint}") from None
    return model.to(device)


def load_into(model: TimerXL, ref: str) -> None:
    """Copy a checkpoint's weights into `model`; sizes must match, the head may differ in stochasticity. The
    variable count may differ (no weight depends on it), so a model pretrained on one dataset starts another."""
    source, _ = load_timer(ref)
    keys = ("patch_len", "d_model", "n_heads", "d_ff", "e_layers", "norm_position", "rope_fraction", "activation",
            "layer_scale")
    differ = [f"{k} {getattr(source.cfg, k)} (profile: {getattr(model.cfg, k)})" for k in keys
              if getattr(source.cfg, k) != getattr(model.cfg, k)]
    if differ:
        raise SpecctlError(f"checkpoint {ref} does not match the profile: " + ", ".join(differ))
    own = model.state_dict()
    with torch.no_grad():
        for key, value in source.state_dict().items():
            n = min(value.shape[0], own[key].shape[0])  # a head's mean half is shared by both head kinds
            own[key][:n].copy_(value[:n])


def train_timer(
    profile: TimeseriesProfile, model: TimerXL, data: SeriesData, device: torch.device, run: RunDir,
    loss_fn, resume: bool, progress, on_epoch_end=None, extra_validation=None, validate_batches=None,
    config: dict | None = None,
) -> FitResult:
    """The time-series side of `fit`: windows, validation, checkpoint config (default: Timer-XL's). `validate_batches(
    batches)` maps the validation windows (on `device`, at most train.max_val_batches batches) to metrics whose
    `val_loss` picks the best checkpoint; by default that is the next-patch MSE against the truth, or with
    train.val_metric = "rollout" the rolling forecast's average MSE over the horizons."""
    length, lookback, train = window_length(profile), profile.data.lookback, profile.train
    val_loader = loader([data.val], length, train.batch_size, False, profile.seed)

    def truth_loss(batches: Iterable[torch.Tensor]) -> dict[str, float]:
        return {"val_loss": float(np.mean([next_patch_loss(model, batch, lookback).item() for batch in batches]))}

    def rollout_loss(batches: Iterable[torch.Tensor]) -> dict[str, float]:
        windows = train.max_val_batches * train.batch_size if train.max_val_batches else None
        scores = evaluate_rolling(model, data.val, lookback, profile.data.horizons, profile.spec.batch_size, device,
                                  modes=("cached",), max_windows=windows)
        rollout = float(np.mean([s.mse["cached"] for s in scores]))
        return {"val_loss": rollout, "val_next_patch": truth_loss(batches)["val_loss"]}

    default = rollout_loss if train.val_metric == "rollout" else truth_loss

    def validate() -> dict[str, float]:
        batches = (batch.to(device) for batch in islice(val_loader, train.max_val_batches))
        metrics = (validate_batches or default)(batches)
        return {**metrics, **(extra_validation() if extra_validation else {})}

    freeze_early_layers(model, train.tune_last_layers)
    task = Task(model, model.parameters(), lambda batch: loss_fn(batch.to(device)),
                lambda epoch: loader([data.train, *data.extra_train], length, train.batch_size, True,
                                     profile.seed + epoch, shard=True),
                validate, config or checkpoint_config(model, lookback, data.columns, profile.model_dump()))
    return fit(task, train, run.checkpoints, resume, progress, on_epoch_end)



def epoch_logger(say: Say | None, extra=None):
    """An on_epoch_end callback printing one line per epoch (train and validation loss, `extra(record)` appended)."""
    if say is None:
        return None

    def log(epoch: int, record: dict) -> None:
        tail = extra(record) if extra else ""
        say(f"epoch {epoch}: train {record['train_loss']:.4f}  val {record['val_loss']:.4f}{tail}  "
            f"({record['seconds']:.1f}s)")

    return log
