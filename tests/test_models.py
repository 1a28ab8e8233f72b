"""Tests of matseg.models: factory, weights resolution, BatchNorm guard, safe checkpoints."""
from __future__ import annotations

import os
import time

import numpy as np
import pytest
import safetensors.torch
import torch

from matseg.core import MatsegError
from matseg.models import (LITE0, LITE0_ENCODER, bn_safe_batches, build_model, efficientnet_lite0_state_dict,
                           hub_reachable, input_stats, list_decoders, list_encoders, load_checkpoint,
                           read_state_dict, save_checkpoint)

torch.set_num_threads(2)
X64 = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))


def test_registries_and_unknown_names():
    assert {"unet", "unetplusplus", "manet", "linknet", "fpn", "pspnet", "deeplabv3", "deeplabv3plus",
            "pan", "upernet", "segformer", "dpt"} <= set(list_decoders())
    assert "resnet50" in list_encoders() and "mit_b0" in list_encoders()
    with pytest.raises(MatsegError, match="deeplabv3plus") as e: build_model("resnet18", "deeplab")
    assert "valid" in str(e.value) or "use one of" in str(e.value)
    with pytest.raises(MatsegError, match="tu-<timm name>") as e: build_model("resnet19", "unet")
    assert "resnet18" in str(e.value)
    with pytest.raises(MatsegError, match="timm has no model"): build_model("tu-notamodel_xyz", "unet")


@pytest.mark.parametrize("decoder", ["unet", "deeplabv3", "deeplabv3plus"])
@pytest.mark.parametrize("encoder", ["resnet50", "se_resnext101_32x4d"])
def test_paper_grid_builds(encoder, decoder):
    m = build_model(encoder, decoder, in_channels=1, classes=3).eval()
    assert m.matseg_arch == {"encoder": encoder, "decoder": decoder, "in_channels": 1, "classes": 3, "kwargs": {}}
    if encoder == "resnet50":  # one forward per decoder is enough (se_resnext101 is slow on CPU)
        with torch.no_grad(): assert m(X64[:1]).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("encoder,decoder", [("tu-resnet18", "fpn"), ("mit_b0", "segformer"),
                                             ("resnet18", "upernet"), ("resnet18", "unetplusplus")])
def test_other_families_forward(encoder, decoder):
    m = build_model(encoder, decoder, in_channels=3 if encoder == "mit_b0" else 1, classes=2).eval()
    with torch.no_grad(): y = m(torch.rand(1, m.matseg_arch["in_channels"], 64, 64))
    assert y.shape == (1, 2, 64, 64)


