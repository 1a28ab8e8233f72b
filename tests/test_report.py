"""Feedback report: JSON record, offline HTML, best-job selection, CLI and errors (tiny trained job on synthetic AFM)."""
import importlib.util
import json
import re
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from matseg.core import MatsegError, atomic_write_json
from matseg.report import best_jobs, build_report, cli_report, external_refs, find_checkpoint
from matseg.runs import select_best

HAS_OOD = importlib.util.find_spec("matseg.ood") is not None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A one-epoch resnet18 U-Net trained on 14 synthetic 128x128 AFM images (12 ID: enough groups for QC): (profile, runs, job dir)."
    from matseg.profile import compile_profile, load_profile
    from matseg.synth import write_afm_dataset
    from matseg.runs import train_job
    threads = torch.get_num_threads(); torch.set_num_threads(1)  # parallel test runners on 2 cores
    tmp = tmp_path_factory.mktemp("report")
    write_afm_dataset(tmp / "afm", n_images=14, size=128, seed=0)
    ds = json.loads((tmp / "afm" / "dataset.json").read_text()); ds["root"] = "afm"
    prof = {"name": "t", "datasets": [ds], "task": {"objective": "grains", "deployment_threshold": 0.9},
            "model": {"encoders": ["resnet18"], "decoders": ["unet"], "weights": "none"},
            "training": {"batch_size": 4, "max_epochs": 1, "crop_size": 64, "crops_per_image": 2, "tile_overlap": 0,
                         "seeds": [0], "amp": False}}
    atomic_write_json(tmp / "profile.json", prof)
    job = compile_profile(load_profile(tmp / "profile.json"))[0]
    train_job(job, tmp / "runs", device="cpu", progress=False)
    yield tmp / "profile.json", tmp / "runs", tmp / "runs" / job.dataset.name / job.id
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report(run):
    prof, _, jdir = run
    return build_report(jdir, prof, n_images=2, device="cpu", heatmap_size=64)


def _strip_scripts(page: str) -> str:
    return re.sub(r"<script\b[^>]*>.*?</script>", "<script></script>", page, flags=re.S | re.I)


def test_json_record(run, report):
    _, _, jdir = run
    out = jdir / "report"
    assert report["out"] == str(out)
    rec = json.loads((out / "report.json").read_text())
    assert rec["format"] == "matseg-report/2" and rec["job"]["id"] == jdir.name
    assert rec["job"]["encoder"] == "resnet18" and rec["job"]["decoder"] == "unet"
    for k in ("profile", "metrics", "history", "masks", "qc", "heatmaps", "files"):
        assert k in rec, k
    assert rec["profile"]["task"]["deployment_threshold"] == 0.9
    u = rec["uncertainty"]  # U: the test split's calibration recorded by training
    assert u["available"] and 0 <= u["ece"] <= 1 and 0 <= u["uncertainty_auroc"] <= 1
    assert rec["cost"]["gflops"] > 0 and rec["cost"]["params"] > 0 and rec["cost"]["threads"] >= 1
    page = (out / "report.html").read_text()
    assert "U — uncertainty and calibration" in page and "fig-reliability" in page and "Cost of the model" in page
    assert set(rec["metrics"]["metrics"]) == {"val", "test"}
    Z = rec["masks"]
    assert Z["split"] == "test" and Z["n_images"] == 2 and Z["shown"] == 2 and len(Z["images"]) == 2
    for r in Z["images"]:
        for k in ("image", "truth", "prediction", "prediction_mask"):
            assert (out / r[k]).is_file() and (out / r[k]).read_bytes()[:4] == b"\x89PNG"
        assert len(r["iou"]) == len(Z["classes"]) and abs(sum(r["predicted_fraction"]) - 1) < 1e-6
    assert sorted(rec["files"]["images"]) == sorted(str(p.relative_to(out)) for p in (out / "images").glob("*.png"))


