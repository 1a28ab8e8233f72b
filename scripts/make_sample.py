#!/usr/bin/env python
"""Regenerate the shipped Super1 sample (matseg/assets/sample/super1/) from the full NASA set.

Deterministic: all 10 train, 4 val and 4 test images (the whole Super1 set), in sorted name order. Images (RGB TIFF whose three
channels are equal) become 8-bit grey PNG; masks (RGBA colour overlays, multi-page TIFF) become RGB PNG with
the same palette encoding: pure blue (0,0,255) = secondary gamma', pure red (255,0,0) = tertiary gamma', and
every other pixel (the grey copy of the micrograph) black (0,0,0) = gamma matrix, which decodes identically and
compresses 17x better. Usage: .venv/bin/python scripts/make_sample.py [SRC] [DST]
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SRC = REPO.parent / "shared/data/nasa-pmm/Super1"
DST = REPO / "matseg/assets/sample/super1"
COUNTS = {"train": 10, "val": 4, "test": 4}  # all of Super1: 14 ID images, enough groups for QC
BLUE, RED = (0, 0, 255), (255, 0, 0)


def convert(src: Path, dst: Path) -> list[str]:
    "Write the sample into dst (replacing it) and return the source files used."
    if not src.is_dir(): sys.exit(f"make_sample: {src} does not exist; pass the Super1 folder of nasa-pmm as SRC")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    used = []
    for split, n in COUNTS.items():
        (tmp / split).mkdir(parents=True); (tmp / f"{split}_annot").mkdir()
        for img in sorted((src / split).glob("*.tif"))[:n]:
            a = tifffile.imread(img)
            assert a.ndim == 3 and (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all(), img
            Image.fromarray(a[..., 0]).save(tmp / split / f"{img.stem}.png", optimize=True)
            mfile = src / f"{split}_annot" / f"{img.stem}_mask.tif"
            with tifffile.TiffFile(mfile) as tif: m = tif.pages.first.asarray()[..., :3]
            out = np.zeros_like(m)
            for col in (BLUE, RED): out[(m == col).all(-1)] = col
            Image.fromarray(out).save(tmp / f"{split}_annot" / f"{img.stem}_mask.png", optimize=True)
            used += [f"{split}/{img.name}", f"{split}_annot/{mfile.name}"]
    for keep in ("LICENSE.txt", "ATTRIBUTION.md"):  # hand-written, kept across regenerations
        if (dst / keep).exists(): shutil.copy2(dst / keep, tmp / keep)
    if not (tmp / "LICENSE.txt").exists(): shutil.copy2(src.parent / "LICENSE.txt", tmp / "LICENSE.txt")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return used


if __name__ == "__main__":
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else SRC
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else DST
    files = convert(src, dst)
    size = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file())
    print(f"wrote {len(files) // 2} image/mask pairs to {dst} ({size / 1e6:.2f} MB):", *files, sep="\n  ")
