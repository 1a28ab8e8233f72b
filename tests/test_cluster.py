"""The job grid on a 2-worker Dask LocalCluster equals a serial run; retries, a job that always fails, a killed worker.

The grid is the shipped Super1 sample profile made tiny: 4 jobs (resnet18 x unet/fpn x 2 seeds, no pretrained
weights, 64 px crops, 2 epochs) on a reduced copy of the shipped images (2 train / 1 val / 1 test, centre 128 px),
so the whole module stays within CI's budget on 2 cores. Faults come from `MATSEG_FAULTS` (test-only, off by
default; see `matseg.cluster`).
"""
import json
import math
import os

import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import run_matseg
from matseg.benchmark import cli_bench
from matseg.cluster import FAILURE, FAULTS_ENV, cluster_client, grid_events, run_grid
from matseg.core import MatsegError, asset_path
from matseg.profile import apply_overrides, compile_profile, load_profile
from matseg.runs import RESULT, RunLock, prepare_grid, run_jobs, write_summary

TINY = ['model.encoders=["resnet18"]', 'model.decoders=["unet","fpn"]', "training.seeds=[0,1]", "model.weights=none",
        "training.crop_size=64", "training.max_epochs=2", "training.crops_per_image=2", "training.batch_size=4",
        "training.tile_overlap=0", "training.deterministic=true", "training.patience=5"]