def test_per_image_iou_matches_torchmetrics(run, report):
    "Per-image IoU of the report against torchmetrics on the saved mask PNG and the ground truth read independently."
    from PIL import Image
    from torchmetrics.functional.classification import multiclass_jaccard_index

    from matseg.data import load_dataset
    from matseg.profile import load_profile
    from matseg.train import evaluate, prepare_data
    prof_path, _, jdir = run
    prof = load_profile(prof_path)
    ds = load_dataset(prof.datasets[0], prof.base_dir, splits=["test"])
    truth = {str(s): np.asarray(ds["mask"].sel(sample=s).values) for s in ds["sample"].values}
    K = len(report["masks"]["classes"])
    for r in report["masks"]["images"]:
        pred = np.asarray(Image.open(jdir / "report" / r["prediction_mask"]))
        t = torch.from_numpy(truth[r["name"]].astype(np.int64))
        iou = multiclass_jaccard_index(torch.from_numpy(pred.astype(np.int64))[None], t[None], K, average="none",
                                       zero_division=float("nan"))
        for got, want in zip(r["iou"], iou.tolist()):
            assert (got is None and np.isnan(want)) or abs(got - want) < 1e-6
    # the saved masks are the training module's own full-image predictions
    from matseg.models import load_checkpoint
    model, meta = load_checkpoint(jdir)
    data = prepare_data(ds, prof.datasets[0].classes)
    x, y, names = data.splits["test"]
    _, preds = evaluate(model, x, y, K, meta["crop_size"], meta["tile_overlap"], boundary=False)
    for r in report["masks"]["images"]:
        saved = np.asarray(Image.open(jdir / "report" / r["prediction_mask"]))
        assert np.array_equal(saved, preds[names.index(r["name"])])


