"""The one run-directory writer: runs/<command>/<name>-<timestamp>/ with profile, manifest and results."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import specctl
from specctl.core.errors import SpecctlError
from specctl.core.files import aside_dir, write_json, write_text
from specctl.core.schema import Profile


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(specctl.__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    import numpy
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("transformers", "tokenizers", "datasets"):
        module = sys.modules.get(name)
        if module is not None:
            versions[name] = getattr(module, "__version__", "?")
    if torch.cuda.is_available():
        versions["cuda"] = str(torch.version.cuda)
    return versions


@dataclass
class RunDir:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def create(cls, profile: Profile, command: str, device: str) -> RunDir:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = Path(profile.run_root) / command / f"{profile.name.replace('/', '-')}-{stamp}"
        path.mkdir(parents=True, exist_ok=False)
        manifest = {
            "command": command,
            "specctl_version": specctl.__version__,
            "git_commit": git_commit(),
            "seed": profile.seed,
            "device": device,
            "argv": sys.argv,
            "versions": library_versions(),
            "started": _now(),
            "finished": None,
            "status": "running",
        }
        run = cls(path, manifest)
        write_text(path / "profile.toml", profile_to_toml(profile))
        write_json(path / "profile.json", profile.model_dump())
        run.save_manifest()
        return run

    @classmethod
    def latest(cls, profile: Profile, command: str) -> RunDir:
        """The newest run of this profile and command that left a resumable checkpoint (`checkpoints/**/last`)."""
        root = Path(profile.run_root) / command
        own = re.compile(re.escape(profile.name.replace("/", "-")) + r"-\d{8}-\d{6}-\d{6}")  # not a longer name's runs
        # a `last` still set aside by a save cut off between its two renames counts: fit's resume puts it back
        resumable = {"last", aside_dir(Path("last")).name}
        runs = sorted(p for p in root.glob("*") if own.fullmatch(p.name)
                      and any(s.parent.name in resumable for s in (p / "checkpoints").glob("**/state.json")))
        if not runs:
            raise SpecctlError(f"--resume: no run of '{profile.name}' with a checkpoint under {root}")
        manifest = json.loads((runs[-1] / "manifest.json").read_text(encoding="utf-8"))
        manifest.update(status="running", resumed=_now())
        run = cls(runs[-1], manifest)
        run.save_manifest()
        return run

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_manifest(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.manifest.update(status=status, finished=_now())
        if error:
            self.manifest["error"] = error
        self.save_manifest()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A run that raised is marked failed (or interrupted), never left looking finished."""
        if kind is not None:
            self.finish("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed", str(error))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. one entry of data.extra_train
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def profile_to_toml(profile: Profile) -> str:
    """The resolved profile as TOML (None values are omitted: TOML has no null)."""
    lines: list[str] = []

    def emit(table: dict[str, Any], prefix: str) -> None:
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        if prefix and (scalars or not tables):
            lines.append(f"\n[{prefix}]")
        for key, value in scalars.items():
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables.items():
            emit(value, f"{prefix}.{_toml_key(key)}" if prefix else _toml_key(key))

    emit(profile.model_dump(), "")
    return "\n".join(lines).lstrip() + "\n"
