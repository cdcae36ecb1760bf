"""Distillation: train a time-series draft to mimic a frozen Timer-XL target (`specctl distill`).

Teacher forcing on real data: draft and target see the same real window, normalised with the statistics of its
lookback (as in `next_patch_loss`), and the target's next-patch prediction at every position is the label.
Losses are in scaled data units, with y the label:
  mse  mean (mu - y)^2
  nll  mean 0.5 (log s^2 + (mu - y)^2 / s^2) + var_reg * mean 1 / (logvar - logvar_min)   (stochastic draft)
  loss = (1 - alpha_truth) L(target) + alpha_truth L(truth)
While training, the target's label gets N(0, teacher_noise^2) noise (scaled units, either loss) and, with
teacher_dropout > 0, the target runs in training mode with that dropout. Validation uses the clean target.

Collapse penalty: 1 / (logvar - logvar_min) is a barrier at the head's floor. Its gradient -1/d^2 (d = distance to
the floor) is negligible for healthy variances (d = 8: var_reg / 64 against the NLL's 0.5 per value) and unbounded
at the floor: a draft that fits its labels exactly settles at d = sqrt(2 var_reg) instead of on the floor. (A
penalty mean(-logvar) would instead inflate every variance by 1 / (1 - 2 var_reg) and never stop a collapse for
var_reg < 0.5.) teacher_noise does the main work: the labels' own noise keeps s^2 >= teacher_noise^2.

Acceptance estimate: on rolling test windows, per generated token (one patch of every variable: P*C values) with
the same real context for both models, in scaled data units (where the speculative engine applies spec.sigma):
deterministic draft, q = N(mu, sigma^2 I): P(accept) = 2 Phi(-Delta/2), Delta = ||t - mu|| / sigma;
stochastic draft, q = N(mu, s_q^2): P(accept) = E_{x~q} min(1, p(x)/q(x)) = 1 - TV(p, q), by Monte Carlo.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from specctl.core.backend import Say
from specctl.core.checkpoint import export_checkpoint, load_weights
from specctl.core.errors import SpecctlError
from specctl.core.rundir import RunDir
from specctl.core.runtime import seed_everything
from specctl.core.train import FitResult
from specctl.timeseries.acceptance import acceptance_closed_form, acceptance_probability
from specctl.timeseries.builders import training_command
from specctl.timeseries.data import SeriesData, eval_windows, load_series
from specctl.timeseries.early_exit import EarlyExit, exit_config
from specctl.timeseries.forecast import Norm, rollout, times_for
from specctl.timeseries.model import (
    Attention,
    TimerConfig,
    TimerXL,
    check_compatible,
    count_parameters,
    init_logvar_head,
    load_timer,
    scaled_config,
)
from specctl.timeseries.profile import DistillConfig, TimeseriesProfile
from specctl.timeseries.training import build_model, check_lookback, epoch_logger, train_timer, window_length

COLLAPSE_MARGIN = 0.5  # a log-variance this close to logvar_min counts as collapsed
COLLAPSE_SHARE = 0.5  # warn when more than this share of log-variances is collapsed
PENALTY_FLOOR = 1e-3  # 1 / d is capped at 1 / PENALTY_FLOOR where the sigmoid bound has rounded d to 0
MC_SAMPLES = 32  # proposals per token for a stochastic draft's acceptance estimate
DEFINITIONS = {
    "teacher_mse": "validation MSE between draft mean and target prediction, every position, scaled units",
    "truth_mse": "validation MSE between draft mean and the real next patch, every position, scaled units",
    "std_mean/std_p05/std_p95": "predicted std in scaled units (as the gaussian rule sees it): mean, 5th, 95th "
                                "percentile",
    "near_floor": f"share of log-variances within {COLLAPSE_MARGIN} of model.logvar_min",
    "draft_mse/target_mse/draft_target_mse": "test windows, generated positions, teacher forcing on real "
                                             "context, scaled units",
    "acceptance": "mean P(accept) per generated token (P*C values) under the gaussian rule with bias 1 at sigma, in "
                  "scaled units: 2 Phi(-||t - mu|| / (2 sigma)) for a deterministic draft, "
                  "E_{x~q} min(1, p(x)/q(x)) by Monte Carlo for a stochastic one",
}


@dataclass
class DistillSetup:
    """The data, the fresh draft and the frozen target (teacher) of a distillation, and warnings about them."""

    data: SeriesData
    draft: TimerXL | EarlyExit
    target: TimerXL
    warnings: list[str]


@dataclass
class Pass:
    """One teacher-forced pass over real windows [B, T, C]: predictions [B, C, N-1, P] for tokens 1..N-1."""

    norm: Norm
    truth: Tensor  # [B, T-P, C] scaled: the real next patches
    target: Tensor
    mean: Tensor
    logvar: Tensor | None


@dataclass
class Estimate:
    """Draft quality and predicted acceptance on the test windows, at the generated positions."""

    windows: int
    tokens: int
    draft_mse: float  # draft vs truth, scaled units
    target_mse: float  # target vs truth
    draft_target_mse: float
    acceptance: dict[float, float]  # sigma -> mean P(accept) per token, gaussian rule, bias 1


@dataclass
class DistillResult:
    definitions: ClassVar[dict[str, str]] = DEFINITIONS

    profile: TimeseriesProfile
    fit: FitResult
    estimate: Estimate
    parameters: int
    checkpoint: Path
    warnings: list[str] = field(default_factory=list)
    data_notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        e, p = self.estimate, self.profile
        return {
            "parameters": self.parameters, "target": p.distill.target, "exit_layer": p.distill.exit_layer,
            "loss": p.distill.loss,
            "epochs": self.fit.epochs_done, "best_val_loss": self.fit.best_val,
            "stopped_early": self.fit.stopped_early, "checkpoint": str(self.checkpoint), "history": self.fit.history,
            "quality": {"windows": e.windows, "tokens": e.tokens, "draft_mse": e.draft_mse,
                        "target_mse": e.target_mse, "draft_target_mse": e.draft_target_mse},
            "acceptance": [{"sigma": s, "acceptance": a} for s, a in e.acceptance.items()],
            "spec_sigma": p.spec.sigma, "warnings": self.warnings, "data_notes": self.data_notes,
        }


def describe_size(model: TimerXL) -> str:
    return f"d_model {model.cfg.d_model}, {model.cfg.e_layers} layers, {count_parameters(model):,} parameters"


def set_dropout(model: TimerXL, p: float) -> None:
    """Set every dropout probability (residual and attention) of a model to p."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, Attention):
            module.dropout = p


