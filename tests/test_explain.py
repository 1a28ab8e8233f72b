"""Tests of matseg.explain: counterfactual heatmaps against the naive loop and hand-computed oracles, CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import xarray as xr
from PIL import Image
from scipy import stats
from torch import nn

from matseg.cli import main
from matseg.core import MatsegError
from matseg.explain import (KERNELS, cli_explain, counterfactual_heatmap, get_kernel, kernel_grid, naive_heatmap,
                            patch_strata, perturbation_validation, region_mask, upsample)
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


def _check_oracle(fa, ex):
    "The error fast reports, recomputed from the exact map at the locations it says it checked."
    a = fa.attrs
    idx = np.asarray(a["fast_check_index"], np.int64)
    est, truth = np.asarray(a["fast_check_estimates"], np.float64), ex.values.ravel()[idx].astype(np.float64)
    np.testing.assert_allclose(fa.values.ravel()[idx], truth, rtol=1e-5, atol=1e-5)  # checked locations: exact (fp32 rounding)
    top = float(np.abs(fa.values).max())
    assert np.isclose(a["fast_check_max_rel_err"], np.abs(est - truth).max() / top, rtol=1e-4, atol=1e-6)
    assert np.isclose(a["fast_check_pearson"], np.corrcoef(est, truth)[0, 1], rtol=1e-4, atol=1e-6)
    order = np.argsort(-fa.values, axis=None)[:10]
    if a["fast_top10_exact"]:  # the ten highest values are exact values
        np.testing.assert_allclose(fa.values.ravel()[order], ex.values.ravel()[order], rtol=1e-5, atol=1e-6)


def test_fast_window_exact_where_claimed(tiny_unet):
    "A context window that covers the whole image drops nothing: windowed values are the exact ones."
    img = torch.rand(1, 48, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kw = dict(region=(18, 20, 28, 30), patch=8, stride=4)
    ex = counterfactual_heatmap(tiny_unet, img, mode="incremental", **kw)
    fa = counterfactual_heatmap(tiny_unet, img, mode="fast", coarse=1, check=12, window=48, **kw)
    a = fa.attrs
    assert a["fast_window"] == 48 and a["fast_window_applied"] == 1 and a["path"] == "incremental"
    assert a["fast_windowed_locations"] > 0 and a["fast_exact_locations"] + a["fast_windowed_locations"] == ex.size
    np.testing.assert_allclose(fa.values, ex.values, rtol=1e-6, atol=1e-9)
    assert a["fast_check_max_rel_err"] < 1e-9 and a["fast_top10_max_rel_err"] < 1e-9
    _check_oracle(fa, ex)


def test_fast_window_reports_a_bad_approximation(tiny_unet):
    """A window of 0 px drops every change outside A ∪ the patch, which a UNet's deep stages spread widely: the map
    is measurably wrong, and the error it reports is the one the exact map shows at its checked locations."""
    img = torch.rand(1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kw = dict(region=(24, 26, 34, 36), patch=8, stride=4)
    ex = counterfactual_heatmap(tiny_unet, img, mode="incremental", **kw)
    fa = counterfactual_heatmap(tiny_unet, img, mode="fast", window=0, check=40, **kw)
    a = fa.attrs
    assert a["fast_window_applied"] == 1 and a["fast_check_windowed"] > 0
    _check_oracle(fa, ex)
    true_err = float(np.abs(fa.values - ex.values).max() / np.abs(ex.values).max())
    assert true_err > 0.05 and a["fast_check_max_rel_err"] > 0.05  # bad, and it says so
    assert a["fast_check_pearson"] < 0.99 or a["fast_top10_max_rel_err"] > 0.05
    wide = counterfactual_heatmap(tiny_unet, img, mode="fast", window=16, check=40, **kw)
    _check_oracle(wide, ex)  # a wider window: smaller error, reported as such
    assert wide.attrs["fast_check_max_rel_err"] < a["fast_check_max_rel_err"]
    with pytest.raises(MatsegError, match="window"): counterfactual_heatmap(tiny_unet, img, mode="fast", window=-1, **kw)


class _Untraceable(nn.Module):
    "Leaves torch through NumPy: make_fx would bake the input in as a constant."
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.from_numpy(x.detach().cpu().numpy().copy()))


def test_fast_window_falls_back_and_says_so():
    torch.manual_seed(0)
    model, img = _Untraceable().eval(), torch.rand(1, 32, 32)
    kw = dict(region=(10, 10, 20, 20), patch=6, stride=3)
    ref = counterfactual_heatmap(model, img, mode="naive", **kw)
    ex = counterfactual_heatmap(model, img, mode="exact", **kw)
    assert ex.attrs["path"] == "batched" and "does not depend on its input" in ex.attrs["path_reason"]
    np.testing.assert_allclose(ex.values, ref.values, rtol=1e-4, atol=1e-5)  # not the traced constant's zeros
    fa = counterfactual_heatmap(model, img, mode="fast", window=4, **kw)
    a = fa.attrs
    assert a["path"] == "batched" and a["fast_window_applied"] == 0 and a["fast_windowed_locations"] == 0
    assert "needs the incremental path" in a["fast_window_reason"]
    _check_oracle(fa, ref)
    with pytest.raises(MatsegError, match="cannot be traced|does not depend"):
        counterfactual_heatmap(model, img, mode="incremental", **kw)


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


def _far_model(shift=28, seed=0):
    "A wide, known receptive field: the output at (y, x) depends mostly on the input at (y, x + shift)."
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 3, (1, 2), dilation=(1, shift))
    with torch.no_grad(): conv.weight[..., 0] *= 0.1  # the local tap is weak
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.ZeroPad2d((0, shift, 0, 0)), conv).double().eval()


@pytest.fixture(scope="module")
def far_case():
    model = _far_model()
    img = torch.rand(1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    region = (8, 24, 20, 36)
    return model, img, region, counterfactual_heatmap(model, img, region, patch=8, stride=4)


def _grid(hm):
    c = (hm.attrs["patch"] - 1) / 2
    return np.stack(np.meshgrid(hm.y.values - c, hm.x.values - c, indexing="ij"), -1).reshape(-1, 2).astype(int)


def test_validation_wide_receptive_field_passes(far_case):
    """The map of a model whose output in A depends on a distant region points there, and its top patches beat
    the matched null; the reported statistics agree with the null sample they come from."""
    model, img, region, hm = far_case
    iy, ix = np.unravel_index(int(np.argmax(hm.values)), hm.shape)
    assert 24 <= float(hm.y[iy]) < 36 and 36 <= float(hm.x[ix]) < 48  # A = x 8..20, y 24..36, shifted by 28
    v = perturbation_validation(model, img, region, hm, top_k=3, n_draws=60, seed=3)
    null = np.asarray(v["null_changes"])
    assert v["n_draws"] == len(null) == 60 and v["passed"] and v["alpha"] == 0.05
    assert v["p_value"] == (1 + (null >= v["influential"]["change"]).sum()) / 61 == 1 / 61
    assert v["null_percentile"] == pytest.approx(stats.percentileofscore(null, v["influential"]["change"], kind="mean"))
    assert v["null"]["median"] == pytest.approx(np.median(null)) and v["null"]["p95"] == pytest.approx(np.quantile(null, .95))
    med = np.median(null)  # most far patches cannot reach A at all: the median may be 0 (ratio inf)
    assert v["ratio"] == (v["influential"]["change"] / med if med > 0 else np.inf) and v["ratio"] > 5
    # every top patch lies in the shifted copy of A, far from A: so are the matched random ones
    A = region_mask(region, (64, 64))
    for arm in ("influential", "random"):
        boxes = v[arm]["patches"]
        assert v[arm]["strata"] == ["outside A, gap > patch"] * 3
        for x0, y0, x1, y1 in boxes: assert not A[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8].any()
        for a, b in [(a, b) for a in boxes for b in boxes if a < b]:  # no two patches of an arm overlap
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    for x0, y0, x1, y1 in v["influential"]["patches"]: assert x0 + 8 > 36 and x0 < 48 and y0 + 8 > 24 and y0 < 36
    # the influential arm's change, by hand: blur the three patches, mean L1 change of softmax over A
    fill, xp = KERNELS["blur"](img, 8), img.clone()
    for x0, y0, x1, y1 in v["influential"]["patches"]: xp[:, y0:y1, x0:x1] = fill[:, y0:y1, x0:x1]
    with torch.no_grad():
        Z, Zp = torch.softmax(model(img[None]), 1)[0], torch.softmax(model(xp[None]), 1)[0]
    assert v["influential"]["change"] == pytest.approx(float((Zp - Z).abs().sum(0)[torch.from_numpy(A)].mean()), rel=1e-6)
    # seeded: the same seed gives the same null, another seed another one
    assert perturbation_validation(model, img, region, hm, top_k=3, n_draws=60, seed=3)["null_changes"] == v["null_changes"]
    assert perturbation_validation(model, img, region, hm, top_k=3, n_draws=60, seed=4)["null_changes"] != v["null_changes"]


def test_validation_random_maps_fail(far_case):
    "Random heatmaps: the top-k of a random map is one more matched draw, so p-values spread over (0, 1]."
    model, img, region, hm = far_case
    ps = np.array([perturbation_validation(model, img, region, hm.copy(data=np.random.default_rng(s).random(hm.shape)),
                                           top_k=3, n_draws=40, seed=100 + s)["p_value"] for s in range(20)])
    assert (ps <= 0.05).mean() <= 0.2 and np.median(ps) > 0.2  # under the null P(p <= a) <= a; 20 maps
    assert (ps > 0.5).sum() >= 5


def test_validation_overlap_indicator_fails(far_case):
    "The trivial map 'patch overlaps A' (which the old background-only comparison rewarded) no longer passes."
    model, img, region, hm = far_case
    frac, gap, strata = patch_strata(region_mask(region, (64, 64)), _grid(hm), 8)
    assert ((frac > 0) == (strata > 0)).all() and ((gap == 0) == (frac > 0)).all()
    real = perturbation_validation(model, img, region, hm, top_k=3, n_draws=60)
    for name, m in {"indicator": frac > 0, "overlap": frac, "closeness": -gap.astype(float)}.items():
        ind = perturbation_validation(model, img, region, hm.copy(data=m.reshape(hm.shape).astype(float)),
                                      top_k=3, n_draws=60)
        assert all(s.startswith("overlaps") for s in ind["matching"]["top_strata"]), name
        assert not ind["passed"] and ind["p_value"] > 0.1 and ind["null_percentile"] < real["null_percentile"] - 20, name


def test_patch_strata_oracle():
    A = np.zeros((20, 20), bool); A[8:12, 8:12] = True
    starts = np.array([[8, 8], [6, 6], [0, 0], [4, 12], [12, 12], [10, 10]])
    frac, gap, strata = patch_strata(A, starts, 4)
    np.testing.assert_allclose(frac, [1, 4 / 16, 0, 0, 0, 4 / 16])
    assert list(gap) == [0, 0, 5, 1, 1, 0] and list(strata) == [4, 1, -1, 0, 0, 1]


def test_validation_errors(far_case):
    model, img, region, hm = far_case
    with pytest.raises(MatsegError, match="n_draws"): perturbation_validation(model, img, region, hm, n_draws=0)
    with pytest.raises(MatsegError, match="top_k"): perturbation_validation(model, img, region, hm, top_k=0)
    with pytest.raises(MatsegError, match="non-finite"):
        perturbation_validation(model, img, region, hm.where(hm.y > 10), top_k=3)
    with pytest.raises(MatsegError, match="own image"): perturbation_validation(model, img[:, :48], region, hm)
    small = counterfactual_heatmap(model, img, region, patch=8, stride=4, margin=0)  # 3×3 centres inside A's box
    v = perturbation_validation(model, img, region, small, top_k=8, n_draws=5)
    assert v["top_k"] == len(v["influential"]["patches"]) == len(v["random"]["patches"]) < 8  # as many as fit
    assert v["matching"]["candidates"] == small.size


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


def test_cli_end_to_end(checkpoint, tmp_path, capsys):
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
    val = j["validation"]
    assert val["n_draws"] == 100 == len(val["null_changes"]) and 1 / 101 <= val["p_value"] <= 1
    assert val["p_value"] == (1 + sum(c >= val["influential"]["change"] for c in val["null_changes"])) / 101
    assert f"p = {val['p_value']:.3g}" in capsys.readouterr().out
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
    (["--region", "0,0,8,8", "--draws", "0"], "--draws"),
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
