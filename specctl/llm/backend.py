"""The LLM backend: what each command does with a profile of kind "llm"."""

from __future__ import annotations

from typing import Any

import torch

from specctl.core.backend import Say, SpecTestOptions, unsupported
from specctl.core.rundir import RunDir
from specctl.core.runtime import seed_everything
from specctl.core.sweep import TrialSession
from specctl.llm.profile import LLMProfile


class LLMBackend:
    def ensure_checkpoints(self, profile: LLMProfile, device: torch.device, train_missing: bool, say: Say) -> None:
        """The target and the draft are loaded (and checked) by spec-test itself; nothing is trained for them."""

    def pretrain(self, profile: LLMProfile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                 say: Say):
        from specctl.llm.pretrain import pretrain_lm

        seed_everything(profile.seed)
        return pretrain_lm(profile, device, run, resume, progress, say)

    def distill(self, profile: LLMProfile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                say: Say):
        raise unsupported("distill", profile.kind, "it trains time-series drafts; an early-exit LLM draft is tuned "
                          "with `specctl finetune-head`")

    def finetune_head(self, profile: LLMProfile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                      say: Say):
        from specctl.llm.finetune import finetune_heads

        seed_everything(profile.seed)
        return finetune_heads(profile, device, run, resume, progress, say)

    def spec_test(self, profile: LLMProfile, device: torch.device, run: RunDir, progress: Any, say: Say,
                  options: SpecTestOptions):
        from specctl.llm.spectest import run_llm_spec_test

        seed_everything(profile.seed)
        return run_llm_spec_test(profile, device, run, progress, say)

    def sweep_session(self, profile: LLMProfile, device: torch.device, progress: Any) -> TrialSession:
        from specctl.core.errors import SpecctlError
        from specctl.llm.sweep import LLMSpecSession

        if profile.sweep_command == "pretrain":
            raise SpecctlError('sweep_command = "pretrain" runs time-series recipe searches; this profile\'s kind '
                               "is 'llm'")
        return LLMSpecSession(profile, device, progress)

    def trial_inputs(self, profile: LLMProfile) -> list[str]:
        llm = profile.llm
        return [path for path in (llm.target, llm.tokenizer, llm.spec.draft) if path]

    def register_plots(self) -> None:
        import specctl.llm.plots  # noqa: F401  (registers on import)
