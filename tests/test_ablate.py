"The ablation runner (matseg.ablate): variants, liveness, statistics against scipy and known answers, end to end."
import json
import math
import shutil

import numpy as np
import pytest
import xarray as xr
from scipy import stats

from matseg import ablate as A
from matseg.core import MatsegError, asset_path
from matseg.profile import apply_overrides, load_profile

SAMPLE = asset_path("profiles", "sample.json")
NOT_WIRED = "sampler = CropSampler(xtr, ytr, size)\nmodel = build_model(job.encoder, job.decoder)"
WIRED = "sampler = make_sampler(tr.sampling, xtr, ytr)\nloss = make_loss(uncertainty=getattr(tr, 'uncertainty_loss'))\n" \
        "model = build_model(dropout=tr.dropout, head=tr.head)"


@pytest.fixture(scope="module")
def sample():
    return load_profile(SAMPLE)


def test_variants_compile_to_documented_overrides(sample):
    want = {"full": [], "-sampling": ["training.sampling=uniform"],
            "-uncertainty": ["training.uncertainty_loss=false", "training.dropout=0", "training.head=softmax"],
            "-augment": ["training.augment=false"], "-class_weights": ["training.class_weights=false"],
            "-pretraining": ["model.weights=none"]}
    for name, ov in want.items(): assert list(A.get_variant(name).overrides) == ov
    prof = apply_overrides(sample, ["training.sampling=adaptive", "training.uncertainty_loss=true", "training.dropout=0.2",
                                    "training.head=evidential", "training.class_weights=true"])
    plan = A.plan_variants(prof, ["-sampling", "-uncertainty", "-augment", "-class_weights", "-pretraining",
                                  "training.lr=0.0005"], source=WIRED)
    assert [p["name"] for p in plan][0] == "full" and len({p["slug"] for p in plan}) == len(plan)
    eff = {p["name"]: p["profile"] for p in plan}
    assert eff["full"].training.sampling == "adaptive" and eff["-sampling"].training.sampling == "uniform"
    t = eff["-uncertainty"].training
    assert (t.uncertainty_loss, t.dropout, t.head) == (False, 0.0, "softmax")
    assert eff["-augment"].training.augment is False and eff["-class_weights"].training.class_weights is False
    assert eff["-pretraining"].model.weights == "none" and eff["training.lr=0.0005"].training.lr == 0.0005
    # nothing else changes: every variant keeps the datasets, models and seeds of full
    for p in plan:
        assert p["profile"].training.seeds == prof.training.seeds and p["profile"].model.encoders == prof.model.encoders
    assert A.variant_slug("-sampling") == "without-sampling" and "/" not in A.variant_slug("training.lr=1/2")


def test_unknown_and_pairing_breaking_variants(sample):
    with pytest.raises(MatsegError) as e: A.plan_variants(sample, ["-dropout"])
    for v in A.VARIANTS: assert v in str(e.value)
    assert "KEY=VALUE" in str(e.value)
    for bad in ("training.seeds=[3]", "model.encoders=[\"resnet18\"]", "datasets.0.root=x", "task.metrics=[]"):
        with pytest.raises(MatsegError, match="cannot vary"): A.plan_variants(sample, [bad])
    with pytest.raises(MatsegError, match="twice"): A.plan_variants(sample, ["-augment", "-augment"])
    with pytest.raises(MatsegError, match="at least one"): A.plan_variants(sample, ["full"])


def test_not_live_variant_refused_and_live_after_wiring(sample):
    prof = apply_overrides(sample, ["training.sampling=rare_class", "training.uncertainty_loss=true",
                                    "training.dropout=0.1", "training.head=evidential"])
    for name, field in (("-sampling", "training.sampling"), ("-uncertainty", "training.uncertainty_loss")):
        with pytest.raises(MatsegError, match="not available") as e: A.plan_variants(prof, [name], source=NOT_WIRED)
        assert field in str(e.value) and "not used by matseg.runs.train_job" in str(e.value)
        assert A.plan_variants(prof, [name], source=WIRED)[1]["name"] == name  # the same call once train_job reads it
    # -compression trains nothing: it is planned (no no-op refusal) and made from full's finished jobs
    assert [(p["name"], p["compress"]) for p in A.plan_variants(prof, ["-compression"], source=NOT_WIRED)] == [
        ("full", False), ("-compression", True)]
    # a flag the integrator flips also makes it live
    old = A.WIRED["training.sampling"]
    try:
        A.WIRED["training.sampling"] = True
        assert A.plan_variants(prof, ["-sampling"], source=NOT_WIRED)[1]["overrides"] == ["training.sampling=uniform"]
    finally: A.WIRED["training.sampling"] = old
    assert A.feature_live("training.lr", NOT_WIRED) and A.feature_live("training.augment", "")  # baseline fields


