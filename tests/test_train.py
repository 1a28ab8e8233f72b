"""Training protocol: early stopping, exact resume, grid skipping, sampler seeds, metrics vs torchmetrics."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import matseg.runs as R
import matseg.train as T
from conftest import write_toy_dataset
from matseg.core import MatsegError
from matseg.profile import compile_profile, load_profile

CLASSES = ["matrix", "disc", "band"]


@pytest.fixture(autouse=True)
def _one_thread():
    "Tiny models: one thread is fastest and avoids oversubscription on a busy 2-core machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_toy_profile(tmp: Path, decoders=("unet",), seeds=(0,), **training) -> Path:
    "A tiny profile over the toy dataset (resnet18, random init, 32-pixel crops)."
    write_toy_dataset(tmp / "data")
    tr = {"batch_size": 4, "max_epochs": 3, "crop_size": 32, "crops_per_image": 2, "tile_overlap": 8,
          "seeds": list(seeds), **training}
    prof = {"name": "toy", "datasets": [{"name": "toy", "modality": "other", "material": "synthetic", "root": "data",
                                         "classes": CLASSES}],
            "task": {"objective": "segment discs and bands"},
            "model": {"encoders": ["resnet18"], "decoders": list(decoders), "weights": "none"}, "training": tr}
    (tmp / "profile.json").write_text(json.dumps(prof))
    return tmp / "profile.json"


def fingerprint(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.state_dict().values() if p.is_floating_point()))


def test_early_stopping_on_scripted_curve(tmp_path, monkeypatch):
    "Stops `patience` epochs after the best val mIoU, restores the best epoch's weights, evaluates once on test."
    job = compile_profile(load_profile(write_toy_profile(tmp_path, max_epochs=30, patience=3)))[0]
    curve = [0.1, 0.3, 0.5, 0.4, 0.5, 0.45, 0.9]  # best at epoch 3; 0.5 at epoch 5 is a tie, not an improvement
    real, calls = T.evaluate, []

    def scripted(model, images, masks, n_classes, size, overlap=64, amp=False, boundary=True, tolerance=2, rule="pixels", ignore_index=None):
        calls.append((boundary, len(images), fingerprint(model)))
        if boundary: return real(model, images, masks, n_classes, size, overlap, amp, boundary, tolerance, rule, ignore_index=ignore_index)
        v = curve[sum(not b for b, *_ in calls) - 1]
        return {"miou": v, "loss": 1 - v}, np.zeros((len(images),) + tuple(masks.shape[1:]), np.uint8)

    monkeypatch.setattr(R, "evaluate", scripted)  # what train_job calls
    r = R.train_job(job, tmp_path / "run", device="cpu", progress=False)
    assert r["epochs"] == 6 and r["best_epoch"] == 3 and r["stopped_early"] is True
    per_epoch = [c for c in calls if not c[0]]
    final = [c for c in calls if c[0]]
    assert len(per_epoch) == 6 and len(final) == 2  # val + test, each exactly once, after training
    assert [c[1] for c in final] == [2, 2]
    assert all(abs(c[2] - per_epoch[2][2]) < 1e-6 * abs(per_epoch[2][2]) for c in final)  # epoch-3 weights restored
    assert abs(per_epoch[5][2] - per_epoch[2][2]) > 1e-6  # ... which differ from the last epoch's
    ck = json.loads((R.job_dir(tmp_path / "run", job) / "checkpoint.json").read_text())
    assert ck["epoch"] == 3 and ck["class_names"] == CLASSES
    hist = (R.job_dir(tmp_path / "run", job) / "history.csv").read_text().splitlines()
    assert len(hist) == 7 and hist[0].startswith("job,epoch,train_loss")


def test_early_stopping_on_val_loss():
    "monitor=val_loss: lower is better."
    es = T.EarlyStopping(patience=2)
    vals = [R._monitor_value("val_loss", {"loss": v, "miou": 0}) for v in (1.0, 0.5, 0.6, 0.7)]
    assert [es.step(i, v) for i, v in enumerate(vals)] == [True, True, False, False] and es.should_stop


def _ckpt_tensors(run, job):
    from safetensors.torch import load_file
    return load_file(str(R.job_dir(run, job) / "checkpoint.safetensors"))


@pytest.mark.parametrize("how", ["stop_mid_epoch", "killed_after_epoch"])
def test_resume_gives_identical_weights(tmp_path, how):
    "An interrupted job resumes at the right epoch and ends with the same weights as an uninterrupted one."
    job = compile_profile(load_profile(write_toy_profile(tmp_path, max_epochs=3)))[0]
    ref = R.train_job(job, tmp_path / "a", device="cpu", progress=False)

    rows = []
    if how == "stop_mid_epoch":
        steps = {"n": 0}

        def stop():  # 2 batches per epoch: set during epoch 2
            steps["n"] += 1; return steps["n"] > 3
        out = R.train_job(job, tmp_path / "b", device="cpu", progress=False, stop=stop, callbacks=rows.append)
        assert out == {"id": job.id, "status": "stopped", "epochs": 1}
        done = 1
    else:
        def kill(row):
            rows.append(row)
            if row["epoch"] == 2: raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            R.train_job(job, tmp_path / "b", device="cpu", progress=False, callbacks=kill)
        done = 2
    state = torch.load(R.job_dir(tmp_path / "b", job) / "state.pt", weights_only=True)
    assert state["epoch"] == done and not (R.job_dir(tmp_path / "b", job) / "result.json").exists()

    resumed = []
    r = R.train_job(job, tmp_path / "b", device="cpu", progress=False, callbacks=resumed.append)
    assert [x["epoch"] for x in resumed] == list(range(done + 1, 4))
    assert r["epochs"] == 3 and r["best_epoch"] == ref["best_epoch"]
    a, b = _ckpt_tensors(tmp_path / "a", job), _ckpt_tensors(tmp_path / "b", job)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.dumps(r["metrics"], sort_keys=True) == json.dumps(ref["metrics"], sort_keys=True)
    assert not (R.job_dir(tmp_path / "b", job) / "state.pt").exists()


def test_grid_skips_finished_jobs(tmp_path, monkeypatch):
    "run_jobs trains only jobs without result.json and loads no data when all are finished."
    profile = load_profile(write_toy_profile(tmp_path, decoders=("unet", "fpn"), max_epochs=1))
    started = []
    cb = type("CB", (), {"on_job_start": lambda self, job: started.append(job.id)})()
    first = R.run_jobs(profile, tmp_path / "run", device="cpu", callbacks=cb, progress=False)
    assert [r["status"] for r in first] == ["done", "done"] and len(started) == 2
    import matseg.data
    def no_load(*a, **k): raise AssertionError("data loaded although every job is finished")
    monkeypatch.setattr(matseg.data, "load_dataset", no_load)
    again = R.run_jobs(profile, tmp_path / "run", device="cpu", callbacks=cb, progress=False)
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)  # (json: NaN-safe equality)
    assert len(started) == 2
    monkeypatch.undo()
    (R.job_dir(tmp_path / "run", compile_profile(profile)[1]) / "result.json").unlink()
    R.run_jobs(profile, tmp_path / "run", device="cpu", callbacks=cb, progress=False)
    assert started[2:] == [compile_profile(profile)[1].id]


def test_sampler_seeded_and_bn_guard():
    x = torch.rand(3, 1, 40, 40); y = (x[:, 0] > 0.5).to(torch.uint8)
    a = [b[0] for b in T.CropSampler(x, y, 32, 4, seed=1, crops_per_image=3)]
    b = [b[0] for b in T.CropSampler(x, y, 32, 4, seed=1, crops_per_image=3)]
    c = [b[0] for b in T.CropSampler(x, y, 32, 4, seed=2, crops_per_image=3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b)) and not torch.equal(a[0], c[0])
    assert [len(t) for t in a] == [4, 4]  # 9 crops, batch 4: the last batch of 1 is dropped
    for xb, yb in T.CropSampler(x, y, 32, 4, seed=0, crops_per_image=3):  # masks follow the augmented images
        assert torch.equal((xb[:, 0] > 0.5).long(), yb)
    with pytest.raises(MatsegError):
        len(T.CropSampler(x[:1], y[:1], 32, 1, crops_per_image=1))


def test_evaluate_matches_torchmetrics():
    "Metrics of tiled evaluation equal torchmetrics on the returned predictions (independent oracle)."
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_jaccard_index
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1)).eval()
    x = torch.rand(3, 1, 50, 70); y = torch.randint(0, 3, (3, 50, 70), dtype=torch.uint8)
    res, pred = T.evaluate(model, x, y, 3, size=32, overlap=8, boundary=False)
    p, t = torch.from_numpy(pred).long(), y.long()
    iou = multiclass_jaccard_index(p, t, 3, average=None)
    assert np.allclose(res["iou"], iou.numpy(), atol=1e-6)
    assert abs(res["miou"] - iou[1:].mean().item()) < 1e-6
    assert abs(res["pixel_accuracy"] - multiclass_accuracy(p, t, 3, average="micro").item()) < 1e-6
    # tiled stitching of a 3x3 conv differs from a whole-image pass only near tile seams: mostly equal argmax
    with torch.no_grad(): full = model(x).argmax(1)
    assert (full == p).float().mean() > 0.97


def test_class_weights_inverse_frequency():
    m = torch.tensor([[0] * 90 + [1] * 9 + [2]])
    w = T.inverse_frequency_weights(m, 3)
    assert torch.allclose(w * torch.tensor([90., 9., 1.]), torch.full((3,), (w[2] * 1).item()), rtol=1e-5)
    assert abs(w.mean().item() - 1) < 1e-6


def test_loss_skips_ignore_index():
    "Ignored pixels change neither loss term: the loss equals the loss over the labelled pixels alone."
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6, requires_grad=True)
    t = torch.randint(0, 3, (2, 4, 6))
    t_ign = t.clone(); t_ign[:, :, 3:] = 255
    ce = T.make_loss("ce", ignore_index=255)(logits, t_ign)
    ref = torch.nn.functional.cross_entropy(logits[:, :, :, :3], t[:, :, :3])  # labelled columns only
    assert torch.isclose(ce, ref, atol=1e-6)
    # Dice over ignored pixels: the same as Dice with those pixels removed (smp's DiceLoss masks them)
    d_ign = T.make_loss("dice", ignore_index=255)(logits, t_ign)
    d_ref = T.make_loss("dice")(logits[:, :, :, :3].contiguous(), t[:, :, :3].contiguous())
    assert torch.isclose(d_ign, d_ref, atol=1e-5)
    both = T.make_loss("ce+dice", ignore_index=255)(logits, t_ign)
    assert torch.isclose(both, ref + d_ref, atol=1e-5)
    zero = T.make_loss("ce+dice", ignore_index=255)(logits, torch.full_like(t, 255))
    zero.backward()
    assert zero.item() == 0 and logits.grad.abs().sum() == 0  # nothing labelled: no NaN, no gradient
    with pytest.raises(IndexError):  # without ignore_index a 255 label is not silently accepted
        T.make_loss("ce")(logits, t_ign)


def test_evaluate_skips_ignore_index():
    "Metrics with ignored pixels equal the metrics over the labelled pixels (torchmetrics with ignore_index)."
    from torchmetrics.functional.classification import multiclass_jaccard_index
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1)).eval()
    x = torch.rand(2, 1, 40, 40); y = torch.randint(0, 3, (2, 40, 40), dtype=torch.uint8)
    y[:, :10] = 255
    res, pred = T.evaluate(model, x, y, 3, size=32, overlap=8, boundary=True, ignore_index=255)
    iou = multiclass_jaccard_index(torch.from_numpy(pred).long(), y.long(), 3, average=None, ignore_index=255)
    assert np.allclose(res["iou"], iou.numpy(), atol=1e-6) and res["n_pixels"] == 2 * 30 * 40
    assert np.isfinite(res["loss"]) and np.isfinite(res["boundary_f1"])
    y_all = torch.full_like(y, 255)
    res0, _ = T.evaluate(model, x, y_all, 3, size=32, overlap=8, boundary=False, ignore_index=255)
    assert res0["n_pixels"] == 0 and np.isnan(res0["loss"])


def test_prepare_data_fractions_exclude_ignored():
    import xarray as xr
    m = np.zeros((3, 4, 5), np.uint8); m[:, :, 0] = 1; m[:, :, 4] = 255  # 15 px per image: 12 labelled, 3 class 1
    ds = xr.Dataset({"image": (("sample", "channel", "y", "x"), np.zeros((3, 1, 4, 5), np.float32)),
                     "mask": (("sample", "y", "x"), m)},
                    coords={"sample": ["a", "b", "c"], "split": ("sample", ["train", "val", "test"])},
                    attrs={"classes": json.dumps(["bg", "fg"])})
    jd = T.prepare_data(ds)
    assert jd.context["class_fraction"] == {"bg": 0.75, "fg": 0.25} and jd.context["minority_class"] == "fg"
