"""Sweep analysis: loading and merging, Pareto fronts, effects, recommendations and `specctl analyze`."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from specctl.commands.analyze import analyze as analyze_cmd
from specctl.core.analysis import (
    Criterion,
    analyze,
    decision_criteria,
    marginal_effects,
    pareto_front,
    recommend,
)
from specctl.core.errors import SpecctlError
from specctl.core.results import TIMESERIES_SWEEP, finished, load_results

# (trial_id, sigma, k, acceptance_rate, mse, speedup); target-only mse 0.475 as in the sweep guide:
# maintain quality: mse <= 0.5002 and acceptance >= 60%; balanced: mse <= 0.5201 and acceptance >= 75%
KNOWN = [
    ("t1", 0.10, 5, 0.90, 0.600, 2.0),  # fastest; quality too poor for either constraint
    ("t2", 0.25, 4, 0.80, 0.500, 1.6),  # meets both, but slower than t3 / t5
    ("t3", 0.25, 5, 0.78, 0.515, 1.8),  # balanced pick; dominated by t2 on acceptance vs mse
    ("t4", 0.50, 2, 0.65, 0.480, 1.2),  # maintain-feasible, slow
    ("t5", 0.50, 3, 0.70, 0.450, 1.7),  # maintain pick
    ("t6", 1.00, 3, 0.70, 0.560, 1.1),  # dominated by t5
]


def known_frame() -> pd.DataFrame:
    frame = pd.DataFrame(KNOWN, columns=["trial_id", "spec.sigma", "spec.k", "acceptance_rate", "mse", "speedup"])
    return frame.assign(mse_target=0.475, predicted_speedup=frame["speedup"] * 1.1, wall_s=1.0, status="ok", error="")


def write(tmp_path: Path, frame: pd.DataFrame, name: str = "results.csv") -> Path:
    frame.to_csv(tmp_path / name, index=False)
    return tmp_path / name


def cli(*args: str):
    app = typer.Typer()
    app.command()(analyze_cmd)
    return CliRunner().invoke(app, list(args))


def test_pareto_front_of_a_known_set():
    frame = known_frame()
    front = pareto_front(frame, "acceptance_rate", "mse")
    assert list(front["trial_id"]) == ["t5", "t2", "t1"]
    assert list(pareto_front(frame, "speedup", "mse")["trial_id"]) == ["t5", "t3", "t1"]
    ties = pd.DataFrame({"a": [1.0, 1.0, 0.5, 2.0], "m": [1.0, 1.0, 1.0, float("nan")]})
    assert list(pareto_front(ties, "a", "m").index) == [0, 1]


def test_recommendations_follow_the_decision_criteria():
    picks = {r.scenario: r for r in recommend(known_frame(), decision_criteria(), TIMESERIES_SWEEP)}
    assert picks["maximise speed"].best["trial_id"] == "t1"
    assert picks["maintain quality"].best["trial_id"] == "t5" and picks["maintain quality"].feasible == 3
    assert picks["balanced"].best["trial_id"] == "t3" and picks["balanced"].feasible == 2
    assert picks["maintain quality"].rule == "mse ≤ 0.5002 = 1.053×target, acceptance ≥ 60%"
    stricter = recommend(known_frame(), [Criterion("maintain quality", 1.053, 0.75)], TIMESERIES_SWEEP)[0]
    assert stricter.best["trial_id"] == "t2"
    impossible = recommend(known_frame(), [Criterion("x", 0.5, 0.99)], TIMESERIES_SWEEP)[0]
    assert impossible.best is None and impossible.feasible == 0


def test_without_measured_speedup_the_prediction_ranks_and_without_mse_target_nothing_qualifies():
    frame = known_frame().drop(columns=["speedup", "mse_target"])
    picks = recommend(frame, decision_criteria(), TIMESERIES_SWEEP)
    assert picks[0].ranked_by == "predicted_speedup" and picks[0].best["trial_id"] == "t1"
    assert [p.feasible for p in picks[1:]] == [0, 0]


def test_marginal_effects_are_means_and_spreads_per_value():
    effects = marginal_effects(known_frame(), TIMESERIES_SWEEP)
    k3 = effects[(effects["key"] == "spec.k") & (effects["value"] == 3)].iloc[0]
    assert k3["n"] == 2 and k3["acceptance_rate"] == pytest.approx(0.70) and k3["mse"] == pytest.approx(0.505)
    assert k3["mse sd"] == pytest.approx(pd.Series([0.45, 0.56]).std())
    assert set(effects["key"]) == {"spec.sigma", "spec.k"}


def test_merging_prefers_finished_rows_and_failed_trials_are_counted(tmp_path):
    first = known_frame()
    retry = first.head(2).assign(status="failed", error="boom", acceptance_rate=None)
    extra = first.tail(1).assign(trial_id="t7", status="failed", error="oom")
    frame = load_results([write(tmp_path, pd.concat([retry, extra]), "a.csv"), write(tmp_path, first, "b.csv")])
    assert len(frame) == 7 and len(finished(frame)) == 6
    report = analyze(frame, ["a.csv", "b.csv"], n=3)
    assert report.failed == 1 and list(report.top["mse"]["trial_id"]) == ["t5", "t4", "t2"]
    assert list(report.top["speedup"]["trial_id"]) == ["t1", "t3", "t5"]


def test_analyze_prints_tables_json_and_markdown(tmp_path):
    path = write(tmp_path, known_frame())
    table = cli(str(path))
    assert table.exit_code == 0, table.output
    assert "Pareto" in table.output and "balanced (mse ≤ 0.5201" in table.output
    report = json.loads(cli(str(path), "--json").output)
    assert report["recommendations"][2]["best"]["trial_id"] == "t3"
    assert [r["trial_id"] for r in report["pareto"]["acceptance_rate vs mse"]] == ["t5", "t2", "t1"]
    markdown = cli(str(path), "--markdown", "--balanced-mse", "1.06", "--balanced-acceptance", "0.6").output
    assert "## Pareto frontier: speedup vs mse" in markdown and "| trial_id |" in markdown
    assert ("- balanced (mse ≤ 0.5035 = 1.06×target, acceptance ≥ 60%): t5 sigma=0.5 k=3 — speedup 1.7, "
            "acceptance_rate 0.7, mse 0.45 (best of 3 that qualify)") in markdown


@pytest.mark.parametrize("content, message", [
    ("a,b\n1,2\n", "not a results CSV: missing column(s) trial_id, status"),
    ("trial_id,status,mse\nx,ok,1\n", "a time-series spec-test sweep, is missing column(s) acceptance_rate"),
    ("trial_id,status,acceptance_rate,mse\n", "no rows, only a header: no trial has been recorded yet"),
    ("", "empty file"),
    (None, "cannot read"),
])
def test_malformed_csv_fails_with_one_line_naming_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    if content is not None:
        path.write_text(content)
    result = cli(str(path))
    assert result.exit_code == 2 and message in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_all_failed_trials_is_an_error_not_an_empty_report(tmp_path):
    path = write(tmp_path, known_frame().assign(status="failed", error="boom"))
    with pytest.raises(SpecctlError, match="no trial finished.*boom"):
        analyze(load_results([path]), [str(path)])


def test_text_and_list_columns_stay_out_of_the_metrics(tmp_path):
    from specctl.core.results import metric_columns

    path = tmp_path / "mixed.csv"
    path.write_text("trial_id,status,acceptance_rate,mse,head,accepted_hist\n"
                    'a,ok,0.5,0.4,tuned,"[1, 2]"\nb,ok,0.7,0.5,copy,"[0, 3]"\n')
    frame = load_results([path])
    assert list(frame["head"]) == ["tuned", "copy"]
    assert metric_columns(frame) == ["acceptance_rate", "mse"]
