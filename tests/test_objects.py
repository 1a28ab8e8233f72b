"Defect instances against independent oracles: skimage's labelling and brute-force matching over pixel sets."
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.measure import label as sk_label

from matseg.core import MatsegError
from matseg.objects import (CONNECTIVITY, DefectCounter, components, defect_columns, instance_labels, instance_scores,
                            match_pairs, overlaps)


def _rects(rng, shape=(20, 20), n=4):
    "A binary map of `n` random rectangles (touching ones merge into one component)."
    m = np.zeros(shape, bool)
    for _ in range(n):
        y, x = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        m[y:y + rng.integers(1, 7), x:x + rng.integers(1, 7)] = True
    return m


def _blobs(rng, shape=(24, 24), p=0.5, size=3):
    "A random binary map of blobs (smoothed noise)."
    return ndimage.uniform_filter(rng.random(shape), size) > p


@pytest.mark.parametrize("seed", range(5))
def test_components_match_skimage_connectivity_2(seed):
    m = _blobs(np.random.default_rng(seed), (64, 64), 0.52, 2)
    lab, area = components(m)
    ref = sk_label(m, connectivity=2)  # 8-connectivity in skimage's terms
    assert CONNECTIVITY == 8 and lab.max() == ref.max() > 3
    # the same partition: each of our labels maps to exactly one of skimage's and back
    pairs = set(zip(lab[m].tolist(), ref[m].tolist()))
    assert len(pairs) == lab.max() == len({a for a, _ in pairs}) == len({b for _, b in pairs})
    assert sorted(area.tolist()) == sorted(np.bincount(ref.ravel())[1:].tolist())


def _oracle(pred, true, threshold, min_size=0, valid=None, true_ids=None):
    "(tp, fp, fn, iou_sum) by skimage labels, IoU from pixel sets and exhaustive search over one-to-one assignments."
    valid = np.ones(pred.shape, bool) if valid is None else valid
    def comps(m, ids=None):
        lab = sk_label(m, connectivity=2) if ids is None else np.where(m, ids, 0)
        sets = [frozenset(zip(*np.nonzero((lab == k) & valid))) for k in np.unique(lab[lab > 0])]
        return [s for s in sets if len(s) >= max(min_size, 1)]
    P, T = comps(pred), comps(true, true_ids)
    iou = np.array([[len(a & b) / len(a | b) for b in T] for a in P]).reshape(len(P), len(T))
    best = (0, 0.0)
    for k in range(min(len(P), len(T)), 0, -1):
        for rows in itertools.combinations(range(len(P)), k):
            for cols in itertools.permutations(range(len(T)), k):
                v = [iou[r, c] for r, c in zip(rows, cols)]
                if min(v) >= threshold and (k, sum(v)) > best: best = (k, sum(v))
        if best[0]: break
    return best[0], len(P) - best[0], len(T) - best[0], best[1]


@pytest.mark.parametrize("seed", range(40))
def test_counter_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    true = _rects(rng, n=rng.integers(0, 6))
    pred = (_rects(rng, n=rng.integers(0, 3)) | np.roll(true, rng.integers(-2, 3, 2), (0, 1))) & (rng.random(true.shape) < 0.9)
    dc = DefectCounter(["bg", "crack"], ["crack"], thresholds=(0.1, 0.3), min_size=2).update(pred.astype(int), true.astype(int))
    for t in (0.1, 0.3, 0.5):
        s = dc.scores()["crack"][f"{t:g}"]
        tp, fp, fn, iou_sum = _oracle(pred, true, t, min_size=2)
        assert (s["tp"], s["fp"], s["fn"]) == (tp, fp, fn)
        assert math.isclose(s["iou_sum"], iou_sum, abs_tol=1e-9)


def test_ignore_equals_oracle_on_labelled_pixels():
    rng = np.random.default_rng(7)
    true = _rects(rng, n=5).astype(int)
    pred = np.roll(true, 1, axis=1)
    valid = np.ones(true.shape, bool); valid[:, 14:] = False
    target = np.where(valid, true, 255)
    s = DefectCounter(["bg", "crack"], ["crack"], (0.2,), ignore_index=255).update(pred, target).scores()["crack"]
    assert s["0.2"]["n_true"] >= 2
    for t in (0.2, 0.5):
        tp, fp, fn, iou_sum = _oracle(pred.astype(bool), (target == 1), t, valid=valid)
        assert (s[f"{t:g}"]["tp"], s[f"{t:g}"]["fp"], s[f"{t:g}"]["fn"]) == (tp, fp, fn)
        assert math.isclose(s[f"{t:g}"]["iou_sum"], iou_sum, abs_tol=1e-9)


