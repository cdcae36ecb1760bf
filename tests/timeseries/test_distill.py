"""Distillation: NLL training, checkpoints and resume in both loss modes, the acceptance estimate against a
simulation of the gaussian rule, the collapse penalty and warnings, and bad input through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from specctl.commands.distill import distill as distill_command
from specctl.core.checkpoint import save_checkpoint
from specctl.core.rundir import RunDir, profile_to_toml
from specctl.timeseries.distill import (
    Pass,
    collapse_penalty,
    distill,
    distill_loss,
    epoch_warnings,
    objective,
    prepare,
    token_acceptance,
    validation_metrics,
)
from specctl.timeseries.forecast import Norm
from specctl.timeseries.model import TimerConfig, TimerXL, checkpoint_config, load_timer
from specctl.timeseries.profile import TimeseriesProfile as Profile
from specctl.timeseries.training import loader, window_length

CPU = torch.device("cpu")
LOOKBACK = 32


def tiny_profile(**tables) -> Profile:
    """A draft of d_model 16 on 2 synthetic variables, patches of 8, windows of 48 rows."""
    base = {
        "name": "tiny", "device": "cpu",
        "data": {"lookback": LOOKBACK, "horizons": [16], "max_eval_windows": 16,
                 "synthetic": {"n_vars": 2, "length": 600}},
        "model": {"patch_len": 8, "d_model": 16, "n_heads": 2, "d_ff": 32, "e_layers": 1, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "schedule": "constant", "max_steps_per_epoch": 10,
                  "max_val_batches": 2},
        "distill": {"sigmas": [0.5, 1.0]},
        "spec": {"batch_size": 16},
    }
    for table, values in tables.items():
        base[table] = {**base.get(table, {}), **values} if isinstance(values, dict) else values
    return Profile.model_validate(base)


def save_target(folder: Path, patch_len: int = 8, n_vars: int = 2, d_model: int = 32) -> str:
    torch.manual_seed(0)
    model = TimerXL(TimerConfig(patch_len=patch_len, d_model=d_model, n_heads=2, d_ff=2 * d_model, e_layers=1,
                                n_vars=n_vars, dropout=0.1))
    columns = [f"x{i}" for i in range(n_vars)]
    save_checkpoint(folder, model.state_dict(), checkpoint_config(model, LOOKBACK, columns, {}))
    return str(folder)


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    return save_target(tmp_path_factory.mktemp("target"))


def val_metrics(profile: Profile, setup) -> dict[str, float]:
    batches = loader([setup.data.val], window_length(profile), profile.train.batch_size, False, 0)
    with torch.no_grad():
        return validation_metrics(profile.distill, setup.draft, setup.target, batches, LOOKBACK)


def test_nll_lowers_teacher_error_without_collapse(target):
    profile = tiny_profile(model={"stochastic": True}, distill={"target": target, "loss": "nll"},
                           train={"epochs": 3, "max_steps_per_epoch": 15})
    setup = prepare(profile, CPU)
    before = val_metrics(profile, setup)
    run = RunDir.create(profile, "distill", "cpu")
    last = distill(profile, CPU, run, False).fit.history[-1]
    assert last["teacher_mse"] < 0.5 * before["teacher_mse"]
    assert last["near_floor"] == 0.0  # no log-variance within 0.5 of logvar_min
    assert 0.0 < last["std_p05"] < last["std_mean"] < last["std_p95"]
    assert not any("collapse" in w for w in epoch_warnings(last, profile))


@pytest.mark.parametrize("loss", ["mse", "nll"])
def test_checkpoint_resume_and_estimate(target, loss):
    tables = {"model": {"stochastic": loss == "nll"}, "distill": {"target": target, "loss": loss, "sigmas": [0.5, 1.0]},
                  "train": {"epochs": 1, "max_steps_per_epoch": 4, "save_to": "artifacts/distilled"}}
    profile = tiny_profile(**tables)
    first = distill(profile, CPU, RunDir.create(profile, "distill", "cpu"), False)
    for name in ("best", "last"):
        assert (first.fit.best_dir.parent / name / "model.safetensors").is_file()
    exported, _ = load_timer("artifacts/distilled")
    assert exported.cfg.stochastic == (loss == "nll")

    tables["train"]["epochs"] = 2
    profile = tiny_profile(**tables)
    last = first.fit.best_dir.parent / "last"
    last.rename(last.with_name(".last.old"))  # as if the last save was cut off between its two renames
    run = RunDir.resume(profile, "distill", "cpu")
    second = distill(profile, CPU, run, True)
    assert second.fit.epochs_done == 2 and len(second.fit.history) == 2
    assert second.fit.history[0] == first.fit.history[0]
    e = second.estimate
    assert e.windows == 16 and e.tokens == 16 * 2
    assert set(e.acceptance) == {0.25, 0.5, 1.0}  # distill.sigmas and spec.sigma
    assert all(0.0 <= a <= 1.0 for a in e.acceptance.values())
    if loss == "mse":  # the closed form grows with sigma
        assert e.acceptance[0.25] <= e.acceptance[0.5] <= e.acceptance[1.0]
    assert min(e.draft_mse, e.target_mse, e.draft_target_mse) > 0


class CtrlC:
    """A progress bar whose third update is a Ctrl-C."""

    updates = 0

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def reset(self, *args, **kwargs) -> None:
        pass

    def update(self, *args, **kwargs) -> None:
        self.updates += 1
        if self.updates == 3:
            raise KeyboardInterrupt


def test_ctrl_c_leaves_a_usable_checkpoint(target):
    profile = tiny_profile(model={"stochastic": True}, distill={"target": target, "loss": "nll"})
    run = RunDir.create(profile, "distill", "cpu")
    with pytest.raises(KeyboardInterrupt):
        distill(profile, CPU, run, False, CtrlC())
    model, _ = load_timer(str(run.checkpoints / "interrupted"))
    assert model.cfg.stochastic


def simulated_acceptance(t, mu, std_q, sigma, n: int, seed: int) -> torch.Tensor:
    """The gaussian rule itself: x ~ q, accept when u < p(x)/q(x); the accepted share per token."""
    g = torch.Generator().manual_seed(seed)
    x = mu + std_q * torch.randn((n, *mu.shape), generator=g, dtype=mu.dtype)
    log_p = torch.distributions.Normal(t, sigma).log_prob(x).sum(-1)
    log_q = torch.distributions.Normal(mu, std_q).log_prob(x).sum(-1)
    u = torch.rand(log_p.shape, generator=g, dtype=mu.dtype)
    return (torch.log(u) < log_p - log_q).double().mean(0)


def test_acceptance_estimate_matches_simulation():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    mu = t + 0.3 * torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    std_q = 0.5 * (0.8 + 0.4 * torch.rand(2, 3, 6, generator=g, dtype=torch.float64))
    sigma = 0.5
    stochastic = token_acceptance(t, mu, std_q, sigma, samples=10000, generator=torch.Generator().manual_seed(1))
    assert stochastic.shape == (2, 3) and 0.1 < stochastic.mean() < 0.9
    torch.testing.assert_close(stochastic, simulated_acceptance(t, mu, std_q, sigma, 50000, 2), atol=0.02, rtol=0)
    deterministic = token_acceptance(t, mu, None, sigma)  # q = N(mu, sigma^2): the closed form
    torch.testing.assert_close(deterministic, simulated_acceptance(t, mu, torch.full_like(mu, sigma), sigma, 50000, 4),
                               atol=0.02, rtol=0)


def test_collapse_penalty_is_a_barrier_at_the_floor():
    low, var_reg = -10.0, 0.01

    def slope(distance: float) -> float:  # d loss / d logvar for a draft that fits its label exactly
        logvar = torch.tensor([low + distance], requires_grad=True)
        y = torch.zeros(1)
        loss = objective("nll", y, logvar.exp(), y) + var_reg * collapse_penalty(logvar, low)
        loss.backward()
        return logvar.grad.item()

    assert slope(math.sqrt(2 * var_reg)) == pytest.approx(0.0, abs=1e-4)  # the floor it settles at
    assert slope(0.5 * math.sqrt(2 * var_reg)) < -1.0  # closer: pushed up hard
    assert slope(8.0) == pytest.approx(0.5, rel=0.01)  # healthy variances: the NLL alone


def test_alpha_truth_mixes_target_and_truth():
    g = torch.Generator().manual_seed(0)
    mean, target = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    norm = Norm(torch.zeros(2, 1, 3), torch.ones(2, 1, 3))
    p = Pass(norm, norm.series(torch.randn(2, 3, 4, 8, generator=g)), target, mean, None)
    vs_target = torch.mean((norm.series(mean) - norm.series(target)) ** 2)
    vs_truth = torch.mean((norm.series(mean) - p.truth) ** 2)
    loss = distill_loss(tiny_profile(distill={"alpha_truth": 0.25}).distill, p, -10.0, 0.0)
    torch.testing.assert_close(loss, 0.75 * vs_target + 0.25 * vs_truth)


def test_epoch_warnings():
    profile = tiny_profile(distill={"mse_warn": 0.6})
    record = {"teacher_mse": 0.7, "near_floor": 0.9}
    collapse, mse = epoch_warnings(record, profile)
    assert "variance collapse: 90%" in collapse and "distill.teacher_noise" in collapse
    assert "distill.mse_warn 0.6" in mse
    assert epoch_warnings({"teacher_mse": 0.1, "near_floor": 0.1}, profile) == []


def invoke(profile: Profile, *extra: str):
    path = Path("profile.toml")
    path.write_text(profile_to_toml(profile), encoding="utf-8")
    app = typer.Typer()
    app.command("distill")(distill_command)
    app.callback()(lambda: None)
    result = CliRunner().invoke(app, ["distill", "--profile", str(path), *extra])
    return result.exit_code, " ".join(result.output.split())


def test_bad_input_exits_2(target, tmp_path):
    cases = [
        (tiny_profile(), "distill.target is not set"),
        (tiny_profile(distill={"target": "nowhere"}), "distill.target: checkpoint not found: nowhere"),
        (tiny_profile(distill={"target": save_target(tmp_path / "p4", patch_len=4)}), "patch_len 4 does not match 8"),
        (tiny_profile(distill={"target": save_target(tmp_path / "c3", n_vars=3)}), "n_vars 3 does not match 2"),
        (tiny_profile(distill={"target": target, "loss": "nll"}), "set model.stochastic = true"),
    ]
    for profile, message in cases:
        code, output = invoke(profile)
        assert code == 2, output
        assert message in output


def test_wider_draft_warns_and_runs(tmp_path):
    narrow = save_target(tmp_path / "narrow", d_model=8)
    profile = tiny_profile(distill={"target": narrow}, train={"epochs": 1, "max_steps_per_epoch": 2})
    code, output = invoke(profile)
    assert code == 0, output
    assert "warning: the draft (d_model 16" in output and "is not smaller than the target" in output
    assert "predicted acceptance per token" in output
    metrics = json.loads(next(Path("runs/distill").glob("*/metrics.json")).read_text())["metrics"]
    assert [row["sigma"] for row in metrics["acceptance"]] == [0.25, 0.5, 1.0]
    assert "not smaller" in metrics["warnings"][0]


def test_on_policy_windows_see_the_targets_rollout_after_the_lookback(target):
    """distill.on_policy = 1: the draft's inputs after the lookback are the target's rolling forecast."""
    from specctl.timeseries.distill import forward_pass
    from specctl.timeseries.forecast import rollout

    profile = tiny_profile(distill={"target": target, "on_policy": 1.0}, train={"epochs": 1, "max_steps_per_epoch": 2})
    setup = prepare(profile, CPU)
    window = torch.from_numpy(setup.data.train[: window_length(profile)]).float()[None]
    seen = []
    hook = setup.draft.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    p = forward_pass(setup.draft, setup.target, window, LOOKBACK, on_policy=1.0)
    hook.remove()
    P, n0 = setup.draft.cfg.patch_len, LOOKBACK // setup.draft.cfg.patch_len
    real = p.norm.tokens(window, P)[:, :, :-1]
    torch.testing.assert_close(seen[0], rollout(setup.target, real, n0))
    assert not torch.allclose(seen[0][:, :, n0:], real[:, :, n0:])
    result = distill(profile, CPU, RunDir.create(profile, "distill", "cpu"), False)
    assert result.fit.epochs_done == 1 and math.isfinite(result.fit.history[-1]["teacher_mse"])
