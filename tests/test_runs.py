"""The run folder (issue "Trust the numbers"): stale results, train/explain input skew, shared and concurrent folders."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import run_matseg, write_toy_dataset

import matseg.runs as R
from matseg.benchmark import evaluate_checkpoint
from matseg.data import load_dataset
from matseg.explain import cli_explain
from matseg.ood import cli_ood
from matseg.profile import load_profile
from matseg.report import build_report
from matseg.widgets import CounterfactualExplorer

CLASSES = ["matrix", "disc", "band"]


def write_profile(tmp: Path, name="toy", dataset="toy", **training) -> Path:
    if not (tmp / "data").is_dir(): write_toy_dataset(tmp / "data")
    prof = {"name": name, "datasets": [{"name": dataset, "modality": "SEM", "material": "synthetic", "root": "data",
                                        "classes": CLASSES, "normalization": {"imagenet": True}}],
            "task": {"objective": "segment discs and bands"},
            "model": {"encoders": ["resnet18"], "decoders": ["unet"], "weights": "none"},
            "training": {"batch_size": 4, "max_epochs": 1, "crop_size": 32, "crops_per_image": 2, "tile_overlap": 8,
                         **training}}
    p = tmp / f"{name}.json"; p.write_text(json.dumps(prof))
    return p


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "One `matseg bench` of the toy profile (1 job, 1 epoch) through papermill."
    tmp = tmp_path_factory.mktemp("runs")
    prof = write_profile(tmp)
    p = run_matseg("bench", prof, "--out", tmp / "run", "--device", "cpu", "--report-images", "1", timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp, prof, tmp / "run"


def test_changed_spec_is_refused_then_rerun(bench):
    tmp, prof, out = bench
    res = json.loads((out / "toy" / "toy__resnet18__unet__s0" / "result.json").read_text())
    before = (out / "profiles" / "toy.json").read_text()
    p = run_matseg("bench", prof, "--out", out, "--device", "cpu", "--set", "training.lr=0.5",
                   "--set", "training.max_epochs=2", "--no-report")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "training.lr: 0.0001 -> 0.5" in p.stderr and "training.max_epochs: 1 -> 2" in p.stderr and "--rerun" in p.stderr
    assert (out / "profiles" / "toy.json").read_text() == before  # provenance not rewritten
    p = run_matseg("bench", prof, "--out", out, "--device", "cpu", "--set", "training.lr=0.5",
                   "--set", "training.max_epochs=2", "--no-report", "--rerun")
    assert p.returncode == 0, p.stderr[-3000:]
    new = json.loads((out / "toy" / "toy__resnet18__unet__s0" / "result.json").read_text())
    assert new["training"]["lr"] == 0.5 and new["epochs"] == 2 and new["spec_hash"] != res["spec_hash"]
    kept = list((out / "superseded" / "toy").iterdir())
    assert len(kept) == 1 and json.loads((kept[0] / "result.json").read_text())["spec_hash"] == res["spec_hash"]
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 2 and set(csv["epochs"]) == {2}  # only the live job, never the superseded one
    assert json.loads((out / "profiles" / "toy.json").read_text())["training"]["lr"] == 0.5


def test_second_profile_shares_the_folder(bench, tmp_path):
    tmp, prof, out = bench
    other = write_profile(tmp, name="other", dataset="toy2")
    p = run_matseg("bench", other, "--out", out, "--device", "cpu", "--report-images", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    csv = pd.read_csv(out / "results.csv")
    assert set(csv["dataset"]) == {"toy", "toy2"} and set(csv["profile"]) == {"toy", "other"}
    assert sorted(x.name for x in (out / "profiles").iterdir()) == ["other.json", "toy.json"]
    for d in ("toy", "toy2"):
        rep = json.loads((out / d / "report" / "report.json").read_text())
        assert rep["profile"]["name"] == {"toy": "toy", "toy2": "other"}[d]


def test_concurrent_bench_is_refused(bench):
    tmp, prof, out = bench
    hold = subprocess.Popen([sys.executable, "-c", "import sys, time; from matseg.runs import RunLock; "
                             "RunLock(sys.argv[1], 'matseg bench A').acquire(); print('held', flush=True); time.sleep(120)",
                             str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert hold.stdout.readline().strip() == "held"
        p = run_matseg("bench", prof, "--out", out, "--device", "cpu", "--no-report")
        assert p.returncode == 2 and "in use by another matseg process" in p.stderr and "matseg bench A" in p.stderr
    finally:
        hold.kill(); hold.wait()


def test_bad_out_and_device_refused_before_compute(tmp_path):
    prof = write_profile(tmp_path)
    (tmp_path / "afile").write_text("x")
    for args, msg in [(["--out", tmp_path / "afile"], "is an existing file"),
                      (["--out", tmp_path / "afile" / "sub"], "is a file, so the folder cannot be created"),
                      (["--out", tmp_path / "ok", "--device", "foo"], "'foo' is not a device")]:
        p = run_matseg("bench", prof, *args, timeout=120)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "ok").exists()


def test_every_reader_feeds_the_training_tensor(bench, tmp_path, monkeypatch):
    "evaluate, ood, report and the explorer widget: the first tensor reaching the model = the training tensor."
    tmp, prof, out = bench
    jdir = out / "toy" / "toy__resnet18__unet__s0"
    tj0 = R.TrainedJob.open(jdir, device="cpu")
    assert tj0.meta["input_stats"]["mean"] == pytest.approx([0.449])  # ImageNet's mean of means, one channel
    profile = load_profile(prof)
    spec = profile.dataset("toy")
    ds = load_dataset(spec, profile.base_dir, splits=["test"])
    # what training made of the test images: the dataset tensor standardised by the job's statistics
    st = tj0.meta["input_stats"]
    train_x = (torch.from_numpy(ds["image"].values) - st["mean"][0]) / st["std"][0]
    files = [Path(f) for f in ds["file"].values]
    np.testing.assert_allclose(tj0.prepare(files[0]).numpy(), train_x[0].numpy(), atol=1e-6)

    seen = []
    orig = R.TrainedJob.open.__func__

    def spy(cls, *a, **k):
        tj = orig(cls, *a, **k)
        tj.model.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().cpu().clone()))
        return tj
    monkeypatch.setattr(R.TrainedJob, "open", classmethod(spy))

    def first_matches(expected):
        x = seen[0][0]; h, w = x.shape[-2:]
        torch.testing.assert_close(x, expected[:, :h, :w], atol=1e-5, rtol=1e-5)
        seen.clear()

    evaluate_checkpoint(jdir, None, "test", device="cpu")
    first_matches(train_x[0])
    build_report(jdir, None, n_images=1, ood=False, heatmaps=False, out=tmp_path / "rep", device="cpu")
    first_matches(train_x[0])
    assert cli_ood([str(jdir), "--id", "toy:train,val", "--test", str(files[0]), "--tile", "32", "--k", "2",
                    "--shift", "noise", "--device", "cpu", "--out", str(tmp_path / "ood")]) == 0
    # ID images come first, then the test file, then the shift sets; the test file's top-left crop is the training tensor's
    assert any(x.shape[-2:] == (32, 32) and torch.allclose(x[0], train_x[0][:, :32, :32], atol=1e-5) for x in seen)
    seen.clear()
    ce = CounterfactualExplorer.from_job(R.TrainedJob.open(jdir, device="cpu"), files[0], patch=16, stride=16)
    first_matches(train_x[0])
    assert ce.pred.shape == (64, 64)


# --- recommendations with real statistics (issue 9, item 5) ---

def _result(dataset, encoder, seed, val, params=1000):
    m = {"miou": val, "dice": val, "pixel_accuracy": 0.9, "wiou": 0.8, "boundary_f1": val, "iou": [0.9, val]}
    return {"id": f"{dataset}__{encoder}__unet__s{seed}", "status": "done", "dataset": dataset, "encoder": encoder,
            "decoder": "unet", "seed": seed, "weights": "none", "classes": ["bg", "a"], "device": "cpu", "epochs": 1,
            "best_epoch": 1, "train_seconds": 1.0, "params": params, "infer_ms": 1.0,
            "metrics": {"val": m, "test": {**m, "miou": val - 0.1}},
            "context": {"n_images": {"train": 4, "val": 2, "test": 2}, "image_shape": [8, 8],
                        "class_fraction": {"bg": 0.9, "a": 0.1}, "minority_class": "a", "minority_fraction": 0.1}}


def test_gap_below_sd_with_many_seeds_is_not_equivalent():
    # the case: 20 seeds, gap 0.007, SD 0.008 -> the old rule said "equivalent"; Welch p = 0.009
    z = np.random.default_rng(1).standard_normal(20)
    z = (z - z.mean()) / z.std(ddof=1)
    res = [_result("D", "a", s, 0.807 + 0.008 * z[s]) for s in range(20)] + \
          [_result("D", "b", s, 0.800 + 0.008 * z[19 - s], params=10) for s in range(20)]
    rec = R.recommend(R.results_frame(res))["D"]
    assert rec["within_noise"] is False and abs(rec["p_value"] - 0.0087) < 5e-4 and rec["encoder"] == "a"
    assert "worse" in rec["text"] and "n = 20 vs 20" in rec["text"]
    # the same gap and SD with 3 seeds cannot be told apart: then the cheaper one is selected
    few = [_result("D", e, s, m + 0.008 * (s - 1), params=pp) for e, m, pp in (("a", 0.807, 1000), ("b", 0.800, 10))
           for s in range(3)]
    rec3 = R.recommend(R.results_frame(few))["D"]
    assert rec3["within_noise"] is True and rec3["encoder"] == "b" and "prefer the cheaper one (b + unet)" in rec3["text"]


def test_null_case_false_positive_rate_and_power():
    rng = np.random.default_rng(0)
    n, reps = 5, 2000
    fp = np.mean([R.compare_seeds(rng.normal(0.8, 0.01, n), rng.normal(0.8, 0.01, n))["verdict"] == "different"
                  for _ in range(reps)])
    assert 0.035 < fp < 0.065, fp  # alpha = 0.05; binomial sd 0.005
    hits = np.mean([R.compare_seeds(rng.normal(0.815, 0.01, 20), rng.normal(0.8, 0.01, 20))["verdict"] == "different"
                    for _ in range(200)])
    assert hits > 0.95, hits  # a real gap of 1.5 SD is found with 20 seeds
    one = R.compare_seeds([0.9], rng.normal(0.8, 0.01, 5))
    assert one["verdict"] == "unknown" and one["p_value"] is None


def test_text_json_tables_and_report_carry_one_selection(tmp_path):
    # big and small cannot be told apart at n = 3; small has fewer parameters; worse is clearly worse
    res = [_result("C", "big", s, 0.80 + 0.01 * s, params=5_000_000) for s in range(3)]
    res += [_result("C", "small", s, 0.795 + 0.01 * s, params=1_000_000) for s in range(3)]
    res += [_result("C", "worse", s, 0.60 + 0.01 * s, params=100) for s in range(3)]
    for r in res:
        d = tmp_path / r["dataset"] / r["id"]
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(r))
        (d / R.CHECKPOINT).write_bytes(b"")
    p = R.write_summary(tmp_path)
    rec = json.loads(p["recommendations_json"].read_text())["C"]
    best = pd.read_csv(p["best_per_dataset_csv"]).iloc[0]
    sel = R.Run(tmp_path).best_jobs()[0]
    assert "prefer the cheaper one (small + unet)" in rec["text"] and rec["top_by_mean"] == "big + unet"
    assert rec["encoder"] == best["encoder"] == sel["encoder"] == "small" and sel["seed"] == 2
    assert [c["verdict"] for c in rec["comparisons"]] == ["indistinguishable", "different"]
    assert "small + unet" in p["best_per_dataset_md"].read_text()


def test_data_identity_is_content_and_legacy_records_are_upgraded(tmp_path):
    "Data files are identified by sha256: new modification times reuse, new content refuses; size+mtime records of an older matseg are upgraded (same times) or adopted on request."
    import os
    prof_path = write_profile(tmp_path)
    prof = load_profile(prof_path)
    out = tmp_path / "run"
    (res,) = R.run_jobs(prof, out, device="cpu", progress=False)
    jdir = out / "toy" / res["id"]
    files = sorted(p for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert all(len(r) == 4 and len(r[3]) == 64 for r in res["spec"]["data"])  # [split, path, size, sha256]
    for i, f in enumerate(files): os.utime(f, ns=(10**18 + i, 10**18 + i))  # a copy / checkout: new times, same bytes
    R._SHA_CACHE.clear()
    assert R.check_jobs(R.compile_profile(prof), out) == []
    (again,) = R.run_jobs(prof, out, device="cpu", progress=False)
    assert again["spec_hash"] == res["spec_hash"]  # reused, not retrained

    def make_legacy(shift):  # what a matseg before content identity wrote: [split, path, size, mtime_ns]
        d = json.loads((jdir / "result.json").read_text())
        d["spec"]["data"] = [[s, rel, size, (tmp_path / "data" / rel).stat().st_mtime_ns + shift]
                             for s, rel, size, _ in d["spec"]["data"]]
        d["spec_hash"] = R.spec_hash(d["spec"]); d.pop("data_identity_upgrade", None)
        (jdir / "result.json").write_text(json.dumps(d))
    jobs = R.compile_profile(prof)
    make_legacy(0)  # recorded times match: the old rule's exact match, upgraded in place
    assert R.check_jobs(jobs, out) == []
    d = json.loads((jdir / "result.json").read_text())
    assert d["spec_hash"] == res["spec_hash"] and d["data_identity_upgrade"]["how"] == "same"
    make_legacy(1)  # same paths and sizes, other times: cannot be checked -> refused unless adopted
    (c,) = R.check_jobs(jobs, out)
    assert c["touched"] and "other modification times" in c["changes"][0]
    assert "--adopt-data" in str(R.conflict_error([c]))
    with pytest.raises(R.MatsegError, match="adopt-data"): R.run_jobs(prof, out, device="cpu", progress=False)
    assert R.check_jobs(jobs, out, adopt_data=True) == []
    d = json.loads((jdir / "result.json").read_text())
    assert d["spec_hash"] == res["spec_hash"] and d["data_identity_upgrade"]["how"] == "touched"
    # other content (same size) is another dataset: refused, and named as a content change
    img = next(f for f in files if "train" in str(f) and f.suffix == ".png")
    b = bytearray(img.read_bytes()); b[-1] ^= 1; img.write_bytes(bytes(b))
    R._SHA_CACHE.clear()
    (c,) = R.check_jobs(jobs, out)
    assert not c["touched"] and "1 changed (content)" in "; ".join(c["changes"])
