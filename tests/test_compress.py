"""matseg compress end to end on a tiny trained job: pruned + int8 checkpoint, trade-off table, safe loading."""
import csv
import json
import shutil

import pytest
import safetensors.torch
import torch
from torch import nn

from matseg.core import MatsegError, atomic_write_json
from matseg.compress import cli_compress, prune_channels
from matseg.compressed import (CALIBRATION, Int8Segmenter, load_compressed, quantize_int8,
                             save_compressed, structure_recipe)
from matseg.models import build_model, sha256_file
from matseg.runs import TrainedJob
from matseg.train import evaluate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    "A one-epoch resnet18 U-Net on 10 synthetic 128x128 AFM images, compressed by prune+int8: (job dir, out dir, profile)."
    from matseg.profile import compile_profile, load_profile
    from matseg.runs import train_job
    from matseg.synth import write_afm_dataset
    threads = torch.get_num_threads(); torch.set_num_threads(1)  # parallel test runners on 2 cores
    tmp = tmp_path_factory.mktemp("compress")
    write_afm_dataset(tmp / "afm", n_images=10, size=128, seed=0)
    ds = json.loads((tmp / "afm" / "dataset.json").read_text()); ds["root"] = "afm"
    prof = {"name": "t", "datasets": [ds], "task": {"objective": "grains", "deployment_threshold": 0.9},
            "model": {"encoders": ["resnet18"], "decoders": ["unet"], "weights": "none"},
            "training": {"batch_size": 4, "max_epochs": 1, "crop_size": 64, "crops_per_image": 2, "tile_overlap": 0,
                         "seeds": [0], "amp": False}}
    atomic_write_json(tmp / "profile.json", prof)
    job = compile_profile(load_profile(tmp / "profile.json"))[0]
    train_job(job, tmp / "runs", device="cpu", progress=False)
    jdir = tmp / "runs" / job.dataset.name / job.id
    rc = cli_compress([str(jdir), "--out", str(tmp / "c"), "--method", "prune+int8", "--epochs", "1", "--no-compile",
                       "--sparsity", "0", "--calibration", "4", "--profile", str(tmp / "profile.json"), "--device", "cpu"])
    assert rc == 0
    yield jdir, tmp / "c", tmp / "profile.json"  # compressed job: c/<dataset>/<job_id>__prune+int8
    torch.set_num_threads(threads)


def _cdir(out, jdir, method="prune+int8"):
    return out / jdir.parent.name / f"{jdir.name}__{method}"


def _rows(out):
    with open(out / "tradeoff.csv") as f: return {r["method"]: r for r in csv.DictReader(f)}


def test_table_and_pruned_int8_checkpoint(run):
    jdir, out, prof = run
    rows = _rows(out)
    assert list(rows) == ["baseline", "prune+int8"]
    assert int(rows["prune+int8"]["params"]) < int(rows["baseline"]["params"])
    assert float(rows["prune+int8"]["gflops"]) < float(rows["baseline"]["gflops"]) / 1.4
    assert float(rows["prune+int8"]["weight_mb"]) < float(rows["baseline"]["weight_mb"]) / 3  # int8 weights: 1 byte
    assert float(rows["baseline"]["ms_per_image"]) > 0 and rows["baseline"]["threads"] == "1"
    assert "| prune+int8 |" in (out / "tradeoff.md").read_text()
    side = json.loads((_cdir(out, jdir) / "checkpoint.json").read_text())
    assert side["format"] == "matseg-compressed/1" and side["compression"]["int8"]["keep_head_fp32"]
    assert side["compression"]["structure"]["reshape"]  # channel counts recorded
    assert side["class_names"] == TrainedJob.open(jdir, device="cpu").classes
    assert (out / "profiles" / "t.json").is_file()  # the job's profile beside it, as in a run folder


