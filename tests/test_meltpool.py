"""Melt-pool objects on the real set: the test split's annotated instances reach the defect counts through JobData."""
import json

import numpy as np
import pytest
from scipy import ndimage

from conftest import REPO, SHARED_DATA
from matseg.data import load_dataset
from matseg.objects import DefectCounter
from matseg.profile import load_profile
from matseg.train import prepare_data

MELTPOOL = SHARED_DATA / "meltpool"


@pytest.mark.skipif(not (MELTPOOL / "annotations").is_dir(), reason=f"melt-pool set not found at {MELTPOOL}")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_meltpool_test_split_counts_annotated_pools():
    prof = load_profile(REPO / "profiles/meltpool.json")
    spec = prof.datasets[0]
    assert prof.task.defect_classes == ["melt_pool"] and prof.task.instance_iou == 0.5
    ds = load_dataset(spec, prof.base_dir, splits="test")
    data = prepare_data(ds, spec.classes)
    _, y, names = data.splits["test"]
    ins = data.instances["test"]
    assert data.instances["train"].shape[0] == data.instances["val"].shape[0] == 0  # only the test split was loaded
    assert ins.shape == y.shape and len(names) == 32
    n_ann = sum(len(v) for v in json.loads(ds.attrs["instance_ids"]).values())
    yn = y.numpy().astype(np.int64)
    regions = sum(ndimage.label(m == 1, structure=np.ones((3, 3)))[1] for m in yn)
    # the truth as its own prediction: the annotated pools are the true objects (one per annotation with pixels),
    # the prediction is the merged connected regions
    s = DefectCounter.from_task(prof.task, spec.classes, spec.ignore_index).update(
        yn, yn, true_instances=ins).scores()["melt_pool"]["0.5"]
    per_tile = sum(len(np.unique(i)) - 1 for i in ins.numpy())  # ids are 1..k within each tile
    assert s["n_true"] == per_tile <= n_ann and s["n_pred"] == regions and s["n_true"] > 3 * regions
    assert s["tp"] <= regions and s["fn"] == s["n_true"] - s["tp"]
    s0 = DefectCounter.from_task(prof.task, spec.classes, spec.ignore_index).update(yn, yn).scores()["melt_pool"]["0.5"]
    assert s0["n_true"] == regions and s0["f1"] == 1  # without the annotations: components, as before
