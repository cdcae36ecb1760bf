"""Atomic writes: a temp file (or folder) beside the target, flushed, then renamed over it.

A write that fails (a read-only folder, an immutable one, a full disk) removes its temp file or folder, leaves the
previous version of the target as it was, and ends in one SpecctlError line naming the target and the cause.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from specctl.core.errors import SpecctlError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def io_cause(e: OSError) -> str:
    """Why a read or write failed, in words; a full disk also says that what was written before is intact."""
    cause = e.strerror or str(e)
    return cause + (" (the disk is full; earlier files are intact)" if e.errno == errno.ENOSPC else "")


def shown(path: Path) -> Path:
    """The path a person knows: a file inside a staging folder (`.last.tmp/x`) is named as the folder it will
    become (`last/x`), since the staging folder is gone by the time the error is read."""
    path = Path(path)
    for parent in path.parents:
        if parent.name.startswith(".") and parent.name.endswith(".tmp"):
            return parent.with_name(parent.name[1:-4]) / path.relative_to(parent)
    return path


def write_error(path: Path, e: OSError) -> SpecctlError:
    return SpecctlError(f"cannot write {shown(path)}: {io_cause(e)}")


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError inside becomes one SpecctlError line naming `path`, the file or folder being written."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path beside `path`, then rename it into place (all or nothing)."""
    path = Path(path)
    with writing(path):
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


def probe_write(folder: Path, what: str, shown: Path) -> None:
    """Write and remove a probe file in `folder`; an OSError is one SpecctlError line naming `shown`."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SpecctlError(f"{what} {shown} is not writable: {io_cause(e)}") from None


def check_creatable(folder: Path, what: str) -> None:
    """`folder` is, or can be made, a folder this process writes in, and nothing is made (a command that fails
    later leaves no empty folder): a probe file is written and removed in `folder`, or where it does not exist
    yet in its nearest existing ancestor."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise SpecctlError(f"{what} {folder} is not writable: {existing} is not a folder")
    probe_write(existing, what, Path(folder))


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
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)


def staging_dir(folder: Path) -> Path:
    """An empty hidden folder beside `folder` to fill and then hand to `replace_dir`."""
    folder = Path(folder)
    staging = folder.with_name(f".{folder.name}.tmp")
    with writing(folder):
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    return staging


@contextmanager
def staged_dir(folder: Path) -> Iterator[Path]:
    """Fill the yielded staging folder; on success it replaces `folder` whole, on any failure it is deleted and
    `folder` keeps its previous contents."""
    staging = staging_dir(folder)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_dir(staging, folder)


def aside_dir(folder: Path) -> Path:
    """Where `replace_dir` keeps the old folder while it swaps the new one in."""
    return Path(folder).with_name(f".{Path(folder).name}.old")


def replace_dir(staging: Path, folder: Path) -> Path:
    """Put a filled staging folder in place of `folder`: a reader sees the old folder or the new one, never a mix.

    The old folder is moved aside, the new one renamed in, the old one deleted; a crash between the two
    renames leaves the old folder aside, and `recover_dir` puts it back. A rename that fails (an immutable
    folder) puts the old folder back, deletes the staging folder and raises one SpecctlError line."""
    folder, old = Path(folder), aside_dir(folder)
    try:
        shutil.rmtree(old, ignore_errors=True)
        moved = folder.exists()
        if moved:
            folder.rename(old)
        try:
            Path(staging).rename(folder)
        except OSError:
            if moved:
                old.rename(folder)
            raise
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise write_error(folder, e) from e
    shutil.rmtree(old, ignore_errors=True)
    return folder


def recover_dir(folder: Path) -> Path:
    """Undo a `replace_dir` cut off between its renames: the old folder comes back if the new one is missing."""
    folder, old = Path(folder), aside_dir(folder)
    if not folder.exists() and old.is_dir():
        old.rename(folder)
    return folder
