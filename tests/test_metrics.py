"Metrics against independent oracles: torchmetrics, scipy distance transforms and hand-computed cases."
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchmetrics.classification import (MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score,
                                         MulticlassJaccardIndex)

from matseg.core import MatsegError
from matseg.metrics import (AGGREGATION, METRIC_KEYS, ConfusionMatrix, boundary_f1, boundary_f1_per_image, boundary_tolerance,
                            confusion_matrix,
                            count_parameters, per_image_scores, scores, segmentation_report, time_inference)

TOL = 1e-6


def _random(n_classes=4, shape=(3, 40, 50), seed=0, p_correct=0.6):
    "Random targets and predictions that agree on about `p_correct` of the pixels."
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, n_classes, shape, generator=g)
    noise = torch.randint(0, n_classes, shape, generator=g)
    p = torch.where(torch.rand(shape, generator=g) < p_correct, t, noise)
    return p, t


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_against_torchmetrics(seed, n):
    p, t = _random(n, seed=seed)
    cm = ConfusionMatrix(n).update(p, t)
    assert np.array_equal(cm.matrix, MulticlassConfusionMatrix(n)(p, t).numpy())
    s = cm.scores()
    iou = MulticlassJaccardIndex(n, average="none")(p, t).double().numpy()
    f1 = MulticlassF1Score(n, average="none")(p, t).double().numpy()
    assert np.allclose(s["iou"], iou, atol=TOL) and np.allclose(s["iou_per_class"], iou, atol=TOL)
    assert np.allclose(s["dice_per_class"], f1, atol=TOL)
    assert math.isclose(s["miou"], iou[1:].mean(), abs_tol=TOL)
    assert math.isclose(s["miou_all"], MulticlassJaccardIndex(n, average="macro")(p, t).item(), abs_tol=TOL)
    assert math.isclose(s["dice"], f1[1:].mean(), abs_tol=TOL)
    assert math.isclose(s["dice_all"], MulticlassF1Score(n, average="macro")(p, t).item(), abs_tol=TOL)
    assert math.isclose(s["pixel_accuracy"], MulticlassAccuracy(n, average="micro")(p, t).item(), abs_tol=TOL)
    assert math.isclose(s["pixel_accuracy"], MulticlassF1Score(n, average="micro")(p, t).item(), abs_tol=TOL)
    # frequency-weighted IoU = support-weighted Jaccard
    assert math.isclose(s["wiou"], MulticlassJaccardIndex(n, average="weighted")(p, t).item(), abs_tol=TOL)
    assert s["n_pixels"] == p.numel() and sum(s["support"]) == p.numel()


def test_numpy_torch_and_streaming_agree():
    p, t = _random(3, shape=(6, 17, 23), seed=5)
    whole = confusion_matrix(p, t, 3)
    assert np.array_equal(whole, confusion_matrix(p.numpy().astype(np.uint8), t.numpy().astype(np.int32), 3))
    assert np.array_equal(whole, confusion_matrix(p, t.numpy(), 3))  # mixed inputs
    cm = ConfusionMatrix(3)
    for i in range(6): cm.update(p[i], t[i])  # (H, W) batches
    assert np.array_equal(cm.matrix, whole)
    a, b = ConfusionMatrix(3).update(p[:2], t[:2]), ConfusionMatrix(3).update(p[2:], t[2:])
    assert np.array_equal((a + b).matrix, whole)
    assert np.array_equal(a.merge(b).matrix, whole)
    assert cm.reset().matrix.sum() == 0 and cm.matrix.dtype == np.int64


def test_ignore_index_against_torchmetrics():
    p, t = _random(3, seed=3)
    t = t.clone(); t[:, :10] = 255
    s = ConfusionMatrix(3, ignore_index=255).update(p, t).scores()
    ref = MulticlassJaccardIndex(3, average="none", ignore_index=255)(p, t).double().numpy()
    assert np.allclose(s["iou"], ref, atol=TOL)
    assert s["n_pixels"] == int((t != 255).sum())
    assert math.isclose(s["pixel_accuracy"], MulticlassAccuracy(3, average="micro", ignore_index=255)(p, t).item(),
                        abs_tol=TOL)
    with pytest.raises(MatsegError, match="ignore_index=0"):
        ConfusionMatrix(3, ignore_index=0)


