"""`specctl pretrain`: train a Timer-XL target or draft (or a small causal LM with an `llm` profile)."""

from __future__ import annotations

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
    handle_errors,
    open_session,
)
from specctl.timeseries.report import horizon_table


@handle_errors
def pretrain(
    profile: ProfileOpt, set_: SetOpt = None, resume: ResumeOpt = False,
    dry_run: DryRunOpt = False, json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Train a model from scratch, or from train.init_from (fine-tuning); evaluate the rolling forecast."""
    session = open_session(profile, set_, device, seed, json_out, dry_run, verbose)
    p = session.profile
    run = session.open_run("pretrain", resume)
    with session.resumable(run, "pretrain", profile), session.progress() as progress:
        if p.kind == "llm":
            from specctl.llm.pretrain import pretrain_lm
            from specctl.llm.report import summary_table

            metrics = pretrain_lm(p, session.device, run, resume, progress)
            run.write_json("metrics.json", metrics)
            run.finish()
            session.out(metrics, lambda: console.print(summary_table(metrics, f"{p.name}: language model")))
            return
        from specctl.timeseries.pretrain import pretrain as pretrain_timeseries

        def log_epoch(epoch: int, record: dict) -> None:
            session.say(f"epoch {epoch}: train {record['train_loss']:.4f}  val {record['val_loss']:.4f}  "
                        f"({record['seconds']:.1f}s)")

        result = pretrain_timeseries(p, session.device, run, resume, progress, log_epoch)
        for note in result.data_notes:
            session.say(note)
        metrics = result.metrics()
        run.write_json("metrics.json", metrics)
        run.finish()
    session.out(metrics, lambda: (
        console.print(horizon_table(result.scores, f"{p.name}: rolling forecast on the test split ({p.data.name})")),
        console.print(f"{result.parameters:,} parameters, {result.fit.epochs_done} epochs, "
                      f"checkpoint: {result.checkpoint}"),
    ))
