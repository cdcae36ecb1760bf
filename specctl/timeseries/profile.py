"""The time-series sections of a profile ([data], [model], [distill], [spec]) and the profile they make.

The seeds' flag names map onto these fields: spec_k -> spec.k, spec_sigma -> spec.sigma,
spec_accept_bias -> spec.bias, draft_teacher_noise -> distill.teacher_noise,
draft_nll_var_reg -> distill.var_reg, draft_teacher_dropout -> distill.teacher_dropout,
draft_scale_* -> model.scale_*, draft_stochastic -> model.stochastic, input_token_len -> model.patch_len,
seq_len -> data.lookback, test_pred_len -> data.horizons, e_layers -> model.e_layers.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from specctl.core.schema import DataLocation, Profile, Strict


class SyntheticConfig(Strict):
    """The embedded generator: seasonalities, trend, noise and cross-variable coupling."""

    n_vars: int = Field(3, ge=1)
    length: int = Field(10000, ge=16)
    periods: list[float] = [24.0, 168.0]
    trend: float = 0.5
    noise: float = Field(0.1, ge=0.0)
    coupling: float = Field(0.3, ge=0.0, le=1.0)
    seed: int = 0


class ExtraTrainSet(Strict):
    """Another series whose train split is added to the training windows (never to validation or test).

    `every` = n keeps every n-th row and makes each of the n phases its own series: ETTm1 (15 min) at
    every = 4 is ETTh1's hourly grid (phase 0 equals ETTh1 row for row) and three copies shifted by 15, 30
    and 45 minutes, over the same months as ETTh1's train split."""

    name: str
    path: str | None = None
    every: int = Field(1, ge=1)


class DataConfig(DataLocation):
    name: str = "synthetic"
    path: str | None = None
    lookback: int = Field(672, gt=0)
    horizons: list[int] = [96, 192, 336, 720]
    # the split protocol: "auto" takes ETT's fixed borders for files named ETTh*/ETTm* and 70/10/20 for the rest
    split: Literal["auto", "ett-hourly", "ett-15min", "ratio-70-10-20"] = "auto"
    missing: Literal["interpolate", "error"] = "interpolate"
    sentinels: list[float] = [-9999.0]
    max_eval_windows: int | None = Field(None, gt=0)
    synthetic: SyntheticConfig = SyntheticConfig()
    extra_train: list[ExtraTrainSet] = []

    @field_validator("horizons")
    @classmethod
    def _positive_horizons(cls, horizons: list[int]) -> list[int]:
        if not horizons or any(h <= 0 for h in horizons):
            raise ValueError("every horizon must be a positive integer")
        return horizons


