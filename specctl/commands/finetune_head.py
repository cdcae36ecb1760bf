"""`specctl finetune-head`: early-exit drafts for a causal LM, distilled with KL toward the full model."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from specctl.commands.common import (
    DeviceOpt,
    DryRunOpt,
    JsonOpt,
    OverwriteOpt,
    ProfileOpt,
    ResumeOpt,
    SeedOpt,
    SetOpt,
    VerboseOpt,
    handle_errors,
    open_session,
    run_training,
)

EvalOnlyOpt = Annotated[str | None, typer.Option(
    "--eval-only", help="Evaluate draft checkpoints matching this glob instead of training (= llm.eval_only).")]


@handle_errors
def finetune_head(
    profile: ProfileOpt, set_: SetOpt = None, eval_only: EvalOnlyOpt = None, resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False,
    json_out: JsonOpt = False, device: DeviceOpt = None, seed: SeedOpt = None, verbose: VerboseOpt = False,
) -> None:
    """Train the LM head (option: + block l) of early-exit drafts at llm.exit_layers; report held-out KL,
    perplexity and top-k accuracy per exit layer (results.csv)."""
    sets = [*(set_ or []), *([f"llm.eval_only={json.dumps(eval_only)}"] if eval_only else [])]
    session = open_session(profile, sets, device, seed, json_out, dry_run, verbose)
    run_training(session, "finetune-head", resume, overwrite, lambda backend: backend.finetune_head)
