"""Benchmark: results schema and tables, `matseg bench` end to end through papermill, `matseg evaluate` round trip."""
import json
import math
import os
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import run_matseg, write_toy_dataset
from PIL import Image

import matseg.benchmark as B
import matseg.runs as R
from matseg.core import MatsegError
from matseg.metrics import ConfusionMatrix, boundary_f1, scores

CLASSES = ["matrix", "disc", "band"]
CSV_COLUMNS = {"dataset", "encoder", "decoder", "seed", "split", "iou", "dice", "pixel_accuracy", "wiou",
               "boundary_f1", "epochs", "train_seconds", "params", "infer_ms", "weights"}


def write_toy_profile(tmp: Path, decoders=("unet", "fpn")) -> Path:
    write_toy_dataset(tmp / "data")
    prof = {"name": "toy", "datasets": [{"name": "toy", "modality": "SEM", "material": "synthetic", "root": "data",
                                         "classes": CLASSES}],
            "task": {"objective": "segment discs and bands"},
            "model": {"encoders": ["resnet18"], "decoders": list(decoders), "weights": "none"},
            "training": {"batch_size": 4, "max_epochs": 5, "crop_size": 32, "crops_per_image": 2, "tile_overlap": 8}}
    (tmp / "profile.json").write_text(json.dumps(prof))
    return tmp / "profile.json"


def fake_result(dataset, encoder, decoder, seed, val, test):
    def m(v): return {"miou": v, "dice": v + 0.05, "pixel_accuracy": 0.9, "wiou": 0.8, "boundary_f1": v - 0.1,
                      "iou": [0.9, v, v]}
    return {"id": f"{dataset}__{encoder}__{decoder}__s{seed}", "status": "done", "dataset": dataset, "modality": "SEM",
            "material": "alloy", "encoder": encoder, "decoder": decoder, "seed": seed, "weights": "none",
            "classes": ["bg", "a", "b"], "device": "cpu", "epochs": 10, "best_epoch": 7, "train_seconds": 12.5,
            "params": 1000, "infer_ms": 3.0, "metrics": {"val": m(val), "test": m(test)},
            "context": {"n_images": {"train": 4, "val": 2, "test": 2}, "image_shape": [64, 64],
                        "class_fraction": {"bg": 0.7, "a": 0.297, "b": 0.003}, "minority_class": "b",
                        "minority_fraction": 0.003}}


def test_tables_and_recommendation_by_hand():
    # unet vs fpn, 3 seeds: val [.80,.82,.84] vs [.80,.81,.82]: gap .01, Welch t = .01/sqrt(.02²/3+.01²/3) = 0.775, df 2.94, p = 0.496
    res = [fake_result("A", "r18", "unet", s, 0.80 + 0.02 * s, 0.70 + 0.02 * s) for s in range(3)]
    res += [fake_result("A", "r18", "fpn", s, 0.80 + 0.01 * s, 0.90) for s in range(3)]
    frame = R.results_frame(res)
    t = R.summary_table(frame, "test").set_index("decoder")
    assert math.isclose(t.loc["unet", "iou_mean"], 0.72) and math.isclose(t.loc["unet", "iou_std"], 0.02)
    best = R.best_table(frame, res).iloc[0]
    assert best["decoder"] == "unet"  # selected on val although fpn is better on test: never select on test
    rec = R.recommend(frame)["A"]
    assert math.isclose(rec["gap"], 0.01) and math.isclose(rec["pooled_std"], math.sqrt((0.02**2 + 0.01**2) / 2))
    assert math.isclose(rec["p_value"], 0.496, abs_tol=1e-3) and rec["comparisons"][0]["n_a"] == 3
    assert rec["within_noise"] is True and "cannot be told apart at this n" in rec["text"] and "n = 3 vs 3" in rec["text"]
    one = R.recommend(frame[frame.seed == 0])["A"]
    assert one["within_noise"] is None and "unknown" in one["text"]


def test_results_dataset_roundtrip(tmp_path):
    res = [fake_result(d, e, m, s, 0.5 + s / 10, 0.4) for d in ("A", "B") for e in ("r18", "r34")
           for m in ("unet",) for s in (0, 1)]
    ds = R.results_dataset(res[:-1])  # one combination missing -> NaN
    assert dict(ds["iou"].sizes) == {"dataset": 2, "encoder": 2, "decoder": 1, "seed": 2, "split": 2}
    assert np.isnan(ds["iou"].sel(dataset="B", encoder="r34", decoder="unet", seed=1, split="val"))
    assert float(ds["iou_class"].sel(dataset="A", encoder="r18", decoder="unet", seed=1, split="val")[0]) == 0.9
    R.save_results(ds, tmp_path / "r.nc")
    back = xr.load_dataset(tmp_path / "r.nc", engine="h5netcdf")
    xr.testing.assert_allclose(back["iou_class"], ds["iou_class"])
    assert [str(x) for x in back["class_name"].sel(dataset="A").values] == ["bg", "a", "b"]
    with pytest.raises(MatsegError):
        R.results_dataset([])


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    "`matseg bench` through papermill on a tiny profile (2 jobs x 2 epochs), run once for the module."
    tmp = tmp_path_factory.mktemp("bench")
    prof = write_toy_profile(tmp)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = run_matseg("bench", prof, "--out", tmp / "run", "--device", "cpu", "--set", "training.max_epochs=2",
                   "--report-images", "1", timeout=600)
    return tmp, prof, p


