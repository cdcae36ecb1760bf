"""The shared training loop: checkpoints, resume, early stopping, Ctrl-C."""

import json

import pytest
import torch
from torch import nn

from specctl.core.checkpoint import load_weights
from specctl.core.schema import TrainConfig
from specctl.core.train import fit, learning_rate


def problem():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    batches = lambda epoch: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    loss = lambda b: ((model(b[0]) - b[1]) ** 2).mean()  # noqa: E731
    validate = lambda: {"val_loss": float(((model(x) - y) ** 2).mean())}  # noqa: E731
    return model, batches, loss, validate


def test_fit_checkpoints_and_resumes(tmp_path):
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant")
    model, batches, loss, validate = problem()
    first = fit(model, model.parameters(), loss, batches, validate, cfg, tmp_path, {"kind": "test"})
    assert first.epochs_done == 2 and (tmp_path / "best/model.safetensors").is_file()
    assert json.loads((tmp_path / "best/config.json").read_text()) == {"kind": "test"}
    model2, batches2, loss2, validate2 = problem()
    more = fit(model2, model2.parameters(), loss2, batches2, validate2, cfg.model_copy(update={"epochs": 4}),
               tmp_path, {"kind": "test"}, resume=True)
    assert more.epochs_done == 4 and len(more.history) == 4 and more.best_val < first.best_val


def test_early_stopping_on_validation(tmp_path):
    model, batches, loss, _ = problem()
    result = fit(model, model.parameters(), loss, batches, lambda: {"val_loss": 1.0},
                 TrainConfig(epochs=10, patience=2, schedule="constant"), tmp_path, {})
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
        fit(model, model.parameters(), interrupting, batches, validate, TrainConfig(epochs=3), tmp_path, {})
    weights = load_weights(tmp_path / "interrupted")
    torch.testing.assert_close(weights["weight"], model.weight.detach())
    assert (tmp_path / "last/state.json").is_file()  # the finished first epoch is resumable


def test_schedules():
    assert learning_rate(TrainConfig(lr=1.0, step_gamma=0.1), 2) == pytest.approx(0.01)
    assert learning_rate(TrainConfig(lr=1.0, schedule="cosine", epochs=4), 2) == pytest.approx(0.5)
