"""Everything specctl shows a person: rich tables for every command's result, the verdict sentences, and the
Markdown the analysis report and the benchmarks print. Results arrive as typed objects (each half's result
classes) and are rendered by their class name, so that importing this module pulls in no model code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd
from rich.columns import Columns
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from specctl.core.analysis import DISAGREE, Influence, Recommendation, Report
from specctl.core.results import fmt, setting


def number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(number(v) for v in value) + "]"
    return "" if value is None else str(value)


def frame_table(frame: pd.DataFrame, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in frame.columns:
        numeric = pd.api.types.is_numeric_dtype(frame[column])
        table.add_column(str(column), justify="right" if numeric else "left", overflow="fold")
    for row in frame.itertuples(index=False):
        table.add_row(*(fmt(v) for v in row))
    return table


def verdict_line(sentence: str) -> Text:
    return Text.assemble(("verdict: ", "bold"), sentence)


# -- time series ---------------------------------------------------------------------------------------------------

def horizon_table(scores: list, title: str) -> Table:
    """MSE/MAE per horizon and their average, one column pair per decoding mode."""
    modes = list(scores[0].mse)
    table = Table(title=title)
    table.add_column("horizon", justify="right")
    table.add_column("windows", justify="right")
    for mode in modes:
        table.add_column(f"MSE {mode}", justify="right")
        table.add_column(f"MAE {mode}", justify="right")
    for s in scores:
        table.add_row(str(s.horizon), str(s.windows), *(f"{v:.4f}" for m in modes for v in (s.mse[m], s.mae[m])))
    averages = [sum(getattr(s, k)[m] for s in scores) / len(scores) for m in modes for k in ("mse", "mae")]
    table.add_row("avg", "", *(f"{v:.4f}" for v in averages), style="bold")
    return table


def pretrain_view(result, title: str) -> list[RenderableType]:
    return [*result.data_notes, horizon_table(result.scores, f"{title}: rolling forecast on the test split "
                                                             f"({result.split})"),
            f"{result.parameters:,} parameters, {result.fit.epochs_done} epochs, checkpoint: {result.checkpoint}"]


def distill_view(result, title: str) -> list[RenderableType]:
    e, sigma = result.estimate, result.profile.spec.sigma
    quality = Table(title=f"draft quality ({e.windows} test windows)")
    for name in ("draft MSE", "target MSE", "draft-vs-target MSE"):
        quality.add_column(name, justify="right")
    quality.add_row(*(f"{v:.4f}" for v in (e.draft_mse, e.target_mse, e.draft_target_mse)))
    acceptance = Table(title="predicted acceptance per token (gaussian rule)")
    acceptance.add_column("sigma", justify="right")
    acceptance.add_column("acceptance", justify="right")
    for s, value in e.acceptance.items():
        acceptance.add_row(f"{s:g}" + (" (spec.sigma)" if s == sigma else ""), f"{value:.3f}")
    return [Columns([quality, acceptance]),
            f"{result.parameters:,} parameters, {result.fit.epochs_done} epochs, checkpoint: {result.checkpoint}"]


def spec_quality_table(r, title: str) -> Table:
    quality = Table(title=f"{title}: quality (scaled space, H = {r.horizon}, {r.windows} windows; {r.split})")
    for column in ("", "MSE", "MAE", "Δ MSE vs target", "speed vs target"):
        quality.add_column(column, justify="right" if column else "left")
    quality.add_row("speculative", f"{r.mse:.4f}", f"{r.mae:.4f}", f"{r.delta_mse_pct:+.2f}%", f"{r.speedup:.2f}x")
    itself = f" (against itself {r.speedup_target_self:.3f}x)" if r.speedup_target_self else ""
    quality.add_row("target-only (KV cache)", f"{r.mse_target:.4f}", f"{r.mae_target:.4f}", "", "1x" + itself)
    quality.add_row("draft-only", f"{r.mse_draft:.4f}", f"{r.mae_draft:.4f}", f"{r.delta_mse_pct_draft:+.2f}%",
                    f"{r.speedup_draft:.2f}x")
    if r.mse_sliding is not None:
        quality.add_row("target sliding window", f"{r.mse_sliding:.4f}", f"{r.mae_sliding:.4f}",
                        f"{100 * (r.mse_sliding - r.mse_target) / r.mse_target:+.2f}%",
                        f"{r.wall_s_target / r.wall_s_sliding:.2f}x")
    quality.add_row("fidelity MSE (spec vs target)", f"{r.fidelity_mse:.2e}", "", "", "")
    return quality


def spec_speed_table(r, title: str) -> Table:
    speed = Table(title=f"{title}: acceptance and speed")
    speed.add_column("metric")
    speed.add_column("value", justify="right")
    batch_ms = r.batch_ms_spec
    rows = [
        ("rule / emit / K", f"{r.rule} / {r.emit} / {r.k}"),
        ("proposed / accepted", f"{r.proposed} / {r.accepted}"),
        ("acceptance_rate", f"{r.acceptance_rate:.3f}"),
        ("alpha_hat", f"{r.alpha_hat:.3f}"),
        ("mean_accepted per round", f"{r.mean_accepted:.2f}"),
        ("tokens_per_target_call", f"{r.tokens_per_target_call:.2f}"),
        ("c_hat / v_hat / o_hat", f"{r.c_hat:.3f} / {r.v_hat:.2f} / {r.o_hat:.2f}"),
        ("target step", f"{r.target_step_ms:.3f} ms"),
        ("predicted_speedup (Leviathan)", f"{r.predicted_speedup:.2f}x ({r.predicted_speedup_leviathan:.2f}x)"),
        ("speedup vs KV-cached target", f"{r.speedup:.2f}x"),
    ]
    if r.draft_rmse_by_step:
        rows.insert(1, ("draft-to-target RMSE per step", " ".join(f"{x:.3g}" for x in r.draft_rmse_by_step)))
    if r.tol is not None:
        relative = f" = {r.tol_relative:.3g} × target RMSE {r.target_rmse_val:.3g}" if r.tol_relative else ""
        units = "each window's units" if r.tol_units == "window" else "scaled units"
        rows.insert(1, (f"tolerance ({units})", f"{r.tol:.4g}{relative}"))
    if r.budget is not None:
        b = r.budget
        chose = (f"tol_relative {b.tol_relative:g}, K {b.k}; {b.val_delta_mse_pct:+.2f}% MSE, predicted "
                 f"{b.val_predicted_speedup:.2f}x" if b.k else "the target alone (K 0): no setting within it is "
                 "predicted to be faster")
        rows.insert(1, ("fidelity budget (validation)",
                        f"{b.budget:.1%}: {chose} ({b.within_budget}/{b.candidates} settings within)"))
    if r.adaptive_k:
        rows.insert(1, ("adaptive K: rounds per k", ", ".join(f"{k}: {n}" for k, n in sorted(r.k_rounds.items()))))
    if r.speedup_sliding is not None:
        rows.append(("speedup vs sliding window", f"{r.speedup_sliding:.2f}x"))
    rows += [
        ("wall time spec / target / draft", f"{r.wall_s_spec:.3f}s / {r.wall_s_target:.3f}s / {r.wall_s_draft:.3f}s"),
        ("per batch (median, min-max)", f"{sorted(batch_ms)[len(batch_ms) // 2]:.1f} ms "
                                        f"({min(batch_ms):.1f}-{max(batch_ms):.1f})"),
        ("time breakdown", ", ".join(f"{k} {v:.3f}s" for k, v in r.breakdown_s.items())
         or "none: every batch ran the target's own loop"),
    ]
    if r.cap_hits:
        rows.append(("exact: residual cap hits", str(r.cap_hits)))
    for name, value in rows:
        speed.add_row(name, value)
    return speed


def spec_verdict(r) -> str:
    """One sentence a user can act on: speculation against the target and against the draft alone."""
    said = (f"speculative: {r.speedup:.2f}x the target's speed at {r.delta_mse_pct:+.1f}% MSE "
            f"(fidelity {r.fidelity_mse:.1e}); the draft alone: {r.speedup_draft:.2f}x at "
            f"{r.delta_mse_pct_draft:+.1f}%; the target step takes {r.target_step_ms:.2f} ms here")
    if r.c_hat > 0.5:
        said += f", launch-bound (a draft step costs {r.c_hat:.0%} of it)"
    advice = []
    if r.rule == "tolerance" and r.acceptance_rate >= 0.999:
        advice.append("every token was accepted, so this is the target scored once on the draft's rollout, not "
                      "the target's own forecast")
    if r.mse_draft <= r.mse_target:
        advice.append("the draft alone is at least as accurate as the target: use the draft, or a stronger target")
    elif drafted_nothing(r):  # its speed is the target's own loop's, within timing noise
        advice.append("use the target: " + why_slow(r))
    elif r.speedup < 1:
        advice.append("speculation is slower than the target alone here: use the target; " + why_slow(r))
    else:
        advice.append("speculation pays here" + (" (the draft alone is faster still, at a larger MSE cost)"
                                                 if r.speedup_draft > r.speedup else ""))
    if first_token_hint := first_token_advice(r):
        advice.append(first_token_hint)
    if abs(r.predicted_speedup / r.speedup - 1) > 0.15:
        advice.append(f"the cost model predicted {r.predicted_speedup:.2f}x")
    return said + (" — " + "; ".join(advice) if advice else "") + "."


def first_token_advice(r) -> str | None:
    """Where the draft was tested and rejected, and it is furthest from the target at the first token, the setting that
    lets the target emit that token (on an H200 it raised acceptance from 0.74-0.82 to 0.94 and halved ΔMSE)."""
    steps = r.draft_rmse_by_step
    tested = not (r.target_opens or drafted_nothing(r) or r.acceptance_rate >= 0.999)
    if not tested or len(steps) < 2 or steps[0] <= max(steps[1:]):
        return None
    return (f"the draft is furthest from the target at the first token (RMSE {steps[0]:.3g}, then at most "
            f"{max(steps[1:]):.3g}): spec.target_opens = true lets the target emit it")


def drafted_nothing(r) -> bool:
    return set(r.k_rounds) <= {0}


def adaptive_fallback(r) -> str:
    """Why adaptive K drafted nothing: the forecasts that drafted (on validation windows) cost more than the target's,
    or no draft length was predicted to pay."""
    said = "adaptive K drafted nothing, so it ran the target's own loop: "
    drafted, bound, target = r.adaptive_drafted_ms, r.adaptive_drafted_bound_ms, r.adaptive_target_ms
    if bound is None or target is None or bound <= target:  # no bound: nothing drafted
        return said + "no draft length was predicted to pay"
    spread = f" (up to {bound:.2f} at 97.5%, by Student's t)" if bound > drafted else ""
    return said + (f"the {r.adaptive_drafted} forecasts that drafted (validation windows first) cost {drafted:.2f} ms "
                   f"each{spread} at the measured costs against {target:.2f} ms for the target's")


def why_slow(r) -> str:
    """Why speculation lost, from the measured costs: what a round costs against what it emits."""
    if drafted_nothing(r):
        reason = (adaptive_fallback(r) if r.k else "K = 0 drafts nothing: this is the target's own loop"
                  + (" (the fidelity budget found no setting within it predicted to be faster)" if r.budget else ""))
    else:
        reason = (f"a round of K = {r.k} costs {r.k * r.c_hat + r.v_hat + r.o_hat:.1f} target steps (draft "
                  f"{r.c_hat:.2f} each, verification {r.v_hat:.1f}, bookkeeping {r.o_hat:.1f}) and emits "
                  f"{r.tokens_per_target_call:.2f} tokens")
    if r.device == "cpu":
        reason += ("; on a CPU small models are bound by per-call overhead, which a draft pays as the target does "
                   '(docs/results.md, "Speculative decoding on a GPU", has the measured GPU frontier)')
    return reason


def spec_view(r, title: str) -> list[RenderableType]:
    return [spec_quality_table(r, title), spec_speed_table(r, title), *r.notes, verdict_line(spec_verdict(r))]


# -- LLM ------------------------------------------------------------------------------------------------------------

LLM_SPEC_KEYS = ("mean_accepted", "acceptance_rate", "alpha_hat", "position_acceptance", "overlap", "tv",
                 "tokens_per_target_call", "target_calls_per_token", "tok_s_vanilla", "tok_s_spec", "speedup",
                 "c_hat", "predicted_speedup", "v_hat", "predicted_speedup_v", "identical_fraction", "peak_mem_gb",
                 "cuda_graphs")


def llm_verdict(r) -> str:
    same = (f"output identical to vanilla on {r.identical_fraction:.0%} of prompts" if r.identical_fraction is not None
            else "output distributed as the target's")
    said = f"speculative: {r.speedup:.2f}x vanilla's tokens/s ({r.tok_s_spec:.0f} vs {r.tok_s_vanilla:.0f}), {same}"
    if r.speedup < 1:
        said += (f" — slower than vanilla: the draft is accepted at alpha {r.alpha_hat:.2f} but costs c_hat "
                 f"{r.c_hat:.2f} of a target step; tune its head or exit later")
    return said + "."


def llm_spec_view(r, title: str) -> list[RenderableType]:
    table = Table("metric", "value", "CI", title=title)
    metrics = r.metrics()
    for key in LLM_SPEC_KEYS:
        if metrics.get(key) is not None:
            table.add_row(key, number(metrics[key]), number(r.ci.get(key)))
    return [table, verdict_line(llm_verdict(r))]


def finetune_view(result, title: str) -> list[RenderableType]:
    """One line per draft: KL at the training temperature, perplexity, top-1 accuracy and top-1 agreement with the
    target on every held-out set."""
    rows = result.rows
    sets = [k[: -len("_kl")] for k in rows[0] if k.endswith("_kl") and not k.endswith("_kl_t1")] if rows else []
    metrics = {"kl": "KL", "ppl": "ppl", "top1": "top1", "agreement": "agree"}
    table = Table("layer", "head", *[f"{s} {m}" for s in sets for m in metrics.values()],
                  title=f"{title}: early-exit drafts (held-out, token-weighted)")
    for r in rows:
        table.add_row(str(r["exit_layer"]), r["head"], *(number(r[f"{s}_{m}"]) for s in sets for m in metrics))
    return [table]


def summary_view(result, title: str) -> list[RenderableType]:
    """Scalar entries of a result's metrics (lists and nested tables left out)."""
    table = Table("metric", "value", title=f"{title}: language model")
    for key, value in result.metrics().items():
        if not isinstance(value, (dict, list)):
            table.add_row(key, number(value))
    return [table]


