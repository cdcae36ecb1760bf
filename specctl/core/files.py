"""Atomic writes: a temp file (or folder) beside the target, flushed, then renamed over it."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path beside `path`, then rename it into place (all or nothing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(folder: Path, what: str) -> None:
    """`folder` exists or can be made, and a file can be written in it; else one SpecctlError line."""
    from specctl.core.errors import SpecctlError

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecctlError(f"{what} {folder} is not writable: {e.strerror or e}") from None


def check_creatable(folder: Path, what: str) -> None:
    """Like check_writable, but makes nothing (a command that fails later leaves no empty folder): an existing
    `folder` is probed; otherwise its nearest existing ancestor must be a folder this process may write in."""
    from specctl.core.errors import SpecctlError

    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if existing == path and path.is_dir():
        check_writable(path, what)
    elif not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SpecctlError(f"{what} {folder} is not writable: {existing} is not a folder this process may write in")


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buffer.getvalue())


def append_line(path: Path, line: str) -> None:
    """Append one line to a log file (a line is written whole or, on a failure, not at all by the OS in practice)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def staging_dir(folder: Path) -> Path:
    """An empty hidden folder beside `folder` to fill and then hand to `replace_dir`."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def aside_dir(folder: Path) -> Path:
    """Where `replace_dir` keeps the old folder while it swaps the new one in."""
    return Path(folder).with_name(f".{Path(folder).name}.old")


def replace_dir(staging: Path, folder: Path) -> Path:
    """Put a filled staging folder in place of `folder`: a reader sees the old folder or the new one, never a mix.

    The old folder is moved aside, the new one renamed in, the old one deleted; a crash between the two
    renames leaves the old folder aside, and `recover_dir` puts it back."""
    folder, old = Path(folder), aside_dir(folder)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    Path(staging).rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_dir(folder: Path) -> Path:
    """Undo a `replace_dir` cut off between its renames: the old folder comes back if the new one is missing."""
    folder, old = Path(folder), aside_dir(folder)
    if not folder.exists() and old.is_dir():
        old.rename(folder)
    return folder
