"""Encoders: exact round trips, the documented layouts, size accounting and bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_KINDS, random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

import flashsparse as fs
from flashsparse.formats import FORMATS, encoded_nbytes
from flashsparse.formats.bitmap import unpack_masks
from flashsparse.formats.tiled_csl import TILE_K, TILE_M

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMAT_NAMES = tuple(FORMATS)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 300),
    k=st.integers(1, 300),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    kind=st.sampled_from(MASK_KINDS),
    dtype=st.sampled_from(DTYPES),
    format=st.sampled_from(FORMAT_NAMES),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_exact(m, k, sparsity, kind, dtype, format, seed):
    w = random_weight(m, k, sparsity, dtype, kind, seed=seed)
    sw = fs.encode(w, format)
    sw.validate()
    dense = sw.to_dense()
    assert dense.dtype == dtype and dense.shape == (m, k)
    assert torch.equal(dense, w)
    assert sw.nnz == int(torch.count_nonzero(w))
    assert sw.sparsity == pytest.approx(1 - sw.nnz / (m * k))
    assert sw.nbytes == sum(t.numel() * t.element_size() for t in sw.tensors)
    assert sw.nbytes == encoded_nbytes(format, w)
    assert (sw.format, sw.shape, sw.dtype, sw.device) == (
        format,
        torch.Size([m, k]),
        dtype,
        w.device,
    )


@pytest.mark.parametrize("format", FORMAT_NAMES)
def test_special_values_round_trip(format):
    w = torch.zeros(130, 70)
    w[0, 0], w[5, 69], w[129, 3] = float("nan"), float("inf"), -float("inf")
    w[7, 7] = -0.0  # a zero: stored as nothing, decoded as +0.0
    w[64:, 64:] = torch.randn(66, 6)
    sw = fs.encode(w, format)
    dense = sw.to_dense()
    assert torch.equal(dense.isnan(), w.isnan())
    assert torch.equal(dense.nan_to_num(), w.nan_to_num())
    assert sw.nnz == int(torch.count_nonzero(w))  # NaN counts as a nonzero


@pytest.mark.parametrize("format", FORMAT_NAMES)
@pytest.mark.parametrize("fill", ["zeros", "ones"])
def test_all_zero_and_fully_dense(format, fill):
    w = torch.zeros(200, 129) if fill == "zeros" else torch.randn(200, 129).abs() + 0.5
    sw = fs.encode(w, format)
    assert torch.equal(sw.to_dense(), w)
    assert sw.sparsity == (1.0 if fill == "zeros" else 0.0)


def test_tiled_csl_worked_example():
    w = torch.tensor([[0, 1.5, 0], [0, 0, -2]], dtype=torch.float16)
    sw = fs.encode(w, "tiled_csl")
    expected = [(0 << 16) | 0, (1 << 16) | 0x3E00, (2 << 16) | 0, ((64 + (2 ^ 8)) << 16) | 0xC000]
    assert sw.state()["words"].tolist() == expected
    assert sw.state()["tile_offsets"].tolist() == [0, 1, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_csl_layout_invariants(dtype):
    w = random_weight(300, 200, 0.7, dtype, "dense_tiles", seed=3)
    sw = fs.encode(w, "tiled_csl")
    words, offsets = sw.state()["words"], sw.state()["tile_offsets"]
    mt, kt = -(-300 // TILE_M), -(-200 // TILE_K)
    assert words.dtype == torch.int32 and offsets.dtype == torch.int32
    assert offsets.shape == (mt * kt + 2,) and offsets[-1] == offsets[-2]
    assert words.numel() == 4 * int(offsets[-1])
    padded = torch.zeros(mt * TILE_M, kt * TILE_K, dtype=dtype)
    padded[:300, :200] = w
    for t in range(mt * kt):
        tile = padded[(t // kt) * TILE_M :][:TILE_M, (t % kt) * TILE_K :][:, :TILE_K]
        chunk = words[4 * int(offsets[t]) : 4 * int(offsets[t + 1])].long()
        loc, bits = chunk >> 16, chunk & 0xFFFF
        row = loc // 64
        col = (loc % 64) ^ ((row % 8) << 3)
        assert len(set((row * 64 + col).tolist())) == chunk.numel()  # no position twice
        nonzero = int(torch.count_nonzero(tile))
        assert chunk.numel() == nonzero + (-nonzero) % 4
        values = torch.tensor(((bits + 2**15) % 2**16 - 2**15).tolist(), dtype=torch.int16).view(
            dtype
        )
        assert torch.equal(values, tile[row, col])  # padding sits on zeros and stores +0.0
        assert int((bits == 0).sum()) == chunk.numel() - nonzero


def test_tiled_csl_fp32_uses_64_bit_words():
    w = random_weight(130, 65, 0.5, torch.float32, seed=1)
    sw = fs.encode(w, "tiled_csl")
    assert sw.state()["words"].dtype == torch.int64
    assert torch.equal(sw.to_dense(), w)


def test_bitmap_worked_example():
    w = torch.tensor([[0, 1.5, 0], [0, 0, -2]], dtype=torch.float16)
    sw = fs.encode(w, "bitmap")
    masks = sw.state()["masks"]
    assert masks.shape == (64,)
    assert masks[0] == 1 << 1 and masks[1] == 1 << 2 and not masks[2:].any()
    assert sw.state()["values"].tolist() == [1.5, -2, 0, 0, 0, 0, 0, 0]
    assert sw.state()["tile_offsets"].tolist() == [0, 1]


def test_bitmap_layout_invariants():
    w = random_weight(150, 140, 0.6, torch.float16, "row_skewed", seed=5)
    sw = fs.encode(w, "bitmap")
    masks, values, offsets = (sw.state()[c] for c in ("masks", "values", "tile_offsets"))
    mt, kt = 3, 3
    bits = unpack_masks(masks, mt * kt).view(mt, kt, 64, 64)
    padded = torch.zeros(mt * 64, kt * 64, dtype=torch.float16)
    padded[:150, :140] = w
    for t in range(mt * kt):
        tile = padded[(t // kt) * 64 :][:64, (t % kt) * 64 :][:, :64]
        assert torch.equal(bits[t // kt, t % kt], tile != 0)
        run = values[8 * int(offsets[t]) : 8 * int(offsets[t + 1])]
        nonzero = tile[tile != 0]  # row-major order
        assert run.numel() == nonzero.numel() + (-nonzero.numel()) % 8
        assert torch.equal(run[: nonzero.numel()], nonzero)
        assert not run[nonzero.numel() :].any()
    # Row r of tile t is mask word t * 64 + r, bit c (the layout every kernel relies on).
    for r, c in ((13, 42), (0, 0), (63, 63), (149, 139)):
        t = (r // 64) * kt + c // 64
        word = int(masks[t * 64 + r % 64]) & (2**64 - 1)
        assert bool((word >> (c % 64)) & 1) == bool(padded[r, c] != 0)


def test_bitmap_masks_from_layout_1():
    from flashsparse.formats.bitmap import masks_from_v1

    w = random_weight(130, 70, 0.5, torch.float16, "row_skewed", seed=9)
    masks = fs.encode(w, "bitmap").state()["masks"]
    # Layout 1: one uint64 per 8x8 sub-tile, byte r % 8 = row r's bits of that sub-tile.
    by = masks.view(torch.uint8).view(-1, 8, 8, 8)  # [T, sub-row, row-in-sub, sub-col]
    v1 = by.permute(0, 1, 3, 2).contiguous().view(torch.int64).reshape(-1)
    assert not torch.equal(v1, masks)
    assert torch.equal(masks_from_v1(v1), masks)


def test_auto_picks_the_smaller_format(backend):
    backend(
        "reference"
    )  # every format runs alike there (on CPU, auto prefers the CPU kernel's bitmap)
    moderate = random_weight(256, 256, 0.7, torch.float16, seed=0)
    very_sparse = random_weight(256, 256, 0.98, torch.float16, seed=0)
    for w in (moderate, very_sparse):
        sizes = {f: fs.encode(w, f).nbytes for f in FORMAT_NAMES}
        assert fs.encode(w, "auto").format == min(sizes, key=sizes.get)
    assert fs.encode(moderate).format == "bitmap"
    assert fs.encode(very_sparse).format == "tiled_csl"


@pytest.mark.parametrize("format", FORMAT_NAMES)
def test_to_moves_every_component(format):
    sw = fs.encode(random_weight(70, 90, 0.5, seed=2), format)
    moved = sw.to("meta")
    assert moved.device.type == "meta"
    assert all(t.device.type == "meta" for t in moved.tensors)
    assert (moved.shape, moved.dtype, moved.format, moved.nnz) == (
        sw.shape,
        sw.dtype,
        sw.format,
        sw.nnz,
    )
    back = sw.to("cpu")
    assert torch.equal(back.to_dense(), sw.to_dense())
    half = sw.to(dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half.to_dense(), sw.to_dense().to(torch.bfloat16))


@pytest.mark.parametrize(
    ("w", "format", "error", "match"),
    [
        (torch.ones(3), "auto", ValueError, "2-D"),
        (torch.ones(2, 3, 4), "auto", ValueError, "2-D"),
        (torch.ones(0, 4), "auto", ValueError, "at least one row"),
        (torch.ones(3, 4, dtype=torch.float64), "auto", TypeError, "float16, bfloat16 or float32"),
        (torch.ones(3, 4, dtype=torch.int32), "bitmap", TypeError, "float16, bfloat16 or float32"),
        (torch.ones(3, 4), "csr", ValueError, "format must be one of"),
        ([[1.0, 2.0]], "auto", TypeError, "torch.Tensor"),
        (torch.ones(3, 4, device="meta"), "bitmap", ValueError, "meta"),
    ],
)
def test_encode_rejects_bad_input(w, format, error, match):
    with pytest.raises(error, match=match):
        fs.encode(w, format)


@pytest.mark.parametrize("format", FORMAT_NAMES)
def test_validate_catches_inconsistent_components(format):
    sw = fs.encode(random_weight(100, 100, 0.5, torch.float16, seed=4), format)
    state = sw.state()
    state["tile_offsets"] = state["tile_offsets"].clone()
    state["tile_offsets"][-1] += 1  # claims more entries than are stored
    broken = type(sw)(state, sw.shape, sw.dtype)
    with pytest.raises(ValueError, match="inconsistent"):
        broken.validate()
    with pytest.raises(ValueError, match="tile_offsets must be int32"):
        type(sw)(
            {**sw.state(), "tile_offsets": sw.state()["tile_offsets"][:-1]}, sw.shape, sw.dtype
        ).validate()


def test_prune_exact_count_and_methods():
    w = torch.randn(37, 53)
    for s in (0.0, 0.3, 0.5, 0.9, 1.0):
        p = fs.prune(w, s)
        assert p.shape == w.shape and p.dtype == w.dtype
        assert int((p == 0).sum()) == round(s * w.numel())
        kept = p != 0
        if kept.any() and (~kept).any():  # magnitude: every pruned |w| <= every kept |w|
            assert w.abs()[~kept].max() <= w.abs()[kept].min()
        assert torch.equal(p[kept], w[kept])
    g = torch.Generator().manual_seed(0)
    r = fs.prune(w, 0.6, "random", generator=g)
    assert int((r == 0).sum()) == round(0.6 * w.numel())
    ties = torch.ones(10)
    assert fs.prune(ties, 0.5).tolist() == [0.0] * 5 + [1.0] * 5
    nan_kept = fs.prune(torch.tensor([float("nan"), 1.0]), 0.5)  # NaN ranks as the largest
    assert nan_kept.isnan().tolist() == [True, False] and nan_kept[1] == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((torch.ones(4), 1.5), ValueError),
        ((torch.ones(4), -0.1), ValueError),
        ((torch.ones(4), 0.5, "wanda"), ValueError),
        ((torch.ones(4, dtype=torch.int64), 0.5), TypeError),
        (([1.0], 0.5), TypeError),
        ((torch.ones(4), "0.5"), TypeError),
    ],
)
def test_prune_rejects_bad_input(args, error):
    with pytest.raises(error):
        fs.prune(*args)
