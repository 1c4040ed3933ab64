"""The C++ CPU kernels for bitmap weights with int8 / fp8 values (csrc/cpu/bitmap_quant_*.cpp)
against a float64 reference of the dequantized weight.

Every SIMD path this CPU has (FLASHSPARSE_CPU_ISA) x int8 / fp8 x per-row scales and groups of
32 (half a tile row), 64 and 128 (whole tile rows, a group spanning two tiles) x x's dtype, on
odd shapes and skewed masks; every kernel the glue picks by n (n = 1 in its dense and sparse
tile forms, the fused kernel up to 8 rows of x, the blocked one above); NaN / Inf in x; fp8
subnormal codes with denormals flushed; the C++ dequantizing decode behind ``to_dense``.
Marked slow: the first test in a process JIT-builds the extension if it is not cached.
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
from flashsparse.kernels.cpu import bitmap as cpu_bitmap
from flashsparse.kernels.cpu import bitmap_quant as cpu_quant

pytestmark = pytest.mark.slow

REASON = cpu_quant._available()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"CPU extension unavailable: {REASON}")
ISAS = cpu_bitmap.available_isas() if REASON is None else ["scalar"]
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QUANTS = ("int8", "fp8")
GROUPS = (None, 32, 64, 128)


def _spmm(x, sw, bias=None, isa="scalar"):
    m, k = sw.shape
    return torch.ops.flashsparse._bitmap_quant_spmm_cpu(
        x, *sw.tensors, m, k, bias, cpu_bitmap.ISAS[isa]
    )


def _reference(x, sw, bias=None):
    m, k = sw.shape
    w = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float64)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cpu")
    backends._selected.clear()
    yield
    backends._selected.clear()


def test_extension_is_there_wherever_the_bitmap_kernels_are():
    """A quantized kernel that fails its self-check would make the path unavailable and every
    test here a skip: fail instead wherever the unquantized CPU kernels build."""
    if cpu_bitmap._available() is not None:
        pytest.skip(f"no CPU extension here: {cpu_bitmap._available()}")
    assert REASON is None, REASON


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "kind"),
    [
        (1, 1, 1, 0.0, "uniform"),
        (77, 1, 3, 0.3, "uniform"),
        (1, 77, 2, 0.3, "uniform"),
        (70, 130, 1, 0.5, "uniform"),  # n = 1, dense tile form
        (150, 260, 1, 0.85, "row_skewed"),  # n = 1, sparse tile form with some rows over 16
        (129, 200, 1, 0.7, "dense_tiles"),  # a dense tile next to sparse ones
        (130, 200, 4, 0.7, "dense_tiles"),
        (65, 129, 8, 0.6, "dense_column"),  # widest fused pass
        (200, 2100, 9, 0.7, "empty_tiles"),  # blocked: two K blocks, odd n
        (96, 4, 33, 0.8, "dense_rows"),
        (64, 64, 17, 0.0, "uniform"),  # one fully dense tile
    ],
)
def test_matches_float64(isa, quant, group_size, m, k, n, sparsity, kind):
    w = random_weight(m, k, sparsity, torch.float32, kind, seed=m * 7 + k + n)
    sw = fs.encode(w, quant=quant, group_size=group_size)
    g = torch.Generator().manual_seed(n)
    x32 = torch.randn(n, k, generator=g)
    b32 = torch.randn(m, generator=g)
    for dtype in DTYPES:
        x, b = x32.to(dtype), b32.to(dtype)
        for bias in (None, b):
            y = _spmm(x, sw, bias, isa)
            assert y.shape == (n, m) and y.dtype == dtype
            assert rel_err(y, _reference(x, sw, bias)) < RTOL[dtype], (dtype, bias is not None)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_row_exact_to_fp32_accumulation(isa):
    """Element-wise, not just in norm: each output within fp32 accumulation error of its row's
    magnitude scale (a wrong scale or a lost group would show in some rows only)."""
    w = random_weight(190, 450, 0.75, torch.float32, "row_skewed", seed=11)
    w[5] *= 1000  # rows of very different scales
    w[6] *= 1e-3
    x = torch.randn(3, 450)
    for quant in QUANTS:
        for group_size in GROUPS:
            sw = fs.encode(w, quant=quant, group_size=group_size)
            dense = QuantBitmap.decode_reference(*sw.tensors, m=190, k=450, dtype=torch.float64)
            for n in (1, 3):
                y = _spmm(x[:n], sw, None, isa).double()
                ref = x[:n].double() @ dense.T
                scale = x[:n].double().abs() @ dense.abs().T
                assert bool(((y - ref).abs() <= 1e-5 * scale + 1e-30).all()), (quant, group_size, n)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", QUANTS)
def test_groups_of_32_read_no_scale_past_the_tensor(isa, quant):
    """k mod 64 in 1..32 with groups of 32: the last tile's upper half has no scale column of its
    own. Until 2026-12-04 every SIMD kernel read column 2 kt + 1 there, one past each row's
    scales, for the last row past the tensor: with NaN after it (here on purpose; a freed
    poisoned output can be there) the zero products became NaN, intermittently in the
    extension's self-check under qemu. Every kernel the glue picks by n, and the decode."""
    m = 70
    for k in (200, 96, 33, 1):  # k mod 64 = 8, 32, 33 (no odd group: a control), 1
        w = random_weight(m, k, 0.5, torch.float32, "dense_tiles", seed=k)
        sw = fs.encode(w, quant=quant, group_size=32)
        masks, values, offsets, scales = sw.tensors
        groups = scales.shape[1]
        buf = torch.full((m * groups + 64,), float("nan"))
        buf[: m * groups] = scales.reshape(-1)
        poisoned = (masks, values, offsets, buf[: m * groups].view(m, groups))
        dense = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float64)
        g = torch.Generator().manual_seed(k)
        for n, dtype in (
            (1, torch.float32),
            (1, torch.bfloat16),
            (3, torch.float32),
            (11, torch.float32),
        ):
            x = torch.randn(n, k, generator=g).to(dtype)
            y = torch.ops.flashsparse._bitmap_quant_spmm_cpu(
                x, *poisoned, m, k, None, cpu_bitmap.ISAS[isa]
            )
            assert torch.isfinite(y).all(), (k, n, dtype)
            assert rel_err(y, x.double() @ dense.T) < RTOL[dtype], (k, n, dtype)
        decoded = torch.ops.flashsparse._bitmap_quant_decode_cpu(
            *poisoned, m, k, torch.float32, cpu_bitmap.ISAS[isa]
        )
        assert torch.equal(decoded, dense.float()), k


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_decode_is_bit_exact(isa):
    for quant in QUANTS:
        for group_size in GROUPS:
            w = random_weight(130, 300, 0.6, torch.float32, "dense_tiles", seed=3)
            sw = fs.encode(w, quant=quant, group_size=group_size)
            for dtype in DTYPES:
                ref = QuantBitmap.decode_reference(*sw.tensors, m=130, k=300, dtype=dtype)
                ours = torch.ops.flashsparse._bitmap_quant_decode_cpu(
                    *sw.tensors, 130, 300, dtype, cpu_bitmap.ISAS[isa]
                )
                assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("quant", QUANTS)
