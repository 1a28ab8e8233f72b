"Cost per model: FLOPs against the closed form and a forward-hook oracle, parameters, latency, checkpoint size."
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from matseg.core import MatsegError
from matseg.cost import COST_COLUMNS, cost_columns, cost_table, count_flops, iou_latency_chart, model_cost
from matseg.models import build_model, save_checkpoint


def _conv_flops_by_hooks(model: torch.nn.Module, x: torch.Tensor) -> int:
    "Independent count: 2 * Cin/groups * Cout * kh * kw * Hout * Wout per Conv2d, 2 * in * out per Linear row."
    total = 0
    def conv(m, inp, out):
        nonlocal total
        total += 2 * (m.in_channels // m.groups) * m.out_channels * m.kernel_size[0] * m.kernel_size[1] * out[0, 0].numel()
    def lin(m, inp, out):
        nonlocal total
        total += 2 * m.in_features * m.out_features * (out.numel() // out.shape[0] // m.out_features)
    hooks = [m.register_forward_hook(conv) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks += [m.register_forward_hook(lin) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad(): model.eval()(x[:1])
    finally:
        for h in hooks: h.remove()
    return total


@pytest.mark.parametrize("cin,cout,k,stride,pad,dil,hw", [(3, 5, 3, 1, 1, 1, (16, 12)), (4, 6, 5, 2, 0, 1, (33, 20)),
                                                          (2, 3, 3, 1, 2, 2, (9, 9)), (1, 1, 1, 1, 0, 1, (7, 5))])
def test_conv2d_exact(cin, cout, k, stride, pad, dil, hw):
    m = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, dilation=dil)
    x = torch.zeros(3, cin, *hw)
    ho, wo = m(x).shape[-2:]
    assert count_flops(m, x) == 2 * cin * cout * k * k * ho * wo


def test_linear_exact_and_per_image():
    m = torch.nn.Linear(11, 6)
    assert count_flops(m, torch.zeros(1, 11)) == count_flops(m, torch.zeros(5, 11)) == 2 * 11 * 6
    assert count_flops(m, torch.zeros(2, 4, 11)) == 2 * 11 * 6 * 4  # a sequence of 4 rows per item


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_model("resnet18", "unet", in_channels=1, classes=3, weights="none")


def test_smp_flops_equal_hook_oracle_and_scale_with_area(unet):
    f64 = count_flops(unet, torch.zeros(1, 1, 64, 64))
    assert f64 == _conv_flops_by_hooks(unet, torch.zeros(1, 1, 64, 64))  # UNet: convolutions only
    f128 = count_flops(unet, torch.zeros(1, 1, 128, 128))
    assert f128 == 4 * f64  # every convolution's output area quadruples


def test_deeplab_flops_scale_about_four():
    torch.manual_seed(0)
    m = build_model("resnet18", "deeplabv3plus", in_channels=1, classes=2, weights="none")
    f64, f128 = count_flops(m, torch.zeros(1, 1, 64, 64)), count_flops(m, torch.zeros(1, 1, 128, 128))
    assert f128 != 4 * f64 and abs(f128 / f64 - 4) < 0.04  # the ASPP image-pooling branch does not scale


def test_model_cost_on_smp_model(unet, tmp_path):
    ck = save_checkpoint(tmp_path / "m.safetensors", unet, {"classes": 3})
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try: c = model_cost(unet, 1, 64, repeats=3, warmup=1, checkpoint=ck)
    finally: torch.set_num_threads(old)
    assert c["params"] == sum(p.numel() for p in unet.parameters()) == c["trainable_params"]
    assert c["flops"] == count_flops(unet, torch.zeros(1, 1, 64, 64)) and math.isclose(c["gflops"], c["flops"] / 1e9)
    assert c["threads"] == 1 and c["device"] == "cpu" and c["peak_mem_mb"] is None
    assert 0 < c["latency_ms"] < math.inf and np.isfinite([c["latency_p25_ms"], c["latency_p75_ms"]]).all()
    # float32 weights dominate the file: about 4 bytes per parameter
    assert c["checkpoint_mb"] == ck.stat().st_size / 1e6 and 4 * c["params"] / 1e6 <= c["checkpoint_mb"] < 4.1 * c["params"] / 1e6
    with pytest.raises(MatsegError, match="cannot run on a 3×64×64 input"):
        model_cost(unet, 3, 64, repeats=1)


def test_batch_latency_is_per_image():
    m = torch.nn.Conv2d(1, 4, 3)
    c = model_cost(m, 1, 32, repeats=3, batch=4)
    assert c["batch"] == 4 and c["flops"] == 2 * 4 * 9 * 30 * 30 and c["latency_ms"] > 0
    cl = model_cost(m, 1, 32, repeats=2, channels_last=True)
    assert cl["channels_last"] and cl["flops"] == c["flops"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_cost_cuda_memory(unet):
    c = model_cost(unet, 1, 128, device="cuda", repeats=3)
    assert c["peak_mem_mb"] > 4 * c["params"] / 1e6 and c["activation_mem_mb"] > 0 and c["device_name"] != "cpu"


def test_cost_table_and_chart_two_datasets():
    rows = []
    for d in ("super1", "ebc2"):
        for e, iou, lat in (("r18", 0.7, 5.0), ("r50", 0.75, 12.0), ("lite0", 0.72, 4.0)):
            for s in range(2):
                rows.append(dict(dataset=d, encoder=e, decoder="unet", seed=s, split="test", iou=iou + 0.02 * s,
                                 latency_ms=lat + s, params=1e6, gflops=1.0, threads=2, peak_mem_mb=math.nan,
                                 checkpoint_mb=4.0))
                rows.append({**rows[-1], "split": "val", "iou": 0.0})
    t = cost_table(pd.DataFrame(rows))
    assert len(t) == 6 and (t["n_seeds"] == 2).all()
    # lite0 (fastest) and r50 (best) are on the front; r18 is beaten by lite0 on both
    assert t.set_index(["dataset", "encoder"])["pareto"].xs("super1").to_dict() == {"r18": False, "r50": True, "lite0": True}
    fig = iou_latency_chart(pd.DataFrame(rows))
    assert [a.text for a in fig.layout.annotations] == ["super1", "ebc2"] and len(fig.data) == 4
    assert set(cost_columns({"params": 3, "peak_mem_mb": None})) == set(COST_COLUMNS)


def test_cost_table_older_results_and_missing_costs():
    # results of jobs from before the cost columns: latency from `infer_ms`, one job without any timing
    rows = [dict(dataset="d", encoder=e, decoder="unet", seed=0, split="test", iou=iou, infer_ms=lat, params=1e6)
            for e, iou, lat in (("a", 0.5, 3.0), ("b", 0.6, math.nan), ("c", 0.4, 4.0))]
    t = cost_table(pd.DataFrame(rows), latency="infer_ms")
    assert t["pareto"].tolist() == [True, False, False] and math.isnan(t["iou_std"][0])  # one seed: std unknown
    fig = iou_latency_chart(pd.DataFrame(rows), latency="infer_ms")
    assert "thread" not in fig.layout.title.text  # no thread count recorded: none claimed
    with pytest.raises(MatsegError, match="lacks columns"):
        cost_table(pd.DataFrame(rows))