def load_teacher(cfg: DistillConfig, draft: TimerConfig, device: torch.device) -> TimerXL:
    try:
        target, _ = load_timer(cfg.target, device)
    except SpecctlError as e:
        command = None if Path(cfg.target).exists() else training_command(cfg.target)
        hint = f" (train it first: `{command}`)" if command else ""
        raise SpecctlError(f"distill.target: {e}{hint}") from None
    check_compatible(draft, target.cfg, f"distill.target {cfg.target} (target vs data/draft)")
    set_dropout(target, cfg.teacher_dropout)
    return target.requires_grad_(False)


def setup_warnings(profile: TimeseriesProfile, draft: TimerXL, target: TimerXL) -> list[str]:
    warnings = []
    if draft.cfg.d_model > target.cfg.d_model or count_parameters(draft) >= count_parameters(target):
        warnings.append(f"the draft ({describe_size(draft)}) is not smaller than the target ({describe_size(target)}): "
                        "it will not make decoding faster")
    if profile.model.stochastic and profile.distill.loss == "mse":
        warnings.append('model.stochastic = true with distill.loss = "mse": the log-variance head is not trained '
                        '(set distill.loss = "nll")')
    return warnings


def prepare(profile: TimeseriesProfile, device: torch.device) -> DistillSetup:
    """Check the profile, load the data, the draft (fresh or train.init_from) and the frozen target."""
    if profile.kind != "timeseries":
        raise SpecctlError(f"distill trains time-series drafts; this profile's kind is '{profile.kind}'")
    check_lookback(profile.data.lookback, profile.model.patch_len)
    if profile.distill.loss == "nll" and not profile.model.stochastic:
        raise SpecctlError('distill.loss = "nll" needs a stochastic draft: set model.stochastic = true '
                           '(or distill.loss = "mse")')
    if not profile.distill.target:
        raise SpecctlError("distill.target is not set: give the target checkpoint to distill from")
    data = load_series(profile.data, window_length(profile), extra_train=True,
                       horizon=max(profile.data.horizons))
    if profile.distill.exit_layer is None:
        draft = build_model(profile, data, device)
        target = load_teacher(profile.distill, draft.cfg, device)
    else:
        target = load_teacher(profile.distill, scaled_config(profile.model, data.n_vars), device)
        draft = build_exit(profile, target)
    return DistillSetup(data, draft, target, setup_warnings(profile, draft, target))


