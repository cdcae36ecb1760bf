"""The time-series backend: what each command does with a profile of kind "timeseries"."""

from __future__ import annotations

from typing import Any

import torch

from specctl.core.backend import Say, SpecTestOptions, unsupported
from specctl.core.rundir import RunDir
from specctl.core.sweep import TrialSession
from specctl.timeseries import builders
from specctl.timeseries.distill import DistillResult, distill
from specctl.timeseries.pretrain import PretrainResult, PretrainSession, pretrain
from specctl.timeseries.profile import TimeseriesProfile
from specctl.timeseries.spec_result import SpecTestResult, append_results_log, summary_line
from specctl.timeseries.spectest import SpecTestSession


class TimeseriesBackend:
    def ensure_checkpoints(self, profile: TimeseriesProfile, device: torch.device, train_missing: bool,
                           say: Say) -> None:
        builders.ensure_checkpoints(profile, device, train_missing, say)

    def pretrain(self, profile: TimeseriesProfile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                 say: Say) -> PretrainResult:
        return pretrain(profile, device, run, resume, progress, say)

    def distill(self, profile: TimeseriesProfile, device: torch.device, run: RunDir, resume: bool, progress: Any,
                say: Say) -> DistillResult:
        return distill(profile, device, run, resume, progress, say)

    def finetune_head(self, profile: TimeseriesProfile, device: torch.device, run: RunDir, resume: bool,
                      progress: Any, say: Say):
        raise unsupported("finetune-head", profile.kind, "it builds early-exit drafts of LLMs; a time-series draft "
                          "is trained with `specctl distill`")

    def spec_test(self, profile: TimeseriesProfile, device: torch.device, run: RunDir, progress: Any, say: Say,
                  options: SpecTestOptions) -> SpecTestResult:
        result = SpecTestSession(profile, device, progress).run(profile, options.debug_csv)
        append_results_log(run.path.parent / "results.log", summary_line(profile, result))
        return result

    def sweep_session(self, profile: TimeseriesProfile, device: torch.device, progress: Any) -> TrialSession:
        if profile.sweep_command == "pretrain":
            return PretrainSession(profile, device, progress)
        return SpecTrials(profile, device, progress)

    def trial_inputs(self, profile: TimeseriesProfile) -> list[str]:
        pairs = builders.inputs(profile) if profile.sweep_command == "pretrain" else builders.spec_test_inputs(profile)
        return [path for path, _, _ in pairs]

    def register_plots(self) -> None:
        import specctl.timeseries.plots  # noqa: F401  (registers on import)


class SpecTrials:
    """A spec-test sweep's trials on one loaded session (models, data, baselines)."""

    def __init__(self, profile: TimeseriesProfile, device: torch.device, progress: Any) -> None:
        self.session = SpecTestSession(profile, device, progress)

    def compatible(self, profile: TimeseriesProfile) -> bool:
        return self.session.compatible(profile)

    def run(self, profile: TimeseriesProfile) -> dict[str, Any]:
        return self.session.run(profile).metrics()