def test_round_trip_reproduces_the_table(run):
    "The reloaded int8 model (rebuilt from weights + recipe + calibration) gives the test mIoU the table recorded."
    jdir, out, prof = run
    model, meta = load_compressed(_cdir(out, jdir))
    assert isinstance(model, Int8Segmenter)
    tj = TrainedJob.open(jdir, profile=prof, device="cpu")
    test = tj.load_split("test")
    m, _ = evaluate(model, test["x"], torch.as_tensor(test["masks"]).long(), tj.n_classes, 64, 0, boundary=False)
    assert abs(m["miou"] - float(_rows(out)["prune+int8"]["test_miou"])) < 1e-6
    # the fp32 structure inside has fewer channels than the original and the head's output count
    convs = lambda mod: sum(c.out_channels for c in mod.modules() if isinstance(c, nn.Conv2d))  # noqa: E731
    assert convs(model.float_model) < convs(tj.model)
    assert model.float_model.segmentation_head[0].out_channels == tj.n_classes
    with pytest.raises(MatsegError, match="CPU only"):
        load_compressed(_cdir(out, jdir), device="cuda")


def test_tampered_calibration_refused(run, tmp_path):
    jdir, out, _ = run
    d = tmp_path / "c"; shutil.copytree(_cdir(out, jdir), d)
    cal = safetensors.torch.load_file(str(d / CALIBRATION)); cal["x"] = cal["x"] * 0.5
    safetensors.torch.save_file(cal, str(d / CALIBRATION))
    with pytest.raises(MatsegError, match="sha256"):
        load_compressed(d)


def _tiny():
    torch.manual_seed(0)
    return build_model("resnet18", "unet", 1, 3, weights="none", encoder_depth=3, decoder_channels=[32, 16, 8]).eval()


META = {"encoder": "resnet18", "decoder": "unet", "in_channels": 1, "classes": 3,
        "model_kwargs": {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}}


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("pruned")
    p, _ = prune_channels(_tiny(), torch.randn(2, 1, 64, 64), speedup=1.5)
    save_compressed(d / "checkpoint.safetensors", p, META, {"method": "prune", "structure": structure_recipe(p, _tiny()),
                                                             "int8": None})
    return d, p


def test_pruned_round_trip(pruned):
    d, p = pruned
    m, meta = load_compressed(d / "checkpoint.json")
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(m(x), p(x)) and meta["compression"]["method"] == "prune"


@pytest.mark.parametrize("tamper, match", [
    ("bytes", "sha256 differs"),
    ("nan", "non-finite"),
    ("channels", "do not fit the rebuilt structure"),
    ("module", "does not exist"),
    ("format", "not a matseg-compressed/1"),
])
def test_tampered_checkpoint_refused(pruned, tmp_path, tamper, match):
    src, _ = pruned
    d = tmp_path / "t"; shutil.copytree(src, d)
    st, side = d / "checkpoint.safetensors", d / "checkpoint.json"
    meta = json.loads(side.read_text())
    if tamper == "bytes":
        b = bytearray(st.read_bytes()); b[-1] ^= 1; st.write_bytes(bytes(b))
    elif tamper == "nan":  # a well-formed file with a NaN, its sha256 updated: refused for the NaN itself
        t = safetensors.torch.load_file(str(st)); k = next(k for k, v in t.items() if v.is_floating_point())
        t[k] = t[k].clone(); t[k].view(-1)[0] = float("nan"); safetensors.torch.save_file(t, str(st))
        meta["sha256"] = sha256_file(st)
    elif tamper == "channels":  # the recipe claims other channel counts than the weights have
        k = next(iter(meta["compression"]["structure"]["reshape"]))
        ent = meta["compression"]["structure"]["reshape"][k]
        for a in ent["attrs"]:
            if a in ("out_channels", "num_features"): ent["attrs"][a] += 8
        ent["shapes"] = {n: [s + 8 if i == 0 else s for i, s in enumerate(shp)] for n, shp in ent["shapes"].items()}
    elif tamper == "module":
        meta["compression"]["structure"]["reshape"]["encoder.evil"] = {"attrs": {}, "shapes": {}}
    elif tamper == "format":
        meta["format"] = "matseg-checkpoint/1"
    side.write_text(json.dumps(meta))
    with pytest.raises(MatsegError, match=match):
        load_compressed(d)


