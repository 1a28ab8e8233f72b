"""Shared fixtures: paths to the repo, the shipped assets and the real NASA data beside the clone."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "nasa-pmm"
MATSEG = [sys.executable, "-m", "matseg.cli"] if shutil.which("matseg") is None else ["matseg"]


def run_matseg(*args, cwd=None, timeout=600):
    "Run the `matseg` console script; return the CompletedProcess (text)."
    exe = Path(sys.executable).with_name("matseg")
    cmd = [str(exe)] if exe.exists() else MATSEG
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.fixture
def nasa():
    "Folder of the real NASA Super1/EBC2 sets (skips when shared/ is not beside the clone)."
    if not (SHARED_DATA / "Super1").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MATSEG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set MATSEG_SLOW=1 to run")
    for it in items:
        if "slow" in it.keywords:
            it.add_marker(skip)
