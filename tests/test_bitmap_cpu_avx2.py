"""The AVX2 path of the C++ CPU bitmap kernel, form by form, against a float64 reference.

The AVX2 kernel picks one of two forms per 64x64 tile from its value count (csrc/cpu/
bitmap_avx2.cpp): expand (every mask byte rebuilds 8 weights from a table line) or sparse
(n = 1: slots of 8 nonzeros with x gathered at their columns, rows of more than 8 continued
from a work list; n >= 2: one broadcast value per nonzero times x transposed, in groups of 8,
16 or 32 rows of x). The op's ``form`` argument forces one form on every tile, so each is
tested whatever the heuristic picks: odd shapes, skewed masks, rows whose counts sit on every
boundary the forms have, NaN/Inf as in F.linear, n on each side of every n-range boundary, and
1 against 2 threads. Needs an AVX2 CPU (skipped elsewhere) and the JIT-built extension (slow).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, reference_linear, rel_err
from helpers import MASK_KINDS, random_weight

import flashsparse as fs
from flashsparse.kernels import build
from flashsparse.kernels.cpu import bitmap as cpu_kernels

pytestmark = pytest.mark.slow

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
FORMS = {"auto": 0, "expand": 1, "sparse": 2}
# n = 1 (slots), 2..8 (one group of 8 lanes), 9..16 (16 lanes), 17+ (groups of 32 lanes;
# forced expand: groups of 8 rows of x), on both sides of each boundary.
NS = (1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 41)
# Row counts on the forms' boundaries: slots of 8 (8/9, 16/17, 24/25), the columns loop's
# unroll of 4 (1..5), a full and an empty row.
COUNTS = (0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 32, 33, 63, 64)


@pytest.fixture(scope="module")
def avx2():
    reason = cpu_kernels._available()
    if reason is not None:
        ext = cpu_kernels.EXTENSION
        tools = ext.prebuilt_available() or (
            build.find_cxx() is not None and build.find_ninja() is not None
        )
        if tools and not ext.missing_sources():  # a kernel failing its self-check: not a skip
            pytest.fail(f"the CPU extension should be available here: {reason}")
        pytest.skip(f"CPU extension unavailable: {reason}")
    if "avx2" not in cpu_kernels.available_isas():
        pytest.skip("this CPU has no AVX2 path")
    return cpu_kernels.ISAS["avx2"]


def _op(isa, x, sw, bias=None, form="auto"):
    m, k = sw.shape
    return torch.ops.flashsparse._bitmap_spmm_cpu(x, *sw.tensors, m, k, bias, isa, FORMS[form])


def boundary_weight(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """131 x 197 (tile rows of 64, 64, 3; tile columns of 64, 64, 64, 5): tile (0, 0) has rows
    of every count in COUNTS (first and last column included), tile (0, 1) is empty, tile row 1
    alternates dense and empty rows, the rest is 90 % sparse, so the last tile (few values)
    ends the values buffer."""
    g = torch.Generator().manual_seed(seed)
    m, k = 131, 197
    keep = torch.rand(m, k, generator=g) >= 0.9
    keep[:64, :64] = False
    for r, c in enumerate(COUNTS * 3):
        if r >= 64:
            break
        cols = torch.randperm(64, generator=g)[:c]
        keep[r, cols] = True
    keep[10, :64] = False
    keep[10, [0, 63]] = True
    keep[:64, 64:128] = False
    keep[64:128:2, :] = True
    keep[65:128:2, :] = False
    w = (torch.randn(m, k, generator=g) + 0.1) * keep
    return w.to(dtype)


def assert_close_per_element(y, x, w, bias, dtype):
    """Each output within the dtype's tolerance of its own magnitude scale (|x| |w|^T + |b|)."""
    ref = reference_linear(x, w, bias)
    scale = x.double().abs() @ w.double().abs().T + 1e-30
    if bias is not None:
        scale = scale + bias.double().abs()
    worst = ((y.double() - ref).abs() / scale).max().item() if y.numel() else 0.0
    assert worst < RTOL[dtype], worst
    assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
def test_every_form_matches_float64_at_every_boundary(avx2, form, dtype, n):
    w = boundary_weight(dtype, seed=n)
    g = torch.Generator().manual_seed(100 + n)
    x = torch.randn(n, w.shape[1], generator=g).to(dtype)
    b = torch.randn(w.shape[0], generator=g).to(dtype)
    sw = fs.encode(w, "bitmap")
    for bias in (None, b):
        y = _op(avx2, x, sw, bias, form)
        assert y.shape == (n, w.shape[0]) and y.dtype == dtype
        assert_close_per_element(y, x, w, bias, dtype)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize(
    "m,k,n,sparsity",
    [
        (1, 1, 1, 0.0),
        (77, 1, 3, 0.3),
        (1, 77, 2, 0.3),
        (70, 130, 1, 0.5),
        (129, 67, 5, 0.9),
        (200, 300, 16, 0.7),
        (65, 700, 1, 0.97),
        (150, 260, 33, 0.8),
    ],
)
def test_skewed_masks_and_odd_shapes(avx2, form, kind, m, k, n, sparsity):
    dtype = (torch.float32, torch.bfloat16, torch.float16)[(m + k + n) % 3]
    w = random_weight(m, k, sparsity, dtype, kind, seed=m + k + n)
    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n)).to(dtype)
    y = _op(avx2, x, fs.encode(w, "bitmap"), None, form)
    assert_close_per_element(y, x, w, None, dtype)


