"""Widgets driven headless: set values, click buttons, read state; metrics against scikit-learn."""
import json
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import run_matseg
from plotly.callbacks import BoxSelector, LassoSelector
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from matseg.core import MatsegError, asset_path
from matseg.profile import load_profile, parse_profile, profile_to_dict
from matseg.widgets import (CounterfactualExplorer, OODViewer, ProfileBuilder, TrainLauncher, builder_state_to_profile_dict,
                            figure_to_png, profile_to_builder_state, readouts_html, selection_to_region, threshold_readouts,
                            validate_dict)

SAMPLE = asset_path("profiles", "sample.json")


def test_state_round_trip_keeps_hidden_fields():
    d = json.loads(SAMPLE.read_text())
    d["datasets"][0]["normalization"] = {"kind": "percentile", "low": 2, "high": 98}
    d["training"]["loss"] = "dice"
    back = builder_state_to_profile_dict(profile_to_builder_state(d))
    assert back["datasets"][0]["normalization"] == {"kind": "percentile", "low": 2, "high": 98}
    assert back["training"]["loss"] == "dice" and back["datasets"][0]["metadata"] == d["datasets"][0]["metadata"]
    assert parse_profile(back).model_dump() == parse_profile(d).model_dump()


def test_validate_dict_matches_cli(tmp_path):
    d = json.loads(SAMPLE.read_text())
    d["datasets"][0]["root"] = "no/such/folder"
    d["datasets"][0]["modality"] = "TEM"
    d["training"]["crop_size"] = 100
    f = tmp_path / "bad.json"; f.write_text(json.dumps(d))
    prof, errs = validate_dict(d, tmp_path)
    assert prof is None and {e["path"] for e in errs} == {"datasets[0].modality", "training.crop_size"}
    cli = run_matseg("validate", f)
    assert cli.returncode == 2
    for e in errs: assert e["path"] in cli.stderr and e["message"] in cli.stderr
    d["datasets"][0]["modality"], d["training"]["crop_size"] = "SEM", 128
    prof, errs = validate_dict(d, tmp_path)  # structurally valid: only the missing folder remains, as in the CLI
    f.write_text(json.dumps(d)); cli = run_matseg("validate", f)
    assert prof is not None and [e["path"] for e in errs] == ["datasets[0].root"] and "datasets[0].root" in cli.stderr


def test_builder_edits_validate_and_save(tmp_path):
    shutil.copytree(asset_path("sample"), tmp_path / "sample")
    (tmp_path / "profiles").mkdir(); shutil.copy(SAMPLE, tmp_path / "profiles" / "sample.json")
    b = ProfileBuilder(tmp_path / "profiles" / "sample.json")
    assert b.errors == [] and "2 jobs" in b.status.value
    b.w["crop_size"].value = 100
    assert b.profile is None and "training.crop_size" in b.status.value and "multiple of 32" in b.status.value
    b.w["crop_size"].value = 64
    b.w["encoders"].value = ("resnet18", "timm-tf_efficientnet_lite0")
    b.w["seeds"].value = "0, 1"
    assert b.profile is not None and "8 jobs" in b.status.value and b.jobs.value.count("<tr>") == 9
    b._pickers["tertiary_gamma_prime"].value = "#00ff00"
    assert b.profile_dict()["datasets"][0]["mask_encoding"]["colors"]["tertiary_gamma_prime"] == [0, 255, 0]
    b.w["root"].value = "nowhere"
    assert "datasets[0].root" in b.status.value and b.profile is not None  # the grid still shows
    b.w["root"].value = "../sample/super1"
    out = tmp_path / "profiles" / "edited.json"
    b.file.value = str(out); b.save_button.click()
    assert "saved" in b.message.value, b.message.value
    p = load_profile(out)
    assert p.training.crop_size == 64 and p.training.seeds == [0, 1] and p.model.encoders == ["resnet18", "timm-tf_efficientnet_lite0"]
    assert p.datasets[0].mask_encoding.colors["tertiary_gamma_prime"] == [0, 255, 0]
    b2 = ProfileBuilder(); b2.file.value = str(out); b2.load_button.click()
    assert profile_to_dict(parse_profile(b2.profile_dict())) == profile_to_dict(p) and b2.errors == []
    b2.file.value = str(tmp_path / "missing.json"); b2.load_button.click()
    assert "does not exist" in b2.message.value


