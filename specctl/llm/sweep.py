"""The sweep runner for kind = "llm": one LLM spec-test per trial, the target loaded once per session and each
exit layer's draft once. Trials may differ in llm.exit_layer, llm.spec.* and seed and still share a session."""

from __future__ import annotations

from typing import Any

import torch

from specctl.llm.draft import Draft
from specctl.llm.profile import LLMProfile
from specctl.llm.spectest import load_target, measure_prompts, pick_draft, setup

# keys a trial may change without reloading the target (pydantic `exclude` form)
PER_TRIAL = {"seed": True, "llm": {"exit_layer", "spec", "draft_kind", "skip_layers"}}


def shared(profile: LLMProfile) -> dict[str, Any]:
    """The profile without its per-trial keys."""
    return profile.model_dump(exclude=PER_TRIAL)


def csv_columns(metrics: dict[str, Any]) -> dict[str, Any]:
    """spec-test metrics as CSV columns: list metrics numbered (position_acceptance_1.., accepted_len_0..),
    confidence intervals as <metric>_ci_low / _ci_high, without the definitions text."""
    nested = ("position_acceptance", "accepted_lengths", "ci")
    out = {k: v for k, v in metrics.items() if k not in nested}
    out["skip_layers"] = " ".join(map(str, metrics["skip_layers"]))
    out.update({f"position_acceptance_{i}": p for i, p in enumerate(metrics["position_acceptance"], start=1)})
    out.update({f"accepted_len_{k}": f for k, f in enumerate(metrics["accepted_lengths"])})
    for name, (low, high) in metrics["ci"].items():
        out.update({f"{name}_ci_low": low, f"{name}_ci_high": high})
    return out


class LLMSpecSession:
    """Holds the target and the drafts loaded so far; `run` is one spec-test of a trial profile."""

    def __init__(self, profile: LLMProfile, device: torch.device, progress: Any = None) -> None:
        self.profile, self.device, self.progress = profile, device, progress
        self.lm = load_target(profile, device)
        self.drafts: dict[tuple, Draft] = {}

    def compatible(self, profile: LLMProfile) -> bool:
        return shared(profile) == shared(self.profile)

    def draft(self, profile: LLMProfile) -> Draft:
        llm = profile.llm
        key = (llm.draft_kind, str(llm.skip_layers)) if llm.draft_kind == "layer_skip" else (
            llm.spec.draft, llm.exit_layer)
        if key not in self.drafts:
            self.drafts[key] = pick_draft(profile, self.lm)
        return self.drafts[key]

    def run(self, profile: LLMProfile) -> dict[str, Any]:
        result, _ = measure_prompts(setup(profile, self.lm, self.draft(profile)), profile, self.device, self.progress)
        return csv_columns(result.metrics())
