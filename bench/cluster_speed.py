"""Wall time of one small CPU grid: serial (`run_jobs` in this process) vs `--cluster local:N` (Dask, N single-threaded
worker processes), measured in one run on the same machine. Prints one JSON line per measurement and the ratios.

    OMP_NUM_THREADS=1 python bench/cluster_speed.py [--workers 2] [--epochs 2] [--out /tmp/cluster_speed]

The grid is the shipped Super1 sample profile with a small model (resnet18 x unet/fpn x 2 seeds, weights none,
128 px crops). Serial runs twice: with one torch thread (what each worker gets) and with `--workers` threads
(a serial run's fair share of the same cores). The cluster time includes starting the cluster; the time to
start it is also printed on its own. Every run writes a fresh folder; the metrics must agree across runs.
"""
import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from matseg.cluster import cluster_client, run_grid
from matseg.core import asset_path
from matseg.profile import apply_overrides, load_profile
from matseg.runs import RunLock, prepare_grid, run_jobs


def grid(epochs: int):
    return apply_overrides(load_profile(asset_path("profiles", "sample.json")), [
        'model.encoders=["resnet18"]', 'model.decoders=["unet","fpn"]', "training.seeds=[0,1]", "model.weights=none",
        "training.crop_size=128", f"training.max_epochs={epochs}", "training.crops_per_image=4",
        "training.batch_size=8", "training.tile_overlap=0", "training.deterministic=true"])


def serial(profile, out: Path, threads: int) -> tuple[float, dict]:
    n = torch.get_num_threads(); torch.set_num_threads(threads)
    try:
        t = time.perf_counter(); rs = run_jobs(profile, out, "cpu", progress=False)
        return time.perf_counter() - t, {r["id"]: r["metrics"]["test"]["miou"] for r in rs}
    finally: torch.set_num_threads(n)


def cluster(profile, out: Path, workers: int) -> tuple[float, float, dict]:
    t = time.perf_counter()
    with cluster_client(f"local:{workers}", "cpu") as client:
        up = time.perf_counter() - t
        with RunLock(out):
            jobs, specs = prepare_grid(profile, out)
            g = run_grid(client, jobs, out, specs, "cpu", 0, profile.name, progress=False)
    assert not g["failed"], g["failed"]
    return time.perf_counter() - t, up, {r["id"]: r["metrics"]["test"]["miou"] for r in g["results"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", default="/tmp/matseg_cluster_speed")
    a = ap.parse_args()
    root = Path(a.out); shutil.rmtree(root, ignore_errors=True)
    p = grid(a.epochs)
    s1, m1 = serial(p, root / "serial1", 1)
    print(json.dumps({"run": "serial", "threads": 1, "seconds": round(s1, 1)}), flush=True)
    sn, mn = serial(p, root / f"serial{a.workers}", a.workers)
    print(json.dumps({"run": "serial", "threads": a.workers, "seconds": round(sn, 1)}), flush=True)
    c, up, mc = cluster(p, root / "cluster", a.workers)
    print(json.dumps({"run": f"local:{a.workers}", "seconds": round(c, 1), "startup_seconds": round(up, 1)}), flush=True)
    assert max(abs(m1[k] - mc[k]) for k in m1) <= 1e-6, (m1, mc)  # same numbers, serial or on the cluster
    print(json.dumps({"jobs": len(m1), "epochs": a.epochs, "speedup_vs_serial_1_thread": round(s1 / c, 2),
                      f"speedup_vs_serial_{a.workers}_threads": round(sn / c, 2),
                      "speedup_excluding_startup_vs_1_thread": round(s1 / (c - up), 2),
                      "max_abs_test_miou_diff_serial_vs_cluster": max(abs(m1[k] - mc[k]) for k in m1)}))


if __name__ == "__main__":
    main()
