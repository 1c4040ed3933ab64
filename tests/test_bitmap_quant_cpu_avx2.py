"""The AVX2 path of the quantized (int8 / fp8) bitmap CPU kernel, form by form, against a float64
reference of the dequantized weight.

csrc/cpu/bitmap_quant_avx2.cpp picks per 64x64 tile at n = 1 between the expand form (a table
line per mask byte rebuilds 8 codes) and slots of 8 nonzeros (x gathered at their columns, rows
of more than 8 continued from a work list); n = 2..8 expands each row segment once for every row
of x; larger n dequantizes blocks for a dense micro-kernel. The op's ``form`` argument forces one
n = 1 form on every tile, so both are tested whatever the heuristic picks: rows whose counts sit
on every slot boundary (8/9, 16/17, ...), dense and empty rows and tiles, groups of 32 (two per
tile row) and of 128 (spanning two tiles, the last one partial), codes that quantize to 0, the
last tile ending the codes buffer, n = 0 / 1 / odd / > 8, 1 against 2 threads. Needs an AVX2 CPU
(skipped elsewhere) and the JIT-built extension (slow).
"""

from __future__ import annotations

import pytest
import torch

import flashsparse as fs
from flashsparse.formats.bitmap_quant import QuantBitmap
from flashsparse.kernels.cpu import bitmap as cpu_bitmap
from flashsparse.kernels.cpu import bitmap_quant as cpu_quant

pytestmark = pytest.mark.slow

FORMS = {"auto": 0, "expand": 1, "sparse": 2}
QUANTS = ("int8", "fp8")
GROUPS = (None, 32, 64, 128)
# Row counts on the forms' boundaries: slots of 8 (8/9, 16/17, 24/25), the halves of a group
# of 32, a full and an empty row.
COUNTS = (0, 1, 2, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 63, 64)
# n = 1 (the two forms), 2..8 (one pass of expanded rows), 9 and more (blocked).
NS = (1, 2, 3, 7, 8, 9, 17, 33)


def _extension() -> None:
    """Skip without the extension; fail where it builds but a quantized kernel fails its
    self-check (that makes the quantized kernels unavailable: not a reason to skip)."""
    if cpu_bitmap._available() is not None:
        pytest.skip(f"CPU extension unavailable: {cpu_bitmap._available()}")
    reason = cpu_quant._available()
    assert reason is None, reason


@pytest.fixture(scope="module")
def avx2() -> int:
    _extension()
    if "avx2" not in cpu_bitmap.available_isas():
        pytest.skip("this CPU has no AVX2 path")
    return cpu_bitmap.ISAS["avx2"]


def _op(isa: int, x, sw, bias=None, form: str = "auto") -> torch.Tensor:
    m, k = sw.shape
    return torch.ops.flashsparse._bitmap_quant_spmm_cpu(
        x, *sw.tensors, m, k, bias, isa, FORMS[form]
    )


def boundary_weight(seed: int = 0) -> torch.Tensor:
    """131 x 197 (tile rows of 64, 64, 3; tile columns of 64, 64, 64, 5): tile (0, 0) has rows
    of every count in COUNTS (first and last column too), tile (0, 1) is empty, tile row 1
    alternates dense and empty rows, the rest is 90 % sparse, so the last tile (few codes) ends
    the codes buffer. Some weights are 1e-6 of their row's largest: their codes are 0 (int8) or
    0 / subnormal (fp8), still stored."""
    g = torch.Generator().manual_seed(seed)
    m, k = 131, 197
    keep = torch.rand(m, k, generator=g) >= 0.9
    keep[:64, :64] = False
    for r, c in enumerate(COUNTS * 4):
        if r >= 64:
            break
        keep[r, torch.randperm(64, generator=g)[:c]] = True
    keep[10, :64] = False
    keep[10, [0, 63]] = True
    keep[:64, 64:128] = False
    keep[64:128:2, :] = True
    keep[65:128:2, :] = False
    w = (torch.randn(m, k, generator=g) + 0.1) * keep
    tiny = torch.rand(m, k, generator=g) < 0.1
    return torch.where(tiny, w * 1e-6, w)


def _check(y: torch.Tensor, x: torch.Tensor, sw, bias=None) -> None:
    """Element-wise: each output within fp32 accumulation error of its magnitude scale."""
    m, k = sw.shape
    dense = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float64)
    ref = x.double() @ dense.T
    scale = x.double().abs() @ dense.abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    bad = (y.double() - ref).abs() > 1e-5 * scale + 1e-30
    assert not bad.any(), bad.nonzero()[:5].tolist()


def test_the_glue_runs_each_paths_own_kernels():
    """isa 1 runs the AVX2 kernels (not the scalar ones it ran before they existed), 2 the
    AVX-512 ones: the glue dispatches every call through the table this op reads."""
    _extension()
    for name in cpu_bitmap.available_isas():
        assert torch.ops.flashsparse._bitmap_quant_cpu_path(cpu_bitmap.ISAS[name]) == name
    with pytest.raises(RuntimeError, match="isa must be"):
        torch.ops.flashsparse._bitmap_quant_cpu_path(7)


