"""The Triton kernel for bitmap weights with int8 / fp8 values against a float64 reference of
the dequantized weight.

Without a GPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so
these use small odd shapes and are marked slow; the ``gpu`` tests run the compiled kernel at
model sizes, through the op under ``auto`` and under torch.compile.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, rel_err
from helpers import random_weight

import flashsparse as fs
from flashsparse import backends
from flashsparse.formats.bitmap_quant import QuantBitmap

tri = pytest.importorskip("flashsparse.kernels.triton", reason="triton is not installed")
from flashsparse.kernels.triton import bitmap_quant_spmm as bq
from flashsparse.kernels.triton.bitmap_spmm import KernelConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QUANTS = ("int8", "fp8")
GROUPS = (None, 32, 64, 128)


def _reference(x, sw, bias=None):
    m, k = sw.shape
    w = QuantBitmap.decode_reference(*[t.cpu() for t in sw.tensors], m=m, k=k, dtype=torch.float64)
    y = x.cpu().double() @ w.T
    return y if bias is None else y + bias.cpu().double()


def _case(m, k, n, sparsity, kind, dtype, quant, group_size, *, seed=0):
    w = random_weight(m, k, sparsity, torch.float32, kind, seed=seed)
    sw = fs.encode(w, quant=quant, group_size=group_size).to(DEVICE, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, k, generator=g).to(device=DEVICE, dtype=dtype)
    b = torch.randn(m, generator=g).to(device=DEVICE, dtype=dtype)
    return sw, x, b


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "kind", "split"),
    [
        (1, 1, 1, 0.0, "uniform", 1),
        (70, 130, 3, 0.5, "uniform", 1),
        (130, 200, 5, 0.7, "row_skewed", 3),  # split-K with a short last slice
        (65, 260, 17, 0.6, "dense_tiles", 2),  # two N blocks
        (64, 100, 2, 0.8, "empty_tiles", 1),
    ],
)
def test_matches_float64(quant, group_size, m, k, n, sparsity, kind, split):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        sw, x, b = _case(m, k, n, sparsity, kind, dtype, quant, group_size, seed=m + k)
        for bias in (None, b):
            out = torch.full((n, m), float("nan"), dtype=dtype, device=DEVICE)  # poisoned
            y = bq.bitmap_quant_linear(
                x, *sw.tensors, m, k, bias, out=out, config=KernelConfig(64, 16, split, 4, 2)
            )
            assert y is out and y.dtype == dtype
            assert rel_err(y, _reference(x, sw, bias)) < RTOL[dtype], (dtype, bias is not None)


@pytest.mark.slow
@pytest.mark.parametrize("quant", QUANTS)
def test_nan_and_inf_in_x_and_values_that_quantize_to_zero(quant):
    w = torch.zeros(70, 130)
    w[:, :5] = torch.tensor([100.0, 0.1, -0.2, 0.3, -100.0])  # small ones: code 0 for int8
    w[3, 64:] = torch.randn(66)
    sw = fs.encode(w, quant=quant).to(DEVICE, torch.bfloat16)
    x = torch.randn(3, 130).to(device=DEVICE, dtype=torch.bfloat16)
    x[0, 2], x[1, 100], x[2, 129] = float("nan"), float("inf"), float("-inf")
    y = bq.bitmap_quant_linear(x, *sw.tensors, 70, 130, config=KernelConfig(64, 16, 2, 4, 2))
    expected = F.linear(x.cpu().float(), sw.to("cpu", torch.float32).to_dense())
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(expected))
    assert torch.equal(torch.isinf(y.cpu()), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert rel_err(y.cpu()[finite], expected[finite]) < 1e-2


@pytest.mark.slow
def test_the_op_runs_the_triton_kernel_when_forced(monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "triton")
    backends._selected.clear()
    try:
        sw, x, b = _case(70, 130, 2, 0.7, "uniform", torch.float16, "fp8", 32)
        assert backends.select("bitmap_quant", x).backend == "triton"
        assert rel_err(fs.linear(x, sw, b), _reference(x, sw, b)) < RTOL[torch.float16]
    finally:
        backends._selected.clear()


def test_bad_arguments_are_refused():
    sw, x, _ = _case(20, 70, 2, 0.5, "uniform", torch.float32, "int8", None)
    masks, values, offsets, scales = sw.tensors
    cases = [
        ((x, masks, values.float(), offsets, scales), TypeError, "int8 or float8_e4m3fn"),
        ((x, masks, values, offsets, scales.double()), ValueError, "scales must be float32"),
        (
            (x, masks, values, offsets, torch.ones(20, 5, device=DEVICE)),
            ValueError,
            "match no group",
        ),
        ((x.double(), masks, values, offsets, scales), TypeError, "x must be float16"),
        ((x[:, :60], masks, values, offsets, scales), ValueError, "x must be 2-D"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            bq.bitmap_quant_linear(*args, 20, 70)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("group_size", (None, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_model_sized_on_gpu(quant, group_size, dtype):
    for m, k in ((4096, 4096), (14336, 4096), (4096, 14336)):
        sw, x, b = _case(m, k, 16, 0.7, "row_skewed", dtype, quant, group_size, seed=m)
        for n in (1, 16):
            y = bq.bitmap_quant_linear(x[:n], *sw.tensors, m, k, b)
            assert rel_err(y, _reference(x[:n], sw, b)) < RTOL[dtype]


@pytest.mark.gpu
def test_auto_picks_triton_on_gpu_and_compiles_without_graph_breaks():
    assert (
        backends.select(
            "bitmap_quant", torch.empty(1, 64, device="cuda", dtype=torch.bfloat16)
        ).backend
        == "triton"
    )
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(fs.prune(layer.weight, 0.7))
    model = model.to("cuda", torch.bfloat16)
    fs.sparsify_(model, quant="int8")
    x = torch.randn(8, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
        assert torch._dynamo.explain(model)(x).graph_break_count == 0
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected)
