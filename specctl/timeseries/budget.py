"""A fidelity budget instead of a raw tolerance: on validation windows only, every tolerance (relative to the
target's own validation RMSE) x K of the profile's candidates is scored, decoded as the test split will be (with
adaptive K where the profile asks for it), and the setting with the best predicted speedup among those whose MSE
stays within the budget of target-only's is what the test split then runs; the target alone (K = 0, its own loop)
when no such setting is predicted to beat it."""

from __future__ import annotations

from dataclasses import dataclass

from specctl.core.errors import SpecctlError
from specctl.timeseries.costs import StepCosts, adaptive_k, predict
from specctl.timeseries.evaluate import errors
from specctl.timeseries.profile import TimeseriesProfile
from specctl.timeseries.spec_result import BudgetChoice
from specctl.timeseries.spectest import SpecTestSession


@dataclass
class Candidate:
    tol_relative: float
    k: int
    delta_mse: float  # relative to the target's validation MSE
    acceptance_rate: float
    predicted_speedup: float


def with_setting(profile: TimeseriesProfile, tol: float, k: int) -> TimeseriesProfile:
    spec = profile.spec.model_copy(update={"tol": tol, "tol_relative": None, "k": k, "fidelity_budget": None})
    return profile.model_copy(update={"spec": spec})


def score_candidate(session: SpecTestSession, profile: TimeseriesProfile, tol_relative: float, mse_target: float,
                    costs: StepCosts) -> Candidate:
    """One (tolerance, k) on the validation windows, decoded as the test windows will be (with adaptive K learning
    from batch to batch): its MSE against the target's and its predicted speedup."""
    results = session.decode_validation(profile, adaptive_k(costs.round, costs.first, profile.spec, session.steps))
    mse, _ = errors([r.forecast for r in results], [b.truth for b in session.validation_batches()])
    proposed = sum(int(r.proposed.sum()) for r in results)
    accepted = sum(int(r.accepted.sum()) for r in results)
    predicted = predict(costs, results).speedup
    return Candidate(tol_relative, profile.spec.k, (mse - mse_target) / mse_target,
                     accepted / proposed if proposed else 0.0, predicted)


def choose_within_budget(session: SpecTestSession, profile: TimeseriesProfile) -> tuple[TimeseriesProfile,
                                                                                        BudgetChoice]:
    """The profile with the chosen tolerance and k (k = 0, the target's own loop, when no setting within the budget
    is predicted to be faster)."""
    spec = profile.spec
    batches = session.validation_batches()
    if not batches:
        raise SpecctlError(f"spec.fidelity_budget chooses on validation windows, but the val split has "
                           f"{len(session.data.val)} rows, fewer than data.lookback + horizon")
    mse_target, rmse = session.validation_mse(), session.validation_rmse(spec.tol_units)
    candidates = []
    for k in spec.budget_ks or [spec.k]:  # with adaptive K, the most a round may draft
        costs = session.costs(with_setting(profile, 0.0, k), whole_rounds=False, batch=batches[0])
        candidates += [score_candidate(session, with_setting(profile, rel * rmse, k), rel, mse_target, costs)
                       for rel in sorted(spec.budget_tolerances)]
    fits = [c for c in candidates if c.delta_mse <= spec.fidelity_budget]
    target_alone = Candidate(0.0, 0, 0.0, 0.0, 1.0)  # within any budget, and 1x by definition
    best = max([*fits, target_alone], key=lambda c: (c.predicted_speedup, c.tol_relative))
    choice = BudgetChoice(spec.fidelity_budget, best.tol_relative, best.k, 100 * best.delta_mse,
                          best.acceptance_rate, best.predicted_speedup, len(candidates), len(fits))
    return with_setting(profile, best.tol_relative * rmse, best.k), choice
