"""The GPU path of `--cluster local` without a GPU: two pretended GPUs, real worker processes.

`visible_gpus` and `resolve_device` are monkeypatched so `local_cluster` builds its GPU cluster on this CPU machine.
The workers really start; the checks are what the code made of them: one single-threaded worker per GPU that holds
the resource GPU=1 and sees only its own GPU in CUDA_VISIBLE_DEVICES, and `grid_events` submitting every job with
GPU=1 so each job runs alone on one worker under that worker's CUDA_VISIBLE_DEVICES. No GPU is measured here.
"""
import os
import sys
import time

import cloudpickle
import torch
from distributed import get_worker

import matseg.cluster as C
from matseg.core import asset_path
from matseg.profile import apply_overrides, compile_profile, load_profile
from matseg.runs import RunLock

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this test module


def _fake_job(job, out_dir, spec, device, lock, profile_name, topic):
    "Stands in for `cluster_job` (no training): what a job on this worker would see."
    t0 = time.monotonic(); time.sleep(0.3)
    return {"id": job.id, "worker": get_worker().name, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "device": device,
            "pid": os.getpid(), "t": (t0, time.monotonic())}


def test_one_worker_per_gpu_each_job_sees_only_its_gpu(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(C, "visible_gpus", lambda: ["3", "7"])
    monkeypatch.setattr(C, "resolve_device", lambda d="auto": torch.device("cpu" if d == "cpu" else "cuda"))
    jobs = compile_profile(apply_overrides(load_profile(asset_path("profiles", "sample.json")),
                                           ['model.encoders=["resnet18"]', 'model.decoders=["unet","fpn"]',
                                            "training.seeds=[0,1,2]"]))
    assert len(jobs) == 6
    with C.cluster_client("local", "auto") as client:
        assert "2 worker(s), 2 thread(s), 2 GPU(s)" in capsys.readouterr().out
        ws = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted((w["name"], w["nthreads"], w["resources"]) for w in ws) == \
            [("gpu3", 1, {"GPU": 1}), ("gpu7", 1, {"GPU": 1})]
        assert all(w["host"] == "127.0.0.1" for w in ws)
        env = client.run(lambda dask_worker: (dask_worker.name, os.environ.get("CUDA_VISIBLE_DEVICES")))
        assert sorted(env.values()) == [("gpu3", "3"), ("gpu7", "7")]  # each worker process sees only its GPU

        submitted = []
        real_submit = client.submit
        def spy(*a, **kw): submitted.append(kw.get("resources")); return real_submit(*a, **kw)
        monkeypatch.setattr(client, "submit", spy)
        monkeypatch.setattr(C, "cluster_job", _fake_job)
        with RunLock(tmp_path):
            ev = list(C.grid_events(client, jobs, tmp_path, {j.id: {} for j in jobs}, "cuda", retries=0))
    assert submitted == [{"GPU": 1}] * 6  # every task asks for one GPU
    done = [e["result"] for e in ev if e["event"] == "done"]
    assert sorted(r["id"] for r in done) == sorted(j.id for j in jobs) and not [e for e in ev if e["event"] == "failed"]
    for r in done:
        assert r["cvd"] == r["worker"].removeprefix("gpu") and r["device"] == "cuda", r
    assert {r["worker"] for r in done} == {"gpu3", "gpu7"}  # both GPUs used
    for w in ("gpu3", "gpu7"):  # a worker holds at most one GPU job at a time
        spans = sorted(r["t"] for r in done if r["worker"] == w)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