def test_int8_export_failure_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__(); self.c = nn.Conv2d(1, 2, 3, padding=1)
        def forward(self, x):
            return self.c(x) if float(x.sum()) > 0 else -self.c(x)  # data-dependent control flow: not exportable
    with pytest.raises(MatsegError, match="PT2E"):
        quantize_int8(Branchy(), torch.rand(4, 1, 16, 16))



def test_readers_do_not_import_torchao():
    "int8 building needs torchao; opening and reading jobs (matseg.runs, the CLI) must not pay its import."
    import subprocess, sys
    code = "import sys, matseg.runs, matseg.cli; print('torchao' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_compressed_checkpoint_runs_through_every_reader(run, tmp_path, capsys):
    "evaluate, ood, explain and report open a `matseg compress` checkpoint (pruned + int8) like any job's."
    from matseg.cli import main
    jdir, out, prof = run
    c = _cdir(out, jdir)
    rc = main(["evaluate", str(c), "--profile", str(prof), "--device", "cpu", "--json", str(tmp_path / "ev.json")])
    assert rc == 0, capsys.readouterr().err
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert abs(ev["metrics"]["miou"] - float(_rows(out)["prune+int8"]["test_miou"])) < 1e-6  # the table's number
    rc = main(["ood", str(c), "--profile", str(prof), "--device", "cpu", "--out", str(tmp_path / "ood"),
               "--shift", "blur", "--test", f"{jdir.parent.name}:test"])
    assert rc == 0, capsys.readouterr().err
    assert any((tmp_path / "ood").iterdir())
    img = sorted((jdir.parents[2] / "afm").rglob("*.tif*"))[0]  # a 3-channel AFM image
    rc = main(["explain", str(c), str(img), "--region", "0,0,32,32", "--patch", "16", "--stride", "16",
               "--validate", "0", "--device", "cpu", "--out", str(tmp_path / "ex")])
    assert rc == 0, capsys.readouterr().err
    ex = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert ex["attrs"]["n_locations"] > 0 and ex["attrs"]["path"]  # which path ran is said
    rc = main(["report", str(c), "--profile", str(prof), "--device", "cpu", "--n-images", "1", "--heatmap-size", "64",
               "--out", str(tmp_path / "rep")])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert "prune+int8" in json.dumps(rep) and (tmp_path / "rep" / "report.html").is_file()


def test_tile_option_sets_the_export_evaluation_and_reader_tile(run, tmp_path):
    "--tile: the int8 model is exported, evaluated and timed at that tile, and every reader tiles it there; fine-tuning keeps the job's crop."
    jdir, _, prof = run
    common = [str(jdir), "--method", "int8", "--no-compile", "--sparsity", "0", "--calibration", "2",
              "--profile", str(prof), "--device", "cpu"]
    with pytest.raises(MatsegError, match="use --tile 128"):  # 160 > the 128 px images
        cli_compress(common + ["--out", str(tmp_path / "bad"), "--tile", "160"])
    with pytest.raises(MatsegError, match="--tile 100 is out of range"):  # not a multiple of 32
        cli_compress(common + ["--out", str(tmp_path / "bad"), "--tile", "100"])
    assert cli_compress(common + ["--out", str(tmp_path / "c"), "--tile", "128"]) == 0
    info = json.loads((tmp_path / "c" / "compress.json").read_text())
    assert (info["tile"], info["finetune_crop"]) == (128, 64)
    cdir = _cdir(tmp_path / "c", jdir, "int8")
    side = json.loads((cdir / "checkpoint.json").read_text())
    assert side["crop_size"] == 128 and side["compression"]["int8"]["tile"] == 128
    tj = TrainedJob.open(cdir, profile=prof, device="cpu")
    assert tj.tile == 128 and tj.model.tile == 128
    x = tj.load_split("test")["x"][:1]
    assert tj.probs(x[0]).shape == (tj.n_classes, *x.shape[-2:])
