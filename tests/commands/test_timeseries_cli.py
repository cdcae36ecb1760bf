"""End-to-end commands and bad input: one clear line, exit 2, no traceback, nothing that looks finished."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from specctl.backends import load_profile
from specctl.cli import app
from specctl.core.checkpoint import load_weights
from specctl.timeseries.model import load_timer

runner = CliRunner()
FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5", "--set", "data.max_eval_windows=16",
        "--set", "data.synthetic.length=3000"]


def invoke(*args):
    return runner.invoke(app, list(args))


def assert_clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert not list(Path("runs").rglob("metrics.json")), "a failed run must not leave a finished result"


def test_help_lists_working_commands():
    result = invoke("--help")
    assert result.exit_code == 0 and "pretrain" in result.output and "spec-test" in result.output


def test_pretrain_quickstart_end_to_end_and_resume():
    result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.epochs=2", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    assert metrics["epochs"] == 2 and {h["horizon"] for h in metrics["horizons"]} == {32, 64}
    assert metrics["average"]["cached"]["mse"] < 1.0
    run = next(Path("runs/pretrain").iterdir())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["seed"] == 0 and "torch" in manifest["versions"]
    assert (run / "profile.toml").is_file() and (run / "checkpoints/best/model.safetensors").is_file()
    assert (Path("artifacts/quickstart/target") / "config.json").is_file()
    resumed = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.epochs=3",
                     "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output[resumed.output.index("{"):])["epochs"] == 3


def test_pretrain_can_pick_the_best_epoch_by_validation_rollout_mse():
    result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.epochs=2",
                    "--set", 'train.val_metric="rollout"', "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    history = metrics["history"]
    assert all(0 < r["val_loss"] < 10 and "val_next_patch" in r for r in history)
    assert metrics["best_val_loss"] == min(r["val_loss"] for r in history)


def test_pretrain_trains_on_extra_series_and_says_so():
    too_sparse = invoke("pretrain", "--profile", "quickstart/target", *FAST,
                        "--set", 'data.extra_train=[{name="synthetic", every=100}]')
    assert_clean_error(too_sparse, "data.extra_train[0] ('synthetic')", "fewer than one training window")
    extra = 'data.extra_train=[{name="synthetic", every=2}]'
    result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", extra, "--json")
    assert result.exit_code == 0, result.output
    (note,) = json.loads(result.output[result.output.index("{"):])["data_notes"]
    assert note.startswith("data.extra_train: 1782 more training windows from 2 series of synthetic (every 2)")
    finished = next(p for p in Path("runs/pretrain").iterdir() if (p / "metrics.json").is_file())
    saved = load_profile(str(finished / "profile.toml"))
    assert [(e.name, e.every) for e in saved.data.extra_train] == [("synthetic", 2)]


def test_recipe_sweep_runs_one_pretrain_per_trial_and_ranks_by_validation():
    result = invoke("sweep", "--profile", "quickstart/tune-target", *FAST, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["ranked_by"] == "best_val_loss" and payload["ran"] == 2 and not payload["failed"]
    losses = [row["best_val_loss"] for row in payload["top"]]
    assert losses == sorted(losses)
    rows = pd.read_csv(payload["results"])
    assert set(rows["train.lr"]) == {2e-3, 5e-4} and rows["mse"].notna().all() and rows["mse_sliding_64"].notna().all()
    for checkpoint in rows["checkpoint"]:  # each trial keeps its own best checkpoint, never train.save_to
        assert (Path(checkpoint) / "model.safetensors").is_file() and "runs/pretrain" in checkpoint
    for run_dir in rows["run_dir"]:  # the same metrics.json shape as every other run
        assert set(json.loads((Path(run_dir) / "metrics.json").read_text())) == {"metrics", "definitions"}
    report = invoke("analyze", payload["results"], "--json")
    assert report.exit_code == 0, report.output
    best = json.loads(report.output)["recommendations"][0]
    assert best["ranked_by"] == "best_val_loss" and best["best"]["best_val_loss"] == losses[0]
    assert not Path("artifacts/quickstart/target").exists()
    again = invoke("sweep", "--profile", "quickstart/tune-target", *FAST, "--json")
    assert json.loads(again.output[again.output.index("{"):])["ran"] == 0
    alone = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.lr=5e-4", "--json")
    alone_loss = json.loads(alone.output[alone.output.index("{"):])["best_val_loss"]  # a trial = the same run alone
    assert alone_loss == pytest.approx(rows.loc[rows["train.lr"] == 5e-4, "best_val_loss"].item(), rel=1e-6)


def test_dry_run_prints_resolved_profile():
    result = invoke("pretrain", "--profile", "etth1/draft-025", "--dry-run")
    assert result.exit_code == 0 and "scale_d_model = 0.25" in result.output and not Path("runs").exists()


def test_spec_test_names_the_commands_for_missing_checkpoints():
    assert_clean_error(invoke("spec-test", "--profile", "quickstart", *FAST),
                       "checkpoint artifacts/quickstart/distilled is missing", "specctl pretrain --profile "
                       "quickstart/target && specctl distill --profile quickstart/distill", "--train-missing")
    assert not Path("artifacts").exists() and not Path("runs").exists()


def test_missing_profile():
    assert_clean_error(invoke("pretrain", "--profile", "nope.toml"), "profile not found")


def test_toml_syntax_error(tmp_path):
    (tmp_path / "bad.toml").write_text("[train\nlr = 1\n")
    assert_clean_error(invoke("pretrain", "--profile", str(tmp_path / "bad.toml")), "TOML syntax error", "line 1")


def test_unknown_key_and_wrong_type():
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", "--set", "train.epoch=3"),
                       "unknown key 'train.epoch'", "did you mean 'train.epochs'")
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", "--set", "train.epochs=many"),
                       "train.epochs")


def test_missing_data_file_says_where_it_looked(tmp_path):
    assert_clean_error(invoke("pretrain", "--profile", "etth1/target", "--set", f'data.dir="{tmp_path}"'),
                       "ETTh1", str(tmp_path))


def csv_file(tmp_path, rows, text_column=False):
    path = tmp_path / "series.csv"
    data = np.random.default_rng(0).normal(size=(rows, 2))
    lines = ["date,a,b" + (",c" if text_column else "")]
    for i, (a, b) in enumerate(data):
        lines.append(f"2020-01-01 {i},{a},{b}" + (",x" if text_column else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_with_non_numeric_column(tmp_path):
    path = csv_file(tmp_path, 400, text_column=True)
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", "--set", f'data.path="{path}"'),
                       "non-numeric", "c")


def test_csv_too_short_for_lookback_and_horizon(tmp_path):
    path = csv_file(tmp_path, 100)
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", "--set", f'data.path="{path}"'), "rows")


def test_lookback_not_a_multiple_of_patch():
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", "--set", "data.lookback=100"),
                       "not a multiple of model.patch_len")


def test_checkpoint_that_does_not_match_profile():
    first = invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", 'train.save_to="artifacts/small"')
    assert first.exit_code == 0, first.output
    for metrics in Path("runs").rglob("metrics.json"):
        metrics.unlink()
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", *FAST,
                              "--set", 'train.init_from="artifacts/small"'), "does not match the profile", "d_model")
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", 'model.norm_position="post"',
                              "--set", 'train.init_from="artifacts/small"'), "norm_position pre (profile: post)")
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", "model.rope_fraction=0.5",
                              "--set", 'train.init_from="artifacts/small"'), "rope_fraction 1.0 (profile: 0.5)")
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", "model.layer_scale=0.1",
                              "--set", 'train.init_from="artifacts/small"'), "layer_scale None (profile: 0.1)")


def test_a_checkpoint_starts_a_dataset_with_another_variable_count_and_attention():
    first = invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", 'train.save_to="artifacts/three"')
    assert first.exit_code == 0, first.output
    five = invoke("pretrain", "--profile", "quickstart/draft", *FAST, "--set", "data.synthetic.n_vars=5",
                  "--set", "model.channel_independent=true",
                  "--set", 'train.init_from="artifacts/three"', "--set", 'train.save_to="artifacts/five"', "--json")
    assert five.exit_code == 0, five.output
    model, config = load_timer("artifacts/five")
    assert config["model"]["n_vars"] == 5 and model.cfg.channel_independent


def test_fine_tuning_the_last_layers_leaves_the_earlier_ones_as_they_were():
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.tune_last_layers=3"),
                       "train.tune_last_layers 3 is more than the model's 2 layers")
    start = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", 'train.save_to="artifacts/start"')
    assert start.exit_code == 0, start.output
    tuned = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", 'train.init_from="artifacts/start"',
                   "--set", "train.tune_last_layers=1", "--set", 'train.save_to="artifacts/tuned"')
    assert tuned.exit_code == 0, tuned.output
    before, after = load_weights("artifacts/start"), load_weights("artifacts/tuned")
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and all(key.startswith(("blocks.1.", "norm.", "head.")) for key in changed)
    assert "head.weight" in changed and "blocks.1.ffn.0.weight" in changed


def test_missing_init_checkpoint_names_the_profile_that_trains_it():
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/draft", *FAST,
                              "--set", 'train.init_from="artifacts/quickstart/target"'),
                       "train.init_from: checkpoint not found: artifacts/quickstart/target",
                       "(train it first: specctl pretrain --profile quickstart/target)")
    assert_clean_error(invoke("pretrain", "--profile", "quickstart/draft", *FAST,
                              "--set", 'train.init_from="artifacts/quickstart/distilled"'),
                       "(train it first: specctl distill --profile quickstart/distill)")


def test_missing_checkpoint_for_spec_test():
    assert_clean_error(invoke("spec-test", "--profile", "quickstart", "--set", 'spec.target="nowhere"',
                              "--set", 'spec.target_profile=""',
                              "--set", 'spec.draft_profile=""'), "checkpoint not found")


@pytest.mark.parametrize("override, fragment", [("spec.k=-1", "spec.k"), ("spec.sigma=-1", "spec.sigma"),
                                                ("spec.bias=0.9", "spec.bias"), ("spec.horizon=0", "spec.horizon")])
def test_impossible_spec_settings(override, fragment):
    assert_clean_error(invoke("spec-test", "--profile", "quickstart", "--set", override), fragment)


def test_ctrl_c_marks_the_run_interrupted_and_says_how_to_resume(monkeypatch):
    import specctl.timeseries.backend

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(specctl.timeseries.backend, "pretrain", interrupted)
    result = invoke("pretrain", "--profile", "quickstart/target", *FAST)
    assert result.exit_code == 130 and "Traceback" not in result.output
    run = next(Path("runs/pretrain").iterdir())
    assert f"specctl pretrain --profile {run}/profile.toml --resume" in "".join(result.output.split("\n"))
    assert json.loads((run / "manifest.json").read_text())["status"] == "interrupted"
    assert not (run / "metrics.json").exists()


def test_a_training_that_fails_marks_its_run_failed(monkeypatch):
    import specctl.timeseries.backend
    from specctl.core.errors import SpecctlError

    assert invoke("pretrain", "--profile", "quickstart/target", *FAST).exit_code == 0
    for metrics in Path("runs").rglob("metrics.json"):
        metrics.unlink()

    def diverged(profile, device, run, *args):
        run.checkpoints.mkdir()  # an epoch's worth of work
        raise SpecctlError("training diverged: loss is nan")

    monkeypatch.setattr(specctl.timeseries.backend, "distill", diverged)
    assert_clean_error(invoke("distill", "--profile", "quickstart/distill", *FAST), "training diverged")
    manifest = json.loads((next(Path("runs/distill").iterdir()) / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "diverged" in manifest["error"]
