"""The one run-directory writer: runs/<command>/<name>-<timestamp>/ with profile, manifest and results."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import specctl
from specctl.core.errors import SpecctlError
from specctl.core.files import aside_dir, check_creatable, write_json, write_text
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
        root = Path(profile.run_root) / command
        mark_dead_runs(root, profile.name)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        path = root / f"{profile.name.replace('/', '-')}-{stamp}"
        path.mkdir(parents=True, exist_ok=False)
        manifest = {
            "command": command,
            "specctl_version": specctl.__version__,
            "git_commit": git_commit(),
            "seed": profile.seed,
            "device": device,
            "argv": sys.argv,
            "pid": os.getpid(),
            "host": platform.node(),
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
    def resume(cls, profile: Profile, command: str, device: str) -> RunDir:
        """The run --resume continues: the run whose profile.toml was given, else the newest resumable run of this
        profile. Its settings must be this profile's (train.epochs and device may differ: training longer, or on
        another device, is still the same run). An unfinished run continues in place; a finished one is never
        rewritten: a new run starts from a copy of its last checkpoint."""
        root = Path(profile.run_root) / command
        mark_dead_runs(root, profile.name)
        chosen = own_run(profile, command) or newest_resumable(root, profile.name)
        if chosen is None:
            raise SpecctlError(f"--resume: no run of '{profile.name}' with a checkpoint under {root}")
        differ = changed_keys(json.loads((chosen / "profile.json").read_text(encoding="utf-8")), profile.model_dump())
        if differ:
            raise SpecctlError(f"--resume: {chosen} was made with other settings ({', '.join(differ[:4])}); resume it "
                               f"with `--profile {chosen / 'profile.toml'} --resume`, or drop --resume for a new run")
        manifest = json.loads((chosen / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("status") == "finished":
            run = cls.create(profile, command, device)
            shutil.copytree(chosen / "checkpoints", run.checkpoints)
            run.manifest["resumed_from"] = str(chosen)
            run.save_manifest()
            return run
        manifest.update(status="running", resumed=_now(), pid=os.getpid(), host=platform.node())
        run = cls(chosen, manifest)
        run.save_manifest()
        return run

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def save_manifest(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)

    def write_json(self, name: str, obj: Any) -> Path:
        return write_json(self.path / name, obj)

    def write_result(self, result: Any) -> Path:
        """metrics.json: a command's typed result (core/backend.Result) as its metrics and their definitions."""
        return self.write_json("metrics.json", {"metrics": result.metrics(), "definitions": result.definitions})

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.manifest.update(status=status, finished=_now())
        if error:
            self.manifest["error"] = error
        self.save_manifest()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        """A run that raised is marked failed (or interrupted), never left looking finished; one that failed on bad
        input before any work (no checkpoint, no result) leaves no folder behind."""
        if kind is None:
            return
        if issubclass(kind, (SpecctlError, OSError)) and not self.has_work():
            shutil.rmtree(self.path, ignore_errors=True)
            return
        self.finish("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed", str(error))

    def has_work(self) -> bool:
        """Whether anything beyond the profile and manifest was written (checkpoints, results, logs)."""
        return any(p.name not in ("profile.toml", "profile.json", "manifest.json") for p in self.path.iterdir())


def own_runs(root: Path, name: str) -> list[Path]:
    """Run folders of profile `name` under `root`, oldest first (not those of a longer name)."""
    own = re.compile(re.escape(name.replace("/", "-")) + r"-\d{8}-\d{6}-\d{6}")
    return sorted(p for p in root.glob("*") if own.fullmatch(p.name) and (p / "manifest.json").is_file())


def newest_resumable(root: Path, name: str) -> Path | None:
    """The newest run of `name` that left a resumable checkpoint (`checkpoints/**/last`, or a `last` still set
    aside by a save cut off between its two renames: fit's resume puts it back)."""
    resumable = {"last", aside_dir(Path("last")).name}
    runs = [p for p in own_runs(root, name)
            if any(s.parent.name in resumable for s in (p / "checkpoints").glob("**/state.json"))]
    return runs[-1] if runs else None


def own_run(profile: Profile, command: str) -> Path | None:
    """The run folder a profile was loaded from (its profile.toml), if it is a run of `command`."""
    folder = profile.source.parent if profile.source else None
    if folder is None or not (folder / "manifest.json").is_file() or not (folder / "profile.json").is_file():
        return None
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    return folder if manifest.get("command") == command else None


RESUMABLE_CHANGES = ("train.epochs", "device")  # what may differ between a run and its resume


def changed_keys(saved: dict[str, Any], given: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two profile dumps, except RESUMABLE_CHANGES."""
    out = []
    for key in sorted(set(saved) | set(given)):
        dotted = f"{prefix}{key}"
        a, b = saved.get(key), given.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_keys(a, b, f"{dotted}.")
        elif a != b and dotted not in RESUMABLE_CHANGES:
            out.append(f"{dotted} {a!r} -> {b!r}")
    return out


def alive(pid: int | None, host: str | None) -> bool:
    """Whether the process that wrote a manifest still runs (unknowable for another host: assumed alive)."""
    if pid is None or host != platform.node():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_dead_runs(root: Path, name: str) -> None:
    """Runs of `name` still marked running whose process is gone (killed) are marked interrupted."""
    for path in own_runs(root, name):
        try:
            manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if manifest.get("status") == "running" and not alive(manifest.get("pid"), manifest.get("host")):
            manifest.update(status="interrupted", finished=_now(), error="its process ended without finishing")
            write_json(path / "manifest.json", manifest)


def check_outputs(profile: Profile, overwrite: bool) -> None:
    """Before any long work: the run root is writable, and train.save_to is writable and, unless `overwrite`, not
    already a checkpoint (no command replaces a trained model silently)."""
    check_creatable(Path(profile.run_root), "the run root (run_root)")
    save_to = profile.train.save_to
    if not save_to:
        return
    target = Path(save_to)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise SpecctlError(f"train.save_to {target} already holds a checkpoint: pass --overwrite to replace it, or "
                           "set train.save_to to another folder")
    check_creatable(target.parent, "the folder of train.save_to")


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