def test_edge_cases():
    t = torch.zeros(2, 8, 8, dtype=torch.long); t[:, 2:5, 2:5] = 1
    perfect = scores(confusion_matrix(t, t, 3))  # class 2 absent from both
    assert perfect["iou"][:2] == [1.0, 1.0] and math.isnan(perfect["iou"][2]) and math.isnan(perfect["dice_per_class"][2])
    assert perfect["miou"] == 1.0 and perfect["dice"] == 1.0 and perfect["miou_all"] == 1.0
    assert perfect["pixel_accuracy"] == 1.0 and perfect["wiou"] == 1.0
    wrong = scores(confusion_matrix(1 - t, t, 2))
    assert wrong["iou"] == [0.0, 0.0] and wrong["dice_per_class"] == [0.0, 0.0]
    assert wrong["miou"] == 0 and wrong["pixel_accuracy"] == 0 and wrong["wiou"] == 0
    # a class predicted but absent from the truth scores 0 (not NaN); its weight in wIoU is 0
    p = t.clone(); p[0, 0, 0] = 2
    s = scores(confusion_matrix(p, t, 3))
    assert s["iou"][2] == 0.0 and math.isnan(s["recall_per_class"][2]) and s["precision_per_class"][2] == 0
    assert math.isclose(s["miou"], (1 + 0) / 2)
    empty = scores(np.zeros((3, 3), np.int64))
    assert all(math.isnan(v) for v in (empty["miou"], empty["pixel_accuracy"], empty["wiou"]))


def test_wiou_hand_computed():
    # truth: 6 px class 0, 2 px class 1; prediction gets 5/6 and 1/2 right
    t = np.array([0, 0, 0, 0, 0, 0, 1, 1]); p = np.array([0, 0, 0, 0, 0, 1, 1, 0])
    s = scores(confusion_matrix(p, t, 2))
    iou0, iou1 = 5 / 7, 1 / 3
    assert np.allclose(s["iou"], [iou0, iou1]) and math.isclose(s["wiou"], 6 / 8 * iou0 + 2 / 8 * iou1)
    assert math.isclose(s["miou"], iou1) and math.isclose(s["miou_all"], (iou0 + iou1) / 2)


def test_bad_input_messages():
    t = np.zeros((4, 4), int)
    with pytest.raises(MatsegError, match="argmax"): confusion_matrix(torch.rand(4, 4), t, 2)
    with pytest.raises(MatsegError, match="shape"): confusion_matrix(np.zeros((4, 5), int), t, 2)
    with pytest.raises(MatsegError, match="class index 7"): confusion_matrix(t + 7, t, 2)
    with pytest.raises(MatsegError, match="merge"): ConfusionMatrix(2).merge(ConfusionMatrix(3))
    with pytest.raises(MatsegError, match="tolerance"): boundary_f1(t, t, 2, tolerance=-1)
    with pytest.raises(MatsegError, match="class names"): per_image_scores(t, t, 2, class_names=["a"])


# ---------------------------------------------------------------- boundary F1

def _oracle_bf(pred, target, n, tol):
    "Boundary F1 per class of one image with scipy: erosion contours and Euclidean distance transforms."
    cross = ndimage.generate_binary_structure(2, 1)
    out = []
    for c in range(n):
        bp = (pred == c) & ~ndimage.binary_erosion(pred == c, cross, border_value=1)
        bt = (target == c) & ~ndimage.binary_erosion(target == c, cross, border_value=1)
        if not bp.any() and not bt.any(): out.append(np.nan); continue
        if not bp.any() or not bt.any(): out.append(0.0); continue
        prec = (ndimage.distance_transform_edt(~bt)[bp] <= tol).mean()
        rec = (ndimage.distance_transform_edt(~bp)[bt] <= tol).mean()
        out.append(0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec))
    return np.array(out)


