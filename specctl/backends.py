"""The one dispatch table: each profile `kind`, its profile schema and the backend that runs its commands.

Schemas are pydantic models only (cheap to import); a backend, which pulls in torch and the model code, is
imported the first time a command asks for it.
"""

from __future__ import annotations

import importlib

from specctl.core import profile as loader
from specctl.core.backend import Backend
from specctl.core.schema import Profile
from specctl.llm.profile import LLMProfile
from specctl.timeseries.profile import TimeseriesProfile

SCHEMAS: dict[str, type[Profile]] = {"timeseries": TimeseriesProfile, "llm": LLMProfile}
BACKENDS: dict[str, str] = {
    "timeseries": "specctl.timeseries.backend:TimeseriesBackend",
    "llm": "specctl.llm.backend:LLMBackend",
}


def load_profile(ref: str, overrides: list[str] | None = None) -> Profile:
    """A shipped profile name or TOML path, `extends` merged, --set overrides applied, validated for its kind."""
    return loader.load_profile(ref, overrides, SCHEMAS)


def backend_for(kind: str, table: dict[str, str] | None = None) -> Backend:
    """The backend of `kind` from `table` (default: BACKENDS)."""
    module, _, cls = (table or BACKENDS)[kind].partition(":")
    return getattr(importlib.import_module(module), cls)()


def register_all_plots() -> None:
    """Every kind's figures in the plot registry (`specctl plot` draws what the results' columns allow)."""
    for kind in BACKENDS:
        backend_for(kind).register_plots()


def open_trial_session(table: dict[str, str], profile: Profile, device, progress=None):
    """The sweep engine's session factory, bound to a backend table with functools.partial (a module-level function
    and a dict, so worker processes unpickle the same table the sweep was started with)."""
    return backend_for(profile.kind, table).sweep_session(profile, device, progress)
