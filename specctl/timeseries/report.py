"""Rich tables for results. Pure rendering: every number shown comes from a result object."""

from __future__ import annotations

from rich.table import Table

from specctl.timeseries.evaluate import HorizonScore


def horizon_table(scores: list[HorizonScore], title: str) -> Table:
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


def scores_to_dict(scores: list[HorizonScore]) -> dict:
    modes = list(scores[0].mse)
    return {
        "horizons": [{"horizon": s.horizon, "windows": s.windows, "mse": s.mse, "mae": s.mae} for s in scores],
        "average": {m: {"mse": sum(s.mse[m] for s in scores) / len(scores),
                        "mae": sum(s.mae[m] for s in scores) / len(scores)} for m in modes},
    }


def spec_tables(metrics: dict, title: str) -> list[Table]:
    """Quality (spec vs target-only vs sliding) and acceptance/speed tables for one spec-test."""
    quality = Table(title=f"{title}: quality (scaled space, H = {metrics['horizon']}, {metrics['windows']} windows)")
    for column in ("", "MSE", "MAE"):
        quality.add_column(column, justify="right" if column else "left")
    quality.add_row("speculative", f"{metrics['mse']:.4f}", f"{metrics['mae']:.4f}")
    quality.add_row("target-only (KV cache)", f"{metrics['mse_target']:.4f}", f"{metrics['mae_target']:.4f}")
    if "mse_sliding" in metrics:
        quality.add_row("target sliding window", f"{metrics['mse_sliding']:.4f}", f"{metrics['mae_sliding']:.4f}")
    if "mse_draft" in metrics:
        quality.add_row("draft-only", f"{metrics['mse_draft']:.4f}", f"{metrics['mae_draft']:.4f}")
    quality.add_row("Δ MSE vs target", f"{metrics['delta_mse_pct']:+.2f}%", "")
    quality.add_row("fidelity MSE (spec vs target)", f"{metrics['fidelity_mse']:.2e}", "")

    speed = Table(title=f"{title}: acceptance and speed")
    speed.add_column("metric")
    speed.add_column("value", justify="right")
    rows = [
        ("proposed / accepted", f"{metrics['proposed']} / {metrics['accepted']}"),
        ("acceptance_rate", f"{metrics['acceptance_rate']:.3f}"),
        ("alpha_hat", f"{metrics['alpha_hat']:.3f}"),
        ("mean_accepted per round", f"{metrics['mean_accepted']:.2f}"),
        ("tokens_per_target_call", f"{metrics['tokens_per_target_call']:.2f}"),
        ("c_hat", f"{metrics['c_hat']:.3f}"),
        ("predicted_speedup", f"{metrics['predicted_speedup']:.2f}x"),
        ("speedup vs KV-cached target", f"{metrics['speedup']:.2f}x"),
    ]
    if "speedup_sliding" in metrics:
        rows.append(("speedup vs sliding window", f"{metrics['speedup_sliding']:.2f}x"))
    batch_ms = metrics["batch_ms_spec"]
    rows += [
        ("wall time spec / target", f"{metrics['wall_s_spec']:.3f}s / {metrics['wall_s_target']:.3f}s"),
        ("per batch (median, min-max)", f"{sorted(batch_ms)[len(batch_ms) // 2]:.1f} ms "
                                        f"({min(batch_ms):.1f}-{max(batch_ms):.1f})"),
        ("time breakdown", ", ".join(f"{k} {v:.3f}s" for k, v in metrics["breakdown_s"].items())),
    ]
    if metrics.get("cap_hits"):
        rows.append(("exact: residual cap hits", str(metrics["cap_hits"])))
    for name, value in rows:
        speed.add_row(name, value)
    return [quality, speed]
