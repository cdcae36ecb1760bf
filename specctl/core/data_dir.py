"""The data directory: where data files named in a profile are looked up, for both halves."""

from __future__ import annotations

import os
from pathlib import Path

from specctl.core.schema import DataLocation

ENV_DATA_DIR = "SPECCTL_DATA_DIR"


def data_dir(location: DataLocation) -> Path | None:
    """The folder named files are looked up in: profile key `data.dir`, else $SPECCTL_DATA_DIR, else none."""
    chosen = location.dir or os.environ.get(ENV_DATA_DIR)
    return Path(chosen).expanduser() if chosen else None
