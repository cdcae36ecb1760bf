"""LLM sweeps on tiny local files: exit layer x gamma through `specctl sweep` in one session, and the LLM plots."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from specctl.commands import sweep as sweep_cmd
from specctl.commands.plot import plot
from specctl.llm import sweep as llm_sweep
from specctl.llm.spectest import load_target, pick_draft
from tests.commands.test_llm_cli import PROFILE, invoke, work  # noqa: F401  (the module-scoped pretrained target)

GRID = '\n[sweep]\n"llm.exit_layer" = [0, 1]\n"llm.spec.gamma" = [2, 3]\n'
LLM_PLOTS = ["layer_acceptance", "layer_pareto", "acceptance_lengths"]

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(command, *args: str):
    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def assert_figures(files: list[str], names: list[str]) -> None:
    assert sorted(Path(f).name for f in files) == sorted(f"{n}.{x}" for n in names for x in ("png", "pdf"))
    for f in map(Path, files):
        assert f.read_bytes()[:4] == (b"\x89PNG" if f.suffix == ".png" else b"%PDF") and f.stat().st_size > 1000


@pytest.fixture(scope="module")
def finetuned(work):  # noqa: F811
    """Drafts at layers 0 and 1 and their finetune-head results.csv (run directory under the fixture's folder)."""
    out = invoke("finetune-head", "-p", str(work / "tiny.toml"), "--set", f'train.save_to="{work}/drafts"',
                 "--set", "train.epochs=1", "--set", f'run_root="{work}/runs"', "--json")
    return Path(json.loads(out.output)["results_csv"])


def test_llm_sweep_reuses_one_session_and_plots(work, finetuned, tmp_path, monkeypatch):  # noqa: F811
    profile = tmp_path / "sweep.toml"
    profile.write_text(PROFILE.format(data=work / "data", work=work) + GRID)
    loads = []
    monkeypatch.setattr(llm_sweep, "load_target", lambda *a: loads.append(a) or load_target(*a))
    drafts = []
    monkeypatch.setattr(llm_sweep, "pick_draft", lambda *a: drafts.append(a) or pick_draft(*a))
    csv = tmp_path / "results.csv"
    out = json.loads(cli(sweep_cmd.sweep, "-p", str(profile), "--set", "llm.spec.bootstrap=20",
                         "--out", str(csv), "--json").output)
    assert out["ran"] == 4 and out["failed"] == [] and len(loads) == 1 and len(drafts) == 2
    rows = pd.read_csv(csv)
    assert (rows["status"] == "ok").all() and len(rows) == 4
    assert rows[["position_acceptance_1", "accepted_len_0", "speedup_ci_low"]].notna().all().all()
    assert rows.loc[rows["llm.spec.gamma"] == 2, "accepted_len_3"].isna().all()

    figures = json.loads(cli(plot, str(csv), "--out", str(tmp_path / "figs"), "--json").output)
    assert_figures([f for f in figures["files"] if Path(f).stem in LLM_PLOTS], LLM_PLOTS)
    assert "layer_quality" in figures["skipped"]  # no finetune columns in a sweep CSV

    quality = json.loads(cli(plot, str(finetuned), "--out", str(tmp_path / "quality"), "--only", "layer_quality",
                             "--only", "layer_agreement", "--json").output)
    assert quality["skipped"] == {}
    assert_figures(quality["files"], ["layer_quality", "layer_agreement"])