def test_deeplabv3_train_mode_batch_two_and_guard():
    m = build_model("resnet18", "deeplabv3", in_channels=1, classes=2).train()
    out = m(X64)
    out.mean().backward()
    assert out.shape == (2, 2, 64, 64)
    with pytest.raises(ValueError): m(X64[:1])  # the failure the guard exists for
    for n in range(2, 40):
        for bs in (2, 3, 4, 16):
            batches, drop = bn_safe_batches(n, bs)
            b = min(bs, n)
            sizes = [b] * (n // b) + ([n % b] if n % b else [])
            if drop: sizes = sizes[:-1]
            assert len(sizes) == batches and min(sizes) >= 2
    with pytest.raises(MatsegError): bn_safe_batches(1, 16)
    with pytest.raises(MatsegError): bn_safe_batches(10, 1)


def test_lite0_weights_are_the_package_tensors_and_differ_from_random():
    sd, path = efficientnet_lite0_state_dict()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    raw = [v for k, v in raw.items() if not k.startswith("_fc.")]
    m = build_model(LITE0_ENCODER, "unet", in_channels=3, classes=2, weights=LITE0)
    enc = m.encoder.state_dict()
    assert len(enc) == len(raw)
    for (k, v), r in zip(enc.items(), raw):
        assert torch.equal(v, r), k
    rnd = build_model(LITE0_ENCODER, "unet", in_channels=3, classes=2)
    assert not torch.equal(rnd.encoder.conv_stem.weight, m.encoder.conv_stem.weight)
    assert m.matseg_weights["source"] == LITE0 and len(m.matseg_weights["sha256"]) == 64
    with pytest.raises(MatsegError, match=LITE0_ENCODER): build_model("resnet18", "unet", weights=LITE0)


def test_lite0_weights_classify_imagenet_photo():
    """The by-order renaming is semantically right: the real network recognises a cat."""
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image
    sd, path = efficientnet_lite0_state_dict()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    m = build_model(LITE0_ENCODER, "unet", in_channels=3, classes=2, weights=LITE0).eval()
    st = input_stats(LITE0_ENCODER, LITE0)
    img = torch.tensor(np.asarray(Image.fromarray(skdata.chelsea()).resize((224, 224))), dtype=torch.float32) / 255
    x = (img.permute(2, 0, 1) - torch.tensor(st["mean"])[:, None, None]) / torch.tensor(st["std"])[:, None, None]
    with torch.no_grad():
        logits = m.encoder.forward_features(x[None]).mean((2, 3)) @ raw["_fc.weight"].T + raw["_fc.bias"]
    assert 281 <= int(logits.argmax()) <= 285  # ImageNet cat classes
    assert logits.softmax(-1)[0, 281:286].sum() > 0.5


def test_local_encoder_and_full_model_files(tmp_path):
    src = build_model("resnet18", "unet", in_channels=3, classes=2)
    enc = {k: v for k, v in src.encoder.state_dict().items()}
    enc["fc.weight"] = torch.zeros(1000, 512)  # an ImageNet head: reported, not fatal
    safetensors.torch.save_file(enc, str(tmp_path / "enc.safetensors"))
    with pytest.warns(UserWarning, match="not used"):
        m = build_model("resnet18", "unet", in_channels=3, classes=2, weights=tmp_path / "enc.safetensors")
        m1 = build_model("resnet18", "unet", in_channels=1, classes=2, weights=tmp_path / "enc.safetensors")
    assert torch.equal(m.encoder.conv1.weight, src.encoder.conv1.weight)
    assert m.matseg_weights["kind"] == "encoder" and m.matseg_weights["unexpected"] == ["fc.weight"]
    # one input channel: the RGB stem is summed
    assert torch.allclose(m1.encoder.conv1.weight, src.encoder.conv1.weight.sum(1, keepdim=True))
    # full model as a wrapped, DataParallel-prefixed .pth; folder with one file resolves to it
    (tmp_path / "full").mkdir()
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "full" / "w.pth")
    mf = build_model("resnet18", "unet", in_channels=3, classes=2, weights=tmp_path / "full")
    assert mf.matseg_weights["kind"] == "model"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad(): assert torch.equal(src.eval()(x), mf.eval()(x))
    # mismatches are errors, never partial loads
    with pytest.raises(MatsegError, match="shapes do not match"):
        build_model("resnet18", "unet", in_channels=3, classes=5, weights=tmp_path / "full" / "w.pth")
    with pytest.raises(MatsegError, match="matches neither"):
        build_model("resnet34", "unet", in_channels=3, classes=2, weights=tmp_path / "enc.safetensors")
    with pytest.raises(MatsegError, match="does not exist"):
        build_model("resnet18", "unet", weights=tmp_path / "missing.safetensors")


