"The one QC protocol (matseg.ood.qc_protocol): ID vs ID centres on 0.5, whole groups per side, honest thresholds."
import numpy as np
import pytest

from matseg.core import MatsegError
from matseg.ood import auto_k, qc_protocol, qc_split, threshold_interval


def _case(r, shift=3.0):
    g = np.random.default_rng(r)
    F, src = g.normal(size=(12 * 8, 8)), np.repeat(np.arange(12), 8)
    T, tsrc = g.normal(size=(6 * 8, 8)), np.repeat(np.arange(6), 8)
    return qc_protocol(F, src, np.arange(12), {"id-test": (T, tsrc)}, {"shift": (g.normal(size=(48, 8)) + shift, tsrc)},
                       seed=r)


def test_id_vs_id_centres_on_half():
    au = np.array([_case(r)["tests"]["id-test"]["auroc_vs_heldout_id"] for r in range(20)])
    assert abs(au.mean() - 0.5) < 0.05, au


def test_verdicts_and_threshold_interval():
    q = _case(0)
    assert q["detector_validated"]["validated"] and q["detector_validated"]["designated"] == ["shift"]
    t = q["threshold"]
    assert t["needs"] is None and t["low"] <= t["threshold"] <= t["high"]
    assert 0 <= q["tests"]["id-test"]["image_pass_rate"] <= 1
    assert not _case(0, shift=0.0)["detector_validated"]["validated"]  # an unshifted "shift" is not separated


def test_k_from_fit_id_data_only():
    q = _case(1)
    assert q["k"] == auto_k(q["n_fit_images"] * 8, q["n_fit_images"])


def test_split_by_group_and_too_few():
    g = np.repeat(np.arange(6), 2)
    f, h = qc_split(g, seed=1)
    assert not set(g[f]) & set(g[h]) and f.any() and h.any()
    with pytest.raises(MatsegError, match="at least 5"):
        qc_split(np.arange(4))
    t = threshold_interval(np.zeros(10), np.arange(10))
    assert t["threshold"] is None and "needs >= 3" in t["needs"] and ">= 20" in t["needs"]