def test_zero_rows_of_x(avx2):
    w = boundary_weight(torch.float32)
    sw = fs.encode(w, "bitmap")
    for form in FORMS:
        y = _op(avx2, torch.empty(0, w.shape[1]), sw, None, form)
        assert y.shape == (0, w.shape[0])


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 3, 16, 33))
def test_nan_and_inf_propagate_like_f_linear(avx2, form, dtype, n):
    """Non-finite weights run the kernels (every form), next to rows they must not leak into:
    a row of 3 nonzeros followed by a row starting with NaN (a slot's 8-value load and an
    expand's table line read past the short row), Inf where x is 0 (NaN), Inf in a row of more
    than 8 (the work list's second slot). A non-finite x takes the decode + F.linear path."""
    g = torch.Generator().manual_seed(n)
    m, k = 70, 130
    keep = torch.rand(m, k, generator=g) >= 0.85
    w = torch.randn(m, k, generator=g) * keep
    w[4, :] = 0
    w[4, [3, 9, 40]] = 1.5  # short row ...
    w[5, :] = 0
    w[5, 2] = float("nan")  # ... then NaN first in the next row
    w[5, 50] = 2.0
    w[20, 7] = float("inf")  # x[:, 7] = 0 below: NaN
    w[30, :64] = 0
    w[30, torch.arange(0, 64, 5)] = 1.0  # 13 nonzeros: the second slot has the Inf
    w[30, 60] = float("-inf")
    w[66, 129] = float("inf")  # the last tile
    x = torch.randn(n, k, generator=g)
    x[0, 7] = 0.0
    w, x = w.to(dtype), x.to(dtype)
    sw = fs.encode(w, "bitmap")
    for x_finite in (True, False):
        xx = x.clone()
        if not x_finite:
            xx[n - 1, 100] = float("nan")
            xx[0, 11] = float("-inf")
        y = _op(avx2, xx, sw, None, form).float()
        expected = F.linear(xx.float(), w.float())
        assert torch.equal(y.isnan(), expected.isnan()), (x_finite, form)
        assert torch.equal(y.isinf(), expected.isinf()), (x_finite, form)
        finite = expected.isfinite()
        assert rel_err(y[finite], expected[finite]) < RTOL[dtype]
        if x_finite:
            assert y[:, 4].isfinite().all()  # the NaN of weight row 5 stayed out of row 4


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("n", (1, 3, 9, 17, 40))
def test_one_and_two_threads_are_bit_identical(avx2, form, n):
    w = random_weight(300, 390, 0.8, torch.bfloat16, "row_skewed", seed=n)
    x = torch.randn(n, 390, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    sw = fs.encode(w, "bitmap")
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_op(avx2, x, sw, None, form))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], reference_linear(x, w)) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("n", (1, 4, 16))
def test_auto_takes_the_expected_form_at_either_end(avx2, n):
    """A tile of few values takes the sparse form, a dense one the expand form: auto gives the
    same bits as the forced form there (summation orders differ between forms)."""
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 256, generator=g)
    sparse = fs.encode(random_weight(128, 256, 0.97, seed=1), "bitmap")
    dense = fs.encode(random_weight(128, 256, 0.1, seed=2), "bitmap")
    assert torch.equal(_op(avx2, x, sparse, None, "auto"), _op(avx2, x, sparse, None, "sparse"))
    if n <= 8:  # above 8 rows of x auto runs the columns form everywhere
        assert torch.equal(_op(avx2, x, dense, None, "auto"), _op(avx2, x, dense, None, "expand"))
    assert not torch.equal(_op(avx2, x, dense, None, "expand"), _op(avx2, x, dense, None, "sparse"))


def test_mixed_tiles_under_auto(avx2):
    """Dense and very sparse tiles in one tile row: auto mixes the forms' accumulators."""
    w = random_weight(130, 400, 0.98, torch.float32, seed=3)
    w[:, :128] = torch.randn(130, 128)
    for n in (1, 5, 12, 40):
        x = torch.randn(n, 400)
        assert_close_per_element(_op(avx2, x, fs.encode(w, "bitmap")), x, w, None, torch.float32)


def test_bad_form_is_a_clear_error(avx2):
    sw = fs.encode(random_weight(70, 66, 0.5, seed=1), "bitmap")
    with pytest.raises(
        RuntimeError, match=r"form must be 0 \(auto\), 1 \(expand\) or 2 \(sparse\)"
    ):
        torch.ops.flashsparse._bitmap_spmm_cpu(
            torch.randn(2, 66), *sw.tensors, 70, 66, None, avx2, 3
        )