def test_the_boundary_weight_has_every_count():
    w = boundary_weight()
    counts = set((w[:64, :64] != 0).sum(1).tolist())
    assert set(COUNTS) <= counts
    assert (w[:64, 64:128] == 0).all() and (w[64:128:2] != 0).all()


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_match_float64(avx2, quant, group_size, form):
    w = boundary_weight(seed=1)
    sw = fs.encode(w, quant=quant, group_size=group_size)
    values = sw.tensors[1].view(torch.uint8)
    assert (values == 0).any()  # codes that quantize to 0 are stored
    g = torch.Generator().manual_seed(2)
    x = torch.randn(max(NS), 197, generator=g)
    bias = torch.randn(131, generator=g)
    for n in NS:
        for b in (None, bias):
            y = _op(avx2, x[:n], sw, b, form)
            assert y.shape == (n, 131) and y.dtype == torch.float32
            _check(y, x[:n], sw, b)


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_x(avx2, quant, dtype):
    sw = fs.encode(boundary_weight(seed=3), quant=quant, group_size=32)
    x = torch.randn(3, 197).to(dtype)
    for n in (1, 3):
        for form in FORMS:
            y = _op(avx2, x[:n], sw, None, form)
            assert y.dtype == dtype
            m, k = sw.shape
            dense = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float64)
            ref = x[:n].double() @ dense.T
            scale = x[:n].double().abs() @ dense.abs().T
            # one rounding to dtype on top of the fp32 sum
            tol = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
            assert not ((y.double() - ref).abs() > tol * ref.abs() + 1e-5 * scale + 1e-30).any()


@pytest.mark.parametrize("quant", QUANTS)
def test_sparsities_and_shapes(avx2, quant):
    """Auto picks the form per tile from its code count: at 0.5 / 0.7 / 0.9 / 0.97 sparsity and
    skewed masks both forms mix within one weight."""
    from helpers import MASK_KINDS, random_weight

    for i, (m, k, s) in enumerate(((1, 1, 0.0), (65, 63, 0.5), (200, 321, 0.7), (130, 700, 0.9))):
        for kind in MASK_KINDS:
            w = random_weight(m, k, s, torch.float32, kind, seed=i)
            for group_size in (None, 32, 128):
                sw = fs.encode(w, quant=quant, group_size=group_size)
                x = torch.randn(3, k)
                for n in (1, 3):
                    _check(_op(avx2, x[:n], sw), x[:n], sw)
    w = random_weight(70, 4000, 0.97, torch.float32, "row_skewed", seed=9)
    sw = fs.encode(w, quant=quant, group_size=128)
    x = torch.randn(1, 4000)
    _check(_op(avx2, x, sw), x, sw)


def test_n_zero(avx2):
    sw = fs.encode(boundary_weight(), quant="int8")
    y = _op(avx2, torch.randn(0, 197), sw)
    assert y.shape == (0, 131)


@pytest.mark.parametrize("quant", QUANTS)
def test_nan_and_inf_in_x(avx2, quant):
    """Non-finite x goes to the dense path (0 * Inf = NaN as in F.linear), whatever the form."""
    sw = fs.encode(boundary_weight(seed=4), quant=quant, group_size=32)
    dense = sw.to_dense()
    for n in (1, 3, 9):
        x = torch.randn(n, 197)
        x[0, 3] = float("nan")
        x[n - 1, 130] = float("inf")
        x[n - 1, 131] = float("-inf")
        expected = torch.nn.functional.linear(x, dense)
        for form in FORMS:
            y = _op(avx2, x, sw, None, form)
            assert torch.equal(torch.isnan(y), torch.isnan(expected))
            assert torch.equal(torch.isinf(y), torch.isinf(expected))
            finite = torch.isfinite(expected)
            torch.testing.assert_close(y[finite], expected[finite])


@pytest.mark.parametrize("quant", QUANTS)
def test_decode_is_bit_exact(avx2, quant):
    for group_size in GROUPS:
        sw = fs.encode(boundary_weight(seed=5), quant=quant, group_size=group_size)
        for dtype in (torch.float32, torch.bfloat16):
            ref = QuantBitmap.decode_reference(*sw.tensors, m=131, k=197, dtype=dtype)
            ours = torch.ops.flashsparse._bitmap_quant_decode_cpu(
                *sw.tensors, 131, 197, dtype, avx2
            )
            assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8)), group_size


def test_one_and_two_threads_bit_identical(avx2):
    """Work splits by whole tile rows: the thread count changes no sum."""
    w = torch.cat([boundary_weight(seed=6)] * 3)  # 393 rows: 7 tile rows to split
    old = torch.get_num_threads()
    try:
        for quant in QUANTS:
            for group_size in (None, 32, 128):
                sw = fs.encode(w, quant=quant, group_size=group_size)
                x = torch.randn(17, 197)
                for n in (1, 5, 17):
                    for form in FORMS:
                        torch.set_num_threads(1)
                        one = _op(avx2, x[:n], sw, None, form)
                        torch.set_num_threads(2)
                        two = _op(avx2, x[:n], sw, None, form)
                        assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    finally:
        torch.set_num_threads(old)


def test_bad_form_is_refused(avx2):
    sw = fs.encode(boundary_weight(), quant="int8")
    with pytest.raises(RuntimeError, match="form must be 0"):
        torch.ops.flashsparse._bitmap_quant_spmm_cpu(
            torch.randn(1, 197), *sw.tensors, 131, 197, None, avx2, 3
        )
