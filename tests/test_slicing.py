"""Cutting a block out of an encoded weight (what tensor-parallel loading gives each rank):
component for component the encoding of the dense block, whatever the block's alignment to the
64x64 / 128x64 tiles, reading only the tiles it overlaps."""

from __future__ import annotations

import pytest
import torch
from helpers import MASK_KINDS, random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

from flashsparse.formats import FORMATS, encode
from flashsparse.formats.slicing import TileRuns, WeightTiles, cut, tile_layout
from flashsparse.nn.parallel import chunk_range


def assert_same_encoding(got, want):
    assert type(got) is type(want) and got.shape == want.shape and got.dtype == want.dtype
    for name in want.components:
        a, b = got.state()[name], want.state()[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        # Bit for bit (NaN values included).
        assert torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), name
    got.validate()


class CountingTiles(WeightTiles):
    """Records which tiles were read."""

    def __init__(self, weight):
        super().__init__(weight)
        self.read_tiles: set[tuple[int, int]] = set()

    def read(self, rows, cols):
        self.read_tiles.update((r, c) for r in range(*rows) for c in range(*cols))
        return super().read(rows, cols)


def check_shards(format, dtype, kind, parts_list, m=389, k=263):
    # Row and column shards: aligned, unaligned and uneven starts.
    w = random_weight(m, k, 0.7, dtype, kind, seed=m + len(kind))
    source = WeightTiles(encode(w, format))
    for parts in parts_list:
        for rank in range(parts):
            r0, r1 = chunk_range(m, parts, rank)
            c0, c1 = chunk_range(k, parts, rank)
            assert_same_encoding(cut(source, (r0, r1), (0, k)), encode(w[r0:r1], format))
            assert_same_encoding(
                cut(source, (0, m), (c0, c1)), encode(w[:, c0:c1].contiguous(), format)
            )


@pytest.mark.parametrize("format", list(FORMATS))
def test_tensor_parallel_shards_encode_as_their_blocks(format):
    check_shards(format, torch.float16, "row_skewed", (2, 3), m=197, k=139)


@pytest.mark.slow
@pytest.mark.parametrize("format", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_tensor_parallel_shards_every_mask_kind_and_dtype(format, dtype, kind):
    check_shards(format, dtype, kind, (2, 4))


@pytest.mark.parametrize("format", list(FORMATS))
def test_aligned_block_reads_only_its_tiles_and_decodes_only_the_cut_ones(format, monkeypatch):
    tm, tk = tile_layout(FORMATS[format]).tile
    m, k = 5 * tm, 6 * tk
    w = random_weight(m, k, 0.8, torch.float16, "row_skewed", seed=3)
    source = CountingTiles(encode(w, format))
    decoded = []
    original = FORMATS[format].to_dense

    def spy(self):
        decoded.append(tuple(self.shape))
        return original(self)

    monkeypatch.setattr(FORMATS[format], "to_dense", spy)
    # Starts on a tile boundary, ends inside the third tile row and the fourth tile column.
    rows, cols = (tm, 3 * tm + 5), (tk, 4 * tk - 7)
    got = cut(source, rows, cols)
    assert_same_encoding(got, encode(w[rows[0] : rows[1], cols[0] : cols[1]].contiguous(), format))
    assert source.read_tiles == {(r, c) for r in range(1, 4) for c in range(1, 4)}
    # The cut last tile column (two tile rows) and the cut last tile row; nothing else.
    assert decoded == [(2 * tm, tk), (tm, 3 * tk)]
    decoded.clear()
    # A block ending on tile boundaries (or at the weight's end) is a pure copy.
    assert_same_encoding(
        cut(source, (2 * tm, m), (0, 2 * tk)), encode(w[2 * tm :, : 2 * tk].contiguous(), format)
    )
    assert decoded == []


@pytest.mark.parametrize("format", list(FORMATS))
def test_nan_inf_and_one_row_blocks(format):
    w = random_weight(200, 150, 0.6, torch.float32, "uniform", seed=5)
    w[3, 7], w[130, 140], w[64, 64] = float("nan"), float("inf"), -float("inf")
    source = WeightTiles(encode(w, format))
    for rows, cols in [
        ((3, 4), (0, 150)),
        ((130, 131), (140, 141)),
        ((0, 200), (7, 8)),
        ((64, 200), (64, 150)),
    ]:
        got = cut(source, rows, cols)
        want = w[rows[0] : rows[1], cols[0] : cols[1]]
        assert_same_encoding(got, encode(want.contiguous(), format))
        assert torch.equal(got.to_dense().isnan(), want.isnan())


@settings(max_examples=15, deadline=None)
@given(
    format=st.sampled_from(list(FORMATS)),
    m=st.integers(1, 300),
    k=st.integers(1, 200),
    data=st.data(),
)
def test_any_block_of_any_weight(format, m, k, data):
    r0 = data.draw(st.integers(0, m - 1))
    r1 = data.draw(st.integers(r0 + 1, m))
    c0 = data.draw(st.integers(0, k - 1))
    c1 = data.draw(st.integers(c0 + 1, k))
    sparsity = data.draw(st.sampled_from([0.0, 0.5, 0.9, 1.0]))
    w = random_weight(m, k, sparsity, torch.float16, "uniform", seed=m * k)
    got = cut(WeightTiles(encode(w, format)), (r0, r1), (c0, c1))
    assert_same_encoding(got, encode(w[r0:r1, c0:c1].contiguous(), format))


def test_bad_blocks_and_formats_are_refused():
    source = WeightTiles(encode(random_weight(70, 80, 0.5), "bitmap"))
    for rows, cols in [
        ((0, 0), (0, 80)),
        ((0, 71), (0, 80)),
        ((-1, 5), (0, 80)),
        ((0, 70), (50, 40)),
    ]:
        with pytest.raises(ValueError, match="not a non-empty block of a 70x80 weight"):
            cut(source, rows, cols)

    class Quantized(FORMATS["bitmap"]):
        components = ("masks", "values", "scales", "tile_offsets")

    with pytest.raises(ValueError, match="not supported"):
        tile_layout(Quantized)


def test_tile_runs_select_keeps_each_tiles_run():
    sw = encode(random_weight(128, 192, 0.7, torch.float16, "empty_tiles", seed=9), "bitmap")
    runs = TileRuns.of(sw)
    order = torch.tensor([5, 0, 3, 3, 1, 2, 4])  # any order, repeats allowed
    picked = runs.select(order)
    assert picked.units.tolist() == runs.units[order].tolist()
    back = runs.select(torch.arange(len(runs))).weight(type(sw), tuple(sw.shape), sw.dtype)
    assert_same_encoding(back, sw)


def test_chunk_range_is_dtensor_shard_split():
    from torch.distributed.tensor import Shard

    for size in (1, 2, 5, 7, 64, 100, 257):
        for parts in (1, 2, 3, 4, 8):
            for rank in range(parts):
                start, stop = chunk_range(size, parts, rank)
                length, offset = Shard.local_shard_size_and_offset(size, parts, rank)
                assert stop - start == length
                if length:
                    assert start == offset
