"""`specctl distill`: train a time-series draft to mimic a frozen target, then predict its acceptance."""

from __future__ import annotations

from rich.columns import Columns
from rich.table import Table

from specctl.commands.common import (
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    ProfileOpt,
    ResumeOpt,
    SeedOpt,
    SetOpt,
    VerboseOpt,
    console,
    err_console,
    handle_errors,
    open_session,
)
from specctl.timeseries.distill import DEFINITIONS, Estimate, epoch_warnings, prepare
from specctl.timeseries.distill import distill as distill_draft


def warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}", markup=True, highlight=False)


def epoch_line(epoch: int, record: dict) -> str:
    line = (f"epoch {epoch}: train {record['train_loss']:.4f}  val {record['val_loss']:.4f}  "
            f"vs target {record['teacher_mse']:.4f}  vs truth {record['truth_mse']:.4f}")
    if "std_mean" in record:
        line += f"  std mean {record['std_mean']:.3f} p5 {record['std_p05']:.3f} p95 {record['std_p95']:.3f}"
    return line + f"  ({record['seconds']:.1f}s)"


def estimate_tables(estimate: Estimate, spec_sigma: float) -> Columns:
    quality = Table(title=f"draft quality ({estimate.windows} test windows)")
    for name in ("draft MSE", "target MSE", "draft-vs-target MSE"):
        quality.add_column(name, justify="right")
    quality.add_row(*(f"{v:.4f}" for v in (estimate.draft_mse, estimate.target_mse, estimate.draft_target_mse)))
    acceptance = Table(title="predicted acceptance per token")
    acceptance.add_column("sigma", justify="right")
    acceptance.add_column("acceptance", justify="right")
    for sigma, value in estimate.acceptance.items():
        acceptance.add_row(f"{sigma:g}" + (" (spec.sigma)" if sigma == spec_sigma else ""), f"{value:.3f}")
    return Columns([quality, acceptance])


@handle_errors
def distill(
    profile: ProfileOpt, set_: SetOpt = None, resume: ResumeOpt = False,
    dry_run: DryRunOpt = False, json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a draft to mimic a frozen target (distill.target); predict its acceptance at distill.sigmas."""
    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    p = session.profile
    setup = prepare(p, session.device)
    for message in setup.warnings:
        warn(message)
    for note in setup.data.notes:
        session.say(note)
    run = session.open_run("distill", resume)
    last_warnings: list[str] = []

    def log_epoch(epoch: int, record: dict) -> None:
        session.say(epoch_line(epoch, record))
        last_warnings[:] = epoch_warnings(record, p)
        for message in last_warnings:
            warn(message)

    with session.resumable(run, "distill", profile), session.progress() as progress:
        result = distill_draft(p, setup, session.device, run, resume, progress, log_epoch)
    e = result.estimate
    metrics = {
        "parameters": result.parameters,
        "target": p.distill.target,
        "loss": p.distill.loss,
        "epochs": result.fit.epochs_done,
        "best_val_loss": result.fit.best_val,
        "stopped_early": result.fit.stopped_early,
        "checkpoint": str(result.checkpoint),
        "history": result.fit.history,
        "quality": {"windows": e.windows, "tokens": e.tokens, "draft_mse": e.draft_mse, "target_mse": e.target_mse,
                    "draft_target_mse": e.draft_target_mse},
        "acceptance": [{"sigma": s, "acceptance": a} for s, a in e.acceptance.items()],
        "spec_sigma": p.spec.sigma,
        "warnings": setup.warnings + last_warnings,
        "data_notes": setup.data.notes,
        "definitions": DEFINITIONS,
    }
    run.write_json("metrics.json", metrics)
    run.finish()
    session.out(metrics, lambda: (
        console.print(estimate_tables(e, p.spec.sigma)),
        console.print(f"{result.parameters:,} parameters, {result.fit.epochs_done} epochs, "
                      f"checkpoint: {result.checkpoint}"),
    ))