def test_hungarian_beats_greedy():
    # truth A overlaps pred 1 (0.45) and pred 2 (0.40); truth B overlaps only pred 1 (0.42): greedy on the largest
    # IoU takes (1, A) and leaves B unmatched; the one-to-one optimum takes (1, B) and (2, A)
    pi, ti, iou = np.array([0, 1, 0]), np.array([0, 0, 1]), np.array([0.45, 0.40, 0.42])
    mp, mt, mi = match_pairs(pi, ti, iou, 0.3)
    assert sorted(zip(mp.tolist(), mt.tolist())) == [(0, 1), (1, 0)] and math.isclose(mi.sum(), 0.82)


def test_overlap_iou_hand_computed():
    p = np.zeros((10, 10), int); p[0:4, 0:4] = 1            # 16 px
    t = np.zeros((10, 10), int); t[2:6, 2:6] = 1; t[8:10, 8:10] = 2  # 16 px overlapping 4 px, and a 4-px square
    pi, ti, iou = overlaps(p, t, np.array([16]), np.array([16, 4]))
    assert pi.tolist() == [0] and ti.tolist() == [0] and math.isclose(iou[0], 4 / 28)


def test_pq_is_sq_times_rq_and_pooled():
    rng = np.random.default_rng(3)
    T = np.stack([_blobs(rng, (32, 32), 0.55) for _ in range(3)]).astype(np.int64)
    P = np.stack([np.roll(m, 1, axis=0) for m in T])
    dc = DefectCounter(["bg", "crack"], ["crack"], (0.3,)).update(torch.from_numpy(P), torch.from_numpy(T))
    for s in dc.scores()["crack"].values():
        assert s["tp"] > 0 and math.isclose(s["pq"], s["sq"] * s["rq"]) and math.isclose(s["rq"], s["f1"])
        assert s["tp"] + s["fn"] == s["n_true"] and s["tp"] + s["fp"] == s["n_pred"]
    # pooled, not a mean over images
    per = [DefectCounter(["bg", "crack"], ["crack"]).update(p, t).counts["crack"][0.5] for p, t in zip(P, T)]
    pooled = dc.counts["crack"][0.5]
    assert pooled["tp"] == sum(d["tp"] for d in per) and pooled["fn"] == sum(d["fn"] for d in per)
    assert math.isclose(dc.scores()["crack"]["0.5"]["recall"], instance_scores(pooled["tp"], pooled["fp"], pooled["fn"])["recall"])


def test_many_specks_no_dense_matrix():
    # a noisy 512² prediction with thousands of components is counted without an n_pred × n_true table
    rng = np.random.default_rng(0)
    pred = (rng.random((512, 512)) < 0.08).astype(np.int64)
    true = (rng.random((512, 512)) < 0.08).astype(np.int64)
    s = DefectCounter(["bg", "crack"], ["crack"], (0.1,)).update(pred, true).scores()["crack"]["0.1"]
    assert s["n_pred"] > 10_000 and s["n_true"] > 10_000 and s["tp"] + s["fp"] == s["n_pred"]


def test_columns_and_bad_input():
    p = np.zeros((8, 8), int); p[1:4, 1:4] = 2
    cols = defect_columns(DefectCounter(["bg", "oxide", "crack"], ["crack"], (0.25,)).update(p, p).scores())
    assert cols["defect_f1_crack@0.5"] == 1 and cols["defect_tp_crack@0.25"] == 1 and cols["defect_n_true_crack@0.5"] == 1
    with pytest.raises(MatsegError, match="dtype"):
        DefectCounter(["bg", "crack"], ["crack"]).update(p.astype(float), p)
    with pytest.raises(MatsegError, match="differ"):
        DefectCounter(["bg", "crack"], ["crack"]).update(p[:4], p)
    with pytest.raises(MatsegError, match="outside 0..1"):
        DefectCounter(["bg", "crack"], ["crack"]).update(p, p)
    with pytest.raises(MatsegError, match="is a class index"):
        DefectCounter(["bg", "crack"], ["crack"], ignore_index=1)
    with pytest.raises(MatsegError, match="min_size"):
        DefectCounter(["bg", "crack"], ["crack"], min_size=-1)
    with pytest.raises(MatsegError, match="no defect class"):
        DefectCounter(["bg", "crack"], [])


