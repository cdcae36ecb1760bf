"""`specctl finetune-head`: early-exit drafts for a causal LM, distilled with KL toward the full model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

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

EvalOnlyOpt = Annotated[str | None, typer.Option(
    "--eval-only", help="Evaluate draft checkpoints matching this glob instead of training (= llm.eval_only).")]


@handle_errors
def finetune_head(
    profile: ProfileOpt, set_: SetOpt = None, eval_only: EvalOnlyOpt = None, resume: ResumeOpt = False,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Train the LM head (option: + block l) of early-exit drafts at llm.exit_layers; report held-out KL,
    perplexity and top-k accuracy per exit layer (results.csv)."""
    from specctl.llm.finetune import finetune_heads
    from specctl.llm.report import results_table

    sets = [*(set_ or []), *([f"llm.eval_only={json.dumps(eval_only)}"] if eval_only else [])]
    session = open_session(profile, sets, device, seed, json_out, dry_run, verbose)
    p = session.profile
    run = session.open_run("finetune-head", resume)
    with session.resumable(run, "finetune-head", profile), session.progress() as progress:
        result = finetune_heads(p, session.device, run, progress, session.say, resume)
    run.write_json("metrics.json", result)
    run.finish()
    session.out(result, lambda: console.print(results_table(result["rows"], f"{p.name}: early-exit drafts "
                                                            f"(held-out, token-weighted)")))