def test_builder_palette_pickers_follow_classes():
    b = ProfileBuilder(SAMPLE)
    b.w["classes"].value = "matrix, precipitate"
    assert list(b._pickers) == ["matrix", "precipitate"]
    enc = b.profile_dict()["datasets"][0]["mask_encoding"]
    assert set(enc["colors"]) == {"matrix", "precipitate"} and "default_class" not in enc  # old names are gone
    assert b.w["default_class"].value is None and b.profile is not None
    b._pickers["matrix"].value = b._pickers["precipitate"].value = "#123456"
    assert enc != b.profile_dict()["datasets"][0]["mask_encoding"]
    b.w["mask_kind"].value = "index"
    assert b.palette_box.children == () and b.profile is not None


def test_builder_sample_on_real_data(nasa, tmp_path):
    d = json.loads(SAMPLE.read_text())
    d["datasets"][0]["root"] = str(nasa / "Super1")
    b = ProfileBuilder(d)
    assert b.errors == [], b.errors
    fig = b.show_sample(0)
    img, mask = fig.data[0].z, fig.data[1].z
    assert img.shape == mask.shape == (512, 512) and set(np.unique(mask)) == {0, 1, 2}


@pytest.mark.parametrize("t", [-1.0, 0.0, 0.7, 2.5])
def test_threshold_readouts_vs_sklearn(t):
    rng = np.random.default_rng(1)
    ids, tests = rng.normal(1, 1, 300), rng.normal(-0.5, 1, 120)
    r = threshold_readouts(ids, tests, t)
    y, s = np.r_[np.ones(300), np.zeros(120)], np.r_[ids, tests]
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert r["precision"] == pytest.approx(precision_score(y, s >= t, zero_division=0))
    assert r["recall"] == pytest.approx(recall_score(y, s >= t))
    assert r["f1"] == pytest.approx(f1_score(y, s >= t))
    assert r["n_flagged"] == (tests < t).sum() and r["pass_rate"] == pytest.approx((tests >= t).mean())
    assert r["separable"] is False  # AUROC ~0.85 < 0.95


def test_separable_flag_has_its_honest_name():
    "A separated test set is 'separable' (shifted), never 'READY'; the same distribution is not separable."
    assert threshold_readouts([5, 6, 7], [0, 1], 3)["separable"] is True
    assert threshold_readouts([5, 6, 7], [0, 6.5], 3, deployment_threshold=0.95)["separable"] is False
    rng = np.random.default_rng(2)
    assert threshold_readouts(rng.normal(size=400), rng.normal(size=400), 0.0)["separable"] is False
    assert "READY" not in readouts_html(threshold_readouts([5, 6, 7], [0, 1], 3)).replace("VALIDATED", "")


def test_ood_viewer_slider_updates_readouts():
    rng = np.random.default_rng(0)
    ids, tests = rng.normal(1, 1, 50), rng.normal(-1, 1, 20)
    v = OODViewer(ids, tests, test_images=rng.random((20, 8, 8)), test_names=[f"t{i}" for i in range(20)], n_thumbs=4)
    assert v.slider.value == pytest.approx(np.quantile(ids, 0.05))
    before = v.readout.value
    v.slider.value = 0.5
    assert v.readout.value != before and v.figure.layout.shapes[0].x0 == pytest.approx(0.5)
    flagged = [("#c22" in c.layout.border) for c in v.thumbs.children]
    lowest = np.sort(tests)[:4]
    assert flagged == list(lowest < v.slider.value)
    assert f"t{int(np.argmin(tests))}" in v.thumbs.children[0].children[1].value


