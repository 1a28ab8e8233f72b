"""Training throughput (images/s) of matseg's training step against two baselines, in one run.

(a) matseg: the full `train_job` step — random crops + flips/rot90 from tensors kept in device memory
    (`CropSampler`), CE + Dice, Adam; bf16 autocast + channels_last on CUDA (`train_step`).
(b) bare smp: the same model and loss stepping on one pre-made batch already on the device (no data
    work at all); bf16 + channels_last on CUDA. The ceiling for (a): (a)/(b) near 1 means the data
    path costs nothing.
(c) paper-style loop: fp32, every step decodes its image and mask files (tifffile / PIL), crops and
    flips them in numpy and copies them to the device, like the original pretrained-microscopy-models
    code with an in-process data loader.

The images are synthetic (written to a temporary folder as TIFF + PNG) unless --data names a
matseg profile, whose first dataset's training images are used for (a)/(b) and re-written as
files for (c). Prints a table and one markdown row for bench/RESULTS.md.

    python bench/train_throughput.py --device cpu --size 128 --batch 4 --steps 5     # small CPU run
    python bench/train_throughput.py --device cuda --size 512 --batch 16 --steps 50  # paper settings
"""
from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from matseg.core import resolve_device
from matseg.models import build_model
from matseg.train import CropSampler, make_loss, seed_everything, train_step


def _sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def _timed(step, steps: int, warmup: int, dev) -> float:
    "Seconds for `steps` calls of `step()` after `warmup` untimed calls."
    for _ in range(warmup): step()
    _sync(dev); t = time.perf_counter()
    for _ in range(steps): step()
    _sync(dev)
    return time.perf_counter() - t


