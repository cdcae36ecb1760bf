"""Pretraining (or fine-tuning, from `train.init_from`) a Timer-XL target or draft on one dataset.

Train as you generate: every window covers lookback + the longest horizon (rounded up to whole patches),
the loss covers every position, and normalisation statistics come from the lookback part only.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader

from specctl.core.checkpoint import load_weights
from specctl.timeseries.data import SeriesData, Windows, load_series
from specctl.core.errors import SpecctlError
from specctl.timeseries.evaluate import HorizonScore, evaluate_rolling
from specctl.core.files import replace_dir, staging_dir
from specctl.timeseries.forecast import n_tokens, next_patch_loss, rollout_mse
from specctl.timeseries.model import (
    TimerXL,
    checkpoint_config,
    count_parameters,
    freeze_early_layers,
    init_logvar_head,
    load_timer,
    scaled_config,
)
from specctl.core.profile import training_command
from specctl.timeseries.report import scores_to_dict
from specctl.core.rundir import RunDir
from specctl.core.runtime import seed_everything
from specctl.core.schema import Profile
from specctl.core.train import FitResult, fit


@dataclass
class PretrainResult:
    fit: FitResult
    scores: list[HorizonScore]
    parameters: int
    checkpoint: Path
    data_notes: list[str]

    def metrics(self) -> dict[str, Any]:
        """metrics.json of a pretrain run: training history and the rolling-forecast scores."""
        return {
            "parameters": self.parameters,
            "epochs": self.fit.epochs_done,
            "best_val_loss": self.fit.best_val,
            "stopped_early": self.fit.stopped_early,
            "checkpoint": str(self.checkpoint),
            "data_notes": self.data_notes,
            "history": self.fit.history,
            **scores_to_dict(self.scores),
        }


def window_length(profile: Profile) -> int:
    """lookback + the longest horizon in whole patches: the longest context generation will reach."""
    P = profile.model.patch_len
    return profile.data.lookback + n_tokens(max(profile.data.horizons), P) * P


def check_lookback(lookback: int, patch_len: int, source: str = "model.patch_len") -> None:
    """The lookback must be whole patches (`source` names where the patch length comes from)."""
    if lookback % patch_len:
        raise SpecctlError(f"data.lookback {lookback} is not a multiple of {source} {patch_len}")


def loader(arrays: list[np.ndarray], length: int, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches of stride-1 windows from all `arrays` (the train split and data.extra_train, or the val split)."""
    generator = torch.Generator().manual_seed(seed)
    windows = ConcatDataset([Windows(a, length) for a in arrays])
    return DataLoader(windows, batch_size=batch_size, shuffle=shuffle, generator=generator)


def build_model(profile: Profile, data: SeriesData, device: torch.device) -> TimerXL:
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
    profile: Profile, model: TimerXL, data: SeriesData, device: torch.device, run: RunDir,
    loss_fn, resume: bool, progress, on_epoch_end=None, extra_validation=None, validate_batches=None,
) -> FitResult:
    """The time-series side of `fit`: windows, validation, checkpoint config. `validate_batches(batches)` maps the
    validation windows (on `device`, at most train.max_val_batches batches) to metrics whose `val_loss` picks the
    best checkpoint; by default that is the next-patch MSE against the truth, or with train.val_metric = "rollout"
    the rolling forecast's average MSE over the horizons."""
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
    return fit(
        model, model.parameters(), lambda batch: loss_fn(batch.to(device)),
        lambda epoch: loader([data.train, *data.extra_train], length, train.batch_size, True, profile.seed + epoch),
        validate, train, run.checkpoints,
        checkpoint_config(model, lookback, data.columns, profile.model_dump()),
        resume=resume, progress=progress, on_epoch_end=on_epoch_end,
    )


def export(best: Path, target: str) -> Path:
    """Copy the best checkpoint to a stable path (train.save_to), replacing any older copy atomically."""
    staging = staging_dir(Path(target))
    shutil.copytree(best, staging, dirs_exist_ok=True)
    return replace_dir(staging, Path(target))


def pretrain(profile: Profile, device: torch.device, run: RunDir, resume: bool, progress=None,
             on_epoch_end=None) -> PretrainResult:
    check_lookback(profile.data.lookback, profile.model.patch_len)
    seed_everything(profile.seed)  # the same initial weights whoever calls (a command, a sweep worker)
    data = load_series(profile.data, window_length(profile), extra_train=True)
    model = build_model(profile, data, device)
    lookback, train = profile.data.lookback, profile.train

    def loss(batch: torch.Tensor) -> torch.Tensor:
        value = next_patch_loss(model, batch, lookback, train.self_feed)
        if train.rollout_weight:
            value = value + train.rollout_weight * rollout_mse(model, batch, lookback)
        return value

    result = train_timer(profile, model, data, device, run, loss, resume, progress, on_epoch_end)
    model.load_state_dict(load_weights(result.best_dir, device))
    model.eval()
    scores = evaluate_rolling(model, data.test, profile.data.lookback, profile.data.horizons,
                              profile.spec.batch_size, device, max_windows=profile.data.max_eval_windows,
                              progress=progress)
    checkpoint = export(result.best_dir, profile.train.save_to) if profile.train.save_to else result.best_dir
    return PretrainResult(result, scores, count_parameters(model), checkpoint, data.notes)


def sweep_row(metrics: dict[str, Any]) -> dict[str, Any]:
    """A pretrain run's metrics as flat CSV columns: average and per-horizon MSE/MAE (cached, and `_sliding`)."""
    row = {k: metrics[k] for k in ("best_val_loss", "epochs", "stopped_early", "parameters", "checkpoint")}
    for mode, suffix in (("cached", ""), ("sliding", "_sliding")):
        row.update({f"{k}{suffix}": v for k, v in metrics["average"][mode].items()})
        row.update({f"mse{suffix}_{h['horizon']}": h["mse"][mode] for h in metrics["horizons"]})
    return row


class PretrainSession:
    """The sweep runner for `sweep_command = "pretrain"` (recipe search): each trial is one pretrain run with
    its own run directory. Trials never export to `train.save_to` (parallel trials would overwrite each
    other); the `checkpoint` column names each trial's best checkpoint instead."""

    def __init__(self, profile: Profile, device: torch.device, progress=None) -> None:
        if profile.kind != "timeseries":
            raise SpecctlError(f'sweep_command = "pretrain" runs time-series recipes; profile kind is {profile.kind}')
        self.device, self.progress = device, progress

    def compatible(self, profile: Profile) -> bool:
        return True  # nothing is kept between trials

    def run(self, profile: Profile) -> dict[str, Any]:
        profile = profile.model_copy(update={"train": profile.train.model_copy(update={"save_to": None})})
        with RunDir.create(profile, "pretrain", str(self.device)) as run:
            metrics = pretrain(profile, self.device, run, resume=False, progress=self.progress).metrics()
            run.write_json("metrics.json", metrics)
            run.finish()
        return {**sweep_row(metrics), "run_dir": str(run.path)}