def test_no_op_variant_refused(sample):
    with pytest.raises(MatsegError, match="changes nothing"): A.plan_variants(sample, ["-sampling"], source=WIRED)
    with pytest.raises(MatsegError, match="changes nothing"): A.plan_variants(sample, [f"training.lr={sample.training.lr}"])


def test_paired_delta_matches_scipy_and_hand():
    g = np.random.default_rng(1)
    full = 0.6 + 0.03 * g.standard_normal(7)
    var = full + 0.01 + 0.02 * g.standard_normal(7)
    r = A.paired_delta(var, full); d = var - full
    assert r["n"] == 7 and math.isclose(r["delta"], d.mean())
    assert math.isclose(r["p_value"], stats.ttest_rel(var, full).pvalue)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(7))
    assert math.isclose(r["p_value"], 2 * stats.t.sf(abs(t), 6))
    h = stats.t.ppf(0.975, 6) * d.std(ddof=1) / math.sqrt(7)
    assert math.isclose(r["ci_low"], d.mean() - h) and math.isclose(r["ci_high"], d.mean() + h)
    assert math.isclose(r["p_wilcoxon"], stats.wilcoxon(var, full).pvalue)  # n = 7 >= 6
    assert math.isnan(A.paired_delta(var[:5], full[:5])["p_wilcoxon"])  # n = 5: the exact test cannot reach 0.05
    assert 2 * 0.5 ** 5 > 0.05 and 2 * 0.5 ** 6 < 0.05  # why 6: the smallest two-sided Wilcoxon p at n is 2 / 2^n


def test_null_not_significant_at_the_nominal_rate_and_clear_delta_is():
    g = np.random.default_rng(0)
    for n in (3, 5):
        fp = 0
        for _ in range(1000):
            seed_luck = 0.05 * g.standard_normal(n)  # shared by both variants (paired)
            full, var = 0.6 + seed_luck + 0.01 * g.standard_normal(n), 0.6 + seed_luck + 0.01 * g.standard_normal(n)
            fp += A.paired_delta(var, full)["p_value"] < 0.05
        assert 0.03 < fp / 1000 < 0.07, (n, fp / 1000)  # equal variants: significant only at the test's level
    full = 0.6 + 0.05 * g.standard_normal(3)
    r = A.paired_delta(full - 0.04 + 0.005 * g.standard_normal(3), full)
    assert r["p_value"] < 0.05 and r["verdict"] == "worse (n = 3)" and r["ci_high"] < 0
    assert A.paired_delta(full, full)["verdict"].startswith("no resolvable change")
    assert A.paired_delta([0.5], [0.4])["verdict"].startswith("unknown")
    assert A.paired_delta([0.5, math.nan, 0.6, 0.7], [0.4, 0.5, math.nan, 0.6])["n"] == 2


def test_noise_floor_is_full_vs_full_spread():
    f = np.array([0.61, 0.58, 0.66, 0.6])
    pairs = [(a - b) ** 2 for i, a in enumerate(f) for b in f[i + 1:]]
    nf = A.noise_floor(f)
    assert nf["n_pairs"] == 6 and math.isclose(nf["noise_floor"], math.sqrt(np.mean(pairs)))
    assert math.isclose(nf["noise_floor"], math.sqrt(2) * f.std(ddof=1))
    assert math.isnan(A.noise_floor([0.5])["noise_floor"])


def _result(dataset, seed, crack, miou_shift=0.0):
    iou = [0.9, 0.6 + miou_shift, crack]
    m = {"miou": float(np.mean(iou[1:])), "dice": 0.7, "pixel_accuracy": 0.9, "wiou": 0.8, "boundary_f1": 0.5, "iou": iou}
    return {"dataset": dataset, "encoder": "resnet18", "decoder": "unet", "seed": seed, "metrics": {"test": m},
            "classes": ["background", "oxide", "crack"], "epochs": 1, "best_epoch": 1, "train_seconds": 1.0,
            "params": 1, "infer_ms": 1.0, "weights": "none", "device": "cpu"}