def _expand(listed: str) -> set[str]:
    "File names of a `tables_listing` line ('cost.{csv,md}, iou_latency.html')."
    out = set()
    for item in listed.split(", "):
        m = re.fullmatch(r"(.+?)\.\{(.+)\}", item)
        out |= {f"{m[1]}.{e}" for e in m[2].split(",")} if m else {item}
    return out


def test_bench_cli_end_to_end(bench_run):
    tmp, prof, p = bench_run
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp / "run"
    nb = nbformat.read(out / "toy" / "benchmark.ipynb", as_version=4)
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    assert ["parameters"] in tags and ["injected-parameters"] in tags
    mimes = {k for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) for k in o.get("data", {})}
    assert "application/vnd.plotly.v1+json" in mimes
    streams = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream")
    assert "toy__resnet18__fpn__s0  epoch   2" in streams
    df = pd.read_csv(out / "results.csv")
    assert CSV_COLUMNS <= set(df.columns) and len(df) == 4  # 2 jobs x (val, test)
    assert (df["epochs"] == 2).all() and set(df["split"]) == {"val", "test"}
    ds = xr.load_dataset(out / "results.nc", engine="h5netcdf")
    assert set(ds["iou"].dims) == {"dataset", "encoder", "decoder", "seed", "split"} and ds.sizes["class"] == 3
    r = json.loads((out / "toy" / "toy__resnet18__unet__s0" / "result.json").read_text())
    assert math.isclose(float(ds["iou"].sel(dataset="toy", encoder="resnet18", decoder="unet", seed=0, split="test")),
                        r["metrics"]["test"]["miou"])
    for f in ("all_combinations.md", "all_combinations.csv", "best_per_dataset.md", "best_per_dataset.csv",
              "recommendations.md", "iou_heatmap.html"):
        assert (out / "tables" / f).stat().st_size > 0, f
    assert "unknown" in (out / "tables" / "recommendations.md").read_text()  # one seed: noise unknown
    assert "synthetic" in (out / "tables" / "best_per_dataset.md").read_text()
    from matseg.profile import load_profile
    used = load_profile(out / "profiles" / "toy.json")  # the effective profile, loadable from the run folder
    assert used.training.max_epochs == 2 and used.dataset_root("toy") == (tmp / "data").resolve()
    rep = json.loads((out / "toy" / "report" / "report.json").read_text())  # feedback report of the best job
    assert rep["job"]["dataset"] == "toy" and rep["job"]["id"].startswith("toy__")
    assert "report.html" in p.stdout and (out / "toy" / "report" / "report.html").stat().st_size > 0
    listed = re.search(r"^tables: +\S+/ \((.*)\)$", p.stdout, re.M).group(1)  # the printout lists what tables/ holds
    files = _expand(listed)
    assert files == {f.name for f in (out / "tables").iterdir()}, (listed, sorted(os.listdir(out / "tables")))
    assert {"cost.csv", "cost.md", "iou_latency.html", "jobs.csv"} <= files  # the newer tables are named too


def test_bench_rerun_skips_finished(bench_run):
    tmp, prof, p = bench_run
    assert p.returncode == 0
    res = tmp / "run" / "toy" / "toy__resnet18__unet__s0" / "result.json"
    nb = tmp / "run" / "toy" / "benchmark.ipynb"
    before = res.stat().st_mtime_ns, nb.stat().st_mtime_ns
    other = tmp / "run" / "other" / "other__resnet18__unet__s0"  # a dataset of another profile run into the same folder
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({**fake_result("other", "resnet18", "unet", 0, 0.5, 0.4), "classes": CLASSES}))
    q = run_matseg("bench", prof, "--out", tmp / "run", "--device", "cpu", "--set", "training.max_epochs=2",
                   "--datasets", "toy", "--no-report", timeout=300)
    assert q.returncode == 0, q.stderr[-3000:]
    assert "skipped" in q.stdout and (res.stat().st_mtime_ns, nb.stat().st_mtime_ns) == before
    df = pd.read_csv(tmp / "run" / "results.csv")  # the folder's tables keep every dataset finished there
    assert len(df) == 6 and set(df.dataset) == {"toy", "other"}
    assert "other" in (tmp / "run" / "tables" / "best_per_dataset.md").read_text()
    shutil.rmtree(other.parent); R.write_summary(tmp / "run")  # leave the shared run as the other tests expect it
    assert len(pd.read_csv(tmp / "run" / "results.csv")) == 4


