"""I/O failures are bad input like any other: one line naming the path and the cause, exit 2, no traceback, and every
file written before left as it was (a checkpoint cut off by a full disk is never the latest).

Each read-only case runs twice: `simulated` refuses writes under one folder with EROFS (monkeypatched os calls, so
it runs everywhere), `real` makes the folder unwritable the way a user meets it: chmod 555, or, for root (whom
chmod does not stop), `chattr +i`. A full disk is simulated inside safetensors' save, which writes half a file first.
"""

from __future__ import annotations

import builtins
import errno
import functools
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from typer.testing import CliRunner

import specctl.core.checkpoint as checkpoint
from specctl.cli import app
from specctl.core.errors import SpecctlError
from specctl.core.files import atomic_write, replace_dir, write_text
from specctl.core.sweep import Results
from tests.timeseries.test_plots import grid_results

FAST = ["--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=5", "--set", "data.max_eval_windows=16",
        "--set", "data.synthetic.length=3000"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny CPU models run far faster on one thread


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    """Exit 2, one `error:` line holding every fragment, no traceback; returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    for fragment in fragments:
        assert fragment in line, line
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def hidden_leftovers(folder: Path) -> list[Path]:
    """Temp files and staging folders a failed write must not leave behind."""
    return [p for p in Path(folder).rglob(".*") if p.name.endswith((".tmp", ".old"))]


# -- making a folder unwritable ---------------------------------------------------------------------------------


def refuse_writes(monkeypatch, folder: Path, code: int = errno.EROFS) -> None:
    """A file system that refuses every write under `folder` with `code` (reads and other folders work)."""
    folder = Path(folder).resolve()

    def inside(path) -> bool:
        try:
            return Path(os.fsdecode(path)).resolve().is_relative_to(folder)
        except (TypeError, ValueError):  # a file descriptor, not a path
            return False

    def refuse(path) -> OSError:
        return OSError(code, os.strerror(code), os.fsdecode(path))

    def guard(real, writes):
        def call(path, *args, **kwargs):
            if writes(args, kwargs) and inside(path):
                raise refuse(path)
            return real(path, *args, **kwargs)
        return call

    def guard_pair(real):
        def call(src, dst, *args, **kwargs):
            for path in (src, dst):
                if inside(path):
                    raise refuse(path)
            return real(src, dst, *args, **kwargs)
        return call

    def opens_for_writing(args, kwargs) -> bool:
        mode = args[0] if args else kwargs.get("mode", "r")
        return isinstance(mode, str) and any(c in mode for c in "wax+")

    def os_open_writes(args, kwargs) -> bool:
        flags = args[0] if args else kwargs.get("flags", 0)
        return bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    always = lambda args, kwargs: True  # noqa: E731
    monkeypatch.setattr(builtins, "open", guard(builtins.open, opens_for_writing))
    monkeypatch.setattr(io, "open", guard(io.open, opens_for_writing))
    monkeypatch.setattr(os, "open", guard(os.open, os_open_writes))
    for name in ("unlink", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), always))

    def mkdir(path, *args, **kwargs):
        if inside(path):  # as on a read-only file system, an existing folder is reported as existing
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path) if os.path.exists(path) else \
                refuse(path)
        return real_mkdir(path, *args, **kwargs)

    real_mkdir = os.mkdir
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("rename", "replace"):
        monkeypatch.setattr(os, name, guard_pair(getattr(os, name)))


@functools.cache
def lock_mechanism() -> str | None:
    """How this machine can make a folder refuse writes: "chmod" (not root), "chattr" (root, whom chmod does not
    stop, with `chattr +i` allowed), or None."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe"
        probe.mkdir(0o555)
        try:
            (probe / "file").touch()
        except PermissionError:
            return "chmod"
        finally:
            probe.chmod(0o755)
        if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0:
            subprocess.run(["chattr", "-i", str(probe)], check=True)
            return "chattr"
    return None


@contextmanager
def unwritable(folder: Path, immutable: bool = False) -> Iterator[None]:
    """`folder` refuses new entries, renames and deletions: chmod 555, or `chattr +i` as root (where chmod does
    not stop writes). `immutable`: also refuse renaming the folder itself, which only chattr can."""
    folder, how = Path(folder), lock_mechanism()
    if how == "chmod" and not immutable:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if how != "chattr":
        pytest.skip("needs `chattr +i` as root: chmod does not stop renaming a folder" if immutable else
                    "running as root, where chmod does not stop writes, and `chattr +i` is refused here")
    subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@contextmanager
def read_only(how: str, folder: Path, monkeypatch, immutable: bool = False) -> Iterator[None]:
    if how == "simulated":
        with monkeypatch.context() as patch:
            refuse_writes(patch, folder)
            yield
    else:
        with unwritable(folder, immutable):
            yield


def cause(how: str) -> str:
    """The strerror a refused write reports: EROFS when simulated; chmod gives EACCES, chattr +i EPERM."""
    if how == "simulated":
        return os.strerror(errno.EROFS)
    return os.strerror(errno.EACCES if lock_mechanism() == "chmod" else errno.EPERM)


HOW = ["simulated", "real"]


# -- the writers in core ----------------------------------------------------------------------------------------


def test_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = write_text(tmp_path / "results.json", "old\n")
    with read_only("simulated", tmp_path, monkeypatch), pytest.raises(SpecctlError) as error:
        write_text(target, "new\n")
    assert str(error.value) == f"cannot write {target}: Read-only file system"
    assert target.read_text() == "old\n" and not hidden_leftovers(tmp_path)


def test_a_write_cut_off_by_a_full_disk_names_the_file_and_says_earlier_files_are_intact(tmp_path):
    target = write_text(tmp_path / "results.csv", "old\n")

    def fill_disk(tmp: Path) -> None:
        tmp.write_text("half a ro")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    with pytest.raises(SpecctlError) as error:
        atomic_write(target, fill_disk)
    assert str(error.value) == (f"cannot write {target}: No space left on device "
                                "(the disk is full; earlier files are intact)")
    assert target.read_text() == "old\n" and not hidden_leftovers(tmp_path)


def test_replace_dir_that_cannot_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    folder, staging = tmp_path / "best", tmp_path / ".best.tmp"
    folder.mkdir()
    (folder / "model.safetensors").write_text("old")
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == staging:  # the new folder cannot be renamed in, after the old one was moved aside
            raise OSError(errno.EPERM, os.strerror(errno.EPERM), str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SpecctlError, match=rf"cannot write {folder}: Operation not permitted"):
        replace_dir(staging, folder)
    assert (folder / "model.safetensors").read_text() == "old" and not hidden_leftovers(tmp_path)


def fill_disk_on(monkeypatch, file: str, nth: int, error: BaseException | None = None) -> list[str]:
    """safetensors' save writes half of the `nth` file named `file`, then fails as it does on a full disk (with
    its own error type, I/O error 28), or raises `error`. Returns the temp paths it was asked to write."""
    real, seen = checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        real(tensors, filename, metadata)
        if f".{file}." in Path(filename).name:
            seen.append(filename)
            if len(seen) == nth:
                data = Path(filename).read_bytes()
                Path(filename).write_bytes(data[: len(data) // 2])
                raise error or SafetensorError("Error while serializing: I/O error: No space left on device "
                                               "(os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    return seen


def test_a_checkpoint_save_cut_off_by_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    folder = tmp_path / "last"
    weights = {"w": torch.ones(64)}
    checkpoint.save_checkpoint(folder, weights, {"epoch": 1}, state={"epoch": 1})
    before = snapshot(tmp_path)
    fill_disk_on(monkeypatch, checkpoint.WEIGHTS, nth=1)
    with pytest.raises(SpecctlError) as error:
        checkpoint.save_checkpoint(folder, {"w": torch.zeros(64)}, {"epoch": 2}, state={"epoch": 2})
    assert str(error.value) == (f"cannot write {folder / checkpoint.WEIGHTS}: No space left on device "
                                "(the disk is full; earlier files are intact)")
    assert snapshot(tmp_path) == before  # no staging folder, no temp file, last/ as it was
    assert checkpoint.load_weights(folder)["w"].eq(1).all()


def test_export_to_an_immutable_save_to_keeps_the_old_copy_and_says_where_the_new_one_is(tmp_path, monkeypatch):
    best, target = tmp_path / "run" / "best", tmp_path / "artifacts" / "target"
    checkpoint.save_checkpoint(best, {"w": torch.ones(4)}, {"new": True})
    checkpoint.save_checkpoint(target, {"w": torch.zeros(4)}, {"new": False})
    before = snapshot(target.parent)
    with read_only("simulated", target, monkeypatch), pytest.raises(SpecctlError) as error:
        checkpoint.export_checkpoint(best, target)  # the old copy cannot be moved aside
    assert str(error.value) == (f"cannot write {target}: Read-only file system (the trained checkpoint is in "
                                f"{best})")
    assert snapshot(target.parent) == before


@pytest.mark.parametrize("how", HOW)
def test_a_sweep_csv_that_cannot_be_rewritten_keeps_its_rows(tmp_path, monkeypatch, how):
    folder = tmp_path / "out"
    results = Results.open(folder / "results.csv", ["spec.k"])
    results.record({"trial_id": "a", "spec.k": 1, "mse": 0.4, "wall_s": 1.0, "status": "ok", "error": ""})
    before = snapshot(folder)
    with read_only(how, folder, monkeypatch), pytest.raises(SpecctlError) as error:
        results.record({"trial_id": "b", "spec.k": 2, "mse": 0.5, "wall_s": 1.0, "status": "ok", "error": ""})
    assert str(error.value) == f"cannot write {folder / 'results.csv'}: {cause(how)}"
    assert snapshot(folder) == before


# -- the commands -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("setting, said", [
    ('run_root="ro/runs"', "the run root (run_root) ro/runs is not writable"),
    ('train.save_to="ro/target"', "the folder of train.save_to ro is not writable"),
], ids=["run_root", "save_to"])
def test_a_read_only_output_is_refused_before_training(tmp_path, monkeypatch, how, setting, said):
    (tmp_path / "ro").mkdir()
    with read_only(how, tmp_path / "ro", monkeypatch):
        result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", setting)
    assert_one_line_error(result, said, cause(how))
    assert not Path("runs/pretrain").exists() and snapshot(tmp_path / "ro") == {}


@pytest.mark.parametrize("how", HOW)
def test_an_immutable_save_to_keeps_the_old_checkpoint(tmp_path, monkeypatch, how):
    target = Path("artifacts/quickstart/target")  # the profile's train.save_to, holding an earlier model
    checkpoint.save_checkpoint(target, {"w": torch.zeros(4)}, {"earlier": True})
    before = snapshot(target.parent)
    with read_only(how, target, monkeypatch, immutable=True):
        result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--overwrite")
    line = assert_one_line_error(result, f"cannot write {target}: {cause(how)}", "(the trained checkpoint is in")
    assert snapshot(target.parent) == before
    trained = Path(line.split("the trained checkpoint is in ")[1].rstrip(")"))
    assert checkpoint.resolve_checkpoint(trained) == trained  # the new model is not lost


@pytest.mark.parametrize("how", HOW)
def test_a_read_only_sweep_out_is_refused_before_any_trial(tmp_path, monkeypatch, how):
    folder = tmp_path / "out"
    Results.open(folder / "r.csv", ["train.lr"]).record(
        {"trial_id": "a", "train.lr": 1.0, "wall_s": 1.0, "status": "ok", "error": ""})
    before = snapshot(folder)
    with read_only(how, folder, monkeypatch):
        result = invoke("sweep", "--profile", "quickstart/tune-target", *FAST, "--out", "out/r.csv")
    assert_one_line_error(result, "the folder of the results CSV (--out) out is not writable", cause(how))
    assert snapshot(folder) == before and not Path("runs/pretrain").exists()


@pytest.mark.parametrize("how", HOW)
def test_a_read_only_plot_folder(tmp_path, monkeypatch, how):
    grid_results().to_csv("results.csv", index=False)
    folder = tmp_path / "plots"
    folder.mkdir()
    (folder / "k_effect.png").write_bytes(b"an earlier figure")
    with read_only(how, folder, monkeypatch):
        result = invoke("plot", "results.csv", "--out", "plots")
    assert_one_line_error(result, "the figures' folder (--out) plots is not writable", cause(how))
    assert snapshot(folder) == {"k_effect.png": b"an earlier figure"}


@pytest.mark.parametrize("how", HOW)
def test_an_immutable_run_folder_is_not_resumed_into(tmp_path, monkeypatch, how):
    with monkeypatch.context() as patch:  # a run interrupted while saving its second epoch
        fill_disk_on(patch, checkpoint.OPTIMIZER, nth=2, error=KeyboardInterrupt())
        assert invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.epochs=2").exit_code == 130
    run = next(Path("runs/pretrain").iterdir())
    before = snapshot(run)
    with read_only(how, run, monkeypatch):
        result = invoke("pretrain", "--profile", str(run / "profile.toml"), "--resume")
    assert_one_line_error(result, f"cannot write {run.resolve() / 'manifest.json'}: {cause(how)}")
    assert snapshot(run) == before


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_epoch_and_resume_continues(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        written = fill_disk_on(patch, checkpoint.OPTIMIZER, nth=2)  # the second epoch's last/
        result = invoke("pretrain", "--profile", "quickstart/target", *FAST, "--set", "train.epochs=2")
    run = next(Path("runs/pretrain").iterdir())
    assert_one_line_error(result, f"cannot write {run / 'checkpoints/last' / checkpoint.OPTIMIZER}: No space left "
                          "on device (the disk is full; earlier files are intact)")
    assert len(written) == 2 and not Path(written[1]).exists() and not hidden_leftovers(run)
    assert checkpoint.load_state(run / "checkpoints/last")["epoch"] == 1
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"
    # space freed: the run continues from its last finished epoch
    resumed = invoke("pretrain", "--profile", str(run / "profile.toml"), "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.output[resumed.output.index("{"):])["epochs"] == 2
