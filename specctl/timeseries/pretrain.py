"""Pretraining (or fine-tuning, from `train.init_from`) a Timer-XL target or draft on one dataset; the
rolling-forecast scores of the best epoch on the test split. Also the sweep runner of recipe searches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from specctl.core.backend import Say
from specctl.core.checkpoint import export_checkpoint, load_weights
from specctl.core.rundir import RunDir
from specctl.core.runtime import seed_everything
from specctl.core.train import FitResult
from specctl.timeseries.data import describe_split, load_series
from specctl.timeseries.evaluate import HorizonScore, evaluate_rolling, scores_to_dict
from specctl.timeseries.forecast import next_patch_loss, rollout_mse
from specctl.timeseries.model import count_parameters
from specctl.timeseries.profile import TimeseriesProfile
from specctl.timeseries.training import build_model, check_lookback, epoch_logger, train_timer, window_length

DEFINITIONS = {
    "best_val_loss": "validation loss of the best epoch (train.val_metric), the epoch whose weights are kept",
    "horizons": "per horizon H: test windows, MSE and MAE of the rolling forecast vs truth (scaled space), KV-cached "
                "growing context (`cached`) and the reference sliding-window loop (`sliding`)",
    "average": "mean over data.horizons of each mode's MSE and MAE",
    "split": "the split protocol of the data (data.split)",
    "history": "per epoch: train loss, validation metrics, learning rate, seconds",
}


@dataclass
class PretrainResult:
    definitions: ClassVar[dict[str, str]] = DEFINITIONS

    fit: FitResult
    scores: list[HorizonScore]
    parameters: int
    checkpoint: Path
    data_notes: list[str]
    split: str

    def metrics(self) -> dict[str, Any]:
        """metrics.json of a pretrain run: training history and the rolling-forecast scores."""
        return {
            "parameters": self.parameters,
            "epochs": self.fit.epochs_done,
            "best_val_loss": self.fit.best_val,
            "stopped_early": self.fit.stopped_early,
            "checkpoint": str(self.checkpoint),
            "data_notes": self.data_notes,
            "split": self.split,
            "history": self.fit.history,
            **scores_to_dict(self.scores),
        }


def pretrain(profile: TimeseriesProfile, device: torch.device, run: RunDir, resume: bool, progress=None,
             say: Say | None = None) -> PretrainResult:
    check_lookback(profile.data.lookback, profile.model.patch_len)
    seed_everything(profile.seed)  # the same initial weights whoever calls (a command, a chain, a sweep worker)
    data = load_series(profile.data, window_length(profile), extra_train=True,
                       horizon=max(profile.data.horizons))
    model = build_model(profile, data, device)
    lookback, train = profile.data.lookback, profile.train

    def loss(batch: torch.Tensor) -> torch.Tensor:
        value = next_patch_loss(model, batch, lookback, train.self_feed)
        if train.rollout_weight:
            value = value + train.rollout_weight * rollout_mse(model, batch, lookback)
        return value

    result = train_timer(profile, model, data, device, run, loss, resume, progress, epoch_logger(say))
    model.load_state_dict(load_weights(result.best_dir, device))
    model.eval()
    scores = evaluate_rolling(model, data.test, profile.data.lookback, profile.data.horizons,
                              profile.spec.batch_size, device, max_windows=profile.data.max_eval_windows,
                              progress=progress)
    save_to = profile.train.save_to
    checkpoint = export_checkpoint(result.best_dir, save_to) if save_to else result.best_dir
    return PretrainResult(result, scores, count_parameters(model), Path(checkpoint), data.notes,
                          describe_split(data))


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

    def __init__(self, profile: TimeseriesProfile, device: torch.device, progress=None) -> None:
        self.device, self.progress = device, progress

    def compatible(self, profile: TimeseriesProfile) -> bool:
        return True  # nothing is kept between trials

    def run(self, profile: TimeseriesProfile) -> dict[str, Any]:
        profile = profile.model_copy(update={"train": profile.train.model_copy(update={"save_to": None})})
        with RunDir.create(profile, "pretrain", str(self.device)) as run:
            result = pretrain(profile, self.device, run, False, self.progress)
            run.write_result(result)
            run.finish()
        return {**sweep_row(result.metrics()), "run_dir": str(run.path)}