def test_bench_errors(tmp_path):
    prof = write_toy_profile(tmp_path)
    with pytest.raises(MatsegError, match="nope.*toy"):
        B.cli_bench([str(prof), "--out", str(tmp_path / "run"), "--datasets", "nope"])
    assert not B.dataset_finished(B.bench_profile(prof), "toy", tmp_path / "run")


def test_evaluate_saved_predictions_roundtrip(bench_run, tmp_path):
    "Metrics recomputed from the saved PNGs and the ground-truth mask files equal the reported ones."
    run, prof, p = bench_run
    assert p.returncode == 0
    ckpt = run / "run" / "toy" / "toy__resnet18__unet__s0" / "checkpoint.safetensors"
    pred_dir = tmp_path / "pred"
    torch.set_num_threads(1)
    rc = B.cli_evaluate([str(ckpt), "--profile", str(prof), "--split", "test", "--save-predictions", str(pred_dir),
                         "--device", "cpu", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    reported = json.loads((pred_dir / "metrics.json").read_text())
    assert reported == json.loads((tmp_path / "m.json").read_text())
    truth_dir = run / "data" / "test_annot"
    names = sorted(f.name for f in truth_dir.iterdir())
    assert sorted(f.name for f in pred_dir.glob("*.png")) == names  # named after the source images
    preds = np.stack([np.array(Image.open(pred_dir / n)) for n in names])
    truth = np.stack([np.array(Image.open(truth_dir / n)) for n in names])
    s = scores(ConfusionMatrix(3).update(preds, truth))
    m = reported["metrics"]
    for k in ("miou", "dice", "pixel_accuracy", "wiou"):
        assert math.isclose(s[k], m[k], rel_tol=1e-9, abs_tol=1e-12), k
    assert np.allclose(s["iou"], m["iou"], equal_nan=True)
    bf = boundary_f1(preds, truth, 3)
    assert math.isclose(float(np.nanmean(bf[1:])), m["boundary_f1"], rel_tol=1e-9)
    # the benchmark's own test score of this checkpoint is the same number
    r = json.loads(ckpt.with_name("result.json").read_text())
    assert math.isclose(r["metrics"]["test"]["miou"], m["miou"], rel_tol=1e-6)


@pytest.mark.slow
def test_real_super1_train_and_evaluate(nasa, tmp_path):
    "Two epochs on the real Super1 set (palette masks, '#' and '()' in names); predictions keep the source stems."
    import matseg.train as T
    from matseg.profile import compile_profile, load_profile
    prof = {"name": "real", "datasets": [{
        "name": "super1", "modality": "SEM", "material": "Ni-based superalloy", "root": str(nasa / "Super1"),
        "layout": {"kind": "split_folders", "mask_suffix": "_mask"},
        "mask_encoding": {"kind": "palette", "colors": {"secondary": [0, 0, 255], "tertiary": [255, 0, 0]},
                          "default_class": "matrix"},
        "classes": ["matrix", "secondary", "tertiary"]}],
        "task": {"objective": "gamma prime"},
        "model": {"encoders": ["resnet18"], "decoders": ["unet"], "weights": "none"},
        "training": {"batch_size": 4, "max_epochs": 2, "crop_size": 128, "crops_per_image": 1, "tile_overlap": 32}}
    (tmp_path / "p.json").write_text(json.dumps(prof))
    profile = load_profile(tmp_path / "p.json")
    job = compile_profile(profile)[0]
    r = R.train_job(job, tmp_path / "run", device="cpu", progress=False)
    assert r["context"]["n_images"] == {"train": 10, "val": 4, "test": 4} and 0 <= r["metrics"]["test"]["miou"] <= 1
    ckpt = R.job_dir(tmp_path / "run", job) / "checkpoint.safetensors"
    out = B.evaluate_checkpoint(ckpt, profile, "test", tmp_path / "pred", device="cpu")
    stems = sorted(p.stem for p in (nasa / "Super1" / "test").iterdir() if p.is_file())
    assert sorted(Path(p).stem for p in out["predictions"]) == stems
    assert math.isclose(out["metrics"]["miou"], r["metrics"]["test"]["miou"], rel_tol=1e-6)