def test_ambiguous_groups_equal_brute_force():
    # predictions that cut true defects in pieces and merge neighbours: several eligible pairs per group at low
    # thresholds, where the assignment (not a unique best partner) decides; checked against exhaustive search
    ambiguous = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        true = _rects(rng, n=rng.integers(2, 5))
        pred = true.copy()
        pred[rng.integers(0, 20), :] = False; pred[:, rng.integers(0, 20)] = False  # cuts
        pred |= _rects(rng, n=1)  # a blob that may bridge two defects
        pl, pa = components(pred); tl, ta = components(true)
        if max(len(pa), len(ta)) > 7: continue
        pi, ti, iou = overlaps(pl, tl, pa, ta)
        dc = DefectCounter(["bg", "crack"], ["crack"], thresholds=(0.1, 0.2)).update(pred.astype(int), true.astype(int))
        for t in (0.1, 0.2):
            e = iou >= t
            ambiguous += len(set(pi[e])) < e.sum() or len(set(ti[e])) < e.sum()
            s = dc.scores()["crack"][f"{t:g}"]
            tp, fp, fn, iou_sum = _oracle(pred, true, t)
            assert (s["tp"], s["fp"], s["fn"]) == (tp, fp, fn) and math.isclose(s["iou_sum"], iou_sum, abs_tol=1e-9)
    assert ambiguous >= 15


@pytest.mark.parametrize("seed", range(4))
def test_pq_equals_torchmetrics_panoptic_quality(seed):
    # torchmetrics' PanopticQuality (Kirillov et al.: match when IoU > 0.5, counts pooled over the batch) on the same
    # components as instance ids; images where some pair has IoU exactly 0.5 (> vs >=) are left out
    PanopticQuality = pytest.importorskip("torchmetrics.detection").PanopticQuality
    rng = np.random.default_rng(seed)
    P, T = [], []
    while len(P) < 6:
        t = _rects(rng, (32, 32), n=6)
        p = (np.roll(t, rng.integers(-1, 2, 2), (0, 1)) & (rng.random(t.shape) < 0.95)) | _rects(rng, (32, 32), n=1)
        (pl, pa), (tl, ta) = components(p), components(t)
        if not np.any(overlaps(pl, tl, pa, ta)[2] == 0.5): P.append(p); T.append(t)
    pan = lambda ms: torch.from_numpy(np.stack([np.stack([m.astype(np.int64), components(m)[0]], -1) for m in ms]))
    ref = PanopticQuality(things={1}, stuffs={0}, return_per_class=True, return_sq_and_rq=True)(pan(P), pan(T))
    s = DefectCounter(["bg", "crack"], ["crack"]).update(np.stack(P).astype(int), np.stack(T).astype(int)).scores()["crack"]["0.5"]
    assert s["tp"] > 0 and s["fp"] + s["fn"] > 0
    assert np.allclose([s["pq"], s["sq"], s["rq"]], ref[0].numpy(), atol=1e-9)


@pytest.mark.parametrize("seed", range(10))
def test_true_instances_equal_brute_force(seed):
    # overlapping annotated rectangles (later ids drawn over earlier ones), a class map that cuts some away
    rng = np.random.default_rng(200 + seed)
    ids = np.zeros((20, 20), np.int64)
    for k in rng.choice(np.arange(1, 50), 5, replace=False):
        y, x = rng.integers(0, 16, 2); ids[y:y + rng.integers(2, 8), x:x + rng.integers(2, 8)] = k
    target = np.where(ids > 0, 1, 0); target[:, rng.integers(0, 20)] = 0
    pred = (np.roll(target, rng.integers(-1, 2, 2), (0, 1)) > 0) | _rects(rng, n=1)
    dc = DefectCounter(["bg", "pool"], ["pool"], thresholds=(0.2,), min_size=2).update(pred, target, true_instances=ids)
    lab, area = instance_labels(ids, target == 1, min_size=2)
    assert dc.counts["pool"][0.5]["n_true"] == len(area) == len({*np.unique(lab)} - {0})
    for t in (0.2, 0.5):
        s = dc.scores()["pool"][f"{t:g}"]
        tp, fp, fn, iou_sum = _oracle(pred, target == 1, t, min_size=2, true_ids=ids)
        assert (s["tp"], s["fp"], s["fn"]) == (tp, fp, fn) and math.isclose(s["iou_sum"], iou_sum, abs_tol=1e-9)
