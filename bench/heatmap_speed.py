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
    python bench/heatmap_speed.py --job runs/cf-src/super1-sample/<lite0-unet job> --tune
        # the Lite0 row with a trained job (its own input pipeline), and fast's settings (coarse, refine,
        # context window) picked on a held-out image (--tune-image, a validation image) before the measured one

--tune: on the held-out image, the exact map and the windowed maps (each perturbed pass limited to A ∪ the
patch dilated by W px) for W in --windows are computed in full; fast's own rule (`_fast_map`) is then replayed
on them for every coarse × refine × window setting, and the cheapest setting (by the measured per-location
times) whose replayed map has Pearson >= --tune-pearson and the same top-10 as the exact map is used for the
measured image. Nothing of the measured image enters the choice.

With --probes, also the approaches tried for a faster `fast` mode (issue 13's ≥ 20×), each against the
exact map in the same run: coarse-lattice interpolation (what fraction of exact locations a given Pearson
needs), Krypton-style truncation of each op's changed box where |change| <= tol × the activation's std,
bfloat16 incremental inference, and batching B perturbed crops per convolution (per-sample cost ratio).

Prints progress to stderr and markdown table rows to stdout (for bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import find_objects, label

from matseg.core import asset_path, resolve_device
from matseg.data import read_image, read_mask
from matseg.explain import (_Evaluator, _fast_map, _Incremental, _interp_grid, _probs, _to_probs, bbox, counterfactual_heatmap,
                            get_kernel, kernel_grid, region_mask)
from matseg.models import build_model
from matseg.runs import TrainedJob

MODELS = {"lite0-unet": ("timm-tf_efficientnet_lite0", "unet"), "resnet50-unet": ("resnet50", "unet")}


def _image_and_particle(path: Path, mask_path: Path):
    "Image in [0, 1] (1, H, W) and the box (x0, y0, x1, y1) of one γ′ particle near the centre."
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


def _mask_of(img_path: Path, mask: str | None) -> Path:
    return Path(mask) if mask else img_path.parent.parent / f"{img_path.parent.name}_annot" / f"{img_path.stem}_mask.png"


class _Lookup:
    "An `_Evaluator` stand-in over precomputed full maps: replays `_fast_map`'s rule and counts what it computes."
    path = "incremental"

    def __init__(self, ys, xs, exact: np.ndarray, windowed: dict):
        self.pos = {(int(y), int(x)): (a, b) for a, y in enumerate(ys) for b, x in enumerate(xs)}
        self.exact, self.win, self.n_exact, self.n_win = exact, windowed, 0, 0

    def __call__(self, starts):
        self.n_exact += len(starts)
        return np.array([self.exact[self.pos[(int(i), int(j))]] for i, j in starts])

    def windowed(self, starts, ctx):
        self.n_win += len(starts)
        return np.array([self.win[ctx][self.pos[(int(i), int(j))]] for i, j in starts])


def _tune(model, x, region, a, dev) -> tuple[dict, list[str]]:
    "fast's settings picked on a held-out image: full exact and windowed maps, `_fast_map` replayed on them."
    kw = dict(kernel=a.kernel, patch=a.patch, stride=a.stride, margin=a.margin, device=str(dev))
    t0 = time.perf_counter()
    ex = counterfactual_heatmap(model, x, region, mode="exact", **kw)
    n = ex.attrs["n_locations"]
    t_ex = (time.perf_counter() - t0) / n
    print(f"  tune: exact map {n} locations, {t_ex * n:.0f} s", file=sys.stderr, flush=True)
    ys, xs = kernel_grid(*x.shape[-2:], a.patch, a.stride, region, a.margin)
    wins, t_win = {}, {}
    for w in [int(v) for v in a.windows.split(",") if v]:
        wins[w], dt = _windowed_map(model, x, region, a, dev, w)
        t_win[w] = dt / n
        print(f"  tune: window {w} map {dt:.0f} s, Pearson with exact {_pearson(wins[w], ex.values):.4f}",
              file=sys.stderr, flush=True)
    vals, top10 = ex.values.astype(np.float64), set(np.argsort(-ex.values, axis=None)[:10])
    rows, best = [], None
    for c, r, w in itertools.product((2, 3, 4), (0.05, 0.1, 0.2, 0.3), [None, *wins]):
        ev = _Lookup(ys, xs, vals, wins)
        est, info = _fast_map(ev, ys, xs, c, r, a.check, 0, w)
        cost = (ev.n_exact * t_ex + ev.n_win * (t_win[w] if w is not None else 0)) / (n * t_ex)
        p, same = _pearson(est, vals), set(np.argsort(-est, axis=None)[:10]) == top10
        ok = p >= a.tune_pearson and same
        rows.append(f"  coarse {c} refine {r:.2f} window {w}: cost {cost:.2f} of exact, Pearson {p:.4f}, "
                    f"top-10 same {same}{'  ← ok' if ok else ''}")
        if ok and (best is None or cost < best[0]): best = (cost, dict(coarse=c, refine=r, window=w))
    lines = [f"tuning on the held-out image: exact {t_ex * 1e3:.1f} ms/location; windowed " +
             ", ".join(f"W={w}: {t * 1e3:.1f} ms ({t_ex / t:.2f}× exact)" for w, t in t_win.items())] + rows
    if best is None:
        lines.append(f"  no setting reached Pearson >= {a.tune_pearson} with the same top-10: the defaults are kept")
        return {}, lines
    lines.append(f"  chosen: {best[1]} (replayed cost {best[0]:.2f} of exact)")
    return best[1], lines


def _windowed_map(model, x, region, a, dev, w: int):
    "Every location of the grid windowed (fast's `_Evaluator.windowed`), and the seconds it took (trace excluded)."
    with torch.inference_mode():
        xx = x.to(dev)
        Z = _probs(model, xx[None])[0]
        A = region_mask(region, tuple(x.shape[-2:]))
        box = bbox(A)
        x0, y0, x1, y1 = box
        fill = get_kernel(a.kernel)(xx, a.patch, 0)
        ev = _Evaluator(model, xx, fill, a.patch, box, Z[:, y0:y1, x0:x1], torch.from_numpy(A[y0:y1, x0:x1]), 1, 0.0,
                        incremental=True, strict=True)
        ys, xs = kernel_grid(*x.shape[-2:], a.patch, a.stride, box, a.margin)
        t0 = time.perf_counter()
        v = ev.windowed([(i, j) for i in ys for j in xs], w)
        return v.reshape(len(ys), len(xs)), time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default=str(asset_path("sample", "super1", "test", "spot2_0d_0.png")))
    ap.add_argument("--mask", default=None, help="annotation of --image (default: the sample's <split>_annot)")
    ap.add_argument("--models", default="lite0-unet,resnet50-unet", help=f"comma-separated of {', '.join(MODELS)}")
    ap.add_argument("--job", default=None, help="a trained Lite0-UNet job folder for the lite0-unet row "
                    "(its checkpoint and input pipeline); default: random weights")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--margin", type=int, default=128)
    ap.add_argument("--kernel", default="occlude")
    ap.add_argument("--coarse", type=int, default=None, help="fast: coarse lattice step (default: the function's)")
    ap.add_argument("--refine", type=float, default=None, help="fast: refinement threshold (default: the function's)")
    ap.add_argument("--window", type=int, default=None, help="fast: context window in px (default: the function's)")
    ap.add_argument("--check", type=int, default=32, help="fast: exact check locations")
    ap.add_argument("--tune", action="store_true", help="pick fast's coarse/refine/window on --tune-image first")
    ap.add_argument("--tune-image", default=str(asset_path("sample", "super1", "val", "spot1_0d_0.png")))
    ap.add_argument("--tune-pearson", type=float, default=0.995, help="tuning criterion on the held-out image")
    ap.add_argument("--windows", default="32,64,96", help="context windows tried by --tune (px)")
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
    x01, region = _image_and_particle(img_path, _mask_of(img_path, a.mask))
    print(f"image {img_path.name} {tuple(x01.shape)}, region A = particle box {region}", file=sys.stderr)
    name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU {platform.machine()} ×{torch.get_num_threads()} thread(s)")
    if a.header:
        print("| device | model | locations | naive s (extrapolated from n) | exact s (path) | exact × | fast s | fast × "
              "| fast settings | fast exact + windowed locations | Pearson fast/exact | top-10 same "
              "| fast self-check Pearson / max rel. err | exact vs naive max rel. diff |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    probes: list[str] = []
    for key in a.models.split(","):
        enc, dec = MODELS[key]
        if key == "lite0-unet" and a.job:
            tj = TrainedJob.open(a.job, device=str(dev))
            model, label_ = tj.model.eval(), f"{dec}-{enc} (trained: {Path(a.job).name})"
            x = tj.prepare(img_path)
            x_tune = tj.prepare(Path(a.tune_image)) if a.tune else None
        else:
            torch.manual_seed(0)
            model, label_ = build_model(enc, dec, in_channels=1, classes=3).to(dev).eval(), f"{dec}-{enc} (random)"
            x = x01
            x_tune = _image_and_particle(Path(a.tune_image), _mask_of(Path(a.tune_image), None))[0] if a.tune else None
        fast_kw = {k: v for k, v in dict(coarse=a.coarse, refine=a.refine, window=a.window).items() if v is not None}
        if a.tune:
            t_region = _image_and_particle(Path(a.tune_image), _mask_of(Path(a.tune_image), None))[1]
            t0 = time.perf_counter()
            chosen, lines = _tune(model, x_tune, t_region, a, dev)
            lines.insert(0, f"{key}: --tune on {Path(a.tune_image).name}, particle box {t_region} "
                         f"({time.perf_counter() - t0:.0f} s)")
            print("\n".join(lines), file=sys.stderr, flush=True)
            probes.append("\n".join(lines))
            fast_kw.update(chosen)
        kw = dict(kernel=a.kernel, patch=a.patch, stride=a.stride, margin=a.margin, device=str(dev))
        t0 = time.perf_counter()
        ex = counterfactual_heatmap(model, x, region, mode="exact", **kw)
        te = time.perf_counter() - t0
        n = ex.attrs["n_locations"]
        print(f"{key}: exact {n} locations in {te:.1f} s (path {ex.attrs['path']})", file=sys.stderr)
        t0 = time.perf_counter()
        fa = counterfactual_heatmap(model, x, region, mode="fast", check=a.check, **fast_kw, **kw)
        tf = time.perf_counter() - t0
        fa_a = fa.attrs
        print(f"{key}: fast {fast_kw} in {tf:.1f} s ({fa_a['fast_exact_locations']} exact + "
              f"{fa_a['fast_windowed_locations']} windowed locations)", file=sys.stderr)
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
        sett = f"c{fa_a['fast_coarse']} r{fa_a['fast_refine']:g} w{fa_a['fast_window'] if fa_a['fast_window'] >= 0 else '-'}"
        print(f"| {name} | {label_} | {n} | {tn_full:.0f} (n={len(picks)}) | {te:.1f} ({ex.attrs['path']}) "
              f"| {tn_full / te:.1f}× | {tf:.1f} | {tn_full / tf:.1f}× | {sett} "
              f"| {fa_a['fast_exact_locations']} + {fa_a['fast_windowed_locations']} "
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
