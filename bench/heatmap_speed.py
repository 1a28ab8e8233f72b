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

With --probes, also the approaches tried for a faster `fast` mode (issue 13's ≥ 20×), each against the
exact map in the same run: coarse-lattice interpolation (what fraction of exact locations a given Pearson
needs), Krypton-style truncation of each op's changed box where |change| <= tol × the activation's std,
bfloat16 incremental inference, and batching B perturbed crops per convolution (per-sample cost ratio).

Prints progress to stderr and markdown table rows to stdout (for bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from matseg.core import asset_path, resolve_device
from matseg.data import read_image, read_mask
from matseg.explain import (_ibox, _Incremental, _interp_grid, _to_probs, bbox, counterfactual_heatmap, get_kernel,
                            kernel_grid, region_mask)
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
    ap.add_argument("--probes", type=int, default=0, metavar="N",
                    help="also probe faster-fast approaches on N sampled locations (0: skip)")
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
    probes: list[str] = []
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
        if a.probes:  # printed below the table
            probes.append(f"\nprobes, {key} ({name}):\n" + "\n".join(_probes(model, x, region, ex, a.patch, a.kernel,
                                                                               a.probes)))
            print(probes[-1], file=sys.stderr, flush=True)
    for text in probes: print(text)
    return 0


def _run_truncated(inc: _Incremental, box, values, tol: float, scale: dict):
    "`_Incremental.run` with each op's changed box shrunk to where |change| > tol × std of the activation."
    def shrink(n, ob, out):
        m = (out - inc.base[n][..., ob[0]:ob[1], ob[2]:ob[3]]).abs().amax((0, 1)) > tol * scale[n]
        if not bool(m.any()): return None
        rr, cc = torch.nonzero(m.any(1)).ravel(), torch.nonzero(m.any(0)).ravel()
        r0, r1, c0, c1 = int(rr[0]), int(rr[-1]) + 1, int(cc[0]), int(cc[-1]) + 1
        return (ob[0] + r0, ob[0] + r1, ob[2] + c0, ob[2] + c1), out[..., r0:r1, c0:c1]
    return inc.run(box, values, shrink=shrink)


def _probes(model, x, region, ex, patch, kernel, n_sample) -> list[str]:
    "Approaches to a faster approximate map, each measured against the exact map / exact path in this run."
    lines, vals = [], ex.values.astype(np.float64)
    ny, nx = vals.shape
    top10 = set(np.argsort(-vals, axis=None)[:10])
    for c in (2, 3):  # coarse lattice + refinement by interpolated value (the fast mode's rule, by budget)
        ri, ci = sorted(set(range(0, ny, c)) | {ny - 1}), sorted(set(range(0, nx, c)) | {nx - 1})
        k = np.zeros((ny, nx), bool); k[np.ix_(ri, ci)] = True
        est = _interp_grid(np.where(k, vals, 0), k)
        for extra in (0.0, 0.2, 0.4, 0.6):
            kk = k.copy()
            kk.flat[np.argsort(-np.where(k, -np.inf, est), axis=None)[:int(extra * vals.size)]] = True
            e2 = np.where(kk, vals, est)
            lines.append(f"- interpolation: coarse {c} + {extra:.0%} refined = {kk.mean():.0%} exact locations: Pearson "
                         f"{_pearson(e2, vals):.4f}, top-10 same {set(np.argsort(-e2, axis=None)[:10]) == top10}")
    A = region_mask(region, tuple(x.shape[-2:]))
    x0, y0, x1, y1 = bbox(A)
    ys, xs = kernel_grid(*x.shape[-2:], patch, int(ex.attrs["stride"]), region, int(ex.attrs["margin"]))
    rng = np.random.default_rng(0)
    pts = [(int(ys[i]), int(xs[j])) for i, j in zip(rng.integers(0, len(ys), n_sample), rng.integers(0, len(xs), n_sample))]
    Ac = torch.from_numpy(A[y0:y1, x0:x1])
    with torch.inference_mode():
        def timed(inc, fill, run):
            Zc, out, t = _to_probs(inc.reference())[0], [], time.perf_counter()
            for i, j in pts:
                Zp = _to_probs(run(inc, (i, i + patch, j, j + patch), fill[None, :, i:i + patch, j:j + patch]))[0]
                out.append(float(((Zp - Zc).abs() * Ac).sum()))
            return np.array(out), (time.perf_counter() - t) / len(pts)
        res = {}
        for dt in (torch.float32, torch.bfloat16):
            m, xx = copy.deepcopy(model).to(dt), x.to(dt)
            inc = _Incremental(m, xx[None], (y0, y1, x0, x1))
            fill = get_kernel(kernel)(xx, patch, 0)
            res[str(dt)] = timed(inc, fill, lambda inc, b, v: inc.run(b, v))
            if dt is torch.float32:
                scale = {n: float(v.float().std()) if isinstance(v, torch.Tensor) and v.ndim == 4 and v.numel() > 1 else 0.0
                         for n, v in inc.base.items()}
                for tol in (0.01, 0.03):
                    res[f"truncated tol {tol}"] = timed(inc, fill, lambda inc, b, v: _run_truncated(inc, b, v, tol, scale))
        ref, t_ref = res["torch.float32"]
        lines.append(f"- exact incremental fp32: {t_ref * 1e3:.1f} ms per location (n={len(pts)})")
        for k_, (v, t) in res.items():
            if k_ == "torch.float32": continue
            lines.append(f"- {k_.replace('torch.', '')}: {t * 1e3:.1f} ms per location = {t_ref / t:.2f}× exact; "
                         f"Pearson {_pearson(v, ref):.4f}, max rel. err {np.abs(v - ref).max() / np.abs(ref).max():.1e}")
        # batching perturbed crops: the per-sample cost of the deepest convolutions at batch 1 and 8
        convs = [mod for mod in model.modules() if isinstance(mod, torch.nn.Conv2d) and mod.in_channels >= 64]
        feats = {}
        hooks = [mod.register_forward_hook(lambda mod, i, o: feats.update({mod: i[0].shape})) for mod in convs]
        model(x[None].float()); [h.remove() for h in hooks]
        convs = [mod for mod in convs if mod in feats]  # those the forward uses
        tb = {1: 0.0, 8: 0.0}
        for mod in convs:
            for B in tb:
                xi = torch.randn(B, *feats[mod][1:])
                mod(xi); t = time.perf_counter(); mod(xi); tb[B] += (time.perf_counter() - t) / B
        lines.append(f"- batching: the {len(convs)} convolutions with >= 64 input channels, whole maps, cost "
                     f"{tb[1] * 1e3:.0f} ms per sample at batch 1 and {tb[8] * 1e3:.0f} ms at batch 8 "
                     f"({tb[1] / tb[8]:.2f}× per sample)")
    return lines


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
