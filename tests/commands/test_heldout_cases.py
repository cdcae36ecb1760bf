"""Cases met on files no one here tuned to (#17): synthetic data shaped like each, through the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from specctl.cli import app

FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=3", "--set", "data.max_eval_windows=8",
        "--set", "data.synthetic.length=3000"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def payload(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def write_csv(path: Path, rows: int, n_vars: int, freq: str = "D") -> Path:
    t = np.arange(rows)[:, None]
    values = np.sin(2 * np.pi * t / 7 + np.arange(n_vars)) + 0.01 * t + 0.1 * np.cos(t / 3)
    frame = pd.DataFrame(values, columns=[f"v{j}" for j in range(n_vars)])
    frame.insert(0, "date", pd.date_range("2000-01-01", periods=rows, freq=freq))
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Path:
    """The quick start's target and draft, trained once for this module (in its own folder)."""
    folder = tmp_path_factory.mktemp("pair")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        payload(invoke("pretrain", "-p", "quickstart/target", *FAST, "--json"))
        payload(invoke("distill", "-p", "quickstart/distill", *FAST, "--json"))
    finally:
        os.chdir(cwd)
    return folder / "artifacts" / "quickstart"


def spec(pair: Path, *more: str) -> list[str]:
    return ["spec-test", "-p", "quickstart/spec-test", *FAST, "--set", f'spec.target="{pair / "target"}"',
            "--set", f'spec.draft="{pair / "distilled"}"', "--set", "spec.max_windows=8", "--set", "spec.repeats=1",
            "--json", *more]


def test_spec_test_checks_only_the_split_it_decodes(pair):
    """A short weekly file: the val split cannot hold lookback + horizon, the test split can (966 rows in the case
    met; here 1000 rows at lookback 96 + horizon 64: val has 100 + 96 rows, test 200 + 96)."""
    data = write_csv(Path("weekly.csv"), 1000, 3, freq="W")
    result = invoke(*spec(pair, "--set", f'data.path="{data}"', "--set", 'data.name="weekly"',
                          "--set", "spec.horizon=110"))
    metrics = payload(result)
    assert metrics["horizon"] == 110 and metrics["windows"] == 8


def test_a_horizon_in_whole_patches_too_long_names_the_knobs():
    """An 8-variable daily file whose test split cannot hold lookback + the horizon rounded up to whole patches."""
    data = write_csv(Path("daily.csv"), 1100, 3)
    result = invoke("pretrain", "-p", "quickstart/target", *FAST, "--set", f'data.path="{data}"',
                    "--set", 'data.name="daily"', "--set", "data.horizons=[120]")
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.split())
    assert "horizon 120 rounded up to whole patches (128)" in text and "a patch length dividing the horizon" in text
    assert "a horizon of at most" in text and "a shorter data.lookback" in text


def test_the_split_protocol_is_said_and_can_be_named(pair):
    data = write_csv(Path("my_ett_copy.csv"), 3000, 3, freq="h")
    common = ["--set", f'data.path="{data}"', "--set", 'data.name="my_ett_copy"']
    metrics = payload(invoke(*spec(pair, *common)))
    assert metrics["split"].startswith("70/10/20 by time") and "the file name" in metrics["split"]
    refused = invoke(*spec(pair, *common, "--set", 'data.split="ett-hourly"'))
    assert refused.exit_code == 2 and "ETT hourly borders" in refused.output and 'data.split = "ratio' in refused.output


def test_tolerance_relative_to_the_targets_own_error(pair):
    absolute = payload(invoke(*spec(pair)))
    assert absolute["tol"] == 0.15 and absolute["target_rmse_val"] > 0
    assert absolute["tol_relative"] == pytest.approx(0.15 / absolute["target_rmse_val"])
    relative = payload(invoke(*spec(pair, "--set", "spec.tol_relative=0.5")))
    assert relative["tol"] == pytest.approx(0.5 * relative["target_rmse_val"]) and relative["tol_relative"] == 0.5


def test_piped_tables_keep_their_values(pair):
    result = invoke(*[a for a in spec(pair) if a != "--json"])
    assert result.exit_code == 0, result.output
    assert "speedup vs KV-cached target" in result.output and "…" not in result.output
    assert "verdict:" in result.output


def test_sigterm_marks_a_run_interrupted(tmp_path):
    child = subprocess.Popen([sys.executable, "-m", "specctl", "pretrain", "-p", "quickstart/target",
                              "--set", "train.epochs=50", "--set", "data.synthetic.length=3000"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "runs" / "pretrain").glob("*/manifest.json")):  # training has started
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read() if child.poll() else "slow"
        time.sleep(0.1)
    time.sleep(1.0)
    child.send_signal(signal.SIGTERM)
    assert child.wait(timeout=60) == 130
    manifest = json.loads(next((tmp_path / "runs" / "pretrain").glob("*/manifest.json")).read_text())
    assert manifest["status"] == "interrupted"
    assert "--resume" in child.stderr.read()


def test_an_interrupt_inside_evaluated_code_still_exits_130_under_python_m(tmp_path):
    # the rare case behind the test above: a SIGTERM landing in exec'd code (a dataclass being made) left CPython
    # flagged to die by SIGINT after `python -m` returned, whatever exit status specctl chose
    (tmp_path / "interrupted_module.py").write_text(
        "from specctl.commands.common import handle_errors\n"
        "handle_errors(lambda: exec('raise KeyboardInterrupt'))()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "interrupted_module"], env=env, capture_output=True, text=True)
    assert done.returncode == 130 and "interrupted" in done.stderr


def test_distill_warns_when_no_sigma_accepts_the_draft(pair, tmp_path):
    result = invoke("distill", "-p", "quickstart/distill", *FAST, "--set", f'distill.target="{pair / "target"}"',
                    "--set", "distill.sigmas=[0.001]", "--set", "spec.sigma=0.001",
                    "--set", f'train.save_to="{tmp_path / "d"}"', "--json")
    warnings = payload(result)["warnings"]
    assert any("predicted acceptance is 0.000" in w and 'rule "tolerance" with spec.tol >=' in w for w in warnings)


def test_distill_in_a_fresh_folder_names_the_command_for_its_target():
    result = invoke("distill", "-p", "quickstart/distill", *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "specctl pretrain --profile quickstart/target" in " ".join(result.output.split())
    assert not Path("runs").exists() or not list(Path("runs").rglob("manifest.json"))


def test_a_sweep_without_checkpoints_stops_before_its_first_trial():
    result = invoke("sweep", "-p", "quickstart/sweep", *FAST)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "specctl pretrain --profile quickstart/target" in " ".join(result.output.split())
    assert not Path("runs/sweep").exists()
