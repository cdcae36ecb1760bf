"""Early-exit self-speculation (early_exit.py): the draft is the target's first l blocks on the target's own KV cache.

The invariants of a shared cache: the speculative forecast equals the cache-free reference (the context is the emitted
forecast) and the same draft on a cache of its own; everything rejected is target-only decoding; the exact rule
emits the target's law; after a forecast the shared cache equals a recompute over the emitted sequence. Then the
head-only checkpoint, the refusals, distillation, and spec-test end to end through the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from typer.testing import CliRunner

from specctl.backends import load_profile
from specctl.cli import app
from specctl.core.checkpoint import save_checkpoint
from specctl.core.errors import SpecctlError
from specctl.core.rundir import RunDir
from specctl.timeseries.builders import missing_builds, spec_test_inputs
from specctl.timeseries.distill import distill, prepare, validation_metrics
from specctl.timeseries.early_exit import EarlyExit, draft_stepper, exit_config, load_draft
from specctl.timeseries.forecast import Norm, forecast_cached, times_for
from specctl.timeseries.model import Stepper, TimerXL, checkpoint_config
from specctl.timeseries.pretrain import pretrain
from specctl.timeseries.profile import SpecConfig
from specctl.timeseries.rng import series_seeds
from specctl.timeseries.speculative import cache_length
from specctl.timeseries.speculative_forecast import speculative_forecast
from specctl.timeseries.training import loader, window_length
from tests.helpers import smooth_series, tiny_timer
from tests.timeseries.test_distill import LOOKBACK, invoke, tiny_profile
from tests.timeseries.test_exactness import reference_forecast

CPU = torch.device("cpu")


def pair(e_layers: int = 3, exit_layer: int = 1, n_vars: int = 2, **model) -> tuple[TimerXL, EarlyExit]:
    target = tiny_timer(n_vars=n_vars, d_model=32, e_layers=e_layers, seed=0, **model)
    return target, EarlyExit(target, exit_layer).eval()


def forecast(target, draft, contexts: torch.Tensor, horizon: int, spec: SpecConfig, seed: int = 0):
    return speculative_forecast(target, draft, contexts, horizon, spec, series_seeds(seed, torch.arange(len(contexts))))


@pytest.mark.parametrize("emit, target_opens", [("target_mean", False), ("draft_mean", False), ("target_mean", True)])
def test_shared_cache_gives_the_cache_free_reference_and_the_own_cache_forecast(emit, target_opens):
    target, draft = pair()
    P, horizon = target.cfg.patch_len, 15 * target.cfg.patch_len
    contexts = smooth_series(6, 3 * P, 2, seed=2)
    _, apart = pair()  # the same weights in other modules: its draft cannot share this target's cache
    tstep = Stepper(target, 6, cache_length(3 * P, horizon, P, 3))
    assert draft_stepper(draft, tstep).cache is tstep.cache
    assert draft_stepper(apart, tstep).cache.k.shape[0] == 1  # a cache of its own, of its one layer
    mixed = 0
    for tol in (0.2, 0.3, 0.35, 0.5):
        spec = SpecConfig(rule="tolerance", tol=tol, emit=emit, k=3, target_opens=target_opens)
        result = forecast(target, draft, contexts, horizon, spec)
        torch.testing.assert_close(result.forecast, forecast(target, apart, contexts, horizon, spec).forecast,
                                   atol=1e-5, rtol=0)
        for b in range(6):
            expected = reference_forecast(target, draft, contexts[b : b + 1], horizon, 3, tol, emit, target_opens)
            torch.testing.assert_close(result.forecast[b : b + 1], expected, atol=2e-4, rtol=0)
        mixed += 0 < int(result.accepted.sum()) < int(result.proposed.sum())
    assert mixed, "the test needs settings that accept some tokens and reject others"


def test_everything_rejected_is_target_only_decoding():
    target, draft = pair(channel_independent=True)
    P, horizon = target.cfg.patch_len, 9 * target.cfg.patch_len
    contexts = smooth_series(4, 4 * P, 2, seed=3)
    result = forecast(target, draft, contexts, horizon, SpecConfig(rule="tolerance", tol=0.0, k=3))
    assert int(result.accepted.sum()) == 0 and int(result.proposed.sum()) > 0
    torch.testing.assert_close(result.forecast, forecast_cached(target, contexts, horizon), atol=1e-5, rtol=0)


def test_shared_cache_equals_a_recompute_over_the_emitted_forecast():
    target, draft = pair(e_layers=3, exit_layer=2)
    P, K, n0, steps = target.cfg.patch_len, 3, 3, 12
    contexts = smooth_series(5, n0 * P, 2, seed=4)
    tstep = Stepper(target, 5, cache_length(n0 * P, steps * P, P, K))
    result = forecast(tstep, draft, contexts, steps * P, SpecConfig(rule="tolerance", tol=0.4, k=K))
    assert 0 < int(result.accepted.sum()) < int(result.proposed.sum())
    norm = Norm.fit(contexts, target.cfg)
    emitted = norm.tokens(torch.cat([contexts, result.forecast], dim=1), P)  # [B, C, n0 + steps, P]
    fresh = target.new_cache(5, tstep.max_len)
    with torch.no_grad():
        target(emitted, times_for(5, 0, n0 + steps, CPU), fresh)
    final = n0 + steps - K - 1  # slots the last round may still hold proposals in lie beyond (speculative.py)
    for got, want in ((tstep.cache.k, fresh.k), (tstep.cache.v, fresh.v)):  # every layer, the draft's included
        torch.testing.assert_close(got[..., :final, :], want[..., :final, :], atol=1e-4, rtol=0)


class TargetSteps:
    """A K policy that never drafts: the engine's target steps, the target's own ancestral sampling."""

    def opening(self) -> int:
        return 0

    def __call__(self, state) -> int:
        return 0


def test_exact_rule_with_the_early_exit_emits_the_targets_law():
    """Against the target's own sampling through the same engine (two independent sets of seeds): any corruption of
    the target's context by the draft's writes to the shared cache would change the law."""
    series, tokens = 4000, 4
    target, draft = pair(e_layers=2, exit_layer=1, patch_len=2)
    P = target.cfg.patch_len
    contexts = smooth_series(1, 6 * P, 2, seed=5).expand(series, -1, -1).contiguous()
    spec = SpecConfig(rule="exact", emit="sample", sigma=0.3, k=3, exact_max_tries=32)
    seeds = torch.arange(series)
    spec_run = speculative_forecast(target, draft, contexts, tokens * P, spec, series_seeds(1, seeds))
    assert int(spec_run.cap_hits.sum()) == 0
    assert 0.1 < int(spec_run.accepted.sum()) / int(spec_run.proposed.sum()) < 0.9, "needs accepts and rejects"
    alone = speculative_forecast(target, draft, contexts, tokens * P, spec, series_seeds(2, seeds),
                                 policy=TargetSteps())
    assert int(alone.proposed.sum()) == 0
    y, z = (r.forecast.double().reshape(series, tokens, -1).numpy() for r in (spec_run, alone))
    for n in range(tokens):
        for value in range(y.shape[2]):
            assert stats.ks_2samp(y[:, n, value], z[:, n, value]).pvalue > 1e-4, (n, value)
        if n:  # a joint statistic: consecutive tokens together
            assert stats.ks_2samp(y[:, n - 1 : n + 1].sum((1, 2)), z[:, n - 1 : n + 1].sum((1, 2))).pvalue > 1e-4, n


def save_timer(folder: Path, model: TimerXL) -> str:
    save_checkpoint(folder, model.state_dict(), checkpoint_config(model, LOOKBACK, ["x0", "x1"], {}))
    return str(folder)


def test_checkpoint_is_the_head_only_and_loads_only_over_its_target(tmp_path):
    target, draft = pair(n_vars=2)
    target_ref = save_timer(tmp_path / "target", target)
    with torch.no_grad():
        draft.head.weight.add_(0.1)  # a trained head differs from the target's readout
    folder = tmp_path / "exit"
    save_checkpoint(folder, draft.state_dict(), exit_config(draft, target_ref, LOOKBACK, ["x0", "x1"], {}))
    assert set(load_file(str(folder / "model.safetensors"))) == {"norm.weight", "norm.bias", "head.weight",
                                                                   "head.bias"}
    config = json.loads((folder / "config.json").read_text())
    assert config["target"] == target_ref and config["exit_layer"] == 1
    loaded = load_draft(str(folder), target, target_ref)
    assert isinstance(loaded, EarlyExit) and loaded.target is target
    tokens, times = smooth_series(2, 4 * 8, 2).reshape(2, 2, 4, 8), times_for(2, 0, 4, CPU)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, times)[0], draft(tokens, times)[0])
    assert isinstance(load_draft(target_ref, target, target_ref), TimerXL)  # a separate draft loads as before

    other = save_timer(tmp_path / "other", target)  # the same weights at another path: not the named target
    with pytest.raises(SpecctlError, match=f"is an early exit of {target_ref}, not of spec.target {other}"):
        load_draft(str(folder), target, other)
    retrained = tiny_timer(n_vars=2, d_model=32, e_layers=3, seed=1)
    save_timer(tmp_path / "target", retrained)  # the named target, trained again: the head is stale
    with pytest.raises(SpecctlError, match="trained on another version"):
        load_draft(str(folder), retrained, target_ref)


def exit_profile(target: str, **distill):
    return tiny_profile(model={"d_model": 32, "e_layers": 2}, distill={"target": target, "exit_layer": 1, **distill},
                        train={"save_to": "artifacts/exit"})


@pytest.fixture(scope="module")
def deep_target(tmp_path_factory) -> str:
    """A two-layer target, pretrained a little so that its layers differ in what they add."""
    folder = tmp_path_factory.mktemp("deep")
    profile = tiny_profile(model={"d_model": 32, "e_layers": 2}, train={"save_to": str(folder / "target")},
                           run_root=str(folder / "runs"))
    with RunDir.create(profile, "pretrain", "cpu") as run:
        pretrain(profile, CPU, run, False)
    return str(folder / "target")


def test_distill_trains_the_exit_head_alone_and_lowers_its_loss(deep_target, one_thread):
    profile = exit_profile(deep_target)
    setup = prepare(profile, CPU)
    batches = lambda: loader([setup.data.val], window_length(profile), 16, False, 0)  # noqa: E731
    with torch.no_grad():
        untuned = validation_metrics(profile.distill, setup.draft, setup.target, batches(), LOOKBACK)["val_loss"]
    frozen = {k: v.clone() for k, v in setup.target.state_dict().items()}
    with RunDir.create(profile, "distill", "cpu") as run:
        result = distill(profile, CPU, run, False)
    assert result.fit.best_val < 0.9 * untuned
    assert result.metrics()["exit_layer"] == 1 and result.parameters < 2000  # a norm and a 32 -> 8 linear
    assert set(load_file("artifacts/exit/model.safetensors")) == {"norm.weight", "norm.bias", "head.weight",
                                                                    "head.bias"}
    assert json.loads(Path("artifacts/exit/config.json").read_text())["target"] == deep_target
    assert all(torch.equal(frozen[k], v) for k, v in setup.target.state_dict().items())


def test_bad_early_exit_settings_exit_2(deep_target):
    cases = [(exit_profile(deep_target, exit_layer=2), "distill.exit_layer 2 must lie between 1 and the target's 2"),
             (exit_profile(deep_target).model_copy(update={"train": exit_profile(deep_target).train.model_copy(
                 update={"tune_last_layers": 1})}), "train.tune_last_layers does not apply to an early-exit draft")]
    for profile, message in cases:
        code, output = invoke(profile)
        assert code == 2 and message in output, output


FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5", "--set", "data.max_eval_windows=16",
        "--set", "data.synthetic.length=3000", "--set", "spec.max_windows=16", "--set", "spec.repeats=1",
        "--set", "spec.horizon=32", "--set", "spec.sliding_baseline=false"]


def test_spec_test_with_the_early_exit_profile_end_to_end(one_thread):
    runner = CliRunner()
    result = runner.invoke(app, ["spec-test", "--profile", "quickstart/spec-test-early-exit", *FAST,
                                 "--train-missing", "--json"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    assert metrics["windows"] == 16 and 0 <= metrics["acceptance_rate"] <= 1 and metrics["proposed"] > 0
    patch = load_profile("quickstart/spec-test-early-exit").model.patch_len
    distances = metrics["draft_rmse_by_step"]  # the early exit's distance to its target along the target's forecast
    assert len(distances) == math.ceil(metrics["horizon"] / patch) and all(d > 0 for d in distances)
    assert set(load_file("artifacts/quickstart/early-exit/model.safetensors")) == {
        "norm.weight", "norm.bias", "head.weight", "head.bias"}
    shutil.copytree("artifacts/quickstart/target", "artifacts/copy")
    refused = runner.invoke(app, ["spec-test", "--profile", "quickstart/spec-test-early-exit", *FAST,
                                  "--set", 'spec.target="artifacts/copy"'])
    line = " ".join(refused.output.split())
    assert refused.exit_code == 2 and "Traceback" not in refused.output, refused.output
    assert "is an early exit of artifacts/quickstart/target, not of spec.target artifacts/copy" in line


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_with_the_shared_cache_match_eager_rounds():
    target, draft = pair()
    target, draft = target.cuda(), draft.cuda()
    P, horizon, B = target.cfg.patch_len, 12 * target.cfg.patch_len, 4
    contexts = smooth_series(B, 3 * P, 2, seed=6).cuda()
    spec = SpecConfig(rule="tolerance", tol=0.35, k=3)
    eager = forecast(target, draft, contexts, horizon, spec)
    tstep = Stepper(target, B, cache_length(3 * P, horizon, P, 3), graphs=True)
    dstep = draft_stepper(draft, tstep, graphs=True)
    graphed = speculative_forecast(tstep, dstep, contexts, horizon, spec, series_seeds(0, torch.arange(B)).cuda())
    rounds = speculative_forecast(tstep, dstep, contexts, horizon, spec, series_seeds(0, torch.arange(B)).cuda(),
                                  round_graphs={})
    for other in (graphed, rounds):
        assert torch.equal(other.accepted, eager.accepted)
        np.testing.assert_allclose(other.forecast.cpu().numpy(), eager.forecast.cpu().numpy(), atol=1e-4)


@pytest.mark.parametrize("name, separate, layers, exit_layer", [
    ("etth1/spec-test-early-exit", "etth1/spec-test", 8, 2),
    ("ettm1/spec-test-early-exit", "ettm1/spec-test", 8, 2),
    ("quickstart/spec-test-early-exit", "quickstart/spec-test", 2, 1),
])
def test_early_exit_profiles_train_their_chain_and_decode_as_the_separate_drafts(name, separate, layers, exit_layer):
    profile, other = load_profile(name), load_profile(separate)
    builds = missing_builds(spec_test_inputs(profile), profile)  # nothing is trained in this folder
    target, draft = (b.profile for b in builds)
    assert [b.checkpoint for b in builds] == [profile.spec.target, profile.spec.draft]
    assert target.model.e_layers == layers and draft.distill.exit_layer == exit_layer
    assert draft.distill.target == profile.spec.target == other.spec.target
    assert draft.model.model_dump() == target.model.model_dump()  # the draft's blocks are the target's
    same = {k: v for k, v in other.spec.model_dump().items() if k not in ("draft", "draft_profile")}
    assert {k: profile.spec.model_dump()[k] for k in same} == same


def test_bf16_training_runs_pretrain_on_policy_distill_and_the_early_exit(tmp_path, one_thread):
    """train.precision = "bf16" through every time-series training path the benchmarks use: pretrain with the
    rollout validation metric, a separate draft distilled on the target's own rollouts, an early exit with an
    adapter; each ends at a finite validation loss below its first epoch's and writes fp32 weights."""
    bf16 = {"precision": "bf16", "epochs": 2}
    target = str(tmp_path / "target")
    profile = tiny_profile(model={"d_model": 32, "e_layers": 2},
                           train={**bf16, "val_metric": "rollout", "save_to": target})
    pretrained = pretrain(profile, CPU, RunDir.create(profile, "pretrain", "cpu"), False)
    assert math.isfinite(pretrained.fit.best_val)
    for profile in (tiny_profile(distill={"target": target, "on_policy": 0.5}, train={**bf16, "save_to": "a/draft"}),
                    exit_profile(target, on_policy=0.5, exit_adapter=16).model_copy(update={
                        "train": tiny_profile(train={**bf16, "save_to": "a/exit"}).train})):
        history = distill(profile, CPU, RunDir.create(profile, "distill", "cpu"), False).fit.history
        assert math.isfinite(history[-1]["val_loss"]) and history[-1]["val_loss"] < history[0]["val_loss"]
        assert all(t.dtype == torch.float32 for t in load_file(f"{profile.train.save_to}/model.safetensors").values())
