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


# -- every kind of results CSV, the timing spread, the baseline (issue #22: 6, 8, 12; #17: 7, 16) --------------------

def llm_sweep_frame() -> pd.DataFrame:
    """Columns as an LLM sweep writes them (llm/sweep.py csv_columns), two exit layers x two gammas."""
    rows = [("a", 1, 2, 0.86, 1.7, 0.086, 1.45, 1.20, 1.70), ("b", 1, 4, 0.85, 3.4, 0.080, 0.52, 0.40, 0.60),
            ("c", 2, 2, 0.92, 1.8, 0.064, 0.26, 0.20, 0.30), ("d", 2, 4, 0.91, 3.6, 0.036, 0.52, 0.45, 0.62)]
    frame = pd.DataFrame(rows, columns=["trial_id", "llm.exit_layer", "llm.spec.gamma", "acceptance_rate",
                                        "mean_accepted", "tv", "speedup", "speedup_ci_low", "speedup_ci_high"])
    return frame.assign(predicted_speedup=1.0, exit_layer=frame["llm.exit_layer"], gamma=frame["llm.spec.gamma"],
                        status="ok", error="")


def finetune_frame() -> pd.DataFrame:
    rows = [("layer1-copy", 1, "copy", 0.091, 0.68), ("layer1-tuned", 1, "tuned", 0.017, 0.88),
            ("layer2-copy", 2, "copy", 0.014, 0.84), ("layer2-tuned", 2, "tuned", 0.005, 0.93)]
    frame = pd.DataFrame(rows, columns=["trial_id", "exit_layer", "head", "val_kl", "val_agreement"])
    return frame.assign(status="ok", val_ppl=70.0, val_top1=0.1, best_val_loss=frame["val_kl"])


def test_every_kind_of_results_is_analysed_by_its_own_quality_metric(tmp_path):
    llm = json.loads(cli(str(write(tmp_path, llm_sweep_frame(), "llm.csv")), "--json").output)
    assert llm["kind"] == "LLM spec-test sweep" and list(llm["pareto"]) == ["speedup vs tv", "acceptance_rate vs tv"]
    assert llm["recommendations"][0]["ranked_by"] == "speedup" and "mse" not in llm["recommendations"][0]["best"]
    heads = json.loads(cli(str(write(tmp_path, finetune_frame(), "results.csv")), "--json").output)
    assert heads["kind"] == "finetune-head results" and heads["swept"] == ["exit_layer", "head"]
    assert heads["recommendations"][0]["best"]["trial_id"] == "layer2-tuned"  # lowest val_kl, not best_val_loss
    recipe = known_frame().drop(columns=["acceptance_rate", "speedup", "predicted_speedup"]).assign(
        best_val_loss=[0.5, 0.3, 0.4, 0.6, 0.7, 0.2], mse=[0.1, 0.9, 0.5, 0.5, 0.5, 0.5])
    picked = json.loads(cli(str(write(tmp_path, recipe, "recipe.csv")), "--json").output)["recommendations"][0]
    assert picked["ranked_by"] == "best_val_loss" and picked["best"]["trial_id"] == "t6"  # never by test mse
    mixed = cli(str(tmp_path / "llm.csv"), str(tmp_path / "recipe.csv"))
    assert mixed.exit_code == 2 and "analyze each kind on its own" in mixed.output


def noisy_frame() -> pd.DataFrame:
    """sigma changes no outcome (as under the tolerance rule) yet its identical trials time 0.4x-1.9x; k matters."""
    rows = [("s1", 0.5, 2, 0.28, 0.0542, 1.90), ("s2", 2.0, 2, 0.28, 0.0542, 0.40),
            ("s3", 0.5, 4, 0.16, 0.0540, 1.10), ("s4", 2.0, 4, 0.16, 0.0540, 1.60)]
    frame = pd.DataFrame(rows, columns=["trial_id", "spec.sigma", "spec.k", "acceptance_rate", "mse", "speedup"])
    return frame.assign(k=frame["spec.k"], mse_target=0.05, predicted_speedup=1.0, status="ok", error="",
                        batch_ms_spec="[10.0, 10.0]", batch_ms_spec_spread="[1.0, 1.0]")


def test_speed_differences_inside_the_timing_spread_are_not_ranked(tmp_path):
    report = analyze(noisy_frame(), ["noisy.csv"])
    assert report.spread.band == pytest.approx(1 - 0.40 / 1.90) and report.spread.repeats == pytest.approx(0.1)
    assert sorted(map(sorted, report.spread.identical)) == [["s1", "s2"], ["s3", "s4"]]
    effect = {i.key: i for i in report.influences}
    assert effect["spec.sigma"].changes_outcome is False and effect["spec.k"].changes_outcome is True
    fastest = report.recommendations[0]  # s1 is fastest, but s3 and s4 are inside the spread and more accurate
    assert fastest.best["trial_id"] == "s4" and fastest.tied == 4
    text = cli(str(write(tmp_path, noisy_frame())))
    said = " ".join(text.output.split())
    assert "spec.sigma: no effect: every outcome (acceptance, quality) is identical at each of its values" in said
    assert "timing spread of speedup: ±79%" in said and "no configuration beats target-only decoding" in said
    assert "Top 4 by speedup (max; differences under ±79% are timing noise)" in said


def test_when_no_setting_beats_the_baseline_the_report_says_so(tmp_path):
    slow = known_frame().assign(speedup=lambda f: f["speedup"] / 3)
    said = " ".join(cli(str(write(tmp_path, slow))).output.split())
    assert "verdict: no configuration beats target-only decoding: the fastest measured speedup is 0.67x" in said
    assert "maximise speed (no constraint): t1" in said and "slower than target-only decoding, use that instead" in said
    fast = json.loads(cli(str(write(tmp_path, known_frame())), "--json").output)
    assert fast["verdict"].startswith("6 configuration(s) beat target-only decoding")


def test_a_sweep_whose_every_trial_failed_names_its_first_error_even_without_metric_columns(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("trial_id,spec.sigma,wall_s,status,error\n"
                    "a1,0.5,0.1,failed,checkpoint not found: artifacts/quickstart/target\nb2,2.0,0.1,failed,other\n")
    result = cli(str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert ("no trial finished in " in result.output and
            "(2 failed); the first error: checkpoint not found: artifacts/quickstart/target" in " ".join(
                result.output.split()))


def test_measured_speedups_far_from_their_prediction_are_flagged():
    frame = known_frame().assign(predicted_speedup=[2.0, 1.6, 0.5, 1.2, 1.7, 1.1])  # t3: 1.8x measured, 0.5x predicted
    report = analyze(frame, ["results.csv"])
    assert report.spread.disagree == ["t3"] and "re-run on a quiet machine" in report.verdict