def synthetic_images(n: int, size: int, channels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    "n images (n, C, H, W) float32 in [0, 1] and 3-class masks (n, H, W) uint8."
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, size // 8, size // 8)) * 3).astype(np.uint8).repeat(8, 1).repeat(8, 2)
    imgs = (masks[:, None] / 2.0 + rng.normal(0, 0.1, (n, channels, size, size))).astype(np.float32)
    return imgs, masks


def load_profile_images(profile: str) -> tuple[np.ndarray, np.ndarray, int]:
    "Training images and masks of a profile's first dataset, and its number of classes."
    from matseg.data import load_dataset
    from matseg.profile import load_profile
    p = load_profile(profile); spec = p.datasets[0]
    ds = load_dataset(spec, p.base_dir, splits=["train"])
    return ds["image"].values.astype(np.float32), ds["mask"].values, len(spec.classes)


def paper_style_step_factory(folder: Path, imgs: np.ndarray, masks: np.ndarray, model, loss_fn, opt, size, batch,
                             dev, seed=0):
    "A step that reads its batch from files each time (fp32, numpy augmentation), like the paper's loop."
    import tifffile
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (im, m) in enumerate(zip(imgs, masks)):
        tifffile.imwrite(folder / f"img{i}.tif", (np.clip(im, 0, 1) * 65535).astype(np.uint16))
        Image.fromarray(m).save(folder / f"img{i}_mask.png"); files.append(folder / f"img{i}")
    rng = np.random.default_rng(seed)

    def sample(f):
        im = tifffile.imread(f"{f}.tif").astype(np.float32) / 65535.0
        if im.ndim == 2: im = im[None]
        m = np.array(Image.open(f"{f}_mask.png"))
        H, W = m.shape; y, x = rng.integers(0, H - size + 1), rng.integers(0, W - size + 1)
        im, m = im[:, y:y + size, x:x + size], m[y:y + size, x:x + size]
        if rng.random() < 0.5: im, m = im[..., ::-1], m[:, ::-1]
        if rng.random() < 0.5: im, m = im[..., ::-1, :], m[::-1]
        k = int(rng.integers(4)); im, m = np.rot90(im, k, (-2, -1)), np.rot90(m, k)
        return np.ascontiguousarray(im), np.ascontiguousarray(m)

    def step():
        pairs = [sample(files[int(i)]) for i in rng.integers(0, len(files), batch)]
        x = torch.from_numpy(np.stack([p[0] for p in pairs])).to(dev)
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(dev)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        loss.item()  # a typical loop logs the loss every step
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", default="resnet18"); ap.add_argument("--decoder", default="unet")
    ap.add_argument("--size", type=int, default=128, help="crop size (multiple of 32)")
    ap.add_argument("--batch", type=int, default=4); ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved timing rounds; the best round counts")
    ap.add_argument("--images", type=int, default=8, help="synthetic training images")
    ap.add_argument("--image-size", type=int, default=512, help="synthetic image side")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--data", help="profile JSON: use its first dataset's training images instead of synthetic ones")
    ap.add_argument("--device", default="auto"); ap.add_argument("--threads", type=int, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    dev = resolve_device(a.device); cuda = dev.type == "cuda"
    amp = cuda and torch.cuda.is_bf16_supported()
    if cuda: torch.backends.cudnn.benchmark = True
    if a.data: imgs, masks, K = load_profile_images(a.data)
    else: (imgs, masks), K = synthetic_images(a.images, a.image_size, a.channels), 3
    C = imgs.shape[1]

    def fresh(channels_last: bool):
        seed_everything(0)
        m = build_model(a.encoder, a.decoder, in_channels=C, classes=K, weights="none").to(dev).train()
        if channels_last: m = m.to(memory_format=torch.channels_last)
        return m, torch.optim.Adam(m.parameters(), lr=1e-4), make_loss("ce+dice").to(dev)

    # (a) matseg: in-memory tensors, sampler + augmentation + train_step
    ma, oa, la = fresh(cuda)
    x_all, y_all = torch.from_numpy(imgs).to(dev), torch.from_numpy(masks).to(dev)
    need = (a.warmup + a.steps + 1) * a.batch * a.repeats  # crops for one epoch that covers every timed step
    it = iter(CropSampler(x_all, y_all, a.size, a.batch, seed=0, crops_per_image=-(-need // len(imgs))))
    # (b) bare smp step on a fixed batch
    mb, ob, lb = fresh(cuda)
    xb, yb = next(iter(CropSampler(x_all, y_all, a.size, a.batch, seed=1)))
    # (c) paper-style: files decoded every step, fp32
    mc, oc, lc = fresh(False)
    steps = {"a": lambda: train_step(ma, *next(it), la, oa, amp), "b": lambda: train_step(mb, xb, yb, lb, ob, amp)}
    res = {k: float("inf") for k in "abc"}
    with tempfile.TemporaryDirectory() as d:
        steps["c"] = paper_style_step_factory(Path(d), imgs, masks, mc, lc, oc, a.size, a.batch, dev)
        for _ in range(a.repeats):  # interleaved rounds, best of each: robust to a busy machine
            for k in "abc": res[k] = min(res[k], _timed(steps[k], a.steps, a.warmup, dev))
    ips = {k: a.batch * a.steps / v for k, v in res.items()}

    gpu = torch.cuda.get_device_name(dev) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    machine = f"{platform.machine()} {platform.system()}, {gpu}, torch {torch.__version__}"
    print(f"{a.decoder}-{a.encoder}, {C}x{a.size}x{a.size} crops, batch {a.batch}, {a.steps} steps (+{a.warmup} warm-up), best of {a.repeats}"
          f" on {dev}{' bf16+channels_last' if amp else ''}")
    for k, name in (("a", "matseg step (sampler + aug + step)"), ("b", "bare smp step"), ("c", "paper-style fp32 file loop")):
        print(f"  ({k}) {name:<36} {ips[k]:8.2f} images/s")
    ra, rc = ips["a"] / ips["b"], ips["a"] / ips["c"]
    print(f"  (a)/(b) = {ra:.2f}   (a)/(c) = {rc:.2f}\n")
    print("| date | machine | model | crop | batch | steps | (a) matseg img/s | (b) bare img/s | (c) paper img/s | (a)/(b) | (a)/(c) |")
    print(f"| {datetime.date.today()} | {machine} | {a.decoder}-{a.encoder} | {a.size} | {a.batch} | {a.steps} | "
          f"{ips['a']:.1f} | {ips['b']:.1f} | {ips['c']:.1f} | {ra:.2f} | {rc:.2f} |")
    return {"images_per_s": ips, "a_over_b": ra, "a_over_c": rc}


if __name__ == "__main__":
    main()