def test_boundary_f1_shifted_square_by_hand():
    t = np.zeros((32, 32), np.uint8); t[5:15, 5:15] = 1
    p = np.roll(t, 1, axis=1)
    # class 1: 36 contour pixels each; tolerance 0 matches the 9 + 9 shared pixels of top and bottom edges
    assert np.allclose(boundary_f1(p, t, 2, tolerance=0), [18 / 40, 0.5])
    assert np.allclose(boundary_f1(p, t, 2, tolerance=1), [1.0, 1.0])
    # shifted by 2 px: the left/right edges are 2 px apart, so tolerance 1 still misses 8 + 8 pixels per side
    p2 = np.roll(t, 2, axis=1)
    assert math.isclose(boundary_f1(p2, t, 2, tolerance=1)[1], (36 - 16) / 36)
    assert math.isclose(boundary_f1(p2, t, 2, tolerance=2)[1], 1.0)


def test_boundary_f1_nan_rules():
    t = np.zeros((16, 16), int); t[4:8, 4:8] = 1
    f = boundary_f1_per_image(t, t, 3)[0]
    assert f[0] == 1 and f[1] == 1 and math.isnan(f[2])  # class 2 absent from both
    assert boundary_f1(np.zeros_like(t), t, 2)[1] == 0  # missed object
    assert boundary_f1(t, np.zeros_like(t), 2)[1] == 0  # hallucinated object
    full = np.zeros((16, 16), int)
    assert math.isnan(boundary_f1(full, full, 2)[0])  # class covering the whole image: no contour
    # per-image mean skips NaN images
    stack_t = np.stack([t, np.zeros_like(t)]); stack_p = np.stack([np.roll(t, 1, 1), np.zeros_like(t)])
    per = boundary_f1_per_image(stack_p, stack_t, 2, tolerance=0)
    assert math.isnan(per[1, 1]) and boundary_f1(stack_p, stack_t, 2, tolerance=0)[1] == per[0, 1]


@pytest.mark.parametrize("tol", [0, 1, 1.5, 2, 3])
def test_boundary_f1_against_scipy_oracle(tol):
    rng = np.random.default_rng(int(tol * 10))
    # blobby label maps (smoothed noise, thresholded) so contours are realistic
    def blobs(seed):
        z = ndimage.gaussian_filter(np.random.default_rng(seed).normal(size=(3, 64, 80)), (0, 3, 3))
        return np.digitize(z, np.quantile(z, [0.5, 0.8]))
    t = blobs(int(rng.integers(1000)))
    p = np.where(rng.random(t.shape) < 0.97, t, rng.integers(0, 3, t.shape))
    p = np.stack([ndimage.shift(x, (1, 0), order=0, mode="nearest") for x in p])
    got = boundary_f1_per_image(torch.as_tensor(p), torch.as_tensor(t), 3, tolerance=tol)
    ref = np.stack([_oracle_bf(a, b, 3, tol) for a, b in zip(p, t)])
    assert np.allclose(got, ref, atol=TOL, equal_nan=True)


def test_boundary_tolerance_rules():
    assert boundary_tolerance((512, 512), 3) == 3 and boundary_tolerance((2, 512, 512), 3, "pixels") == 3
    assert math.isclose(boundary_tolerance((300, 400), rule="diagonal"), 3.75)  # 0.75 % of the 500 px diagonal
    assert math.isclose(boundary_tolerance((4, 1024, 1024), 99, "diagonal"), 0.0075 * 1024 * math.sqrt(2))
    with pytest.raises(MatsegError, match="valid rules: pixels, diagonal"):
        boundary_f1(np.zeros((4, 4), int), np.zeros((4, 4), int), 2, rule="csurka")


