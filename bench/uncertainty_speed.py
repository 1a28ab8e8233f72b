"""MC-dropout cost: T = 20 stochastic passes of one image as matseg runs them (the T copies of a tile in one batch,
`matseg.train.predict_uncertainty_tiled`) against the plain reference of 20 single forwards of the same model, in one run.

Target (issue 10): ratio (matseg MC, T = 20) / (20 single forwards) <= 1.1 on CPU and <= 0.3 on a GPU.
matseg runs the deterministic part before the first dropout once (`matseg.train.mc_passes`): with dropout before the
head only, the encoder and decoder run once and the head T times; with --decoder-dropout the decoder runs T times.
The image is a real Super1 test image (the shipped sample) resized to --size, or synthetic with --synthetic.
Prints a table and one markdown row for bench/RESULTS.md.

    python bench/uncertainty_speed.py --device cpu --size 256 --threads 2
    python bench/uncertainty_speed.py --device cuda --size 512
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time

import numpy as np
import torch
from PIL import Image

from matseg.core import asset_path, resolve_device
from matseg.models import build_model, mc_dropout
from matseg.train import predict_uncertainty_tiled


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def _median_seconds(fn, repeats: int, dev) -> float:
    out = []
    for _ in range(repeats):
        _sync(dev); t = time.perf_counter(); fn(); _sync(dev); out.append(time.perf_counter() - t)
    return statistics.median(out)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=256, help="image side (one tile)")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--decoder", default="unet")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--decoder-dropout", action="store_true", help="dropout after every decoder block too (the decoder "
                    "then runs T times; default: dropout before the head only, the encoder and decoder run once)")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = resolve_device(a.device)
    torch.manual_seed(0)
    model = build_model(a.encoder, a.decoder, in_channels=1, classes=3, dropout=0.2,
                        decoder_dropout=a.decoder_dropout).to(dev).eval()
    if a.synthetic: img = np.random.default_rng(0).random((a.size, a.size), dtype=np.float32)
    else:
        f = sorted(asset_path("sample", "super1", "test").glob("*.png"))[0]
        img = np.asarray(Image.open(f).convert("L").resize((a.size, a.size)), np.float32) / 255
    x = torch.from_numpy(img)[None].to(dev)
    T = a.samples

    def ours():
        predict_uncertainty_tiled(model, x, 3, a.size, 0, "mc", samples=T)

    def reference():  # the plain loop: T single stochastic forwards, probabilities averaged
        with torch.no_grad(), mc_dropout(model):
            acc = torch.zeros(1, 3, a.size, a.size, device=dev)
            for _ in range(T): acc += model(x[None]).softmax(1)

    for fn in (ours, reference): fn()  # warm-up (allocations, cudnn)
    t_ours = _median_seconds(ours, a.repeats, dev)
    t_ref = _median_seconds(reference, a.repeats, dev)
    ratio = t_ours / t_ref
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    target = 0.3 if dev.type == "cuda" else 1.1
    where = "head + decoder blocks" if a.decoder_dropout else "head"
    print(f"{a.encoder}-{a.decoder}, dropout before the {where}, {a.size}x{a.size}, T={T}, device {dev} ({machine}), "
          f"threads {torch.get_num_threads()}")
    print(f"  matseg MC (T copies in one batch): {t_ours * 1e3:9.1f} ms   (median of {a.repeats})")
    print(f"  {T} single forwards (reference):   {t_ref * 1e3:9.1f} ms")
    print(f"  ratio {ratio:.3f} (target <= {target}: {'met' if ratio <= target else 'missed'})")
    print(f"| {datetime.date.today()} | {machine} | {dev.type} | {torch.get_num_threads()} | {a.encoder}-{a.decoder} | {where} | "
          f"{a.size}² | {T} | {t_ours * 1e3:.0f} | {t_ref * 1e3:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
