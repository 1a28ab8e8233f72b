"""Shared fixtures: paths to the repo, the shipped assets and the real NASA data beside the clone."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def write_toy_dataset(root: Path, n=(4, 2, 2), size=64, seed=0) -> Path:
    "Synthetic index-mask dataset on disk: train/ train_annot/ val/ ... with discs (1) and a band (2)."
    rng = np.random.default_rng(seed); yy, xx = np.mgrid[:size, :size]; k = 0
    for split, count in zip(("train", "val", "test"), n):
        (root / split).mkdir(parents=True, exist_ok=True); (root / f"{split}_annot").mkdir(exist_ok=True)
        for _ in range(count):
            m = np.zeros((size, size), np.uint8)
            for _ in range(3):
                cy, cx = rng.integers(8, size - 8, 2); r = rng.integers(4, 9)
                m[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
            b = rng.integers(0, size - 6); m[b:b + 5] = 2
            img = np.where(m == 1, 200, np.where(m == 2, 30, 110)) + rng.normal(0, 12, m.shape)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / f"img #{k}.png")
            Image.fromarray(m).save(root / f"{split}_annot" / f"img #{k}.png"); k += 1
    return root