def test_boundary_f1_diagonal_rule_by_hand():
    # a 10x10 square shifted 2 px right: 36 contour pixels each side
    big = np.zeros((200, 200), int); big[5:15, 5:15] = 1
    small = big[:40, :40].copy()
    # 200²: tolerance 0.0075·200·√2 = 2.12 px >= the 2 px shift, every contour pixel matches
    assert boundary_f1(np.roll(big, 2, 1), big, 2, rule="diagonal")[1] == 1.0
    assert math.isclose(boundary_f1(np.roll(big, 2, 1), big, 2, tolerance=1)[1], 20 / 36)  # pixel rule, 1 px
    # 40²: tolerance 0.42 px, only the 8 + 8 shared pixels of the top and bottom edges match: P = R = 16/36
    assert math.isclose(boundary_f1(np.roll(small, 2, 1), small, 2, tolerance=5, rule="diagonal")[1], 16 / 36)
    # per image: each image of a sequence gets the tolerance of its own size
    per = boundary_f1_per_image([np.roll(big, 2, 1), np.roll(small, 2, 1)], [big, small], 2, rule="diagonal")
    assert np.allclose(per[:, 1], [1.0, 16 / 36])
    # same as the pixel rule at the equivalent distance
    p, t = _random(3, shape=(2, 96, 128), seed=4, p_correct=0.9)
    assert np.allclose(boundary_f1_per_image(p, t, 3, rule="diagonal"),
                       boundary_f1_per_image(p, t, 3, tolerance=0.0075 * 160), equal_nan=True)  # diagonal 160
    r = segmentation_report(p, t, 3, rule="diagonal")
    assert r["tolerance_rule"] == "diagonal" and segmentation_report(p, t, 3)["tolerance_rule"] == "pixels"
    assert np.allclose(r["per_image_mean"]["boundary_f1_per_class"], boundary_f1(p, t, 3, rule="diagonal"))
    df = per_image_scores(p, t, 3, rule="diagonal")
    assert np.allclose(df["boundary_f1_1"], boundary_f1_per_image(p, t, 3, rule="diagonal")[:, 1], equal_nan=True)


def test_aggregation_labels_match_the_computation():
    assert set(AGGREGATION) == set(METRIC_KEYS)
    # two images: a perfect one and a bad one of very different sizes, so pooled and per-image means differ
    a = np.zeros((8, 8), int); a[2:6, 2:6] = 1
    b = np.zeros((32, 32), int); b[4:20, 4:20] = 1
    pb = np.roll(b, 3, 1)
    r = segmentation_report([a, pb], [a, b], 2, tolerance=0)
    pooled = ConfusionMatrix(2).update(a, a).update(pb, b).scores()
    for m in ("iou", "dice", "pixel_accuracy", "wiou"):
        assert AGGREGATION[m].startswith("pooled over the split")
        assert math.isclose(r["micro"][METRIC_KEYS[m]], pooled[METRIC_KEYS[m]])
        assert not math.isclose(r["micro"][METRIC_KEYS[m]], r["per_image_mean"][METRIC_KEYS[m]])
    # boundary F1 as benchmarked (`boundary_f1`) is the per-image mean, not the pooled-count BF
    bf = boundary_f1([a, pb], [a, b], 2, tolerance=0)[1]
    assert AGGREGATION["boundary_f1"] == "mean over images"
    assert math.isclose(bf, r["per_image_mean"]["boundary_f1"]) and not math.isclose(bf, r["micro"]["boundary_f1"])


def test_boundary_f1_ignore_index():
    t = np.zeros((20, 20), int); t[5:12, 5:12] = 1
    p = t.copy()
    t_ign = t.copy(); t_ign[:, 10:] = 255  # unlabelled right part cuts the square
    p[:, 14:] = 1  # prediction differs only inside the ignored region
    f = boundary_f1(p, t_ign, 2, tolerance=0, ignore_index=255)
    assert np.allclose(f, [1.0, 1.0])  # the cut through the square is not a contour
    assert boundary_f1(p, t, 2, tolerance=0)[1] < 1


