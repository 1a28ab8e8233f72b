"""Counterfactual heatmap speed: naive vs exact vs fast `counterfactual_heatmap` (issue 13).

One run, one CPU thread by default: a real 512² Super1 test image (the shipped sample), region A = the
bounding box of one γ′ particle (a mid-sized component of the annotation near the image centre), patch 16,
stride 8, kernel centres within A's box dilated by --margin (128 → about 1100 locations, the size of the
recorded tutorial's map), for the shipped sample's Lite0-UNet and a ResNet50-UNet (random weights: only
the timing matters). Per model:

- naive: `mode="naive"` on --naive-sample evenly spread locations, **extrapolated** to the full grid
  (a full naive map takes ~20 min per model on one thread); its values also check exact on those locations;
- exact: the full map, `mode="exact"` (the `path` attribute says which exact path ran);
- fast: the full map, `mode="fast"`, and its agreement with the exact map (Pearson over all locations,
  same top-10 set), next to the error it measured itself on its check sample.

    python bench/heatmap_speed.py                   # CPU, 1 thread, both models (~5 min)
    python bench/heatmap_speed.py --device cuda     # exact = batched on a GPU

Prints progress to stderr and markdown table rows to stdout (for bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from matseg.core import asset_path, resolve_device
from matseg.data import read_image, read_mask
from matseg.explain import counterfactual_heatmap
from matseg.models import build_model

MODELS = {"lite0-unet": ("timm-tf_efficientnet_lite0", "unet"), "resnet50-unet": ("resnet50", "unet")}


def _image_and_particle(path: Path, mask_path: Path):
    "Image in [0, 1] (1, H, W) and the box (x0, y0, x1, y1) of one γ′ particle near the centre."
    from scipy.ndimage import find_objects, label
    img = read_image(path).astype(np.float32)
    img = (img - img.min()) / max(float(np.ptp(img)), 1e-12)
    m = read_mask(mask_path)
    fg = (m[..., 0] > 127) & (m[..., 2] < 128) if m.ndim == 3 else m > 0  # red: one γ′ class of the palette
    lab, n = label(fg)
    H, W = fg.shape
    best = None
    for k, sl in enumerate(find_objects(lab), 1):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if not (8 <= h <= 40 and 8 <= w <= 40): continue
        d = abs((sl[0].start + sl[0].stop) / 2 - H / 2) + abs((sl[1].start + sl[1].stop) / 2 - W / 2)
        if best is None or d < best[0]: best = (d, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop))
    if best is None: raise SystemExit(f"no γ′ particle of 8–40 px in {mask_path}")
    return torch.from_numpy(img), best[1]


def _pearson(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default=str(asset_path("sample", "super1", "test", "spot2_0d_0.png")))
    ap.add_argument("--mask", default=None, help="annotation of --image (default: the sample's test_annot)")
    ap.add_argument("--models", default="lite0-unet,resnet50-unet", help=f"comma-separated of {', '.join(MODELS)}")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--margin", type=int, default=128)
    ap.add_argument("--kernel", default="occlude")
    ap.add_argument("--naive-sample", type=int, default=6, help="naive locations timed (then extrapolated)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--header", action="store_true", help="also print the markdown table header")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    img_path = Path(a.image)
    mask_path = Path(a.mask) if a.mask else img_path.parent.parent / "test_annot" / f"{img_path.stem}_mask.png"
    x, region = _image_and_particle(img_path, mask_path)
    print(f"image {img_path.name} {tuple(x.shape)}, region A = particle box {region}", file=sys.stderr)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU {platform.machine()} ×{torch.get_num_threads()} thread(s)")
    if a.header:
        print("| device | model | locations | naive s (extrapolated from n) | exact s (path) | exact × | fast s | fast × "
              "| fast exact locations | Pearson fast/exact | top-10 same | fast self-check Pearson / max rel. err "
              "| exact vs naive max rel. diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in a.models.split(","):
        enc, dec = MODELS[key]
        torch.manual_seed(0)
        model = build_model(enc, dec, in_channels=1, classes=3).to(dev).eval()
        kw = dict(kernel=a.kernel, patch=a.patch, stride=a.stride, margin=a.margin, device=str(dev))
        t0 = time.perf_counter()
        ex = counterfactual_heatmap(model, x, region, mode="exact", **kw)
        te = time.perf_counter() - t0
        n = ex.attrs["n_locations"]
        print(f"{key}: exact {n} locations in {te:.1f} s (path {ex.attrs['path']})", file=sys.stderr)
        t0 = time.perf_counter()
        fa = counterfactual_heatmap(model, x, region, mode="fast", **kw)
        tf = time.perf_counter() - t0
        print(f"{key}: fast in {tf:.1f} s ({fa.attrs['fast_exact_locations']} exact locations)", file=sys.stderr)
        # naive on a sample of locations: a margin-0 grid of one location each, spread over the grid
        ny, nx = ex.shape
        picks = [(int(i), int(j)) for i, j in zip(np.linspace(0, ny - 1, a.naive_sample).round(),
                                                    np.linspace(nx - 1, 0, a.naive_sample).round())]
        c = (a.patch - 1) / 2
        tn, rel = 0.0, 0.0
        top = float(np.abs(ex.values).max())
        ref = _NaiveOne(model, x, region, a.patch, a.kernel, dev)
        for i, j in picks:  # naive_heatmap's loop body at sampled locations (its Z is computed once, as there)
            t0 = time.perf_counter()
            v = ref(int(ex.y[i] - c), int(ex.x[j] - c))
            tn += time.perf_counter() - t0
            rel = max(rel, abs(v - float(ex.values[i, j])) / top)
        tn_full = tn / len(picks) * n
        print(f"{key}: naive {tn / len(picks):.2f} s per location → {tn_full:.0f} s for {n} (extrapolated)",
              file=sys.stderr)
        same10 = set(np.argsort(-ex.values, axis=None)[:10]) == set(np.argsort(-fa.values, axis=None)[:10])
        fa_a = fa.attrs
        print(f"| {name} | {dec}-{enc} | {n} | {tn_full:.0f} (n={len(picks)}) | {te:.1f} ({ex.attrs['path']}) "
              f"| {tn_full / te:.1f}× | {tf:.1f} | {tn_full / tf:.1f}× | {fa_a['fast_exact_locations']} "
              f"| {_pearson(fa.values, ex.values):.4f} | {'yes' if same10 else 'no'} "
              f"| {fa_a['fast_check_pearson']:.4f} / {fa_a['fast_check_max_rel_err']:.1e} | {rel:.1e} |", flush=True)
    return 0


class _NaiveOne:
    "H at one location exactly as naive_heatmap computes it: one whole-image forward per location."
    def __init__(self, model, x, region, patch, kernel, dev):
        from matseg.explain import _probs, get_kernel, region_mask
        self.model, self.patch, self.probs = model, patch, _probs
        with torch.inference_mode():
            self.x = x.to(dev)
            self.Z = _probs(model, self.x[None])[0]
            self.A = torch.from_numpy(region_mask(region, tuple(x.shape[-2:]))).to(dev)
            self.fill = get_kernel(kernel)(self.x, patch, 0)

    def __call__(self, y0, x0) -> float:
        p = self.patch
        with torch.inference_mode():
            xp = self.x.clone()
            xp[:, y0:y0 + p, x0:x0 + p] = self.fill[:, y0:y0 + p, x0:x0 + p]
            Zp = self.probs(self.model, xp[None])[0]
            return float(torch.sum(torch.abs(self.Z * self.A - Zp * self.A)))


if __name__ == "__main__":
    sys.exit(main())