def test_selection_to_region():
    m = selection_to_region(BoxSelector(xrange=[2.6, 5.1], yrange=[0.4, 1.6]), (4, 8))
    expect = np.zeros((4, 8), bool); expect[1, 3:6] = True
    assert (m == expect).all()
    assert (selection_to_region({"x": [5.1, 2.6], "y": [1.6, 0.4]}, (4, 8)) == expect).all()
    assert selection_to_region({"x": [-10, 100], "y": [-10, 100]}, (4, 8)).all()  # clipped to the image
    sq = selection_to_region(LassoSelector(xs=[0.5, 2.5, 2.5, 0.5], ys=[0.5, 0.5, 2.5, 2.5]), (4, 8))
    assert sq.sum() == 4 and sq[1:3, 1:3].all()
    with pytest.raises(MatsegError, match="cannot turn selection"): selection_to_region("nonsense", (4, 8))
    with pytest.raises(MatsegError, match="shape"): selection_to_region(np.ones((3, 3), bool), (4, 8))


def _toy_profile(epochs):
    return parse_profile(dict(
        name="toy", datasets=[dict(name="toy", modality="other", material="synthetic", root=".", classes=["matrix", "disc", "band"])],
        task=dict(objective="find discs"), model=dict(encoders=["resnet18"], decoders=["unet"], weights="none"),
        training=dict(batch_size=4, max_epochs=epochs, crop_size=64, crops_per_image=1, tile_overlap=0, amp=False)))


def _toy_data():
    import xarray as xr
    rng = np.random.default_rng(0); yy, xx = np.mgrid[:64, :64]
    masks = np.zeros((8, 64, 64), np.uint8)
    for i in range(8):
        cy, cx = rng.integers(12, 52, 2); masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 < 60] = 1; masks[i, 5 * i:5 * i + 4] = 2
    img = (masks / 2 + rng.normal(0, 0.05, masks.shape)).astype(np.float32)
    return xr.Dataset({"image": (("sample", "channel", "y", "x"), img[:, None]), "mask": (("sample", "y", "x"), masks)},
                      coords={"sample": [f"s{i}" for i in range(8)], "split": ("sample", ["train"] * 4 + ["val"] * 2 + ["test"] * 2),
                              "channel": ["intensity"]}, attrs={"name": "toy", "classes": json.dumps(["matrix", "disc", "band"])})


def test_train_launcher_stop_and_resume(tmp_path):
    tl = TrainLauncher(_toy_profile(3), tmp_path, device="cpu", data={"toy": _toy_data()})
    jid = "toy__resnet18__unet__s0"
    tl.start_button.click()
    t0 = time.time()
    while not tl.history.get(jid) and time.time() - t0 < 120: time.sleep(0.02)
    tl.stop_button.click()
    res = tl.wait(120)
    assert res[0]["status"] == "stopped" and 1 <= res[0]["epochs"] < 3, res
    jdir = tmp_path / "toy" / jid
    assert (jdir / "state.pt").exists() and (jdir / "checkpoint.safetensors").exists() and not (jdir / "result.json").exists()
    assert "stopped" in tl.status.value and not tl.start_button.disabled and tl.stop_button.disabled
    n_done = len(tl.history[jid])
    tl.start_button.click(); res = tl.wait(300)
    assert res[0]["status"] == "done" and res[0]["epochs"] == 3 and (jdir / "result.json").exists()
    assert [r["epoch"] for r in tl.history[jid]] == list(range(1, 4))  # resumed, not restarted
    miou = [y for t in tl.figure.data if t.name == f"{jid} val mIoU" for y in t.y]
    assert len(miou) == 3 and miou == [r["val_miou"] for r in tl.history[jid]]


class _Copy(torch.nn.Module):
    "Logits = 10 x the 3-channel input: the prediction at a pixel depends only on that pixel."
    def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.ones(1))
    def forward(self, x): return x * 10 * self.w