DS = "super1-sample"
A, B, C = (f"{DS}__resnet18__unet__s1", f"{DS}__resnet18__fpn__s0", f"{DS}__resnet18__fpn__s1")


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    "The shipped sample profile on a reduced copy of its images; returns (profile path, Profile, tmp)."
    tmp = tmp_path_factory.mktemp("cluster")
    src = asset_path("sample", "super1")
    for split, n in (("train", 2), ("val", 1), ("test", 1)):
        for sub in (split, f"{split}_annot"): (tmp / "super1" / sub).mkdir(parents=True)
        for img in sorted((src / split).glob("*.png"))[:n]:
            for path, sub in ((img, split), (src / f"{split}_annot" / f"{img.stem}_mask.png", f"{split}_annot")):
                im = Image.open(path); w, h = im.size
                im.crop((w // 2 - 64, h // 2 - 64, w // 2 + 64, h // 2 + 64)).save(tmp / "super1" / sub / path.name)
    d = json.loads(asset_path("profiles", "sample.json").read_text())
    d.pop("$schema", None); d["datasets"][0]["root"] = "super1"
    (tmp / "mini.json").write_text(json.dumps(d))
    return tmp / "mini.json", apply_overrides(load_profile(tmp / "mini.json"), TINY), tmp


@pytest.fixture(scope="module")
def serial(mini):
    "The same grid trained serially in this process (one thread, like a worker): job id -> result."
    path, profile, tmp = mini
    n = torch.get_num_threads(); torch.set_num_threads(1)
    try: return {r["id"]: r for r in run_jobs(profile, tmp / "serial", "cpu", progress=False)}
    finally: torch.set_num_threads(n)


@pytest.fixture(scope="module")
def client(mini):
    "A 2-worker LocalCluster whose workers fail job A once and kill themselves after job B's first epoch."
    os.environ[FAULTS_ENV] = f"{A}=fail-once,{B}=kill"  # workers (and restarted ones) inherit it
    try:
        with cluster_client("local:2", "cpu") as c:
            yield c
    finally:
        os.environ.pop(FAULTS_ENV, None)


def _set_faults(client, value):
    "Change the faults in this process (restarted workers) and in every running worker."
    if value: os.environ[FAULTS_ENV] = value
    else: os.environ.pop(FAULTS_ENV, None)
    client.run(lambda v=value: os.environ.__setitem__(FAULTS_ENV, v) if v else os.environ.pop(FAULTS_ENV, None))


def _grid(client, profile, out, retries):
    with RunLock(out):
        jobs, specs = prepare_grid(profile, out)
        return run_grid(client, jobs, out, specs, "cpu", retries, profile.name, progress=False)


def _same_metrics(a: dict, b: dict):
    "Every metric of two results equal to 1e-6 (per-class lists included)."
    assert a["metrics"].keys() == b["metrics"].keys() == {"val", "test"}
    for split in a["metrics"]:
        ma, mb = a["metrics"][split], b["metrics"][split]
        assert ma.keys() == mb.keys()
        for k, v in ma.items():
            for x, y in zip(v if isinstance(v, list) else [v], mb[k] if isinstance(mb[k], list) else [mb[k]]):
                if isinstance(x, (int, float)) and not (math.isnan(x) and math.isnan(y)):
                    assert abs(x - y) <= 1e-6, (a["id"], split, k, x, y)


def test_cluster_equals_serial_despite_a_retry_and_a_killed_worker(mini, serial, client):
    path, profile, tmp = mini
    out = tmp / "cl"
    g = _grid(client, profile, out, retries=1)
    assert g["failed"] == [], g["failed"]
    assert [r["id"] for r in g["results"]] == [j.id for j in compile_profile(profile)] == list(serial)
    assert (out / DS / A / ".fault-fail-once").exists() and (out / DS / B / ".fault-kill").exists()  # both fired
    assert len({r["metrics"]["test"]["miou"] for r in serial.values()}) > 1  # the jobs differ: the check can fail
    for r in g["results"]:
        s = serial[r["id"]]
        assert r["status"] == "done" and r["epochs"] == 2 and r["spec_hash"] == s["spec_hash"]
        _same_metrics(r, s)
        hist, ref = (pd.read_csv(o / DS / r["id"] / "history.csv") for o in (out, tmp / "serial"))
        assert (hist["train_loss"] - ref["train_loss"]).abs().max() <= 1e-6  # B resumed epoch 2 exactly
        assert not (out / DS / r["id"] / "state.pt").exists()


def test_failing_job_reported_others_kept_and_rerun_runs_only_it(mini, serial, client):
    path, profile, tmp = mini
    out = tmp / "fail"
    _set_faults(client, f"{C}=fail")
    try: g = _grid(client, profile, out, retries=1)
    finally: _set_faults(client, None)
    assert [f["job"] for f in g["failed"]] == [C]
    f = g["failed"][0]
    assert "fault injected" in f["error"] and "cluster_job" in f["traceback"] and "RuntimeError" in f["traceback"]
    assert (out / DS / C / FAILURE).read_text() == f["traceback"] and not (out / DS / C / RESULT).exists()
    assert sorted(r["id"] for r in g["results"]) == sorted(set(serial) - {C})  # the three others are gathered
    for r in g["results"]: _same_metrics(r, serial[r["id"]])
    write_summary(out)
    assert set(pd.read_csv(out / "results.csv")["seed"].astype(str) + pd.read_csv(out / "results.csv")["decoder"]) \
        == {"0unet", "1unet", "0fpn"}  # tables built from what finished

    kept = {j: (out / DS / j / RESULT).stat().st_mtime_ns for j in set(serial) - {C}}
    p = run_matseg("bench", path, "--out", out, "--device", "cpu", "--cluster", "local:1", "--no-report",
                   *[x for s in TINY for x in ("--set", s)], timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "dashboard" in p.stdout and "reused" in p.stdout
    assert {j: (out / DS / j / RESULT).stat().st_mtime_ns for j in kept} == kept  # only the missing job ran
    _same_metrics(json.loads((out / DS / C / RESULT).read_text()), serial[C])
    assert not (out / DS / C / FAILURE).exists() and (out / DS / "benchmark.ipynb").exists()
    assert len(pd.read_csv(out / "results.csv")) == 8  # 4 jobs x (val, test)


def test_grid_needs_the_lock_and_reuses_finished_jobs(mini, serial, client):
    path, profile, tmp = mini
    with pytest.raises(MatsegError, match="needs the lock"):
        next(grid_events(client, [], tmp / "serial", {}))
    with RunLock(tmp / "serial"):
        jobs, specs = prepare_grid(profile, tmp / "serial")
        ev = list(grid_events(client, jobs, tmp / "serial", specs, "cpu"))
    assert [e["event"] for e in ev] == ["done"] * 4 and all(e["reused"] for e in ev)  # nothing submitted


def test_bad_cluster_arguments_refused_before_anything(mini):
    path, profile, tmp = mini
    for args, msg in ((["--cluster", "local:0"], "valid forms"), (["--cluster", "kubernetes"], "valid forms"),
                      (["--retries", "3"], "--cluster"), (["--cluster", "local", "--device", "cuda:1"], "its own GPU")):
        with pytest.raises(MatsegError, match=msg):
            cli_bench([str(path), "--out", str(tmp / "never"), *args])
    assert not (tmp / "never").exists()
    with pytest.raises(SystemExit):  # argparse: usage, exit 2
        cli_bench([str(path), "--out", str(tmp / "never"), "--cluster", "local", "--retries", "-1"])
