"""Checkpoints: a folder with `model.safetensors` and `config.json` (never pickles).

Training checkpoints add `optimizer.safetensors` and `state.json` (epoch, best validation loss, ...).
A folder is written whole into a hidden staging folder and then renamed into place, so the files of a
checkpoint always belong to the same save (resuming never mixes two epochs), and a save that fails (a full disk,
a read-only folder) deletes its staging folder and leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from specctl.core import distributed
from specctl.core.errors import SpecctlError
from specctl.core.files import atomic_write, staged_dir, write_error, write_json

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: write_safetensors(tensors, tmp))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' `save_file`, its I/O failures raised as the OSError they are (it wraps them in its own error
    type, which would otherwise escape as a traceback)."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e


def save_checkpoint(
    folder: Path,
    weights: dict[str, torch.Tensor],
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a checkpoint folder as a whole; `extra` maps more file names to tensors saved beside the weights."""
    with staged_dir(folder) as staging:
        save_tensors(staging / WEIGHTS, weights)
        for name, tensors in (extra or {}).items():
            save_tensors(staging / name, tensors)
        if optimizer is not None:
            tensors, groups = flatten_optimizer(optimizer)
            save_tensors(staging / OPTIMIZER, tensors)
            write_json(staging / STATE, {**(state or {}), "param_groups": groups})
        elif state is not None:
            write_json(staging / STATE, state)
        write_json(staging / CONFIG, config)
    return Path(folder)


def resolve_checkpoint(ref: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose `checkpoints/best` (else `last`) is used."""
    path = Path(ref)
    for candidate in (path, path / "checkpoints" / "best", path / "checkpoints" / "last", path / "best"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise SpecctlError(f"checkpoint not found: {path}")
    raise SpecctlError(f"{path}: not a specctl checkpoint (needs {WEIGHTS} and {CONFIG})")


def load_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SpecctlError(f"{folder}: unreadable checkpoint config: {e}") from None


def load_tensors(path: Path, device: str | torch.device = "cpu", what: str = "tensors") -> dict[str, torch.Tensor]:
    """The twin of `save_tensors`; a corrupt or missing file is a one-line SpecctlError naming its folder."""
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise SpecctlError(f"{Path(path).parent}: unreadable {what}: {e}") from None


def load_weights(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_tensors(Path(folder) / WEIGHTS, device, "weights")


def load_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Optimizer state as named tensors (for safetensors) plus its JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, sd["param_groups"]


def restore_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    state = load_state(folder)
    tensors = load_file(str(Path(folder) / OPTIMIZER))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})


def export_checkpoint(best: Path, target: str | Path) -> Path:
    """Copy a checkpoint folder to a stable path (train.save_to), replacing any older copy atomically. If that
    fails, the older copy stays and the error says where the new checkpoint still is. Under torchrun rank 0 alone
    copies; every process gets the path."""
    target = Path(target)
    if not distributed.is_main():
        return target
    try:
        with staged_dir(target) as staging:
            for src in sorted(Path(best).iterdir()):
                try:
                    (shutil.copytree if src.is_dir() else shutil.copy2)(src, staging / src.name)
                except OSError as e:
                    raise write_error(staging / src.name, e) from e
    except SpecctlError as e:
        raise SpecctlError(f"{e} (the trained checkpoint is in {best})") from e.__cause__
    return target
