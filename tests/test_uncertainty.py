"""Uncertainty maps and calibration: oracles (torchmetrics, torch.distributions), BatchNorm frozen under MC dropout,
checkpoints rebuild the head, and jobs on (a crop of) the shipped Super1 sample report calibration end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torchmetrics.classification as tmc
import xarray as xr
from PIL import Image
from torch import nn

import matseg.runs as runs
from matseg.core import MatsegError, asset_path
from matseg.models import build_model, load_checkpoint, mc_dropout, save_checkpoint
from matseg.profile import apply_overrides, compile_profile, load_profile
from matseg.runs import TrainedJob, job_dir, train_job, write_summary
from matseg.train import Calibration, dirichlet_kl_uniform, evidential_loss, make_loss, predict_uncertainty_tiled
from matseg.uncertainty import cli_uncertainty

torch.set_num_threads(1)


def _as_image(p, t):  # (M, K), (M,) -> (1, K, M, 1), (1, M, 1)
    return p.T[None, :, :, None], t[None, :, None]


@pytest.mark.parametrize("seed,K,ignore", [(0, 2, None), (1, 3, None), (2, 5, 255), (3, 3, 255)])
def test_ece_streaming_matches_torchmetrics(seed, K, ignore):
    g = torch.Generator().manual_seed(seed)
    n = 6000
    p = (torch.randn(n, K, generator=g, dtype=torch.float64) * (1 + seed)).softmax(1)
    t = torch.randint(0, K, (n,), generator=g)
    if ignore is not None: t[torch.rand(n, generator=g) < 0.2] = ignore
    cal = Calibration(K, ignore_index=ignore)
    for i in range(0, n, 997): cal.update(*_as_image(p[i:i + 997], t[i:i + 997]))
    top = tmc.MulticlassCalibrationError(K, n_bins=15, norm="l1", ignore_index=ignore)(p, t).item()
    assert abs(cal.ece() - top) < 1e-6
    keep = t != ignore if ignore is not None else torch.ones(n, dtype=torch.bool)
    for k in range(K):
        ref = tmc.BinaryCalibrationError(n_bins=15, norm="l1")(p[keep, k], (t[keep] == k).long()).item()
        assert abs(cal.ece_per_class()[k] - ref) < 1e-6
    assert cal.n == int(keep.sum())


def test_ece_edge_cases_match_torchmetrics():
    # all confidences exactly 1 and right -> 0; exactly 1 and wrong -> 1; exactly on bin edges; float32 input
    one = torch.eye(3, dtype=torch.float64)[torch.tensor([0, 1, 2, 0])]
    right, wrong = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 1])
    assert Calibration(3).update(*_as_image(one, right)).ece() == 0.0
    assert Calibration(3).update(*_as_image(one, wrong)).ece() == 1.0
    edges = torch.linspace(0, 1, 16)[6:]  # float32 edges >= 0.4: still the top label of 2 classes
    p = torch.stack([edges, 1 - edges], 1).repeat(50, 1)
    t = torch.randint(0, 2, (len(p),), generator=torch.Generator().manual_seed(0))
    ref = tmc.MulticlassCalibrationError(2, n_bins=15, norm="l1")(p, t).item()
    assert abs(Calibration(2).update(*_as_image(p, t)).ece() - ref) < 1e-6


@pytest.mark.parametrize("kind", ["continuous", "heavy ties", "constant", "perfect", "inverted"])
def test_auroc_matches_binary_auroc(kind):
    g = torch.Generator().manual_seed(7)
    n = 4000
    p = torch.rand(n, 3, generator=g, dtype=torch.float64).softmax(1)
    t = torch.randint(0, 3, (n,), generator=g)
    wrong = p.argmax(1) != t
    u = {"continuous": torch.rand(n, generator=g, dtype=torch.float64),
         "heavy ties": torch.randint(0, 3, (n,), generator=g).double(),
         "constant": torch.zeros(n, dtype=torch.float64),
         "perfect": wrong.double(), "inverted": (~wrong).double()}[kind]
    cal = Calibration(3).update(p.T[None, :, :, None], t[None, :, None], u[None, :, None])
    ref = tmc.BinaryAUROC()(u, wrong.long()).item()
    assert abs(cal.auroc() - ref) < 1e-6
    if kind == "constant": assert cal.auroc() == 0.5
    if kind == "perfect": assert cal.auroc() == 1.0


def test_auroc_sample_is_uniform_and_capped():
    # a score that separates errors perfectly only in the second half of the stream: over the whole stream
    # P(score_wrong > score_right) = 1/4 * (1/2 + 1 + 1 + 1) = 0.875; a capped uniform sample sees both halves in
    # proportion, one that kept only the first (0.5) or the last pixels (1.0) would not
    g = torch.Generator().manual_seed(3)
    cal = Calibration(2, max_pixels=4000)
    for half in range(2):
        for _ in range(5):
            t = torch.randint(0, 2, (2000,), generator=g)
            p = torch.full((2000, 2), 0.5, dtype=torch.float64); p[:, 0] = 0.6  # always predicts class 0
            wrong = t != 0
            u = wrong.double() if half else torch.rand(2000, generator=g, dtype=torch.float64)
            cal.update(p.T[None, :, :, None], t[None, :, None], u[None, :, None])
    assert cal.n == 20000 and cal.result()["auroc_pixels"] == 4000
    assert 0.85 < cal.auroc() < 0.90


def test_dirichlet_kl_and_evidential_loss():
    a = torch.rand(3, 4, 5, 5, dtype=torch.float64) * 10 + 0.05
    ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(a.movedim(1, -1)),
                                            torch.distributions.Dirichlet(torch.ones(4, dtype=torch.float64)))
    assert torch.allclose(dirichlet_kl_uniform(a), ref, atol=1e-8)
    assert torch.allclose(dirichlet_kl_uniform(torch.ones(2, 3, 1, 1)), torch.zeros(2, 1, 1), atol=1e-6)  # Dir(1) vs itself
    z = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randint(0, 3, (2, 8, 8)); t[0, :2] = 255
    loss = evidential_loss(z, t, 0.5, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad[0, :, :2].abs().max() == 0  # ignored: no gradient


@pytest.mark.parametrize("decoder", ["unet", "fpn", "deeplabv3plus", "unetplusplus"])
def test_mc_dropout_only_dropout_stochastic(decoder):
    torch.manual_seed(0)
    m = build_model("resnet18", decoder, in_channels=1, classes=3, dropout=0.4, decoder_dropout=True)
    m.train()  # mc_dropout must put everything else in eval mode, whatever the flags were
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad(), mc_dropout(m):
        assert all(not b.training for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm))
        a, b = m(x), m(x)
    assert not torch.equal(a, b)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # running statistics never change
    assert m.training  # flags restored
    p0 = build_model("resnet18", decoder, in_channels=1, classes=3).eval()
    u = predict_uncertainty_tiled(p0, torch.rand(1, 64, 64), 3, 64, 0, "mc", samples=5)
    assert float(u["variance"].max()) == 0 and float(u["mutual_information"].max()) < 1e-5


def test_checkpoint_rebuilds_head_and_refuses_bad_ones(tmp_path):
    m = build_model("resnet18", "unet", in_channels=1, classes=2, dropout=0.3, decoder_dropout=True,
                    head="evidential", temperature=0.7)
    ck = save_checkpoint(tmp_path / "checkpoint.safetensors", m, {"class_names": ["a", "b"]})
    m2, meta = load_checkpoint(ck)
    assert m2.matseg_head == m.matseg_head and len(m2.matseg_dropout) == len(m.matseg_dropout) == 6
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad(): assert torch.equal(m.eval()(x), m2(x))
    side = json.loads(ck.with_suffix(".json").read_text())
    for bad, why in (({"kind": "softmax", "extra": 1}, "unknown"), ({"temperature": -1}, "> 0"),
                     ({"decoder_dropout": "yes"}, "true or false"), ("dropout", "must be a dict")):
        ck.with_suffix(".json").write_text(json.dumps({**side, "head": bad}))
        with pytest.raises(MatsegError, match=why): load_checkpoint(ck)
    old = {k: v for k, v in side.items() if k != "head"}  # a sidecar of an older matseg: the plain model
    ck.with_suffix(".json").write_text(json.dumps(old))
    assert load_checkpoint(ck)[0].matseg_head["dropout"] == 0.0


def test_loss_refuses_silent_options():
    with pytest.raises(MatsegError, match="ce\\+dice"): make_loss("dice", head="evidential")
    with pytest.raises(MatsegError, match="ce\\+dice"): make_loss("dice", uncertainty=True)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    "The shipped sample profile on 128-pixel centre crops of a few of its images."
    tmp = tmp_path_factory.mktemp("unc")
    src = asset_path("sample", "super1")
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        for sub in (split, f"{split}_annot"): (tmp / "super1" / sub).mkdir(parents=True)
        for img in sorted((src / split).glob("*.png"))[:n]:
            for path, sub in ((img, split), (src / f"{split}_annot" / f"{img.stem}_mask.png", f"{split}_annot")):
                im = Image.open(path); w, h = im.size
                im.crop((w // 2 - 64, h // 2 - 64, w // 2 + 64, h // 2 + 64)).save(tmp / "super1" / sub / path.name)
    d = json.loads(asset_path("profiles", "sample.json").read_text())
    d.pop("$schema", None); d["datasets"][0]["root"] = "super1"
    (tmp / "mini.json").write_text(json.dumps(d))
    return tmp


TINY = ["model.encoders=[\"resnet18\"]", "model.decoders=[\"unet\"]", "model.weights=none", "training.max_epochs=2",
        "training.crop_size=64", "training.crops_per_image=2", "training.batch_size=4", "training.tile_overlap=16"]


def test_jobs_on_the_sample_report_calibration_and_the_cli_writes_maps(mini, monkeypatch):
    monkeypatch.setattr(runs, "MC_SAMPLES", 4)
    out = mini / "run"
    prof = apply_overrides(load_profile(mini / "mini.json"),
                           TINY + ["training.head=evidential", "training.temperature_scaling=true",
                                   "training.uncertainty_loss=true", "training.evidential_anneal=2"])
    job = compile_profile(prof)[0]
    r = train_job(job, out, device="cpu", progress=False, profile_name="mini")
    t = r["metrics"]["test"]
    assert r["status"] == "done" and t["uncertainty_method"] == "evidential" and t["uncertainty_measure"] == "vacuity"
    assert 0 <= t["ece"] <= 1 and 0 <= t["ece_temperature"] <= 1 and 0 <= t["uncertainty_auroc"] <= 1
    assert r["temperature"]["nll_after"] <= r["temperature"]["nll_before"] + 1e-9
    side = json.loads((job_dir(out, job) / "checkpoint.json").read_text())
    assert side["head"]["kind"] == "evidential" and side["head"]["temperature"] == r["temperature"]["temperature"]
    tj = TrainedJob.open(job_dir(out, job), profile=prof, device="cpu")
    assert tj.model.matseg_head == side["head"]
    cal = tj.calibrate("test")  # the job's own reader reproduces the recorded (after-temperature) ECE
    assert abs(cal["ece"] - t["ece_temperature"]) < 1e-6
    frame = __import__("pandas").read_csv(write_summary(out)["csv"])
    row = frame[frame["split"] == "test"].iloc[0]
    assert math.isclose(row["ece"], t["ece"], rel_tol=1e-9) and math.isclose(row["ece_temperature"], t["ece_temperature"], rel_tol=1e-9)
    assert frame.loc[frame["split"] == "val", "ece"].isna().all()
    img = sorted((mini / "super1" / "test").glob("*.png"))[0]
    maps = mini / "maps"
    assert cli_uncertainty([str(job_dir(out, job)), str(img), "--out", str(maps), "--device", "cpu"]) == 0
    ds = xr.load_dataset(maps / f"{img.stem}.nc", engine="h5netcdf")
    assert dict(ds.sizes) == {"y": 128, "x": 128} and ds.attrs["method"] == "evidential"
    assert {"vacuity", "entropy", "prediction", "mean_prob_gamma_matrix"} <= set(ds.data_vars)
    assert float(ds["vacuity"].min()) > 0 and float(ds["vacuity"].max()) <= 1
    assert (maps / f"{img.stem}_vacuity.png").is_file()
    summary = json.loads((maps / "uncertainty.json").read_text())
    assert abs(summary["images"][str(img)]["mean_vacuity"] - float(ds["vacuity"].mean())) < 1e-6
    with pytest.raises(MatsegError, match="training.dropout > 0"):
        cli_uncertainty([str(job_dir(out, job)), str(img), "--method", "mc", "--out", str(maps)])
    with pytest.raises(SystemExit):  # --out is a file: refused when parsed, before anything is computed
        cli_uncertainty([str(job_dir(out, job)), str(img), "--out", str(img)])


def test_mc_dropout_job_on_the_sample(mini, monkeypatch):
    monkeypatch.setattr(runs, "MC_SAMPLES", 4)
    out = mini / "run_mc"
    prof = apply_overrides(load_profile(mini / "mini.json"), TINY + ["training.dropout=0.3", "training.max_epochs=1"])
    job = compile_profile(prof)[0]
    r = train_job(job, out, device="cpu", progress=False)
    t = r["metrics"]["test"]
    assert t["uncertainty_method"] == "mc" and r["calibration"]["test"]["samples"] == 4 and "ece_temperature" not in t
    tj = TrainedJob.open(job_dir(out, job), profile=prof, device="cpu")
    d = tj.load_split("test")
    maps = tj.uncertainty(d["x"][0], samples=4)
    assert maps["mutual_information"].shape == (128, 128) and float(maps["mutual_information"].max()) > 0
    assert bool((maps["mutual_information"] <= maps["entropy"] + 1e-5).all())
