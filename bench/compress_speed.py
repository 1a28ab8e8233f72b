"""Compression trade-off on a Super1 model: baseline vs pruned, int8, low-rank, pruned+int8 (issue 11).

One run, in one process, on the CPU: `matseg.compress.compress` makes every method from the same trained
checkpoint, fine-tunes the pruned and low-rank models on the training split (the job's own crops, loss and
optimiser), evaluates each on the Super1 test split with the job's tiling, and times all of them round-robin on a
tile-sized batch of one (--threads torch threads), so that machine-load drift hits every model alike. Ratios are
speed-ups over the eager fp32 baseline measured in the same rounds; with int8 an inductor-compiled fp32 baseline
is timed too (compile vs int8).

Without --job it first trains the model it measures: Lite0-UNet (`lite0-imagenet` weights, installed offline),
256² crops, batch 8, Adam 1e-3, up to --train-epochs epochs (patience 10) on Super1 on the CPU.

    python bench/compress_speed.py --out /tmp/compress-bench                 # train (~15-40 min) + compress
    python bench/compress_speed.py --job RUNS/super1/<job_id> --out DIR      # an existing Super1 job

Prints the trade-off table (markdown, for bench/RESULTS.md) and each target's verdict
(pruning ≥ 1.3× and int8 ≥ 1.5× faster than the baseline, each with a test-mIoU drop ≤ 0.01).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from matseg.compress import METHODS, compress
from matseg.profile import apply_overrides, compile_profile, load_profile
from matseg.runs import TrainedJob, markdown_table, save_run_profile, train_job

REPO = Path(__file__).resolve().parents[1]


def train_super1(runs: Path, epochs: int) -> Path:
    "Train the Lite0-UNet Super1 job the benchmark measures (or reuse it); return its job folder."
    p = apply_overrides(load_profile(REPO / "profiles" / "super1.json"), [
        'model.encoders=["timm-tf_efficientnet_lite0"]', 'model.decoders=["unet"]', "model.weights=lite0-imagenet",
        f"training.max_epochs={epochs}", "training.patience=10", "training.crop_size=256", "training.batch_size=8",
        "training.lr=0.001", "training.seeds=[0]", "training.crops_per_image=4", "training.tile_overlap=32",
        "training.amp=false"])
    save_run_profile(p, runs)
    job = compile_profile(p)[0]
    r = train_job(job, runs, device="cpu", progress=False, profile_name=p.name,
                  callbacks=lambda row: print(f"epoch {row['epoch']}: val mIoU {row['val_miou']:.3f}", file=sys.stderr))
    print(f"trained {job.id}: {r['status']}, test mIoU {r['metrics']['test']['miou']:.4f}", file=sys.stderr)
    return runs / job.dataset.name / job.id


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", help="Super1 job folder (default: train one into OUT/runs)")
    ap.add_argument("--out", required=True, help="output folder (compressed checkpoints, tradeoff.csv/md)")
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs")
    ap.add_argument("--speedup", type=float, default=1.5, help="pruning target (multiply-adds)")
    ap.add_argument("--importance", default="magnitude", help="pruning importance: magnitude | taylor")
    ap.add_argument("--energy", type=float, default=0.9)
    ap.add_argument("--max-cost", type=float, default=0.7)
    ap.add_argument("--no-fit-budget", action="store_true", help="low-rank: leave layers that need more rank")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--tile", type=int, default=None, help="evaluation / int8 export / timing tile (default: the job's crop)")
    ap.add_argument("--no-compile", action="store_true", help="skip inductor lowering (eager; no compiled rows)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    jdir = Path(a.job) if a.job else train_super1(out / "runs", a.train_epochs)
    tj = TrainedJob.open(jdir, device="cpu")
    info = compress(tj, a.methods.split(","), out / "compressed", speedup=a.speedup, importance=a.importance, energy=a.energy,
                    max_cost=a.max_cost, fit_budget=not a.no_fit_budget, epochs=a.epochs, compile=not a.no_compile,
                    threads=a.threads, rounds=a.rounds, tile=a.tile, log=lambda s: print(s, file=sys.stderr))
    rows = pd.DataFrame(info["rows"])
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), platform.processor())
    print(f"machine: {model}, {a.threads} torch thread(s), torch {torch.__version__}, tile {info['tile']}², "
          f"job {tj.meta.get('job')} (test mIoU from the table's baseline row)")
    cols = ["method", "test_miou", "miou_drop", "ms_per_image", "speedup", "params", "gflops", "file_mb", "weight_mb", "note"]
    print(markdown_table(rows[cols]))
    by = {r["method"]: r for r in info["rows"]}
    for m, target in (("prune", 1.3), ("int8", 1.5), ("prune+int8", 1.5)):
        if m in by:
            r = by[m]; ok = r["speedup"] >= target and r["miou_drop"] <= 0.01
            print(f"{m}: {r['speedup']:.2f}x (target >= {target}x), mIoU drop {r['miou_drop']:+.4f} (target <= 0.01): "
                  f"{'met' if ok else 'MISSED'}")
    (out / "bench.json").write_text(json.dumps({"machine": model, "threads": a.threads, "job": str(jdir),
                                                "rows": info["rows"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