def build_exit(profile: TimeseriesProfile, target: TimerXL) -> EarlyExit:
    """A fresh exit head after the target's first distill.exit_layer blocks (early_exit.py)."""
    for key, value in (("train.init_from", profile.train.init_from),
                       ("train.tune_last_layers", profile.train.tune_last_layers)):
        if value is not None:
            raise SpecctlError(f"{key} does not apply to an early-exit draft (distill.exit_layer): its blocks are the "
                               "target's, and only its exit head trains")
    draft = EarlyExit(target, profile.distill.exit_layer, profile.model.stochastic, profile.distill.exit_adapter)
    init_logvar_head(draft)
    return draft


def forward_pass(draft: TimerXL, target: TimerXL, window: Tensor, lookback: int, target_dropout: bool = False,
                 on_policy: float = 0.0) -> Pass:
    """Both models on the window's tokens. With `on_policy`, that share of the windows gets, after the lookback, the
    target's own rolling forecast instead of the truth: the context speculative decoding feeds (the target's tokens,
    several steps deep), so the draft learns to predict the target where it will be asked to."""
    P = draft.cfg.patch_len
    norm = Norm.fit(window[:, :lookback], target.cfg)
    inputs = norm.tokens(window, P)[:, :, :-1]
    times = times_for(window.shape[0], 0, inputs.shape[2], window.device)
    if on_policy > 0:
        own = torch.rand(window.shape[0], device=window.device) < on_policy
        inputs = torch.where(own[:, None, None, None], rollout(target, inputs, lookback // P), inputs)
    target.train(target_dropout)
    with torch.no_grad():
        t, _ = target(inputs, times)
    mean, logvar = draft(inputs, times)
    return Pass(norm, window[:, P:], t, mean, logvar)


def objective(loss: str, mean: Tensor, var: Tensor | None, label: Tensor) -> Tensor:
    if loss == "mse":
        return torch.mean((mean - label) ** 2)
    return 0.5 * torch.mean(torch.log(var) + (mean - label) ** 2 / var)  # Gaussian NLL without 0.5 log 2pi


def collapse_penalty(logvar: Tensor, logvar_min: float) -> Tensor:
    return torch.mean(1 / (logvar - logvar_min).clamp_min(PENALTY_FLOOR))  # barrier at the floor (docstring)


def distill_loss(cfg: DistillConfig, p: Pass, logvar_min: float, noise: float) -> Tensor:
    mean = p.norm.series(p.mean)
    var = None if p.logvar is None else p.norm.variance(p.logvar)
    label = p.norm.series(p.target)
    if noise:
        label = label + noise * torch.randn_like(label)
    a = cfg.alpha_truth
    loss = (1 - a) * objective(cfg.loss, mean, var, label) + a * objective(cfg.loss, mean, var, p.truth)
    return loss + cfg.var_reg * collapse_penalty(p.logvar, logvar_min) if cfg.loss == "nll" else loss


def spread(std: Tensor, logvar: Tensor, logvar_min: float) -> dict[str, float]:
    """Predicted std (scaled units): mean, 5th and 95th percentile; share of log-variances near the floor."""
    p05, p95 = np.percentile(std.double().cpu().numpy(), [5, 95])
    return {"std_mean": std.double().mean().item(), "std_p05": float(p05), "std_p95": float(p95),
            "near_floor": (logvar < logvar_min + COLLAPSE_MARGIN).double().mean().item()}


def validation_metrics(cfg: DistillConfig, draft: TimerXL, target: TimerXL, batches: Iterable[Tensor],
                       lookback: int) -> dict[str, float]:
    """val_loss (the distillation loss against the clean target), draft-vs-target and draft-vs-truth MSE."""
    losses, vs_target, vs_truth, stds, logvars = [], [], [], [], []
    for window in batches:
        p = forward_pass(draft, target, window, lookback)
        mean = p.norm.series(p.mean)
        losses.append(distill_loss(cfg, p, draft.cfg.logvar_min, 0.0).item())
        vs_target.append(torch.mean((mean - p.norm.series(p.target)) ** 2).item())
        vs_truth.append(torch.mean((mean - p.truth) ** 2).item())
        if p.logvar is not None:
            stds.append(p.norm.variance(p.logvar).sqrt().flatten())
            logvars.append(p.logvar.flatten())
    metrics = {"val_loss": float(np.mean(losses)), "teacher_mse": float(np.mean(vs_target)),
               "truth_mse": float(np.mean(vs_truth))}
    return metrics | (spread(torch.cat(stds), torch.cat(logvars), draft.cfg.logvar_min) if logvars else {})


def epoch_warnings(record: dict[str, float], profile: TimeseriesProfile) -> list[str]:
    warnings = []
    if record.get("near_floor", 0.0) > COLLAPSE_SHARE:
        warnings.append(f"variance collapse: {record['near_floor']:.0%} of log-variances lie within {COLLAPSE_MARGIN} "
                        f"of model.logvar_min ({profile.model.logvar_min}); raise distill.teacher_noise or "
                        "distill.var_reg, or set distill.teacher_dropout")
    if record["teacher_mse"] > profile.distill.mse_warn:
        warnings.append(f"draft-vs-target MSE {record['teacher_mse']:.4f} exceeds distill.mse_warn "
                        f"{profile.distill.mse_warn}: train longer, or lower distill.teacher_noise")
    return warnings


def token_acceptance(t: Tensor, mu: Tensor, std_q: Tensor | None, sigma: float, samples: int = MC_SAMPLES,
                     generator: torch.Generator | None = None) -> Tensor:
    """P(accept) [...] of each token [..., D] under the gaussian rule with bias 1, p = N(t, sigma^2 I).
    std_q None (deterministic draft, q = N(mu, sigma^2 I)): the closed form; else the mean of min(1, p(x)/q(x))
    over `samples` proposals x ~ q = N(mu, std_q^2)."""
    if std_q is None:
        return acceptance_closed_form((t - mu).norm(dim=-1) / sigma)  # 2 Phi(-Delta/2)
    total = torch.zeros(mu.shape[:-1], device=mu.device, dtype=mu.dtype)
    for _ in range(samples):
        x = mu + std_q * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        total += acceptance_probability("gaussian", x, t, mu, std_q, sigma, 1.0, 0.0)[0]
    return total / samples


def as_tokens(series: Tensor, patch_len: int) -> Tensor:
    """[B, K*P, C] -> [B, K, P*C]: one generated token is one patch of every variable."""
    return series.reshape(series.shape[0], -1, patch_len * series.shape[2])


@torch.no_grad()
def estimate_acceptance(profile: TimeseriesProfile, draft: TimerXL, target: TimerXL, test: np.ndarray,
                        device: torch.device, samples: int = MC_SAMPLES) -> Estimate:
    """Teacher-forced draft and target predictions at the generated positions of rolling test windows
    (at most data.max_eval_windows), scored against the truth and turned into acceptance per sigma."""
    lookback, P = profile.data.lookback, draft.cfg.patch_len
    n0 = lookback // P  # tokens in the lookback: the first generated token is token n0
    context, future = eval_windows(test, lookback, window_length(profile) - lookback, profile.data.max_eval_windows)
    sigmas = sorted({*profile.distill.sigmas, profile.spec.sigma})
    generators = {s: torch.Generator(device=device).manual_seed(profile.seed) for s in sigmas}  # common random numbers
    draft.eval()
    sq = {"draft": 0.0, "target": 0.0, "between": 0.0}
    accepted, tokens = dict.fromkeys(sigmas, 0.0), 0
    for window in torch.cat([context, future], dim=1).split(profile.spec.batch_size):
        p = forward_pass(draft, target, window.to(device), lookback)
        mean = p.norm.series(p.mean[:, :, n0 - 1:])  # predictions for tokens n0..N-1, scaled [B, K*P, C]
        t = p.norm.series(p.target[:, :, n0 - 1:])
        truth = p.truth[:, lookback - P:]
        sq["draft"] += torch.sum((mean - truth) ** 2).item()
        sq["target"] += torch.sum((t - truth) ** 2).item()
        sq["between"] += torch.sum((mean - t) ** 2).item()
        std_q = None if p.logvar is None else as_tokens(p.norm.variance(p.logvar[:, :, n0 - 1:]).sqrt(), P)
        for s in sigmas:
            accepted[s] += token_acceptance(as_tokens(t, P), as_tokens(mean, P), std_q, s, samples,
                                            generators[s]).sum().item()
        tokens += t.shape[0] * t.shape[1] // P
    values = len(context) * future.shape[1] * future.shape[2]
    return Estimate(len(context), tokens, sq["draft"] / values, sq["target"] / values, sq["between"] / values,
                    {s: accepted[s] / tokens for s in sigmas})


def acceptance_warnings(e: Estimate) -> list[str]:
    """A draft the gaussian rule accepts at no sigma tried: name the settings that can accept it."""
    if max(e.acceptance.values()) >= 5e-4:
        return []
    rmse = math.sqrt(e.draft_target_mse)  # per value; the tolerance rule compares a token's RMSE
    return [f"predicted acceptance is 0.000 at every sigma tried ({', '.join(f'{s:g}' for s in e.acceptance)}): "
            f"the draft is {rmse:.3g} (RMSE per value) from the target over {e.tokens // e.windows} tokens of P*C "
            f"values; rule \"tolerance\" with spec.tol >= {rmse:.3g} accepts tokens this close, or the gaussian "
            "rule needs a much larger spec.sigma"]


def distill_line(record: dict) -> str:
    """The tail of a distillation's epoch line: distance to the target and the truth, the draft's spread."""
    line = f"  vs target {record['teacher_mse']:.4f}  vs truth {record['truth_mse']:.4f}"
    if "std_mean" in record:
        line += f"  std mean {record['std_mean']:.3f} p5 {record['std_p05']:.3f} p95 {record['std_p95']:.3f}"
    return line


def distill(profile: TimeseriesProfile, device: torch.device, run: RunDir, resume: bool, progress=None,
            say: Say | None = None) -> DistillResult:
    """Train the draft against the frozen target; then estimate its acceptance on the test windows."""
    say = say or (lambda line: None)
    seed_everything(profile.seed)  # the same draft whether distill runs alone or in a chain
    setup = prepare(profile, device)
    for message in setup.warnings:
        say(f"warning: {message}")
    for note in setup.data.notes:
        say(note)
    cfg, lookback, draft, target = profile.distill, profile.data.lookback, setup.draft, setup.target
    low = draft.cfg.logvar_min
    last_warnings: list[str] = []
    log = epoch_logger(say, distill_line)

    def on_epoch_end(epoch: int, record: dict) -> None:
        log(epoch, record)
        last_warnings[:] = epoch_warnings(record, profile)
        for message in last_warnings:
            say(f"warning: {message}")

    def train_loss(window: Tensor) -> Tensor:
        views = forward_pass(draft, target, window, lookback, cfg.teacher_dropout > 0, cfg.on_policy)
        return distill_loss(cfg, views, low, cfg.teacher_noise)

    config = (exit_config(draft, cfg.target, lookback, setup.data.columns, profile.model_dump())
              if isinstance(draft, EarlyExit) else None)
    result = train_timer(profile, draft, setup.data, device, run, train_loss, resume, progress, on_epoch_end,
                         validate_batches=lambda batches: validation_metrics(cfg, draft, target, batches, lookback),
                         config=config)
    draft.load_state_dict(load_weights(result.best_dir, device))
    estimate = estimate_acceptance(profile, draft, target, setup.data.test, device)
    for message in acceptance_warnings(estimate):
        say(f"warning: {message}")
        last_warnings.append(message)
    save_to = profile.train.save_to
    checkpoint = export_checkpoint(result.best_dir, save_to) if save_to else result.best_dir
    return DistillResult(profile, result, estimate, count_parameters(draft), Path(checkpoint),
                         setup.warnings + last_warnings, setup.data.notes)
