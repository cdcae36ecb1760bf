"""LLM sweeps on tiny local files: exit layer x gamma through `specctl sweep` in one session, and the LLM plots."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from specctl.commands import sweep as sweep_cmd
from specctl.commands.analyze import analyze
from specctl.commands.plot import plot
from specctl.core.plots import PLOTS, Plot, draw
from specctl.llm import sweep as llm_sweep
from specctl.llm.spectest import load_target, pick_draft
from tests.commands.test_llm_cli import PROFILE, invoke, work  # noqa: F401  (the module-scoped pretrained target)
from tests.timeseries.test_plots import grid_results

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


def assert_title_clear_of_labels(plot: Plot, ok: pd.DataFrame) -> None:
    """The figure's title overlaps no axis label (#22, 11: it collided with a long y-label)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = draw(plot, plot.rows(ok))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    title = fig._suptitle.get_window_extent(canvas.get_renderer())
    for ax in fig.axes:
        for text in (ax.yaxis.label, ax.xaxis.label, ax.title):
            assert not text.get_text() or not title.overlaps(text.get_window_extent(canvas.get_renderer()))


@pytest.fixture(scope="module")
def finetuned(work):  # noqa: F811
    """Drafts at layers 0 and 1 and their finetune-head results.csv (run directory under the fixture's folder)."""
    out = json.loads(invoke("finetune-head", "-p", str(work / "tiny.toml"), "--set", f'train.save_to="{work}/drafts"',
                            "--set", "train.epochs=1", "--set", f'run_root="{work}/runs"', "--json").output)
    assert Path(out["run_dir"]).is_dir()  # --json names the run directory (#22, 9)
    return Path(out["results_csv"])


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

    report = json.loads(cli(analyze, str(csv), "--json").output)  # the sweep's closing hint runs (#22, 6)
    assert report["kind"] == "LLM spec-test sweep" and report["recommendations"][0]["ranked_by"] == "speedup"
    assert {k["key"] for k in report["keys"]} == {"llm.exit_layer", "llm.spec.gamma"} and report["verdict"]
    heads = json.loads(cli(analyze, str(finetuned), "--json").output)
    assert heads["kind"] == "finetune-head results" and heads["recommendations"][0]["best"]["head"] == "tuned"

    grid_results().to_csv(tmp_path / "timeseries.csv", index=False)  # an LLM sweep beside another CSV (#22, 7)
    figures = json.loads(cli(plot, str(csv), str(tmp_path / "timeseries.csv"), "--out", str(tmp_path / "figs"),
                             "--json").output)
    assert_figures([f for f in figures["files"] if Path(f).stem in LLM_PLOTS], LLM_PLOTS)
    assert {"pareto_frontier", "k_effect"} <= {Path(f).stem for f in figures["files"]}
    assert "layer_quality" in figures["skipped"]  # no finetune columns in a sweep CSV
    assert_title_clear_of_labels(PLOTS["layer_acceptance"], pd.read_csv(csv).assign(status="ok"))

    quality = json.loads(cli(plot, str(finetuned), "--out", str(tmp_path / "quality"), "--only", "layer_quality",
                             "--only", "layer_agreement", "--json").output)
    assert quality["skipped"] == {}
    assert_figures(quality["files"], ["layer_quality", "layer_agreement"])