def test_nan_and_inf_in_x_propagate_as_in_f_linear(isa, quant):
    w = random_weight(70, 200, 0.7, torch.bfloat16, "row_skewed", seed=5)
    sw = fs.encode(w, quant=quant, group_size=32)
    dense = sw.to_dense()
    for n in (1, 3):
        x = torch.randn(n, 200).to(torch.bfloat16)
        x[0, 7] = float("nan")
        x[n - 1, 150] = float("inf")
        y = _spmm(x, sw, None, isa)
        expected = F.linear(x, dense)
        assert torch.equal(torch.isnan(y), torch.isnan(expected))
        assert torch.equal(torch.isinf(y), torch.isinf(expected))
        finite = torch.isfinite(expected)
        torch.testing.assert_close(y[finite], expected[finite])


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_fp8_code_including_subnormals_with_denormals_flushed(isa):
    """Each finite e4m3 code once (subnormal ones too), on a weight whose scale is a power of
    two, with torch.set_flush_denormal(True) (FTZ/DAZ in MXCSR): the fp16 conversion the kernels
    use is exact regardless."""
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    w = torch.zeros(3, 256)
    w[0, : values.numel()] = values  # max |value| = 448: scale exactly 1
    w[1, : values.numel()] = values.flip(0)
    w[2, :10] = values[:10]
    w[2, 200] = 448.0
    sw = fs.encode(w, quant="fp8")
    assert torch.equal(sw.tensors[3][:, 0], torch.ones(3))
    torch.testing.assert_close(sw.to_dense(), w, rtol=0, atol=0)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(8))  # fixed: the bound is tight
    # set_flush_denormal returns whether the CPU supports it, not the previous state: the
    # default (off) is restored below so later tests see subnormals.
    assert torch.set_flush_denormal(True)
    try:
        for n in (1, 2):
            y = _spmm(x[:n], sw, None, isa)
            assert rel_err(y, x[:n].double() @ w.double().T) < 1e-6
        ours = torch.ops.flashsparse._bitmap_quant_decode_cpu(
            *sw.tensors, 3, 256, torch.float32, cpu_bitmap.ISAS[isa]
        )
        assert torch.equal(ours, w)
    finally:
        torch.set_flush_denormal(False)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_fp8_subnormal_codes_in_dense_rows_with_bf16_x(isa):
    """Rows rebuilt whole (64 nonzeros a tile row) from fp8 codes that are all subnormal but one,
    with bf16 x zero at that one's column: the output is the subnormal codes' sum alone, so a
    conversion that lost them (vdpbf16ps treats bf16 subnormals as zero) shows."""
    g = torch.Generator().manual_seed(11)
    codes = torch.tensor([*range(1, 8), *range(0x81, 0x88)], dtype=torch.uint8)
    subnormal = codes.view(torch.float8_e4m3fn).float()
    m, k = 5, 130  # tile columns of 64, 64 and 2: the first two rebuilt, the last gathered
    w = subnormal[torch.randint(0, subnormal.numel(), (m, k), generator=g)]
    w[:, 7] = 448.0  # scale exactly 1: the codes are the values
    sw = fs.encode(w, quant="fp8")
    assert torch.equal(sw.to_dense(), w)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    x[0, 7] = 0
    y = _spmm(x, sw, None, isa)
    assert rel_err(y, x.double() @ w.double().T) < 4e-3  # y is bf16


