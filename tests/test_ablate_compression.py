"""The ablation's -compression variant on the shipped sample: full's trained jobs compressed (int8) and evaluated on the
same test split, one row per seed, paired with full."""
import json

import pytest
import torch

from matseg import ablate as A
from matseg.benchmark import evaluate_checkpoint
from matseg.core import MatsegError, asset_path

SET = ['model.encoders=["resnet18"]', 'model.decoders=["unet"]', "model.weights=none", "training.max_epochs=1",
       "training.crop_size=128", "training.crops_per_image=1", "training.batch_size=4", "training.tile_overlap=0",
       "training.amp=false", "training.seeds=[0,1]"]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("abl")
    r = A.run_ablation(asset_path("profiles", "sample.json"), out, ["-compression"], device="cpu", overrides=SET)
    yield out, r
    torch.set_num_threads(threads)


def test_one_row_per_seed_paired_with_full(ablation):
    out, r = ablation
    ds = r["dataset"]
    assert list(ds["variant"].values) == ["full", "-compression"] and sorted(ds["seed"].values.tolist()) == [0, 1]
    sc = ds["score"].sel(metric="iou").squeeze()
    assert bool(sc.notnull().all())  # both variants have a test mIoU for both seeds
    meta = json.loads((out / "ablation.json").read_text())
    assert meta["compression"] == {"method": "int8", "epochs": 2}
    # the -compression score is the compressed checkpoint's test mIoU (independent: matseg evaluate's code path)
    for seed in (0, 1):
        res = next((out / "variants" / "without-compression").glob(f"*__s{seed}/*/*__int8/result.json"))
        rec = json.loads(res.read_text())
        ev = evaluate_checkpoint(rec["compression"]["checkpoint"], device="cpu")
        v = float(ds["score"].sel(variant="-compression", seed=seed, metric="iou").squeeze())
        assert abs(v - ev["metrics"]["miou"]) < 1e-9
        assert abs(rec["compression"]["tradeoff"]["test_miou"] - ev["metrics"]["miou"]) < 1e-6
        f = float(ds["score"].sel(variant="full", seed=seed, metric="iou").squeeze())
        assert abs(float(ds["delta"].sel(variant="-compression", seed=seed, metric="iou").squeeze()) - (v - f)) < 1e-12
    assert "-compression" in (out / "ablation.md").read_text()


def test_resume_reuses_compressed_results(ablation, monkeypatch):
    out, r = ablation
    monkeypatch.setattr(A, "compress", lambda *a, **k: (_ for _ in ()).throw(AssertionError("compressed again")))
    r2 = A.run_ablation(asset_path("profiles", "sample.json"), out, ["-compression"], device="cpu", overrides=SET)
    assert r2["dataset"]["score"].equals(r["dataset"]["score"])


def test_unknown_method_refused_before_compute(tmp_path):
    with pytest.raises(MatsegError, match="not known"):
        A.run_ablation(asset_path("profiles", "sample.json"), tmp_path / "x", ["-compression"], device="cpu",
                       overrides=SET, compression_method="quantum")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())
