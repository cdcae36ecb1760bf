"""`specctl --help` and bad input answer at once: no torch, transformers, pandas or numpy is imported on the way
(heavy imports live inside the commands that need them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "pandas", "numpy")
# run the CLI as `specctl ARGS` does, then report the exit code and which heavy modules were imported
PROBE = f"HEAVY = {HEAVY!r}\n" + """
import json, sys
from specctl.cli import app
try:
    app(sys.argv[1:], prog_name="specctl")
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "heavy": sorted(m for m in HEAVY if m in sys.modules)}), file=sys.stderr)
"""


def probe(*args: str, cwd: Path) -> tuple[int, list[str], str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], done.stdout + done.stderr


@pytest.mark.parametrize("args, code, says", [
    (["--help"], 0, "spec-test"),
    (["pretrain", "--help"], 0, "--profile"),
    (["pretrain", "--profile", "nope.toml"], 2, "profile not found"),
    (["spec-test", "--profile", "quickstart", "--set", "spec.kk=3"], 2, "unknown key 'spec.kk'"),
    (["pretrain", "--profile", "quickstart/target", "--dry-run"], 0, "[train]"),
])
def test_help_and_bad_input_import_no_heavy_module(tmp_path, args, code, says):
    exit_code, heavy, output = probe(*args, cwd=tmp_path)
    assert exit_code == code and says in output, output
    assert heavy == [], f"`specctl {' '.join(args)}` imported {heavy}"
