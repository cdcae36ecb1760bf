"""The shared training loop: checkpoints, resume, early stopping, Ctrl-C."""

import json

import pytest
import torch
from torch import nn

from specctl.core import checkpoint
from specctl.core.checkpoint import load_state, load_weights, save_checkpoint
from specctl.core.errors import SpecctlError
from specctl.core.files import recover_dir
from specctl.core.schema import TrainConfig
from specctl.core.train import Task, fit, learning_rate


def problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    batches = lambda epoch: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    loss = lambda b: ((model(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    validate = lambda: {"val_loss": float(((model(x) - y) ** 2).mean())}  # noqa: E731
    return model, batches, loss, validate


def train(cfg: TrainConfig, folder, resume: bool = False):
    """Fit a fresh copy of the problem into `folder`."""
    model, batches, loss, validate = problem()
    return fit(Task(model, model.parameters(), loss, batches, validate, {}), cfg, folder, resume=resume)


def train_straight_and_split(cfg: TrainConfig, tmp_path, split_after: int) -> None:
    """Train `cfg` straight into tmp_path/straight, and in two runs (stop, then --resume) into tmp_path/split."""
    train(cfg, tmp_path / "straight")
    train(cfg.model_copy(update={"epochs": split_after}), tmp_path / "split")
    train(cfg, tmp_path / "split", resume=True)


def test_fit_checkpoints_and_resumes(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    model, batches, loss, validate = problem()
    first = fit(Task(model, model.parameters(), loss, batches, validate, {"kind": "test"}), cfg, tmp_path)
    assert first.epochs_done == 2 and (tmp_path / "best/model.safetensors").is_file()
    assert json.loads((tmp_path / "best/config.json").read_text()) == {"kind": "test"}
    model2, batches2, loss2, validate2 = problem()
    more = fit(Task(model2, model2.parameters(), loss2, batches2, validate2, {"kind": "test"}),
               cfg.model_copy(update={"epochs": 4}), tmp_path, resume=True)
    assert more.epochs_done == 4 and len(more.history) == 4 and more.best_val < first.best_val


def test_early_stopping_on_validation(tmp_path):
    model, batches, loss, _ = problem()
    result = fit(Task(model, model.parameters(), loss, batches, lambda: {"val_loss": 1.0}, {}),
                 TrainConfig(epochs=10, patience=2, schedule="constant"), tmp_path)
    assert result.stopped_early and result.epochs_done == 3


def test_ctrl_c_leaves_a_usable_checkpoint(tmp_path):
    model, batches, loss, validate = problem()
    calls = {"n": 0}

    def interrupting(batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return loss(batch)

    with pytest.raises(KeyboardInterrupt):
        fit(Task(model, model.parameters(), interrupting, batches, validate, {}), TrainConfig(epochs=3), tmp_path)
    weights = load_weights(tmp_path / "interrupted")
    torch.testing.assert_close(weights["weight"], model.weight.detach())
    assert (tmp_path / "last/state.json").is_file()  # the finished first epoch is resumable


def test_weight_average_is_what_validation_and_checkpoints_see_and_leaves_training_alone(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    plain, batches, loss, validate = problem()
    fit(Task(plain, plain.parameters(), loss, batches, validate, {}), cfg, tmp_path / "plain")
    model, batches, loss, validate = problem()
    averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen = []
    steps = 0

    def tracking(batch):  # after each optimizer step: average += (1 - d) (raw - average), d = min(0.9, warm-up)
        nonlocal steps
        if steps:
            d = min(0.9, steps / (9 + steps))
            for k, v in model.state_dict().items():
                averaged[k] += (1 - d) * (v.detach() - averaged[k])
        steps += 1
        return loss(batch)

    def validating():
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return validate()

    fit(Task(model, model.parameters(), tracking, batches, validating, {}), cfg.model_copy(update={"ema_decay": 0.9}),
        tmp_path / "ema")
    torch.testing.assert_close(model.weight, plain.weight)  # the raw trajectory is plain training's
    d = min(0.9, steps / (9 + steps))  # the last step's update, which no later loss call saw
    for k, v in model.state_dict().items():
        averaged[k] += (1 - d) * (v.detach() - averaged[k])
    torch.testing.assert_close(seen[-1]["weight"], averaged["weight"])
    torch.testing.assert_close(load_weights(tmp_path / "ema/last")["weight"], averaged["weight"])
    assert not torch.allclose(averaged["weight"], model.weight)


def test_resume_with_weight_average_continues_exactly(tmp_path):
    cfg = TrainConfig(epochs=4, lr=0.05, schedule="constant", ema_decay=0.8)
    train_straight_and_split(cfg, tmp_path, split_after=2)
    for name in ("last", "best"):
        torch.testing.assert_close(load_weights(tmp_path / "split" / name)["weight"],
                                   load_weights(tmp_path / "straight" / name)["weight"])
    train(cfg.model_copy(update={"ema_decay": None}), tmp_path / "plain")
    with pytest.raises(SpecctlError, match="without train.ema_decay"):
        train(cfg.model_copy(update={"epochs": 6}), tmp_path / "plain", resume=True)


def test_resume_inside_the_warm_up_continues_the_ramp_exactly(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, schedule="constant", warmup_steps=6)  # 4 steps per epoch
    train_straight_and_split(cfg, tmp_path, split_after=1)
    torch.testing.assert_close(load_weights(tmp_path / "split/last")["weight"],
                               load_weights(tmp_path / "straight/last")["weight"])
    train(cfg.model_copy(update={"warmup_steps": 0}), tmp_path / "plain")
    assert not torch.allclose(load_weights(tmp_path / "plain/last")["weight"],
                              load_weights(tmp_path / "straight/last")["weight"])


def test_schedules():
    assert learning_rate(TrainConfig(lr=1.0, step_gamma=0.1), 2) == pytest.approx(0.01)
    warm = TrainConfig(lr=1.0, schedule="step", step_gamma=0.1, warmup_steps=4)
    assert [learning_rate(warm, 0, step) for step in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert learning_rate(warm, 1, 2) == pytest.approx(0.075) and learning_rate(warm, 1) == pytest.approx(0.1)
    assert learning_rate(TrainConfig(lr=1.0, schedule="cosine", epochs=4), 2) == pytest.approx(0.5)


def test_a_checkpoint_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    save_checkpoint(folder, {"w": torch.zeros(2)}, {"kind": "test"}, state={"epoch": 1},
                    extra={"raw.safetensors": {"w": torch.ones(2)}})
    save_checkpoint(folder, {"w": torch.full((2,), 2.0)}, {"kind": "test"}, state={"epoch": 2})
    assert not (folder / "raw.safetensors").exists()  # nothing of the earlier save survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    real = checkpoint.save_tensors

    def crash_after_weights(path, tensors):
        real(path, tensors)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_tensors", crash_after_weights)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(folder, {"w": torch.full((2,), 3.0)}, {"kind": "test"}, state={"epoch": 3},
                        extra={"raw.safetensors": {"w": torch.ones(2)}})
    assert load_state(folder)["epoch"] == 2 and load_weights(folder)["w"].tolist() == [2.0, 2.0]

    folder.rename(tmp_path / ".last.old")  # as if cut off between replace_dir's two renames
    assert load_state(recover_dir(folder))["epoch"] == 2


def test_bf16_precision_autocasts_the_step_and_keeps_fp32_weights(tmp_path):
    model, batches, loss, validate = problem()
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    result = fit(Task(model, model.parameters(), loss, batches, validate, {}),
                 TrainConfig(epochs=3, lr=0.05, schedule="constant", precision="bf16"), tmp_path)
    assert seen[0] == torch.bfloat16 and seen[-1] == torch.float32  # the steps autocast, validation does not
    assert model.weight.dtype == torch.float32 and load_weights(tmp_path / "best")["weight"].dtype == torch.float32
    fp32 = train(TrainConfig(epochs=3, lr=0.05, schedule="constant"), tmp_path / "fp32")
    assert [h["val_loss"] for h in result.history] == pytest.approx([h["val_loss"] for h in fp32.history], rel=1e-2)