VIEWS: dict[str, Callable[[Any, str], list[RenderableType]]] = {
    "PretrainResult": pretrain_view,
    "DistillResult": distill_view,
    "SpecTestResult": spec_view,
    "LMPretrainResult": summary_view,
    "FinetuneResult": finetune_view,
    "LLMSpecTestResult": llm_spec_view,
}


def view(result: Any, title: str) -> list[RenderableType]:
    """What a command's result looks like in a terminal."""
    return VIEWS[type(result).__name__](result, title)


def verdict(result: Any) -> str | None:
    """The one-sentence verdict of a spec-test result (None for other results)."""
    name = type(result).__name__
    return spec_verdict(result) if name == "SpecTestResult" else llm_verdict(result) if name == "LLMSpecTestResult" \
        else None


# -- analysis -------------------------------------------------------------------------------------------------------

def times(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def describe(r: Recommendation, report: Report) -> str:
    """One sentence: the scenario, its rule, and the pick with its key metrics (and ties inside the spread)."""
    head = f"{r.scenario} ({r.rule})"
    if r.best is None:
        return f"{head}: no configuration qualifies"
    kind = report.kind
    setting_text = " ".join(setting(k, r.best[k]) for k in report.swept if k in r.best)
    shown = dict.fromkeys((r.ranked_by, *kind.effects))
    metrics = ", ".join(f"{m} {fmt(r.best.get(m))}" for m in shown if m in r.best)
    said = f"{head}: {r.best['trial_id']} {setting_text} — {metrics} (best of {r.feasible} that qualify"
    if r.tied:
        said += (f"; {r.tied} are within the ±{report.spread.band:.0%} timing spread of the fastest, so the lowest "
                 f"{kind.quality} of them")
    said += ")"
    if r.ranked_by in ("speedup", "predicted_speedup") and (r.best.get(r.ranked_by) or 1) < 1:
        said += f": slower than {kind.baseline}, use that instead"
    return said


def spread_line(report: Report) -> str | None:
    """What the timing spread is and where it comes from."""
    s = report.spread
    if s.metric not in ("speedup", "predicted_speedup"):
        return None
    parts = []
    if s.identical_range:
        low, high = s.identical_range
        parts.append(f"{len(s.identical)} group(s) of trials did identical work, the widest measured "
                     f"{low:.2f}x–{high:.2f}x")
    if s.repeats is not None:
        parts.append(f"one trial's repeated timings spread ±{s.repeats:.0%} (median)")
    if s.disagree:
        parts.append(f"{len(s.disagree)} trial(s) measured over {DISAGREE:g}x away from their predicted speedup "
                     f"({', '.join(s.disagree[:3])}): the clock was disturbed")
    if not parts:
        return f"timing spread: unknown (no repeated timings in the file); {s.metric} differences are taken as measured"
    return (f"timing spread of {s.metric}: ±{s.band:.0%} ({'; '.join(parts)}); differences inside it are not "
            "ranked")


def influence_line(i: Influence, report: Report) -> str:
    """What varying one setting did, and whether its speed effect is real."""
    speed = report.spread.metric
    measured = (f"mean {speed} {times(i.speed_low)}–{times(i.speed_high)} across its values"
                if i.speed_low is not None else "")
    if i.changes_outcome is False:
        return (f"- {i.key}: no effect: every outcome (acceptance, quality) is identical at each of its values"
                + (f"; its {measured} is timing noise" if measured else ""))
    said = f"- {i.key}: " + ("changes outcomes" if i.changes_outcome else "effect on outcomes not isolated")
    if measured:
        said += f"; {measured}" + (", inside the timing spread: not ranked" if i.within_spread else "")
    return said


def sections(report: Report) -> list[tuple[str, pd.DataFrame]]:
    """The report's tables, titled, in reading order (shared by the rich and Markdown renderings)."""
    senses, spread = dict(report.kind.tops), report.spread
    noise = f"; differences under ±{spread.band:.0%} are timing noise" if spread.band else ""
    return [
        ("Summary", report.summary),
        *((f"Top {len(f)} by {m} ({senses[m]}{noise if m == spread.metric else ''})", f)
          for m, f in report.top.items()),
        *((f"Pareto frontier: {name}", f) for name, f in report.pareto.items()),
        ("Marginal effect of each setting (mean, sd)", report.effects),
    ]


def findings(report: Report) -> list[str]:
    """The lines after the tables: the timing spread, each setting's influence, the baseline verdict."""
    lines = [line for line in [spread_line(report)] if line]
    if report.influences:
        lines += ["What each setting changed:", *(influence_line(i, report) for i in report.influences)]
    if report.verdict:
        lines.append(f"verdict: {report.verdict}")
    return lines


def recommendation_lines(report: Report) -> tuple[str, list[str]]:
    """A title and one bullet per decision criterion."""
    ranked_by = report.recommendations[0].ranked_by if report.recommendations else ""
    best = "fastest" if ranked_by in ("speedup", "predicted_speedup", "acceptance_rate") else "best"
    return (f"Recommendations (the {best} by {ranked_by} among the configurations that qualify)",
            [f"- {describe(r, report)}" for r in report.recommendations])


def markdown_table(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def headline(report: Report) -> str:
    return (f"{report.trials} trials ({report.failed} failed) of a {report.kind.name} from "
            f"{', '.join(report.sources)}; varied: {', '.join(report.swept) or 'nothing'}")


def report_markdown(report: Report) -> str:
    tables = "".join(f"\n## {title}\n\n{markdown_table(frame)}\n" for title, frame in sections(report))
    title, bullets = recommendation_lines(report)
    notes = "\n".join(findings(report))
    return (f"# Results analysis\n\n{headline(report)}.\n" + tables + (f"\n## Findings\n\n{notes}\n" if notes else "")
            + f"\n## {title}\n\n" + "\n".join(bullets) + "\n")


def report_view(report: Report) -> list[RenderableType]:
    title, bullets = recommendation_lines(report)
    return [headline(report), *(frame_table(frame, t) for t, frame in sections(report)), *findings(report),
            Text(title, style="bold"), "\n".join(bullets)]
