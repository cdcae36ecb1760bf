"""Sweep figures: every plot written as non-empty PNG and PDF; plots without their columns are skipped."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pandas as pd
import typer
from typer.testing import CliRunner

import specctl.timeseries.plots  # noqa: F401  (registers the time-series plots)
from specctl.commands.plot import plot as plot_cmd
from specctl.core.plots import PLOTS, render

SEED_PLOTS = {"acceptance_vs_mse", "acceptance_heatmap", "mse_heatmap", "k_effect", "pareto_frontier",
              "speedup_vs_predicted"}


def grid_results() -> pd.DataFrame:
    """A 2 sigma x 2 bias x 2 K sweep with plausible metrics."""
    rows = []
    for i, (sigma, bias, k) in enumerate(itertools.product([0.25, 0.5], [1.0, 2.0], [2, 4])):
        acceptance = min(1.0, sigma * bias)
        rows.append({"trial_id": f"t{i}", "spec.sigma": sigma, "spec.bias": bias, "spec.k": k,
                     "acceptance_rate": acceptance, "mean_accepted": acceptance * k, "mse": 0.45 + 0.02 * bias * sigma,
                     "mse_target": 0.45, "speedup": 1 + acceptance * k / 5,
                     "predicted_speedup": 1.1 + acceptance * k / 5,
                     "wall_s": 1.0, "status": "ok", "error": ""})
    return pd.DataFrame(rows)


def cli(*args: str):
    app = typer.Typer()
    app.command()(plot_cmd)
    return CliRunner().invoke(app, list(args))


def test_every_plot_is_written_as_png_and_pdf(tmp_path):
    assert set(PLOTS) >= SEED_PLOTS
    written, skipped = render(grid_results(), tmp_path / "plots", sorted(SEED_PLOTS))  # LLM plots: test_llm_sweep
    assert skipped == {}
    assert {p.name for p in written} == {f"{n}.{f}" for n in SEED_PLOTS for f in ("png", "pdf")}
    for path in written:
        head = path.read_bytes()[:8]
        assert path.stat().st_size > 1000 and head.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF")


def test_plots_whose_columns_were_not_swept_are_skipped_with_a_note(tmp_path):
    frame = grid_results().query("`spec.bias` == 1.0").drop(columns=["speedup"])
    frame.to_csv(tmp_path / "results.csv", index=False)
    result = cli(str(tmp_path / "results.csv"), "--out", str(tmp_path / "figs"))
    assert result.exit_code == 0, result.output
    assert "skipped acceptance_heatmap: spec.bias not swept" in result.output
    assert "skipped speedup_vs_predicted: no speedup column" in result.output
    assert (tmp_path / "figs" / "k_effect.pdf").stat().st_size > 0
    assert not (tmp_path / "figs" / "mse_heatmap.png").exists()


def test_plot_only_one_and_default_folder_beside_the_csv(tmp_path):
    grid_results().to_csv(tmp_path / "results.csv", index=False)
    result = cli(str(tmp_path / "results.csv"), "--only", "pareto_frontier", "--json")
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["files"]
    assert sorted(Path(f).name for f in files) == ["pareto_frontier.pdf", "pareto_frontier.png"]
    assert Path(files[0]).parent == tmp_path / "plots"
    assert cli(str(tmp_path / "results.csv"), "--only", "nope").exit_code == 2


def test_every_figure_has_a_title_and_speed_axes_their_break_even_line():
    from specctl.core.plots import draw

    for name in SEED_PLOTS:
        plot = PLOTS[name]
        fig = draw(plot, plot.rows(grid_results()))
        assert fig.get_suptitle(), name
        if name in ("speedup_vs_predicted", "pareto_frontier", "k_effect"):
            lines = [line for ax in fig.axes for line in ax.get_lines()]
            assert any(list(line.get_ydata()) == [1.0, 1.0] for line in lines), name


def overlapping(boxes) -> bool:
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_pareto_tick_and_point_labels_do_not_overlap():
    """MSEs that differ in the 4th digit and frontier points on one spot (the quick-start sweep under tolerance)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation

    from specctl.core.plots import draw

    k4 = grid_results()["spec.k"] == 4
    frame = grid_results().assign(mse=0.0542 + 0.00018 * k4, acceptance_rate=0.28 - 0.12 * k4)
    fig = draw(PLOTS["pareto_frontier"], frame)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        assert len(ticks) >= 2 and not overlapping(ticks)
        labels = [t for t in ax.texts if isinstance(t, Annotation)]  # the points' numbers and the settings key
        assert len(labels) >= 2 and not overlapping([t.get_window_extent(renderer) for t in labels])
        key = next(t for t in labels if ":" in t.get_text())
        assert not key.get_window_extent(renderer).overlaps(ax.xaxis.label.get_window_extent(renderer))


def test_a_plot_that_fails_leaves_no_figures_behind(tmp_path, monkeypatch):
    from specctl.core.plots import Plot
    from specctl.core.results import TIMESERIES_SWEEP

    def broken(ok, fig):
        raise ValueError("cannot convert float NaN to integer")

    monkeypatch.setitem(PLOTS, "zz_broken", Plot("zz_broken", "Broken", TIMESERIES_SWEEP, broken))
    grid_results().to_csv(tmp_path / "results.csv", index=False)
    result = cli(str(tmp_path / "results.csv"), "--out", str(tmp_path / "figs"))
    assert result.exit_code == 2 and "plot zz_broken failed (ValueError" in result.output
    assert not list((tmp_path / "figs").glob("*.png"))


def test_the_speed_quality_frontier_marks_the_target_and_the_draft(tmp_path):
    rows = pd.DataFrame([{"trial_id": f"b{b}-{i}", "status": "ok", "batch": b, "acceptance_rate": a, "mse": 0.42,
                          "speedup": 1 + a, "delta_mse_pct": 0.4 * a, "speedup_draft": 5.0, "delta_mse_pct_draft": 0.9}
                         for b in (1, 32) for i, a in enumerate((0.2, 0.6, 1.0))])
    written, skipped = render(rows, tmp_path, ["speed_quality_frontier"])
    assert skipped == {} and {p.suffix for p in written} == {".png", ".pdf"}


def test_the_speed_quality_frontier_colours_each_draft_and_lists_every_one(tmp_path):
    from matplotlib.figure import Figure

    from specctl.timeseries.plots import speed_quality_frontier

    rows = pd.DataFrame([{"batch": b, "draft": d, "speedup": 1 + a, "delta_mse_pct": 0.4 * a + (d == "weak"),
                          "speedup_draft": 5.0 + (d == "weak"), "delta_mse_pct_draft": 0.9 + 4 * (d == "weak")}
                         for b in (1, 32, 256) for d in ("distilled", "weak") for a in (0.2, 1.0)
                         if (b, d) != (32, "weak") and (b, d) != (256, "distilled")])  # some drafts in some panels
    fig = Figure()
    speed_quality_frontier(rows, fig)
    texts = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
    assert {"distilled: speculative", "distilled alone", "weak: speculative", "weak alone", "target only"} <= set(texts)
    colours = {}  # label -> the colours it is drawn in, over every panel (batch 256 has the weak draft alone)
    for ax in fig.axes:
        for c in ax.collections:
            if c.get_label().endswith("speculative"):
                colours.setdefault(c.get_label(), set()).add(tuple(c.get_facecolor()[0]))
    assert len(colours) == 2 and all(len(c) == 1 for c in colours.values())  # one colour per draft, in every panel
    assert colours["distilled: speculative"] != colours["weak: speculative"]
