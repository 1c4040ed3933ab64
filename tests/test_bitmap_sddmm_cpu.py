"""The C++ CPU weight-gradient kernel of trainable bitmap layers (``_bitmap_sddmm_cpu``) against
a float64 reference: every SIMD path this CPU has x every dtype, odd shapes, skewed masks,
N = 1 to large, NaN/Inf, threads, opcheck and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, rel_err
from helpers import MASK_KINDS, random_weight

import flashsparse as fs
from flashsparse import backends
from flashsparse.kernels.cpu import bitmap as cpu_kernels
from flashsparse.kernels.cpu import bitmap_sddmm as cpu_sddmm
from flashsparse.ops import bitmap_gather_stored

REASON = cpu_sddmm._available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"CPU extension unavailable: {REASON}")
ISAS = cpu_kernels.available_isas() if REASON is None else []
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _problem(m, k, n, sparsity, kind, dtype, seed):
    w = random_weight(m, k, sparsity, dtype, kind, seed=seed)
    masks, values, offsets = fs.encode(w, "bitmap").tensors
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(n, m, generator=g).to(dtype)
    x = torch.randn(n, k, generator=g).to(dtype)
    return w, (grad, x, masks, offsets, m, k, values.numel())


def _reference(w, args):
    """float64 ``grad.T @ x`` at the stored positions, in packed order."""
    grad, x, masks, offsets, _, _, num_values = args
    dense = (grad.double().T @ x.double()) * (w != 0)
    return bitmap_gather_stored(dense, masks, offsets, num_values)


def _padding(args):
    _, _, masks, offsets, m, k, num_values = args
    return bitmap_gather_stored(torch.ones(m, k), masks, offsets, num_values) == 0


def _op(args, isa):
    return torch.ops.flashsparse._bitmap_sddmm_cpu(*args, cpu_kernels.ISAS[isa])


def test_every_path_this_machine_should_have_is_there():
    assert ISAS[0] == "scalar" and cpu_kernels.ISAS == {
        "scalar": 0,
        "avx2": 1,
        "avx512": 2,
        "neon": 3,
    }


@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,n,sparsity,kind",
    [
        (1, 1, 1, 0.0, "uniform"),
        (77, 1, 3, 0.3, "uniform"),
        (1, 77, 2, 0.3, "uniform"),
        (70, 130, 1, 0.5, "uniform"),
        (130, 200, 37, 0.7, "dense_tiles"),  # a fully dense tile: rows of 64
        (129, 67, 65, 0.9, "row_skewed"),  # n one past the SIMD step
        (65, 129, 64, 0.6, "dense_column"),
        (200, 300, 9, 0.7, "empty_tiles"),
        (96, 4, 130, 0.8, "dense_rows"),
        (64, 64, 5, 0.0, "uniform"),
        (150, 260, 1000, 0.7, "row_skewed"),  # large N
    ],
)
def test_matches_float64(isa, dtype, m, k, n, sparsity, kind):
    assert kind in MASK_KINDS
    w, args = _problem(m, k, n, sparsity, kind, dtype, seed=m * 7 + k + n)
    out = _op(args, isa)
    assert out.shape == (args[-1],) and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert not out[_padding(args)].any(), "the padding slots must be written as zeros"
    ref = _reference(w, args)
    if ref.any():
        assert rel_err(out, ref) < RTOL[dtype], (isa, dtype)
    else:
        assert not out.any()


@pytest.mark.parametrize("isa", ISAS or ["scalar"])
def test_the_op_runs_the_selected_path(isa, monkeypatch):
    """FLASHSPARSE_CPU_ISA picks the path for the weight gradient too."""
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cpu")
    monkeypatch.setenv("FLASHSPARSE_CPU_ISA", isa)
    backends._selected.clear()
    w, args = _problem(70, 130, 33, 0.7, "row_skewed", torch.bfloat16, seed=1)
    try:
        out = torch.ops.flashsparse.bitmap_sddmm(*args)
    finally:
        backends._selected.clear()
    assert torch.equal(out, _op(args, isa))
    assert rel_err(out, _reference(w, args)) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_and_inf_propagate_as_in_the_dense_gradient(isa, dtype):
    w, args = _problem(70, 130, 6, 0.5, "uniform", dtype, seed=2)
    grad, x = args[0].clone(), args[1].clone()
    x[1, 7] = float("nan")  # column 7 of dW is NaN at every stored position
    x[2, 70] = float("inf")  # column 70: Inf, or NaN where grad sums signs (Inf - Inf)
    grad[3, 5] = 0.0
    x[3, 100] = float("inf")  # 0 * Inf = NaN in row 5, column 100, as in the dense product
    args = (grad, x, *args[2:])
    out = _op(args, isa)
    ref = _reference(w, args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=tol, atol=tol)
    assert out.isnan().any() and out.isinf().any()


@pytest.mark.parametrize("isa", ISAS or ["scalar"])
def test_same_result_on_one_and_two_threads(isa):
    """Tile rows are split across torch's threads; each slot is summed by one thread in one
    order, so the thread count changes nothing."""
    _, args = _problem(300, 190, 77, 0.7, "row_skewed", torch.bfloat16, seed=3)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_op(args, isa))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_non_contiguous_inputs():
    w, args = _problem(70, 130, 9, 0.7, "uniform", torch.float32, seed=4)
    grad, x = args[0], args[1]
    strided = (grad.T.contiguous().T, x.T.contiguous().T)
    assert not strided[0].is_contiguous()
    out = _op((*strided, *args[2:]), ISAS[-1])
    assert rel_err(out, _reference(w, args)) < 1e-5


def test_opcheck():
    _, args = _problem(70, 66, 5, 0.5, "dense_tiles", torch.bfloat16, seed=5)
    torch.library.opcheck(
        torch.ops.flashsparse._bitmap_sddmm_cpu.default, (*args, cpu_kernels.isa())
    )


def test_bad_input_is_a_clear_error():
    _, args = _problem(70, 130, 4, 0.7, "uniform", torch.float32, seed=6)
    grad, x, masks, offsets, m, k, n = args
    with pytest.raises(RuntimeError, match="do not match num_values"):
        _op((grad, x, masks, offsets, m, k, n + 8), "scalar")
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[N=4, k=130\]"):
        _op((grad, x[:, :129], masks, offsets, m, k, n), "scalar")
    with pytest.raises(RuntimeError, match="x must have grad's dtype"):
        _op((grad, x.half(), masks, offsets, m, k, n), "scalar")
    with pytest.raises(RuntimeError, match="grad must be float32, bfloat16 or float16"):
        _op((grad.double(), x.double(), masks, offsets, m, k, n), "scalar")
    crowded = masks.clone()
    crowded[: 64 * 3] = -1  # every bit of the first tiles set: more nonzeros than slots
    for isa in ISAS:
        with pytest.raises(RuntimeError, match="more nonzeros than its tile_offsets"):
            _op((grad, x, crowded, offsets, m, k, n), isa)