class ModelConfig(Strict):
    """Timer-XL. A draft is the same architecture with the scale_* factors applied to these sizes."""

    patch_len: int = Field(96, gt=0)
    d_model: int = Field(1024, gt=0)
    n_heads: int = Field(8, gt=0)
    d_ff: int = Field(2048, gt=0)
    e_layers: int = Field(1, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    scale_d_model: float = Field(1.0, gt=0.0)
    scale_n_heads: float = Field(1.0, gt=0.0)
    scale_d_ff: float = Field(1.0, gt=0.0)
    scale_e_layers: float = Field(1.0, gt=0.0)
    stochastic: bool = False
    # centre of the frozen instance normalisation: the lookback's mean (the paper), or the mean of its last
    # patch, the level the forecast starts from (robust to level shifts, like NLinear's last-value subtraction)
    norm_center: Literal["mean", "last_patch"] = "mean"
    # LayerNorm before each sublayer (pre) or after each residual sum, as the reference code's TimerLayer (post)
    norm_position: Literal["pre", "post"] = "pre"
    # share of each head's channels that RoPE rotates (the reference code rotates half; the rest carry no
    # position, so attention on them is by content alone) and the feed-forward activation (the reference: relu)
    rope_fraction: float = Field(1.0, gt=0.0, le=1.0)
    activation: Literal["gelu", "relu"] = "gelu"
    # stochastic depth for deep targets on small data: in training, each sample skips a layer's residual
    # branches with a probability rising linearly from 0 (first layer) to drop_path (last); 0 = off
    drop_path: float = Field(0.0, ge=0.0, lt=1.0)
    # LayerScale: initial value of a learned per-channel gain on every residual branch (e.g. 0.1); None = off
    layer_scale: float | None = Field(None, gt=0.0)
    # each variable attends only to its own past (the univariate Timer, PatchTST's channel independence): one
    # model for every variable, which cannot fit cross-variable patterns of a small training set
    channel_independent: bool = False
    logvar_min: float = -10.0
    logvar_max: float = 4.0


class DistillConfig(Strict):
    target: str | None = None
    loss: Literal["mse", "nll"] = "mse"
    var_reg: float = Field(0.01, ge=0.0)
    teacher_noise: float = Field(0.05, ge=0.0)
    teacher_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    alpha_truth: float = Field(0.0, ge=0.0, le=1.0)
    # share of training windows whose tokens after the lookback are the target's own rolling forecast (on-policy,
    # as DistillSpec for LLMs): the draft learns the target's next token in the context decoding will give it
    on_policy: float = Field(0.0, ge=0.0, le=1.0)
    mse_warn: float = Field(0.6, gt=0.0)
    sigmas: list[float] = [0.1, 0.25, 0.5]
    # early-exit self-speculation: the draft is the target's own first exit_layer blocks (frozen, never copied, and
    # sharing the target's KV cache when decoding) and an exit head (final norm + linear to the patch, started from
    # the target's own) that distill trains alone; model.stochastic gives the head a variance, the other model.*
    # sizes are not read, and the checkpoint is the head only, usable with this target alone. None: a separate draft
    exit_layer: int | None = Field(None, ge=1)
    # hidden width of a zero-initialised residual MLP before the exit head's norm (0: none)
    exit_adapter: int = Field(0, ge=0)


class SpecConfig(Strict):
    target: str | None = None
    draft: str | None = None
    target_profile: str | None = None
    draft_profile: str | None = None
    # draft tokens per round (the most, with adaptive_k); 0 drafts nothing and runs the target's own loop (what a
    # fidelity budget chooses when no setting within it is predicted to pay)
    k: int = Field(3, ge=0)
    rule: Literal["gaussian", "exact", "tolerance"] = "gaussian"
    sigma: float = Field(0.25, gt=0.0)
    bias: float = Field(1.0, ge=1.0)
    tol: float = Field(0.1, ge=0.0)
    # the tolerance as a share of the target's own per-token RMSE to the truth on validation windows (replaces tol:
    # one value means the same strictness on every dataset)
    tol_relative: float | None = Field(None, ge=0.0)
    # the units tol (and the RMSE tol_relative is a share of) are in: "data", the dataset's scaled units; "window",
    # each window's own (a token's values over its context's per-variable std, the units the models decode in), so a
    # volatile window is held to its own scale (ETTh1's validation windows are 1.46x as volatile as its test windows
    # in scaled units: median context std 1.05 against 0.72)
    tol_units: Literal["data", "window"] = "data"
    emit: Literal["target_mean", "draft_mean", "sample"] = "target_mean"
    # the target's prefill emits the forecast's first token (its mean; a sample where the exact rule emits samples)
    # and rounds draft from the second: a draft is furthest from the target at the first token (ETTm1's small draft:
    # RMSE 0.23 there against 0.13-0.17 later), and the prefill computes the target's prediction there anyway; false
    # drafts from the first token (every measurement before 2026-12-03's sixth run)
    target_opens: bool = True
    horizon: int | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)
    max_windows: int | None = Field(None, gt=0)
    repeats: int = Field(3, ge=1)
    warmup: int = Field(1, ge=0)
    dtype: Literal["fp32", "bf16"] = "fp32"
    cuda_graphs: bool = True
    graph_rounds: bool = False  # replay each whole round as one CUDA graph (checked against eager rounds first)
    # per round, the draft length 0..k that finishes the forecast soonest at the measured round costs and the batch's
    # running acceptance (0: a plain target step, so a setting that cannot pay falls back to target-only decoding)
    adaptive_k: bool = False
    # choose tol (as tol_relative) and k on validation windows: the fastest predicted setting among
    # budget_tolerances x budget_ks whose validation MSE is within this share of the target's (e.g. 0.01 = +1%)
    fidelity_budget: float | None = Field(None, ge=0.0)
    budget_tolerances: list[float] = [0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0]
    budget_ks: list[int] = []  # empty: spec.k only
    exact_max_tries: int = Field(100, ge=1)
    sliding_baseline: bool = True

    @model_validator(mode="after")
    def _exact_is_exact(self) -> SpecConfig:
        if self.rule == "exact" and self.bias != 1.0:
            raise ValueError("rule 'exact' means bias 1 (set spec.bias = 1 or choose rule 'gaussian')")
        if self.fidelity_budget is not None and self.rule != "tolerance":
            raise ValueError('spec.fidelity_budget chooses a tolerance: set spec.rule = "tolerance"')
        if self.rule == "exact" and self.emit != "sample":
            raise ValueError("rule 'exact' preserves the target's distribution only for emitted samples: set "
                             'spec.emit = "sample" (or choose rule "gaussian" or "tolerance")')
        return self



class TimeseriesProfile(Profile):
    kind: Literal["timeseries"] = "timeseries"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    distill: DistillConfig = DistillConfig()
    spec: SpecConfig = SpecConfig()

    def ignored_keys(self) -> dict[str, str]:
        """The keys the acceptance rule does not read: tolerance compares the draft's and the target's means and
        draws nothing (no sigma, no bias); gaussian and exact test densities (no tolerance)."""
        if self.sweep_command == "pretrain":
            return {}
        if self.spec.rule == "tolerance":
            why = ("rule 'tolerance' accepts when RMSE(draft mean, target mean) <= spec.tol and draws nothing; "
                   'sweep spec.tol or spec.k instead, or set spec.rule = "gaussian"')
            return {"spec.sigma": why, "spec.bias": why}
        why = f"rule '{self.spec.rule}' tests densities and has no tolerance"
        return {"spec.tol": why, "spec.tol_relative": why, "spec.tol_units": why}