def test_boundary_f1_fast_on_1024():
    g = torch.Generator().manual_seed(0)
    t = (torch.nn.functional.avg_pool2d(torch.rand(1, 1, 1024, 1024, generator=g), 15, 1, 7)[0] * 3).long().clamp(0, 2)
    p = torch.roll(t, 1, -1)
    boundary_f1(p, t, 3)
    t0 = time.perf_counter(); f = boundary_f1(p, t, 3, tolerance=2); dt = time.perf_counter() - t0
    assert dt < 2.0, f"boundary F1 on one 1024² image took {dt:.2f} s"
    assert np.all(f[~np.isnan(f)] > 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    p, t = _random(4, shape=(2, 64, 64), seed=9)
    cm = ConfusionMatrix(4).update(p.cuda(), t.cuda())
    assert np.array_equal(cm.matrix, confusion_matrix(p, t, 4))
    assert np.allclose(boundary_f1(p.cuda(), t.cuda(), 4), boundary_f1(p, t, 4), equal_nan=True)


# ---------------------------------------------------------------- tables and reports

def test_per_image_and_report():
    p, t = _random(3, shape=(4, 32, 32), seed=11, p_correct=0.8)
    names = ["matrix", "pore", "crack"]
    df = per_image_scores(p, t, 3, class_names=names)
    assert list(df["image"]) == [0, 1, 2, 3]
    for i in range(4):
        ref = MulticlassJaccardIndex(3, average="none")(p[i], t[i]).numpy()
        assert np.allclose(df.loc[i, ["iou_matrix", "iou_pore", "iou_crack"]].to_numpy(float), ref, atol=TOL)
        assert math.isclose(df.loc[i, "pixel_accuracy"], (p[i] == t[i]).double().mean().item(), abs_tol=TOL)
        assert np.allclose(df.loc[i, [f"boundary_f1_{c}" for c in names]].to_numpy(float),
                           _oracle_bf(p[i].numpy(), t[i].numpy(), 3, 2), atol=TOL)
    r = segmentation_report(p, t, 3, names)
    assert r["micro"] | {} and np.array_equal(r["micro"]["confusion_matrix"], confusion_matrix(p, t, 3))
    assert math.isclose(r["micro"]["miou"], ConfusionMatrix(3).update(p, t).scores()["miou"])
    assert math.isclose(r["per_image_mean"]["miou"], df["miou"].mean())
    assert np.allclose(r["per_image_mean"]["boundary_f1_per_class"], boundary_f1(p, t, 3))
    assert set(METRIC_KEYS.values()) <= set(r["micro"]) & set(r["per_image_mean"])
    assert len(r["per_image"]) == 4 and r["classes"] == names


def test_report_on_images_of_different_sizes():
    a = np.zeros((16, 16), int); a[4:8, 4:8] = 1
    b = np.zeros((24, 40), int); b[10:20, 5:30] = 1
    r = segmentation_report([a, b], [a, b], 2)
    assert r["n_images"] == 2 and r["micro"]["miou"] == 1 and r["per_image_mean"]["boundary_f1"] == 1
    assert r["micro"]["n_pixels"] == 16 * 16 + 24 * 40
    with pytest.raises(MatsegError, match="2 predictions but 1 targets"):
        segmentation_report([a, b], [a], 2)


# ---------------------------------------------------------------- size and speed

def test_count_parameters_and_timing():
    import segmentation_models_pytorch as smp
    m = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=3)
    n_all = count_parameters(m)
    enc = sum(p.numel() for p in m.encoder.parameters())
    assert n_all > 14e6  # a resnet18 U-Net has ~14.3 M parameters
    for prm in m.encoder.parameters(): prm.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == n_all - enc
    m.train()
    ms = time_inference(m, torch.zeros(2, 1, 64, 64), repeats=2, warmup=1)
    assert 0 < ms < 5000 and m.training  # mode restored
    with pytest.raises(MatsegError): time_inference(m, torch.zeros(1, 1, 64, 64), repeats=0)