def test_html_offline_with_figures(run, report):
    _, _, jdir = run
    page = (jdir / "report" / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "</html>" in page
    assert external_refs(page) == []
    outside = _strip_scripts(page)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", outside, re.I)
    assert page.count('<script type="text/javascript">') == 1 and "Plotly" in page  # plotly.js inlined once
    divs = re.findall(r'<div id="(fig-[a-z]+)" class="plotly-graph-div"', page)
    assert {"fig-metrics", "fig-history", "fig-masks", "fig-heatmaps"} <= set(divs), divs
    # gallery: image, truth, prediction, heatmap per image (plotly's JSON writes "/" as \u002f)
    assert len(re.findall(r"data:image(?:/|\\u002f)png;base64,iVBOR", page)) >= 2 * 4
    q = report["qc"]
    m = re.search(r'data-validated="(\w+)"', page)
    assert m and m.group(1) == (str(q["validated"]).lower() if q["available"] else "unknown")
    assert ("DETECTOR VALIDATED" in page or "DETECTOR NOT VALIDATED" in page) if q["available"] else ("QC UNAVAILABLE" in page)
    if q["available"] and q["threshold"]["threshold"] is not None:
        t = re.search(r'data-typical="(\d+)"', page)
        assert t and int(t.group(1)) == q["typical_images"] and "fig-qc" in divs


def test_heatmaps(report):
    H = report["heatmaps"]
    assert H["available"] and len(H["items"]) == 2
    for it in H["items"]:
        assert "error" not in it, it
        assert it["window"]["height"] == 64 and it["patch"] == 8 and it["n_locations"] == 64
        assert np.array(it["grid"]).shape == (8, 8) and np.isfinite(it["grid"]).all() and it["max_influence"] > 0
        assert it["validation_ratio"] is not None and it["validation_ratio"] > 0
        assert 0 < it["validation_p"] <= 1 and it["validation"]["n_draws"] >= 1  # the fair test's p-value
        assert it["region_pixels"] > 0 and it["overlay"].endswith(".png")


@pytest.mark.skipif(not HAS_OOD, reason="matseg.ood (07_ood) is not exported yet")
def test_qc_signals(report):
    "Q is matseg.ood.qc_run: held-out ID vs the test split and vs graded shifts, one threshold with its interval."
    from matseg.ood import SHIFT_LEVELS, SHIFTS
    q = report["qc"]
    assert q["available"], q.get("reason")
    assert q["n_fit_images"] + q["n_heldout_images"] == q["n_id_images"] == 12 and q["features"] == "encoder"
    assert not set(q["fit_images"]) & set(q["heldout_images"])
    dv = q["detector_validated"]
    assert dv["designated"] == [f"{k}@3" for k in SHIFTS] and dv["required_auroc"] == 0.9
    assert set(q["shifts"]) == {f"{k}@{lv}" for k in SHIFTS for lv in range(1, SHIFT_LEVELS + 1)}
    assert dv["min_auroc"] == min(q["shifts"][d]["auroc_vs_heldout_id"] for d in dv["designated"])
    assert q["validated"] == dv["validated"] == (dv["min_auroc"] > 0.9)
    th = q["threshold"]
    assert th["needs"] is None and th["low"] <= th["threshold"] <= th["high"] and 0 <= th["loo_pass_rate"] <= 1
    t = q["tests"]["test"]
    assert 0 <= t["auroc_vs_heldout_id"] <= 1 and len(t["images"]) == 2
    assert [p["name"] for p in q["per_image"]] == [r["name"] for r in report["masks"]["images"]]
    for p in q["per_image"]:
        assert p["typical"] == (p["typical_fraction"] >= 0.5) and 0 <= p["typical_fraction"] <= 1
    assert q["typical_images"] == sum(p["typical"] for p in q["per_image"])


def test_report_qc_is_the_command(run, report, tmp_path):
    "matseg ood with its defaults on the same job and split gives the report's numbers exactly."
    from matseg.ood import cli_ood
    prof, _, jdir = run
    ref = f"{jdir.parent.name}:test"
    assert cli_ood([str(jdir), "--profile", str(prof), "--test", ref, "--device", "cpu", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    q = report["qc"]
    assert s["threshold"] == q["threshold"] and s["detector_validated"] == q["detector_validated"]
    assert s["tests"][ref]["scores"] == q["tests"]["test"]["scores"]


def test_qc_and_heatmaps_switched_off(run, tmp_path, monkeypatch):
    prof, _, jdir = run
    rep = build_report(jdir, prof, n_images=1, ood=False, heatmaps=False, out=tmp_path / "r", device="cpu")
    assert rep["qc"]["available"] is False and rep["qc"]["reason"] == "switched off (--no-ood)"
    assert rep["heatmaps"] == {"available": False, "reason": "switched off (--no-heatmaps)"}
    page = (tmp_path / "r" / "report.html").read_text()
    assert "QC UNAVAILABLE" in page and external_refs(page) == []


def test_profile_discovery(run, tmp_path):
    prof, runs, jdir = run
    with pytest.raises(MatsegError, match="--profile") as e:
        build_report(jdir, None, out=tmp_path / "x", ood=False, heatmaps=False)
    assert str(jdir) in str(e.value)
    p = json.loads(prof.read_text()); p["datasets"][0]["root"] = str(prof.parent / "afm")
    atomic_write_json(runs / "profiles" / "t.json", p)
    try:
        rep = build_report(jdir / "checkpoint.safetensors", None, n_images=1, ood=False, heatmaps=False,
                           out=tmp_path / "y", device="cpu")
        assert rep["profile"]["name"] == "t" and rep["masks"]["shown"] == 1
    finally:
        (runs / "profiles" / "t.json").unlink()


def test_bad_input(run, tmp_path):
    prof, runs, jdir = run
    with pytest.raises(MatsegError, match="does not exist") as e: find_checkpoint(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MatsegError, match="holds no checkpoint.safetensors") as e: build_report(tmp_path / "empty", prof)
    assert str(tmp_path / "empty") in str(e.value) and "matseg bench" in str(e.value)
    with pytest.raises(MatsegError, match="profile .* does not exist"): build_report(jdir, tmp_path / "nope.json")
    with pytest.raises(MatsegError, match="no images in split|no split"):
        build_report(jdir, prof, split="holdout", ood=False, heatmaps=False, out=tmp_path / "z")
    with pytest.raises(MatsegError, match="does not exist"): cli_report([str(tmp_path / "missing")])
    with pytest.raises(MatsegError, match="neither checkpoint.safetensors"): cli_report([str(tmp_path / "empty")])
    with pytest.raises(MatsegError, match="jobs with a checkpoint: " + jdir.name):
        cli_report([str(runs), "--job", "nope__x__y__s0", "--profile", str(prof)])


def test_select_best_on_val_not_test():
    f = pd.DataFrame([("d", "a", "unet", 0, "val", 0.80), ("d", "a", "unet", 0, "test", 0.40),
                      ("d", "b", "unet", 0, "val", 0.70), ("d", "b", "unet", 0, "test", 0.90),
                      ("d", "b", "unet", 1, "val", 0.72), ("d", "b", "unet", 1, "test", 0.95)],
                     columns=["dataset", "encoder", "decoder", "seed", "split", "iou"])
    b = select_best(f)["d"]
    assert (b["encoder"], b["seed"], b["criterion"], b["value"], b["test_miou"]) == ("a", 0, "val mIoU", 0.8, 0.4)
    # mean over seeds decides the combination: b (0.71) loses to a (0.80) although b's test scores are higher
    f2 = f.copy(); f2.loc[f2["split"] == "val", "iou"] = np.nan
    assert select_best(f2)["d"]["criterion"] == "test mIoU" and select_best(f2)["d"]["seed"] == 1


def test_cli_bench_dir_best_job(run, tmp_path, capsys):
    from matseg.runs import write_summary
    prof, runs, jdir = run
    write_summary(runs)  # results.csv as `matseg bench` leaves it
    sel = best_jobs(runs)
    assert len(sel) == 1 and sel[0]["job_dir"] == str(jdir) and sel[0]["criterion"] == "val mIoU"
    assert cli_report([str(runs), "--profile", str(prof), "--no-ood", "--no-heatmaps", "--n-images", "1",
                       "--device", "cpu"]) == 0
    dest = runs / jdir.parent.name / "report"
    rec = json.loads((dest / "report.json").read_text())
    assert rec["selection"]["job_id"] == jdir.name and rec["qc"]["available"] is False
    page = (dest / "report.html").read_text()
    assert "Selected as the best of 1 jobs" in page and "val mIoU" in page
    assert str(dest / "report.html") in capsys.readouterr().out
    shutil.rmtree(dest)


def test_cli_exit_code(run, tmp_path):
    from conftest import run_matseg
    r = run_matseg("report", tmp_path / "nothing-here")
    assert r.returncode == 2 and str(tmp_path / "nothing-here") in r.stderr and "Traceback" not in r.stderr


@pytest.mark.browser
def test_report_renders_offline_in_chromium(run, report):
    "Open report.html from disk in headless chromium with every non-file request blocked: figures draw, nothing fetched."
    from pathlib import Path
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists(): pytest.skip(f"{chromium} not found: run `bash scripts/browser_setup.sh`")
    pw = pytest.importorskip("playwright.sync_api", reason="playwright missing: run `bash scripts/browser_setup.sh`")
    _, _, jdir = run
    page_path = jdir / "report" / "report.html"
    external, errors = [], []
    with pw.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            pg = b.new_page(viewport={"width": 1280, "height": 900})

            def route(r):
                if r.request.url.startswith(("file:", "data:", "blob:")): r.continue_()
                else: external.append(r.request.url); r.abort()
            pg.route("**/*", route)
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.goto(page_path.as_uri(), wait_until="load")
            pg.wait_for_function("document.querySelectorAll('.plotly-graph-div .main-svg').length >= 4", timeout=60000)
            n_images = pg.evaluate("document.querySelectorAll('#fig-masks image').length")
            art = Path(__file__).resolve().parents[1] / "test-artifacts"; art.mkdir(exist_ok=True)
            pg.screenshot(path=str(art / "report.png"), full_page=True)
        finally:
            b.close()
    assert external == [] and errors == []
    assert n_images == 2 * 4  # image, truth, prediction, heatmap for each shown image


@pytest.mark.slow
def test_real_super1_report(nasa, tmp_path):
    "One epoch on the real Super1 SEM set (palette masks, 512x512), then the full report."
    from matseg.core import asset_path
    from matseg.profile import compile_profile, load_profile
    from matseg.runs import train_job
    p = json.loads(asset_path("profiles", "sample.json").read_text())
    p.pop("$schema", None)
    p["datasets"][0].update(name="super1", root=str(nasa / "Super1"))
    p["model"] = {"encoders": ["resnet18"], "decoders": ["unet"], "weights": "none"}
    p["training"] = {"batch_size": 8, "max_epochs": 1, "crop_size": 128, "crops_per_image": 2, "tile_overlap": 32,
                     "seeds": [0], "amp": False}
    atomic_write_json(tmp_path / "profile.json", p)
    job = compile_profile(load_profile(tmp_path / "profile.json"))[0]
    train_job(job, tmp_path / "runs", device="cpu", progress=False)
    jdir = tmp_path / "runs" / "super1" / job.id
    rep = build_report(jdir, tmp_path / "profile.json", n_images=2, device="cpu", heatmap_size=128)
    assert rep["masks"]["n_images"] == 4 and rep["masks"]["classes"][0] == "gamma_matrix"
    assert rep["qc"]["available"] and rep["qc"]["tile"] == 256 and rep["qc"]["n_id_images"] == 14
    assert rep["qc"]["threshold"]["threshold"] is not None  # 7 held-out groups x 4 crops
    assert all(h.get("validation_ratio") is not None for h in rep["heatmaps"]["items"])
    assert external_refs((jdir / "report" / "report.html").read_text()) == []