def test_counterfactual_explorer_is_local():
    img = np.zeros((3, 32, 32), np.float32); img[1, 8:16, 8:16] = 1  # class 1 square, class 0 elsewhere
    ce = CounterfactualExplorer(_Copy(), img, ["a", "b", "c"], kernel="occlude", patch=4, stride=4)
    assert (ce.pred[8:16, 8:16] == 1).all() and ce.pred[0, 0] == 0
    ce.mode.value = 1
    assert ce.region.sum() == 64 and "predicted b" in ce.status.value
    ce.compute_button.click()
    h = ce.heatmap
    assert h is not None, ce.status.value
    cy, cx = np.meshgrid(np.asarray(h.y), np.asarray(h.x), indexing="ij")
    touching = (np.abs(cy - 11.5) < 6) & (np.abs(cx - 11.5) < 6)  # patches overlapping the 8..15 square
    assert (h.values[~touching] == 0).all() and (h.values[touching] > 0).all()
    ce.mode.value = 2
    assert "predicted nowhere" in ce.status.value
    ce._on_selection(None, None, BoxSelector(xrange=[20, 23], yrange=[20, 23]))
    assert ce.region.sum() == 16 and ce.region[20:24, 20:24].all()


def test_figure_to_png(tmp_path):
    pytest.importorskip("kaleido", reason="kaleido not installed (scripts/browser_setup.sh installs it)")
    if not shutil.which("chromium"): pytest.skip("no chromium on PATH (scripts/browser_setup.sh installs it)")
    import plotly.graph_objects as go
    p = figure_to_png(go.Figure(go.Bar(y=[1, 3, 2])), tmp_path / "f.png", width=300, height=200)
    from PIL import Image
    assert Image.open(p).size == (300, 200)



def test_train_launcher_on_a_cluster(tmp_path):
    "With a dask client the launcher submits the grid as tasks and shows each job's status (issue 12)."
    from conftest import write_toy_dataset
    from distributed import Client, LocalCluster
    write_toy_dataset(tmp_path / "data")
    prof = parse_profile(dict(
        name="toy", datasets=[dict(name="toy", modality="SEM", material="synthetic", root=str(tmp_path / "data"),
                                   classes=["matrix", "disc", "band"])],
        task=dict(objective="find discs"), model=dict(encoders=["resnet18"], decoders=["unet"], weights="none"),
        training=dict(batch_size=4, max_epochs=1, crop_size=32, crops_per_image=1, tile_overlap=0, amp=False, seeds=[0, 1])))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cl, Client(cl) as c:
        tl = TrainLauncher(prof, tmp_path / "run", device="cpu", client=c, retries=0)
        tl.start(); res = tl.wait(300)
    ids = ["toy__resnet18__unet__s0", "toy__resnet18__unet__s1"]
    assert sorted(r["id"] for r in res) == ids and all(r["status"] == "done" for r in res), res
    assert all(tl.job_status[j] == "done" for j in ids) and all(j in tl.jobs_html.value for j in ids)
    assert all((tmp_path / "run" / "toy" / j / "result.json").exists() for j in ids)
    assert "done: 2 job(s)" in tl.status.value


def _checkpoint(tmp_path, name, **head):
    "A tiny random-weight job folder (resnet18-UNet, 3 classes) with the given head options."
    from matseg.models import build_model, save_checkpoint
    torch.manual_seed(0)
    model = build_model("resnet18", "unet", in_channels=1, classes=3, **head).eval()
    save_checkpoint(tmp_path / name / "checkpoint.safetensors", model,
                    {"class_names": ["matrix", "disc", "band"], "normalization": {"kind": "minmax"}, "crop_size": 64,
                     "tile_overlap": 16})
    return tmp_path / name


RAW = (np.random.default_rng(5).random((1, 48, 40)) * 4000).astype(np.uint16)