def test_ablation_dataset_on_known_numbers(tmp_path):
    luck = {0: 0.0, 1: 0.05, 2: -0.03}
    res = {"full": [_result(d, s, 0.3 + luck[s]) for d in ("ebc2", "super1") for s in luck],
           "-sampling": [_result(d, s, 0.2 + luck[s]) for d in ("ebc2", "super1") for s in luck],
           "training.lr=0.01": [_result("ebc2", s, 0.3 + luck[s]) for s in (0, 1)]}  # super1 and seed 2 missing
    ds = A.ablation_dataset(res)
    c = ds.sel(model="resnet18+unet", metric="iou_crack")
    assert np.allclose(c["delta"].sel(variant="-sampling"), -0.1)
    assert np.allclose(c["delta_mean"].sel(variant="-sampling"), -0.1)
    assert (c["p_value"].sel(variant="-sampling") == 0).all()  # every seed exactly 0.1 lower: no spread, exact
    assert list(c["n"].sel(variant="training.lr=0.01").values) == [2, 0]
    assert c["verdict"].sel(variant="training.lr=0.01", dataset="super1").item() == "no data"
    assert np.isclose(float(c["noise_floor"].sel(dataset="ebc2")), math.sqrt(2) * np.std([0.3, 0.35, 0.27], ddof=1))
    paths = A.write_ablation(ds, tmp_path, {"-sampling": ["training.sampling=uniform"]}, metric="iou_crack")
    back = xr.load_dataset(paths["nc"], engine="h5netcdf")
    xr.testing.assert_allclose(back["delta_mean"], ds["delta_mean"])
    md = paths["md"].read_text()
    assert "n = 0, 2, 3" in md and "paired t" in md and "noise floor" in md
    assert "plotly" in paths["html"].read_text()[:20000].lower()
    with pytest.raises(MatsegError, match="metric"): A.ablation_figure(ds, "iou_pore")
    moved = A.ablation_dataset({k: res[k] for k in ("-sampling", "full", "training.lr=0.01")})  # full need not come first
    xr.testing.assert_allclose(moved["delta_mean"].sel(variant="-sampling"), ds["delta_mean"].sel(variant="-sampling"))
    assert (moved["delta_mean"].sel(variant="full") == 0).all()


def small_sample(tmp):
    "The shipped sample profile over one image per split of the shipped sample (copied), to keep CI fast."
    src = SAMPLE.parent / json.loads(SAMPLE.read_text())["datasets"][0]["root"]
    for split in ("train", "val", "test"):
        img = sorted((src / split).iterdir())[0]
        for d, f in ((split, img), (f"{split}_annot", src / f"{split}_annot" / f"{img.stem}_mask{img.suffix}")):
            (tmp / "data" / d).mkdir(parents=True, exist_ok=True); shutil.copy(f, tmp / "data" / d / f.name)
    prof = json.loads(SAMPLE.read_text()); prof.pop("$schema", None)
    prof["datasets"][0]["root"] = str(tmp / "data")
    (tmp / "sample.json").write_text(json.dumps(prof))
    return tmp / "sample.json"


def test_ablate_end_to_end_on_the_sample(tmp_path, monkeypatch):
    "full vs -augment on the shipped sample (one image per split), 2 seeds x 1 epoch at 64 px, through run_bench (papermill)."
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prof = small_sample(tmp_path)
    sets = ['model.encoders=["resnet18"]', 'model.decoders=["unet"]', "model.weights=none", "training.crop_size=64",
            "training.crops_per_image=4", "training.batch_size=4",
            "training.max_epochs=1", "training.tile_overlap=0",
            "training.seeds=[0,1]"]
    argv = [str(prof), "--out", str(tmp_path / "abl"), "--variants", "full,-augment", "--device", "cpu",
            "--metric", "iou_tertiary_gamma_prime", *[x for s in sets for x in ("--set", s)]]
    assert A.cli_ablate(argv) == 0
    out = tmp_path / "abl"
    for v in ("full", "without-augment"):
        assert (out / "variants" / v / "super1-sample" / "benchmark.ipynb").is_file()  # papermill record per variant
        assert (out / "variants" / v / "results.nc").exists()
    ds = xr.load_dataset(out / "ablation.nc", engine="h5netcdf")
    assert list(ds["variant"].values) == ["full", "-augment"] and list(ds["seed"].values) == [0, 1]
    assert ds["score"].sel(metric="iou").notnull().all() and (ds["n"].sel(variant="-augment", metric="iou") == 2).all()
    d = ds["score"].sel(variant="-augment") - ds["score"].sel(variant="full")
    assert np.allclose(ds["delta"].sel(variant="-augment"), d, equal_nan=True)
    plan = json.loads((out / "ablation.json").read_text())
    assert [v["overrides"] for v in plan["variants"]] == [[], ["training.augment=false"]]
    before = {p: p.stat().st_mtime_ns for p in out.glob("variants/*/super1-sample/*/result.json")}
    assert len(before) == 4
    assert A.cli_ablate(argv) == 0  # resumes: every job reused, nothing retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("variants/*/super1-sample/*/result.json")} == before
