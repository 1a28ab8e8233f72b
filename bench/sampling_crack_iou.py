"""Uniform vs rare_class vs adaptive crop sampling on the real NASA sets (EBC2 cracks, Super1): test IoU per class.

Until `training.sampling` is wired into `matseg.runs.train_job`, this runs a local loop built from matseg's own pieces
(the profile's Job, `InputPipeline` standardisation, `build_model`, `make_optimizer`, `make_loss`, `train_step`,
`evaluate`, early selection on val mIoU) with the sampler from `matseg.sampling.make_sampler`; adaptive gets
`sampler.update(val per-class IoU)` after every validation. Equal epochs and seeds for every method.

    OMP_NUM_THREADS=1 python bench/sampling_crack_iou.py --epochs 4 --seeds 0 1 2 --out /tmp/sampling_bench.json
"""
import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from matseg.core import atomic_write_json
from matseg.data import load_dataset
from matseg.models import build_model
from matseg.profile import apply_overrides, compile_profile, load_profile
from matseg.runs import InputPipeline, job_input_stats
from matseg.sampling import expected_crop_share, make_sampler
from matseg.train import evaluate, make_loss, make_optimizer, prepare_data, seed_everything, train_step

REPO = Path(__file__).resolve().parents[1]
SETS = {"ebc2": REPO / "profiles/ebc2.json", "super1": REPO / "profiles/super1.json"}


def run(job, data, method, epochs, tile, val_every):
    tr = job.training; K = len(data.classes)
    stats = job_input_stats(job.encoder, job.weights, data.in_channels, job.dataset.normalization)
    pipe = InputPipeline(job.dataset.normalization, data.in_channels, stats)
    (xtr, ytr, _), (xva, yva, _), (xte, yte, _) = ((pipe.standardize(x), y, n) for x, y, n in
                                                   (data.splits[s] for s in ("train", "val", "test")))
    seed_everything(job.seed)
    model = build_model(job.encoder, job.decoder, in_channels=data.in_channels, classes=K, weights=job.weights)
    opt, sched = make_optimizer(model, tr)
    loss_fn = make_loss(tr.loss)
    sampler = make_sampler(method, xtr, ytr, tr.crop_size, tr.batch_size, seed=job.seed, augment=tr.augment,
                           crops_per_image=tr.crops_per_image, n_classes=K, temperature=tr.sampling_temperature)
    best, best_state, t0 = -1.0, None, time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for x, y in sampler: train_step(model, x, y, loss_fn, opt)
        sched.step()
        if (epoch + 1) % val_every and epoch + 1 != epochs: continue
        val, _ = evaluate(model, xva, yva, K, tile, 0, boundary=False)
        sampler.update(val["iou"])
        if val["miou"] > best: best, best_state = val["miou"], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test, _ = evaluate(model, xte, yte, K, tile, 0, boundary=False)
    return {"method": method, "seed": job.seed, "val_miou": best, "test_iou": test["iou"], "test_miou": test["miou"],
            "seconds": time.perf_counter() - t0, "probabilities": getattr(sampler, "probabilities", lambda: None)() is not None
            and sampler.probabilities().tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", nargs="+", default=list(SETS))
    ap.add_argument("--methods", nargs="+", default=["uniform", "rare_class", "adaptive"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--crops-per-image", nargs="+", type=int, default=[16, 8], help="per set, in --sets order")
    ap.add_argument("--val-every", type=int, default=2)
    ap.add_argument("--tile", type=int, default=512, help="evaluation tile (overlap 0)")
    ap.add_argument("--temperature", type=float, default=0.1)
    ap.add_argument("--out", default="/tmp/sampling_bench.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.split(":")[-1].strip()
    out = {"machine": cpu or platform.processor(), "threads": torch.get_num_threads(), "args": vars(a), "runs": {}}
    prev = Path(a.out)
    if prev.exists(): out["runs"] = json.loads(prev.read_text())["runs"]  # resume: finished runs are kept
    for name, cpi in zip(a.sets, a.crops_per_image):
        p = apply_overrides(load_profile(SETS[name]), [
            'model.encoders=["timm-tf_efficientnet_lite0"]', 'model.decoders=["unet"]', "model.weights=lite0-imagenet",
            f"training.crop_size={a.crop}", f"training.crops_per_image={cpi}", "training.batch_size=8",
            "training.lr=0.001", f"training.max_epochs={a.epochs}", f"training.seeds={json.dumps(a.seeds)}",
            f"training.sampling_temperature={a.temperature}"])
        jobs = compile_profile(p)
        data = prepare_data(load_dataset(jobs[0].dataset, jobs[0].base_dir), jobs[0].dataset.classes)
        out.setdefault("settings", {})[name] = {**vars(a), "crops_per_image": cpi, "sets": [name]}  # per set: runs may resume
        out.setdefault("classes", {})[name] = data.classes
        out.setdefault("class_fraction", {})[name] = data.context["class_fraction"]
        ytr, K = data.splits["train"][1], len(data.classes)
        rare = make_sampler("rare_class", *data.splits["train"][:2], a.crop, 8, n_classes=K, temperature=a.temperature)
        out.setdefault("crop_share", {})[name] = {  # exact share of training crops containing each class
            "uniform": expected_crop_share(ytr, a.crop, None, n_classes=K).tolist(),
            "rare_class": expected_crop_share(ytr, a.crop, rare.probabilities().numpy(), n_classes=K).tolist()}
        for job in jobs:
            for m in a.methods:
                key = f"{name}/{m}/s{job.seed}"
                if key in out["runs"]: continue
                r = run(job, data, m, a.epochs, a.tile, a.val_every)
                out["runs"][key] = r
                print(key, "test IoU", np.round(r["test_iou"], 3).tolist(), f"{r['seconds']:.0f}s", flush=True)
                atomic_write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
