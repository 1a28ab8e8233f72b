"""Counterfactual heatmap speed: batched `counterfactual_heatmap` vs the one-forward-per-location loop.

Default (GPU-sized): Unet-ResNet50 at 256², patch 16, stride 8 → 961 kernel locations.
On a CPU use a smaller configuration, e.g.

    python bench/heatmap_speed.py --size 128 --encoder resnet18 --device cpu

Prints progress to stderr and one markdown table row to stdout (for bench/RESULTS.md):
| device | model | image | patch/stride | locations | batch | batched s | naive s | speed-up | max rel. diff |
"""
from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from matseg.core import resolve_device
from matseg.explain import counterfactual_heatmap, naive_heatmap
from matseg.models import build_model


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256, help="square image side (default 256)")
    ap.add_argument("--encoder", default="resnet50")
    ap.add_argument("--decoder", default="unet")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--kernel", default="occlude")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--header", action="store_true", help="also print the markdown table header")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    model = build_model(a.encoder, a.decoder, in_channels=1, classes=a.classes).to(dev).eval()
    img = torch.rand(1, a.size, a.size, generator=torch.Generator().manual_seed(0))
    q = a.size // 4
    region = (q, q, 3 * q, 3 * q)
    kw = dict(kernel=a.kernel, patch=a.patch, stride=a.stride, device=str(dev))
    counterfactual_heatmap(model, img, region, batch_size=a.batch_size, **{**kw, "stride": a.size})  # warm-up
    _sync(dev); t0 = time.perf_counter()
    hm = counterfactual_heatmap(model, img, region, batch_size=a.batch_size, **kw)
    _sync(dev); tb = time.perf_counter() - t0
    print(f"batched: {hm.attrs['n_locations']} locations in {tb:.2f} s", file=sys.stderr)
    _sync(dev); t0 = time.perf_counter()
    ref = naive_heatmap(model, img, region, **kw)
    _sync(dev); tn = time.perf_counter() - t0
    print(f"naive:   {tn:.2f} s", file=sys.stderr)
    rel = float(np.abs(hm.values - ref.values).max() / max(float(np.abs(ref.values).max()), 1e-12))
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU {platform.processor() or platform.machine()} ×{torch.get_num_threads()} threads")
    if a.header:
        print("| device | model | image | patch/stride | locations | batch | batched s | naive s | speed-up | max rel. diff |")
        print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {name} | {a.decoder}-{a.encoder} | {a.size}² | {a.patch}/{a.stride} | {hm.attrs['n_locations']} | "
          f"{a.batch_size} | {tb:.2f} | {tn:.2f} | {tn / tb:.1f}× | {rel:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
