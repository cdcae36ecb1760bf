"""The part of a profile every kind shares: identity, seed, device, run root, the [train] table (both halves train
with the one loop in core/train.py), the data directory and the [sweep] grid.

Each half owns the rest of its profile (specctl/timeseries/profile.py, specctl/llm/profile.py) as a subclass of
`Profile`; the loader (core/profile.py) picks the subclass by `kind`. Unknown keys are rejected (`extra="forbid"`),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataLocation(Strict):
    """Where named data files are looked up: `data.dir`, else $SPECCTL_DATA_DIR (core/data_dir.py)."""

    dir: str | None = None


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    # the GLOBAL batch: under torchrun each of N processes takes batch_size / N of every batch (so it must be a
    # multiple of N) and the gradients are averaged, so N processes train as one would (core/distributed.py)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    patience: int = Field(3, ge=1)
    grad_clip: float | None = Field(None, gt=0.0)
    # linear lr warm-up over the run's first optimizer steps (deep post-norm stacks need it); 0 = off
    warmup_steps: int = Field(0, ge=0)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    max_val_batches: int | None = Field(None, ge=1)
    # the forward pass and loss of each optimizer step in bfloat16 autocast (weights, gradients, the optimizer and
    # validation stay fp32): a recent GPU's matrix units; fp32 is what every result before it used
    precision: Literal["fp32", "bf16"] = "fp32"
    # what picks pretrain's best epoch (distill always uses draft-vs-teacher MSE): teacher-forced next-patch MSE,
    # or the rolling forecast's MSE on the validation split (KV-cached, frozen statistics, averaged over
    # data.horizons), the metric the test split reports
    val_metric: Literal["next_patch", "rollout"] = "next_patch"
    # share of training windows whose tokens after the lookback are the model's own rolling forecast, as
    # generation feeds it (pretrain; against exposure bias in growing-context generation; docs/results.md)
    self_feed: float = Field(0.0, ge=0.0, le=1.0)
    # weight of a second loss term (pretrain): the MSE of the model's own rolling forecast over the window after
    # the lookback, with the gradient through every fed-back token (forecast.rollout_mse); ~steps x the compute
    rollout_weight: float = Field(0.0, ge=0.0)
    # exponential moving average of the trainable weights, updated every step; validation, checkpoints and the
    # exported model use the average (training keeps updating the raw weights). None = off
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0)
    init_from: str | None = None
    # fine-tuning a Timer-XL (pretrain, distill): train only the last N blocks, the final norm and the head;
    # the patch embedding and earlier blocks stay frozen (0 = the head alone). None = train everything
    tune_last_layers: int | None = Field(None, ge=0)
    save_to: str | None = None



class Profile(Strict):
    name: str = "run"
    description: str = ""
    kind: str = "timeseries"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    run_root: str = "runs"
    data: DataLocation = DataLocation()
    train: TrainConfig = TrainConfig()
    sweep: dict[str, list[Any]] = {}
    sweep_command: Literal["spec-test", "pretrain"] = "spec-test"  # what one sweep trial runs
    # how it was loaded (not profile keys): the file given (other profiles it names resolve from its folder first)
    # and the --set overrides (passed on to the profiles that build its missing checkpoints)
    _source: Path | None = PrivateAttr(None)
    _overrides: tuple[str, ...] = PrivateAttr(())

    @property
    def source(self) -> Path | None:
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        return self._overrides

    def ignored_keys(self) -> dict[str, str]:
        """Keys this profile's other settings make irrelevant, each with why (sweeping one measures timing noise
        only); each kind's profile knows its own."""
        return {}

    def loaded_from(self, source: Path | None, overrides: tuple[str, ...]) -> Profile:
        """Record where this profile came from (the loader calls it); returns self."""
        self._source, self._overrides = source, overrides
        return self

    @field_validator("sweep", mode="before")
    @classmethod
    def _dotted_sweep_keys(cls, table: Any) -> Any:
        """`spec.sigma = [...]` written unquoted in [sweep] parses as a nested table; flatten it to dotted keys."""
        if not isinstance(table, dict):
            return table
        flat: dict[str, Any] = {}
        for key, value in table.items():
            if isinstance(value, dict):
                for sub, inner in cls._dotted_sweep_keys(value).items():
                    flat[f"{key}.{sub}"] = inner
            else:
                flat[key] = value
        return flat
