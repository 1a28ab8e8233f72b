"""Tests of matseg.explain: counterfactual heatmaps against the naive loop and hand-computed oracles, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from torch import nn

from matseg.cli import main
from matseg.core import MatsegError
from matseg.explain import (KERNELS, cli_explain, counterfactual_heatmap, get_kernel, kernel_grid, naive_heatmap,
                            perturbation_validation, region_mask, upsample)
from matseg.models import build_model, save_checkpoint

torch.set_num_threads(2)


def _local_model(seed=0, classes=3):
    "A 3×3 receptive field: perturbations further than one pixel from A cannot reach it."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, classes, 1)).double().eval()


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return build_model("resnet18", "unet", in_channels=1, classes=3, encoder_depth=3,
                       decoder_channels=(32, 16, 8)).double().eval()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_batched_equals_naive(tiny_unet, kernel):
    img = torch.rand(1, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(region=(8, 10, 20, 22), kernel=kernel, patch=8, stride=7)
    hm = counterfactual_heatmap(tiny_unet, img, batch_size=7, **kw)  # 16 locations: chunks of 7, 7, 2
    ref = naive_heatmap(tiny_unet, img, **kw)
    assert hm.shape == ref.shape == (5, 5)  # starts 0, 7, 14, 21 and the last one, 24
    assert float(hm.max()) > 1e-3  # not trivially zero
    np.testing.assert_allclose(hm.values, ref.values, rtol=1e-5, atol=1e-5)
    assert hm.attrs["kernel"] == kernel and hm.attrs["region_bbox"] == [8, 10, 20, 22]
    assert list(hm.y.values) == [3.5 + 7 * i for i in range(4)] + [27.5]
    for mode in ("batched", "incremental", "fast"):
        other = counterfactual_heatmap(tiny_unet, img, mode=mode, **kw)
        np.testing.assert_allclose(other.values, ref.values, rtol=1e-5, atol=1e-5)
        assert other.attrs["mode"] == mode


def test_kernel_grid_perturbs_the_last_strip():
    ys, xs = kernel_grid(30, 26, 8, 5)
    assert list(ys) == [0, 5, 10, 15, 20, 22] and list(xs) == [0, 5, 10, 15, 18]
    assert list(kernel_grid(32, 32, 8, 8)[0]) == [0, 8, 16, 24]  # a dividing stride adds nothing
    model, img = _local_model(), torch.rand(1, 30, 26, dtype=torch.float64)
    hm = counterfactual_heatmap(model, img, (20, 26, 26, 30), patch=8, stride=5)  # A in the last rows/columns
    assert float(hm.y[-1]) == 22 + 3.5 and float(hm.x[-1]) == 18 + 3.5
    assert float(hm.values[-1, -1]) > 0  # the bottom-right strip is perturbed and reaches A
    np.testing.assert_allclose(hm.values, naive_heatmap(model, img, (20, 26, 26, 30), patch=8, stride=5).values,
                               rtol=1e-6, atol=1e-9)


ARCHS = [("resnet18", "unet"), ("resnet18", "deeplabv3"), ("resnet18", "deeplabv3plus"), ("resnet18", "fpn"),
         ("timm-tf_efficientnet_lite0", "unet"), ("resnet18", "linknet"), ("resnet18", "pspnet"),
         ("mit_b0", "segformer")]


@pytest.mark.parametrize("encoder,decoder", ARCHS)
def test_exact_equals_naive(encoder, decoder):
    """Incremental inference reproduces the naive loop: border patches, a stride that does not divide the image,
    regions inside and touching the border, float32 on CPU."""
    torch.manual_seed(0)
    model = build_model(encoder, decoder, in_channels=1, classes=3).eval()
    img = torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(1))
    for region in [(22, 18, 36, 30), (50, 52, 64, 64)]:
        kw = dict(region=region, kernel="blur", patch=12, stride=10)  # starts 0, 10, …, 50, 52
        ref = counterfactual_heatmap(model, img, mode="naive", **kw)
        inc = counterfactual_heatmap(model, img, mode="incremental", **kw)
        ex = counterfactual_heatmap(model, img, **kw)  # default mode: exact, whichever exact path is faster
        assert ref.shape == inc.shape == (7, 7) and float(ref.max()) > 0
        assert inc.attrs["path"] == "incremental" and ex.attrs["mode"] == "exact"
        assert ex.attrs["path"] in ("incremental", "batched")
        top = float(np.abs(ref.values).max())
        assert float(np.abs(inc.values - ref.values).max()) <= 1e-4 * top
        assert float(np.abs(ex.values - ref.values).max()) <= 1e-4 * top


def test_incremental_names_whole_ops():
    torch.manual_seed(0)
    model = build_model("resnet18", "deeplabv3", in_channels=1, classes=2).eval()
    hm = counterfactual_heatmap(model, torch.rand(1, 64, 64), (20, 20, 30, 30), patch=16, stride=16,
                                mode="incremental")
    assert "aten.mean.dim" in hm.attrs["full_ops"]  # ASPP image pooling: global, computed whole


def test_fast_mode_measures_its_error():
    model, img = _local_model(), torch.rand(1, 64, 64, dtype=torch.float64)
    kw = dict(region=(28, 28, 36, 36), patch=6, stride=2)
    ex = counterfactual_heatmap(model, img, mode="incremental", **kw)
    fa = counterfactual_heatmap(model, img, mode="fast", check=20, **kw)
    a = fa.attrs
    assert a["mode"] == "fast" and a["fast_check_locations"] == 20 and a["fast_check_interpolated"] > 0
    assert 0 < a["fast_exact_locations"] < ex.size  # it skipped work
    assert a["fast_top10_exact"] == 1 and np.isfinite(a["fast_check_max_rel_err"])
    assert np.corrcoef(fa.values.ravel(), ex.values.ravel())[0, 1] > 0.99
    top = np.argsort(-ex.values, axis=None)[:10]
    assert set(np.argsort(-fa.values, axis=None)[:10]) == set(top)
    with pytest.raises(MatsegError, match="coarse"): counterfactual_heatmap(model, img, mode="fast", coarse=0, **kw)
    with pytest.raises(MatsegError, match="mode"): counterfactual_heatmap(model, img, mode="quick", **kw)


def test_pointwise_model_against_hand_computed_oracle():
    """For a per-pixel model, H_ij = sum over A ∩ patch of |softmax(f(x)) - softmax(f(mean))|."""
    torch.manual_seed(0)
    model = nn.Conv2d(2, 3, 1).double().eval()
    img = torch.rand(2, 24, 24, dtype=torch.float64)
    A = np.zeros((24, 24), bool); A[5:14, 9:20] = True
    hm = counterfactual_heatmap(model, img, A, kernel="occlude", patch=6, stride=3)
    with torch.no_grad():
        Z = torch.softmax(model(img[None]), 1)[0].numpy()
        Zm = torch.softmax(model(img.mean((1, 2), keepdim=True)[None]), 1)[0].numpy()[:, 0, 0]
    per_pixel = np.abs(Z - Zm[:, None, None]).sum(0) * A
    oracle = np.array([[per_pixel[y:y + 6, x:x + 6].sum() for x in range(0, 19, 3)] for y in range(0, 19, 3)])
    np.testing.assert_allclose(hm.values, oracle, rtol=1e-6, atol=1e-9)


def test_far_perturbations_have_no_influence():
    model, img = _local_model(), torch.rand(1, 48, 48, dtype=torch.float64)
    hm = counterfactual_heatmap(model, img, (30, 30, 38, 38), patch=6, stride=2)
    c = 2.5  # patch centre offset
    ys, xs = np.meshgrid(hm.y.values - c, hm.x.values - c, indexing="ij")
    # patch [s, s+6) cannot reach A=[30,38) through a 3×3 field if s+6 <= 29 or s >= 39
    far = (ys + 6 <= 29) | (ys >= 39) | (xs + 6 <= 29) | (xs >= 39)
    assert far.sum() > 300 and (~far).sum() > 10
    assert hm.values[far].max() < 1e-12
    assert hm.values[~far].min() > 0


def test_margin_restricts_grid_to_same_values():
    model, img = _local_model(), torch.rand(1, 40, 40, dtype=torch.float64)
    full = counterfactual_heatmap(model, img, (10, 12, 18, 20), patch=4, stride=2)
    near = counterfactual_heatmap(model, img, (10, 12, 18, 20), patch=4, stride=2, margin=3)
    assert near.shape[0] < full.shape[0] and near.shape[1] < full.shape[1]
    assert near.y.min() >= 12 - 3 and near.y.max() <= 19 + 3 and near.x.min() >= 10 - 3 and near.x.max() <= 17 + 3
    np.testing.assert_allclose(near.values, full.sel(y=near.y, x=near.x).values, rtol=1e-9, atol=1e-12)
    assert near.attrs["margin"] == 3


def test_class_region_and_errors():
    model, img = _local_model(), torch.rand(1, 16, 16, dtype=torch.float64)
    with torch.no_grad(): lab = model(img[None])[0].argmax(0).numpy()
    c = int(np.bincount(lab.ravel()).argmax())
    hm = counterfactual_heatmap(model, img, ["a", "b", "c"][c], classes=["a", "b", "c"], patch=4, stride=4)
    assert hm.attrs["region_pixels"] == int((lab == c).sum())
    with pytest.raises(MatsegError, match="occlude, blur, noise"): get_kernel("smear")
    with pytest.raises(MatsegError, match="occlude, blur, noise"):
        counterfactual_heatmap(model, img, (0, 0, 4, 4), kernel="smear")
    with pytest.raises(MatsegError, match="outside"): counterfactual_heatmap(model, img, (10, 10, 20, 12))
    with pytest.raises(MatsegError, match="empty"): counterfactual_heatmap(model, img, np.zeros((16, 16), bool), patch=4)
    with pytest.raises(MatsegError, match="empty or outside"): region_mask((4, 4, 4, 8), (16, 16))
    with pytest.raises(MatsegError, match="larger than"): counterfactual_heatmap(model, img, (0, 0, 4, 4), patch=32)
    with pytest.raises(MatsegError, match="shape"): region_mask(np.ones((8, 8)), (16, 16))
    with pytest.raises(MatsegError, match="not one of"): region_mask("d", (16, 16), torch.zeros(3, 16, 16), ["a", "b", "c"])
    with pytest.raises(MatsegError, match="margin"): kernel_grid(64, 64, 4, 4, (0, 0, 2, 2), margin=-10)


def test_model_state_is_restored():
    model = _local_model().train()
    counterfactual_heatmap(model, torch.rand(1, 16, 16, dtype=torch.float64), (4, 4, 8, 8), patch=4, stride=4)
    assert model.training


def test_upsample():
    model, img = _local_model(), torch.rand(1, 40, 40, dtype=torch.float64)
    hm = counterfactual_heatmap(model, img, (10, 12, 18, 20), patch=5, stride=4, margin=4)  # centres on pixels
    up = upsample(hm, (40, 40))
    assert up.shape == (40, 40) and up.dtype == np.float32
    y0, x0 = int(hm.y[0]) - 2, int(hm.x[0]) - 2  # first patch start
    y1, x1 = int(hm.y[-1]) + 3, int(hm.x[-1]) + 3  # end of the last patch
    assert np.isnan(up[y0 - 1, x0]) and np.isnan(up[y0, x0 - 1]) and np.isnan(up[y1, x0]) and np.isnan(up[y0, x1])
    assert not np.isnan(up[y0:y1, x0:x1]).any()
    for i, y in enumerate(hm.y.values):  # kernel centres keep their values
        for j, x in enumerate(hm.x.values):
            assert np.isclose(up[int(y), int(x)], hm.values[i, j], rtol=1e-5, atol=1e-7)
    # halfway between two centres: the mean of both (bilinear)
    assert np.isclose(up[int(hm.y[0]) + 2, int(hm.x[0])], hm.values[:2, 0].mean(), rtol=1e-5, atol=1e-7)
    assert upsample(hm, (20, 20)).shape == (20, 20)


def test_perturbation_validation_prefers_influential_patches():
    model, img = _local_model(), torch.rand(1, 48, 48, dtype=torch.float64)
    region = (20, 20, 28, 28)
    hm = counterfactual_heatmap(model, img, region, patch=6, stride=3)
    v = perturbation_validation(model, img, region, hm, top_k=3, seed=0)
    assert v["top_k"] == 3 and len(v["random"]["patches"]) == 3
    A = region_mask(region, (48, 48))
    for x0, y0, x1, y1 in v["random"]["patches"]: assert not A[y0:y1, x0:x1].any()
    assert v["influential"]["change"] > 0.01 and v["ratio"] > 10
    with pytest.raises(MatsegError, match="background"):
        perturbation_validation(model, img, (0, 0, 48, 48), hm, top_k=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(0)
    m = build_model("resnet18", "unet", in_channels=1, classes=3, encoder_depth=3, decoder_channels=(32, 16, 8))
    save_checkpoint(d / "checkpoint.safetensors", m.eval(), {"class_names": ["matrix", "gamma1", "gamma2"],
                                                             "normalization": {"kind": "auto"}})
    img = (np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "img.png")
    mask = np.zeros((48, 48), np.uint8); mask[10:20, 12:30] = 255
    Image.fromarray(mask).save(d / "mask.png")
    return d


def test_cli_end_to_end(checkpoint, tmp_path):
    d = checkpoint
    out = tmp_path / "box"
    assert cli_explain([str(d), str(d / "img.png"), "--region", "8,8,24,24", "--patch", "8", "--stride", "4",
                        "--kernel", "blur", "--validate", "2", "--device", "cpu", "--out", str(out)]) == 0
    with xr.open_dataarray(out / "heatmap.nc", engine="h5netcdf") as hm:
        assert hm.dims == ("y", "x") and hm.shape == (11, 11) and hm.attrs["kernel"] == "blur"
        assert list(hm.attrs["region_bbox"]) == [8, 8, 24, 24] and float(hm.max()) > 0
        values = hm.values.copy()
    png = Image.open(out / "overlay.png")
    assert png.size == (48, 48) and png.mode == "RGB"
    assert (np.asarray(png) == (0, 255, 255)).all(-1).sum() > 40  # the region outline
    j = json.loads((out / "explain.json").read_text())
    assert j["validation"]["top_k"] == 2 and j["attrs"]["n_locations"] == 121
    # the same via the library on the same prepared input
    from matseg.runs import TrainedJob
    tj = TrainedJob.open(d, device="cpu")
    model, x = tj.model, tj.prepare(d / "img.png")
    lib = counterfactual_heatmap(model, x, (8, 8, 24, 24), kernel="blur", patch=8, stride=4)
    np.testing.assert_allclose(values, lib.values, rtol=1e-4, atol=1e-4)
    # mask file and class regions, through the matseg dispatcher
    assert main(["explain", str(d / "checkpoint.safetensors"), str(d / "img.png"), "--region", str(d / "mask.png"),
                 "--patch", "8", "--stride", "8", "--validate", "0", "--out", str(tmp_path / "m")]) == 0
    with xr.open_dataarray(tmp_path / "m" / "heatmap.nc", engine="h5netcdf") as hm:
        assert hm.attrs["region_pixels"] == 180 and list(hm.attrs["region_bbox"]) == [12, 10, 30, 20]


@pytest.mark.parametrize("args,msg", [
    (["--region", "40,40,60,60"], "outside"),
    (["--region", "5,5,5,9"], "empty or outside"),
    (["--region", "0,0,8,8", "--patch", "64"], "larger than"),
    (["--region", "class=austenite"], "not one of"),
    (["--region", "nope.png"], "neither a box"),
])
def test_cli_errors(checkpoint, tmp_path, capsys, args, msg):
    d = checkpoint
    rc = main(["explain", str(d), str(d / "img.png"), *args, "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_cli_missing_checkpoint(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "none.safetensors"), "x.png", "--region", "0,0,4,4",
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