def test_explorer_overlays_mc_uncertainty(tmp_path, monkeypatch):
    import matseg.widgets as widgets
    from matseg.runs import TrainedJob
    torch.set_num_threads(1)
    jd = _checkpoint(tmp_path, "mc", dropout=0.3)
    calls = []
    real = widgets.image_uncertainty
    monkeypatch.setattr(widgets, "image_uncertainty", lambda *a, **k: calls.append(1) or real(*a, **k))
    ce = CounterfactualExplorer.from_job(jd, RAW, samples=5, seed=7)
    ctl = ce.uncertainty_control
    assert not ctl.disabled and "MC dropout" in ctl.tooltip and calls == []  # nothing computed before a map is chosen
    assert [v for _, v in ctl.options] == [None, "entropy", "mutual_information", "variance_matrix", "variance_disc",
                                           "variance_band", "mean_prob_matrix", "mean_prob_disc", "mean_prob_band"]
    assert dict(ctl.options)["variance: disc"] == "variance_disc"
    tj = TrainedJob.open(jd, device="cpu")  # independent: the job's own uncertainty call under the same seed
    torch.manual_seed(7); ref = tj.uncertainty(tj.prepare(RAW), method="mc", samples=5)
    assert float(ref["mutual_information"].max()) > 0  # the passes differ, so equality below is not trivial
    tr = ce.figure.data[5]
    for name, expect, top in (("mutual_information", ref["mutual_information"], None), ("variance_band", ref["variance"][2], None),
                              ("entropy", ref["entropy"], np.log(3)), ("mean_prob_disc", ref["mean_prob"][1], 1.0)):
        ctl.value = name
        z = np.asarray(tr.z, np.float32)
        assert tr.visible and z.shape == (48, 40) and np.array_equal(z, expect.numpy()), name
        assert tr.zmin == 0 and np.isclose(tr.zmax, top if top is not None else float(expect.max())), (name, tr.zmax)
        assert tr.colorbar.title.text == name.replace("_", " ") and "colour scale" in ce.status.value
    assert calls == [1]  # computed once, cached for every map
    assert tr.colorbar.x != ce.figure.data[2].colorbar.x  # its own colour bar beside the influence map's
    ctl.value = None
    assert not tr.visible


def test_explorer_overlays_evidential_vacuity(tmp_path):
    from matseg.runs import TrainedJob
    torch.set_num_threads(1)
    jd = _checkpoint(tmp_path, "ev", head="evidential")
    ce = CounterfactualExplorer.from_job(jd, RAW)
    opts = [v for _, v in ce.uncertainty_control.options]
    assert opts[:3] == [None, "entropy", "vacuity"] and "mutual_information" not in opts and not any("variance" in o for o in opts[1:])
    ce.uncertainty_control.value = "vacuity"
    tj = TrainedJob.open(jd, device="cpu")
    ref = tj.uncertainty(tj.prepare(RAW), method="evidential")["vacuity"].numpy()
    assert np.array_equal(np.asarray(ce.figure.data[5].z, np.float32), ref) and ce.figure.data[5].zmax == 1.0
    assert 0 < ref.min() and ref.max() <= 1 and "evidential" in ce.status.value


def test_explorer_uncertainty_disabled_says_how_to_train(tmp_path):
    jd = _checkpoint(tmp_path, "plain")
    ce = CounterfactualExplorer.from_job(jd, RAW)
    ctl = ce.uncertainty_control
    assert ctl.disabled and ctl.options == (("none", None),) and ctl.value is None
    assert "--set training.dropout=0.2" in ctl.tooltip and "training.head=evidential" in ctl.tooltip
    with pytest.raises(MatsegError, match="training.dropout=0.2"): ce.uncertainty_dataset()
    with pytest.raises(MatsegError, match="training.head=evidential"): ce.show_uncertainty("entropy")  # called directly
    assert not ce.figure.data[5].visible and ce.uncertainty is None
    bare = CounterfactualExplorer(_Copy(), np.zeros((3, 16, 16), np.float32), ["a", "b", "c"])  # no job at all
    assert bare.uncertainty_control.disabled and "from_job" in bare.uncertainty_control.tooltip