def test_plain_timm_file_for_tu_encoder(tmp_path):
    import timm
    t = timm.create_model("resnet18", num_classes=1000)
    safetensors.torch.save_file(t.state_dict(), str(tmp_path / "model.safetensors"))  # as on the timm hub
    with pytest.warns(UserWarning, match="fc.weight"):
        m = build_model("tu-resnet18", "unet", in_channels=1, classes=2, weights=tmp_path)
    assert torch.allclose(m.encoder.model.conv1.weight, t.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.encoder.model.layer4[1].bn2.running_var, t.layer4[1].bn2.running_var)
    assert m.matseg_weights["n_unexpected"] == 2


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_pickles_are_never_executed(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(1), "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(MatsegError, match="weights_only"): read_state_dict(tmp_path / "evil.pt")
    with pytest.raises(MatsegError, match="never loaded"): load_checkpoint(tmp_path / "evil.pt")
    (tmp_path / "evil.safetensors").write_bytes((tmp_path / "evil.pt").read_bytes())
    (tmp_path / "evil.json").write_text('{"encoder": "resnet18", "decoder": "unet", "in_channels": 1, "classes": 2}')
    with pytest.raises(MatsegError, match="not a readable safetensors"): load_checkpoint(tmp_path / "evil.safetensors")
    assert not _Evil.marker.exists()


def test_checkpoint_round_trip_and_errors(tmp_path):
    m = build_model("resnet18", "unet", in_channels=1, classes=3, decoder_channels=(64, 32, 16, 8, 4)).eval()
    ck = tmp_path / "job" / "checkpoint.safetensors"
    meta = {"class_names": ["a", "b", "c"], "normalization": {"kind": "percentile", "low": 1, "high": 99},
            "job": {"id": "ds__resnet18__unet__s0", "seed": 0}}
    save_checkpoint(ck, m, meta)
    assert sorted(p.name for p in ck.parent.iterdir()) == ["checkpoint.json", "checkpoint.safetensors"]
    m2, meta2 = load_checkpoint(ck, device="cpu")
    assert not m2.training
    with torch.no_grad(): assert torch.equal(m(X64), m2(X64))
    assert meta2["class_names"] == ["a", "b", "c"] and meta2["model_kwargs"]["decoder_channels"] == [64, 32, 16, 8, 4]
    assert meta2["weights"] == {"source": "none", "sha256": None} and meta2["job"]["seed"] == 0
    load_checkpoint(ck.with_suffix(".json")); load_checkpoint(ck.parent)  # other ways to name it
    with pytest.raises(MatsegError, match="does not exist"): load_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(MatsegError, match=r"\.safetensors"): save_checkpoint(tmp_path / "x.pt", m)
    with pytest.raises(MatsegError, match="class_names"): save_checkpoint(tmp_path / "y.safetensors", m, {"class_names": ["a"]})
    # architecture mismatch: the sidecar claims another model
    save_checkpoint(tmp_path / "o.safetensors", build_model("resnet18", "unet", in_channels=1, classes=3))
    side = tmp_path / "o.json"
    j = side.read_text().replace('"classes": 3', '"classes": 4')
    side.write_text(j)
    with pytest.raises(MatsegError, match="does not fit"): load_checkpoint(tmp_path / "o.safetensors")
    # tensors from another save than the sidecar
    save_checkpoint(tmp_path / "p.safetensors", m)
    (tmp_path / "p.safetensors").write_bytes((tmp_path / "o.safetensors").read_bytes())
    with pytest.raises(MatsegError, match="sha256"): load_checkpoint(tmp_path / "p.safetensors")
    side.unlink()
    with pytest.raises(MatsegError, match="sidecar"): load_checkpoint(tmp_path / "o.safetensors")


def test_input_stats():
    assert input_stats("resnet50", "none") is None
    s = input_stats("resnet50", "imagenet", in_channels=3)
    assert s["mean"] == pytest.approx([0.485, 0.456, 0.406]) and s["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert input_stats("resnet50", "imagenet", in_channels=1)["mean"] == pytest.approx([np.mean([0.485, 0.456, 0.406])])
    assert len(input_stats("resnet50", "imagenet", in_channels=4)["std"]) == 4
    assert input_stats("inceptionv4", "imagenet")["mean"] == [0.5] * 3


@pytest.mark.parametrize("hf_offline", ["1", None])
def test_imagenet_offline_fails_fast_with_fix(tmp_path, monkeypatch, hf_offline):
    import huggingface_hub.constants as c
    if hf_offline is None and (hub_reachable() or c.HF_HUB_OFFLINE):
        pytest.skip("the Hugging Face hub is reachable here (or HF_HUB_OFFLINE is fixed at import): "
                    "the no-network path cannot be exercised")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if hf_offline: monkeypatch.setenv("HF_HUB_OFFLINE", hf_offline)
    t0 = time.perf_counter()
    with pytest.raises(MatsegError) as e:
        build_model("resnet18", "unet", in_channels=1, classes=2, weights="imagenet")
    assert time.perf_counter() - t0 < 5
    msg = str(e.value)
    assert "smp-hub/resnet18.imagenet" in msg and "model.safetensors" in msg
    assert "/path/to/encoder.safetensors" in msg and "lite0-imagenet" in msg
    assert ("HF_HUB_OFFLINE" in msg) == bool(hf_offline)
    with pytest.raises(MatsegError, match="timm/resnet18"):  # timm (tu-) weights too
        build_model("tu-resnet18", "unet", weights="imagenet")
    assert time.perf_counter() - t0 < 10