def _probe_weight(quant: str, other: int | None = None) -> tuple[QuantBitmap, torch.Tensor]:
    """Every code (int8: -128..127; fp8: all but the NaNs) once, each alone in a row of its own
    ("probe" rows 32-63 of a tile, scale 1). The tiles' other rows are dense (other=None), so
    that the kernels rebuild every row of those tiles (AVX-512 at n = 1 with bf16 x: byte
    lookups before the expand), or hold `other` nonzeros each, so that the tiles take a form that
    gathers x (AVX-512, bf16 x: 8 -> rows in pairs of at most 16, 30 -> rows of at most 32).
    k = 130 adds a dense second tile column and a 2-column third. Returns the weight and the
    probe rows' indices."""
    g = torch.Generator().manual_seed(21)
    codes = list(range(256)) if quant == "int8" else [c for c in range(256) if c & 0x7F != 0x7F]
    tile_rows = -(-len(codes) // 32)
    m, k = 64 * tile_rows, 130
    w = torch.randn(m, k, generator=g)
    if other is not None:
        keep = torch.rand(m, 64, generator=g).argsort(dim=1) < other
        w[:, :64] *= keep
    probe = torch.tensor([64 * (i // 32) + 32 + i % 32 for i in range(len(codes))])
    cols = torch.randint(0, 64, (len(codes),), generator=g)
    w[probe] = 0
    w[probe, cols] = 1.0
    masks, values, offsets, scales = fs.encode(w, quant=quant).tensors
    raw = values.view(torch.uint8).clone()
    scales = scales.clone()
    # the position of each probe row's one code: its tile's start + the popcounts before it
    counts = torch.tensor([bin(v & (2**64 - 1)).count("1") for v in masks.tolist()])
    kt = -(-k // 64)
    for row, c in zip(probe.tolist(), codes, strict=True):
        tile = (row // 64) * kt
        pos = int(offsets[tile]) * 8 + int(counts[tile * 64 : tile * 64 + row % 64].sum())
        raw[pos] = c
        scales[row] = 1.0
    sw = QuantBitmap(
        {
            "masks": masks,
            "values": raw.view(values.dtype),
            "tile_offsets": offsets,
            "scales": scales,
        },
        (m, k),
        torch.bfloat16,
    )
    sw.validate()
    return sw, probe


@needs_ext
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("isa", ISAS)
def test_every_code_in_rebuilt_rows_with_bf16_x(quant, isa):
    """Each probe row's output is one code's value times one x: exact up to the bf16 output's
    rounding, so a wrong lookup-table entry or a misplaced lane shows in its row."""
    sw, probe = _probe_weight(quant)
    k = sw.shape[1]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(22)).to(torch.bfloat16)
    y = _spmm(x, sw, None, isa)
    ref = _reference(x, sw)
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs()[0, probe]
    assert (err <= 2**-8 * ref.abs()[0, probe]).all(), err.max()
    assert rel_err(y, ref) < 1e-2


@needs_ext
@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("other", [8, 30])
@pytest.mark.parametrize("isa", ISAS)
def test_every_code_in_gathered_rows_with_bf16_x(quant, other, isa):
    """As above, in tiles of few nonzeros, whose rows multiply their codes with x gathered at
    their columns (AVX-512 with bf16 x: fp8 codes become bf16 words by byte lookups)."""
    sw, probe = _probe_weight(quant, other)
    masks = sw.tensors[0]
    counts = torch.tensor([bin(v & (2**64 - 1)).count("1") for v in masks.tolist()]).view(-1, 64)
    counts = counts[::3].reshape(-1)  # each row's nonzeros in tile column 0 (of 3)
    is_probe = torch.zeros_like(counts, dtype=torch.bool)
    is_probe[probe] = True
    assert (counts[is_probe] == 1).all() and (counts[~is_probe] == other).all()
    k = sw.shape[1]
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(23)).to(torch.bfloat16)
    y = _spmm(x, sw, None, isa)
    ref = _reference(x, sw)
    assert torch.isfinite(y).all()
    err = (y.double() - ref).abs()[0, probe]
    assert (err <= 2**-8 * ref.abs()[0, probe]).all(), err.max()
    assert rel_err(y, ref) < 1e-2


@needs_ext
def test_values_that_quantize_to_zero_and_int8_minus_128():
    """Stored codes of 0 (weights that round to zero) and -128 (compressed-tensors' range)."""
    w = torch.zeros(3, 130)
    w[0, :5] = torch.tensor([100.0, 0.1, -0.2, 0.3, -100.0])
    w[1, 64:70] = 1.0
    w[2, 129] = -2.0
    sw = fs.encode(w, quant="int8")
    masks, values, offsets, scales = sw.tensors
    values = values.clone()
    values[values == -127] = -128  # row 0's -100 and row 2's -2
    sw = QuantBitmap(
        {"masks": masks, "values": values, "tile_offsets": offsets, "scales": scales},
        (3, 130),
        torch.float32,
    )
    sw.validate()
    x = torch.randn(2, 130)
    for isa in ISAS:
        for n in (1, 2, 9):
            xn = torch.randn(n, 130)
            assert rel_err(_spmm(xn, sw, None, isa), _reference(xn, sw)) < 1e-6
    assert rel_err(_spmm(x, sw), _reference(x, sw)) < 1e-6


@needs_ext
def test_the_op_runs_the_cpu_kernel_under_auto_and_cpu(cpu_backend, monkeypatch):
    w = random_weight(100, 300, 0.7, torch.bfloat16, seed=9)
    for quant in QUANTS:
        layer = fs.SparseLinear.from_dense(w, quant=quant, group_size=128)
        x = torch.randn(2, 5, 300).to(torch.bfloat16)
        assert backends.select("bitmap_quant", x.reshape(-1, 300)).backend == "cpu"
        y = layer(x)
        assert rel_err(y, _reference(x.reshape(-1, 300), layer.weight).view(2, 5, 100)) < 1e-2
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "auto")
    backends._selected.clear()
    assert backends.select("bitmap_quant", x.reshape(-1, 300)).backend == "cpu"


@needs_ext
def test_forced_isa_paths_run_through_the_op(monkeypatch):
    w = random_weight(130, 200, 0.8, torch.float32, "row_skewed", seed=2)
    sw = fs.encode(w, quant="int8", group_size=32)
    x = torch.randn(1, 200)
    ref = _reference(x, sw)
    for name in ISAS:
        monkeypatch.setenv("FLASHSPARSE_CPU_ISA", name)
        assert rel_err(fs.linear(x, sw), ref) < 1e-5


@needs_ext
def test_bad_tensors_are_refused_by_the_glue():
    sw = fs.encode(random_weight(20, 70, 0.5, seed=1), quant="int8")
    masks, values, offsets, scales = sw.tensors
    x = torch.randn(2, 70)
    op = torch.ops.flashsparse._bitmap_quant_spmm_cpu
    cases = [
        ((x, masks, values.float(), offsets, scales, 20, 70), "values must be int8 or float8"),
        ((x, masks, values, offsets, scales.double(), 20, 70), "scales must be a float32"),
        ((x, masks, values, offsets, scales[:, :0], 20, 70), "scales must be a float32"),
        ((x, masks, values, offsets, torch.ones(20, 5), 20, 70), "match no group size"),
        ((x, masks, values[:-8], offsets, scales, 20, 70), "tile_offsets do not match"),
        ((x.double(), masks, values, offsets, scales, 20, 70), "x must be float32"),
        ((x[:, :69], masks, values, offsets, scales, 20, 70), "x must be 2-D"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            op(*args)


@needs_ext
def test_opcheck_of_the_internal_ops():
    from torch.library import opcheck

    sw = fs.encode(random_weight(70, 66, 0.6, seed=4), quant="int8", group_size=32)
    x, b = torch.randn(3, 66), torch.randn(70)
    isa = cpu_bitmap.ISAS[ISAS[-1]]
    opcheck(torch.ops.flashsparse._bitmap_quant_spmm_cpu.default, (x, *sw.tensors, 70, 66, b, isa))
    opcheck(
        torch.ops.flashsparse._bitmap_quant_decode_cpu.default,
        (*sw.tensors, 70, 66, torch.bfloat16, isa),
    )


@needs_ext
def test_compile_fullgraph_with_the_cpu_kernel(cpu_backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 130), torch.nn.GELU(), torch.nn.Linear(130, 33))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(fs.prune(layer.weight, 0.7))
    fs.sparsify_(model, quant="fp8", group_size=64)
    x = torch.randn(4, 96)
    with torch.no_grad():
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_decode_step_with_bf16_x_every_row(isa):
    """n = 1 with bf16 activations (the vdpbf16ps forms on AVX-512: row pairs of at most 16
    nonzeros, single rows of up to 32, rebuilt rows) element-wise: very sparse tiles with dense
    rows and columns mixed in, odd row counts, per-row and whole-tile-group scales."""
    w = random_weight(131, 700, 0.9, torch.float32, "row_skewed", seed=21)
    w[3] = torch.randn(700)  # a dense row next to a sparse one (a pair that splits)
    w[64:70, :40] = torch.randn(6, 40)  # rows of 17-40 nonzeros in one tile
    x = torch.randn(1, 700).to(torch.bfloat16)
    for quant in QUANTS:
        for group_size in (None, 64, 128):
            sw = fs.encode(w, quant=quant, group_size=group_size)
            dense = QuantBitmap.decode_reference(*sw.tensors, m=131, k=700, dtype=torch.float64)
            y = _spmm(x, sw, None, isa).double()
            ref = x.double() @ dense.T
            scale = x.double().abs() @ dense.abs().T
            bad = (y - ref).abs() > 2.0**-8 * ref.abs() + 1e-5 * scale + 1e-30
            assert not bad.any(), (quant, group_size, bad.nonzero()[:3].tolist())
