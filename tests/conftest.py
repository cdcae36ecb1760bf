"""Shared fixtures. Real benchmark files are read from the data directory: $SPECCTL_DATA_DIR, else
../shared/data beside the repository; tests that need them skip, saying why, where they are absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("SPECCTL_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture
def data_dir() -> Path:
    path = shared_data_dir()
    if not (path / "ETTh1.csv").is_file():
        pytest.skip(f"real benchmark data not found in {path} (set SPECCTL_DATA_DIR)")
    return path


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path, monkeypatch):
    """Every test runs in its own folder so run directories and artifacts never leak between tests."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids oversubscription."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
