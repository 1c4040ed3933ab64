"""Tiled-CSL, Flash-LLM's format (arXiv 2309.10285, ``csrc/SpMM_API.cu``).

Layout (for an ``[M, K]`` weight, ``M`` = out_features):

* The weight is zero-padded to whole tiles of ``TILE_M x TILE_K = 128 x 64``; tiles are
  numbered row-major over the tile grid: ``t = (row // 128) * ceil(K / 64) + col // 64``.
* ``words``: one word per stored entry. For fp16/bf16 it is an int32 whose low 16 bits are
  the value's bits and whose high 16 bits are the in-tile location
  ``r * 64 + (c ^ ((r % 8) << 3))`` (``r`` in 0..127, ``c`` in 0..63) -- the XOR is the
  16-byte-chunk swizzle of the shared-memory tile, so a kernel scatters straight to it.
  fp32 weights (reference/Triton only) use int64 words: low 32 bits value, bits 32..47
  location.
* Each tile's entries are padded to a multiple of 4 with zero-valued entries placed at
  positions that are zero in the weight, so every tile is whole 16-byte vectors (for 16-bit
  values) and the padding never overwrites a nonzero, in whatever order a kernel scatters.
* ``tile_offsets``: int32, ``#tiles + 2`` entries in units of 4 words: entry ``t`` is where tile
  ``t`` starts, entry ``t + 1`` where it ends; the last entry repeats the total so a kernel
  may prefetch one tile ahead.

Word order inside a tile (any order decodes the same, so files written in another order
still load; this one makes the CUDA kernel's scatter bank-conflict free, as Flash-LLM's encoder
does). A kernel thread stages whole 16-byte vectors (4 words), and one 16-bit shared store
instruction of a warp writes word ``e`` of 32 consecutive vectors ``32g .. 32g+31`` of the tile.
The shared-memory bank of a location is ``(location >> 1) % 32`` (a 64-element row is 128 bytes
= 32 banks; the two halves of one 32-bit word share it without a conflict). The encoder

1. builds the tile's sequence in rounds: round ``j`` takes the ``j``-th stored 32-bit word
   (both of its entries if both are stored; words of a bank in row order) of every bank that
   has one, banks with the most words first (ties: lower bank), so consecutive entries come
   from distinct banks until fewer than 32 banks have words left;
2. deals the sequence out group by group: entry ``q`` (group ``g = q // 128``, ``u = q % 128``,
   ``L`` = the group's vector count) is stored as word ``u // L`` of vector ``32g + u % L``, so
   the 32 words one store instruction writes are exactly one window.

A window of 32 consecutive entries then holds each bank at most once except where rounds run
short at the end of a tile: the emulator counts 1.07 / 1.14 / 1.38 shared-memory wavefronts per
warp store at 50 / 70 / 90 % sparsity on uniform random masks, against 3.0-3.3 in row-major
order (``tests/test_cuda_kernel.py``).

Worked example: a 2x3 fp16 weight ``[[0, 1.5, 0], [0, 0, -2]]`` is one tile with two nonzeros
plus two padding zeros at the first zero positions (0,0) and (0,2):
``words = [(0 << 16) | 0, (1 << 16) | 0x3E00, (2 << 16) | 0, ((64 + (2 ^ 8)) << 16) | 0xC000]``
and ``tile_offsets = [0, 1, 1]``.
"""

from __future__ import annotations

import functools

import torch

from .base import (
    SparseWeight,
    check_weight,
    int_view_dtype,
    pad_to_tiles,
    tile_grid,
    unpad_tiles,
)

TILE_M = 128
TILE_K = 64
VECTOR = 4  # entries per 16-byte vector; tile lengths are padded to a multiple of this


def _word_layout(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(word dtype, value bits) for a weight dtype."""
    return (torch.int64, 32) if dtype == torch.float32 else (torch.int32, 16)


def swizzle(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """In-tile location of (row, col): the 16-byte chunk ``col // 8`` is XORed with ``row % 8``."""
    return (row << 6) | (col ^ ((row & 7) << 3))


def _padding_positions(
    nonzero: torch.Tensor, pad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile, position) of the first ``pad[t]`` zero positions of each tile ``t``.

    They exist because the tile size is a multiple of VECTOR, and they hold zeros, so padding
    entries there never overwrite a nonzero whatever order a kernel scatters in. Most tiles
    find theirs in a short prefix; only the rest are scanned whole.
    """
    window = 64
    head = ~nonzero[:, :window]
    rank = torch.cumsum(head, 1, dtype=torch.int32)
    found = rank[:, -1] >= pad
    hit = head & (rank <= pad.unsqueeze(1)) & found.unsqueeze(1)
    tiles, pos = hit.nonzero(as_tuple=True)
    rest = (~found).nonzero().squeeze(1)
    if rest.numel():
        zero = ~nonzero[rest]
        rank = torch.cumsum(zero, 1, dtype=torch.int32)
        sub, rest_pos = (zero & (rank <= pad[rest].unsqueeze(1))).nonzero(as_tuple=True)
        tiles, pos = torch.cat([tiles, rest[sub]]), torch.cat([pos, rest_pos])
    return tiles, pos


_ORDER_CHUNK = 2048  # tiles per pass of the word-order computation (bounds temporaries)
_BANKS = 32


@functools.cache
def _bank_words(device: torch.device) -> torch.Tensor:
    """Word indices (``row * 32 + p``, ``p`` the 32-bit word of the 64-column row) in bank-major
    order: entry ``b * 128 + r`` is the word of row ``r`` that the swizzle puts in bank ``b``."""
    r = torch.arange(TILE_M, device=device).view(1, TILE_M)
    b = torch.arange(_BANKS, device=device).view(_BANKS, 1)
    # bank(r, p) = ((p // 4) ^ (r % 8)) * 4 + p % 4, so p = ((b // 4) ^ (r % 8)) * 4 + b % 4
    p = (((b >> 2) ^ (r & 7)) << 2) | (b & 3)
    return (r * _BANKS + p).reshape(-1)


def _round_order(
    kc: torch.Tensor, tile_starts: torch.Tensor, first_tile: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(storage index, flat weight index)`` of every stored entry of the tiles in ``kc``
    (``[tiles, 8192]`` bool, tile ``first_tile`` first; ``tile_starts``: each tile's first word).

    Step 1 of the module docstring builds each tile's sequence in rounds: round ``j`` holds the
    ``j``-th stored 32-bit word (one or both of its entries) of every bank that has one, banks
    with more words first (ties: lower bank). Step 2 deals the sequence out over the tile's
    128-word groups. Vectorised: no loop over windows or rounds."""
    tc = kc.shape[0]
    dev = kc.device
    words = TILE_M * _BANKS
    halves = kc.view(tc, words, 2)
    first_half = halves[..., 0]
    size = first_half.to(torch.int32) + halves[..., 1]  # entries of each 32-bit word: 0, 1, 2
    bank_words = _bank_words(dev)
    size_bm = size.index_select(1, bank_words).view(tc, _BANKS, TILE_M)  # [tile, bank, row]
    present = size_bm > 0
    rank = torch.cumsum(present, 2, dtype=torch.int32) - 1  # the word's round
    count = present.sum(2, dtype=torch.int32)
    # A bank present in round j + 1 is then among the first banks of round j, so a window that
    # straddles two rounds repeats a bank only once fewer than 32 banks have words left.
    banks = torch.arange(_BANKS, device=dev)
    order = torch.argsort(count * _BANKS + (_BANKS - 1 - banks), dim=1, descending=True)
    slot = torch.empty_like(order).scatter_(
        1, order, banks.expand(tc, -1)
    )  # bank -> place in a round
    cell = (torch.where(present, rank, TILE_M).long() * _BANKS + slot.unsqueeze(2)).view(tc, -1)
    grid = torch.zeros(
        tc, (TILE_M + 1) * _BANKS, dtype=torch.int32, device=dev
    )  # last round: absent
    grid.scatter_(1, cell, size_bm.view(tc, -1))
    grid = grid[:, :words]
    start = torch.cumsum(grid, 1, dtype=torch.int32) - grid  # each word's first sequence index
    start_bm = torch.gather(start, 1, cell.clamp(max=words - 1))
    word_start = torch.empty_like(start_bm).index_copy_(1, bank_words, start_bm).view(-1)
    flat = kc.view(-1).nonzero().squeeze(1)  # stored entries in natural order, tile by tile
    f32 = flat.to(torch.int32)  # (int32 arithmetic: half the memory traffic of int64)
    tile = f32 >> 13
    word = f32 >> 1
    # The high half of a word goes after its low half when that is stored too.
    q = word_start.index_select(0, word) + (f32 & 1) * first_half.reshape(-1).index_select(0, word)
    n = grid.sum(1, dtype=torch.int32).index_select(
        0, tile
    )  # the tile's entry count (multiple of 4)
    # Entry q goes to word u // L of vector 32 g + u % L (g = q // 128, u = q % 128), L = 32 but
    # in a tile's last group, which has L = (n - 128 g) / 4 < 32 vectors.
    g = q & ~127
    u = q & 127
    dealt = g + ((u & 31) << 2) + (u >> 5)
    last = ((n - g) < 128).nonzero().squeeze(1)
    if last.numel():
        lanes = (n.index_select(0, last) - g.index_select(0, last)) >> 2
        ul = u.index_select(0, last)
        dealt.index_copy_(0, last, g.index_select(0, last) + (ul % lanes) * 4 + ul // lanes)
    storage = tile_starts.index_select(0, tile + first_tile) + dealt
    return storage, flat + (first_tile << 13)


def _conflict_free_order(keep: torch.Tensor) -> torch.Tensor:
    """Flat indices into the ``[tiles, 8192]`` padded weight of the stored entries, grouped by
    tile, in the bank-conflict-free word order described in the module docstring."""
    num_tiles = keep.shape[0]
    counts = keep.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    ordered = torch.empty(int(counts.sum()), dtype=torch.long, device=keep.device)
    for t0 in range(0, num_tiles, _ORDER_CHUNK):
        storage, source = _round_order(keep[t0 : t0 + _ORDER_CHUNK], starts, t0)
        ordered.index_copy_(0, storage, source)
    return ordered


class TiledCSL(SparseWeight):
    format = "tiled_csl"
    components = ("words", "tile_offsets")

    @classmethod
    def encode(cls, w: torch.Tensor) -> TiledCSL:
        w = check_weight(w)
        m, k = w.shape
        tiles = pad_to_tiles(w, TILE_M, TILE_K)  # [T, 8192]
        num_tiles = tiles.shape[0]
        nonzero = tiles != 0  # NaN is a nonzero; -0.0 is a zero
        counts = nonzero.sum(1, dtype=torch.int32)
        keep = nonzero.clone()
        keep[_padding_positions(nonzero, (-counts) % VECTOR)] = True
        flat = _conflict_free_order(keep)  # grouped by tile
        values = tiles.view(-1)[flat]
        values = torch.where(values == 0, 0, values)  # padding entries hold +0.0
        word_dtype, value_bits = _word_layout(w.dtype)
        bits = values.view(int_view_dtype(w.dtype)).to(word_dtype) & ((1 << value_bits) - 1)
        pos = (flat & (TILE_M * TILE_K - 1)).to(
            word_dtype
        )  # shifts and masks: int division is slow
        words = (swizzle(pos >> 6, pos & (TILE_K - 1)) << value_bits) | bits
        tile_offsets = torch.zeros(num_tiles + 2, dtype=torch.int32, device=w.device)
        tile_offsets[1 : num_tiles + 1] = torch.cumsum((counts + VECTOR - 1) // VECTOR, 0)
        tile_offsets[-1] = tile_offsets[-2]
        return cls(
            {"words": words, "tile_offsets": tile_offsets}, (m, k), w.dtype, int(counts.sum())
        )

    @staticmethod
    def decode(
        words: torch.Tensor, tile_offsets: torch.Tensor, *, m: int, k: int, dtype: torch.dtype
    ) -> torch.Tensor:
        mt, kt = tile_grid(m, k, TILE_M, TILE_K)
        num_tiles = mt * kt
        _, value_bits = _word_layout(dtype)
        lengths = (tile_offsets[1 : num_tiles + 1] - tile_offsets[:num_tiles]).long() * VECTOR
        tile_idx = torch.repeat_interleave(
            torch.arange(num_tiles, device=words.device), lengths, output_size=words.numel()
        )
        bits = words & ((1 << value_bits) - 1)
        bits = bits - ((bits >> (value_bits - 1)) << value_bits)  # to signed, so .to() is exact
        values = bits.to(int_view_dtype(dtype)).view(dtype)
        loc = (words >> value_bits) & 0xFFFF
        row = loc >> 6
        pos = (loc & ~(TILE_K - 1)) | ((loc & (TILE_K - 1)) ^ ((row & 7) << 3))  # unswizzle
        tiles = torch.zeros(num_tiles * TILE_M * TILE_K, dtype=dtype, device=words.device)
        tiles[tile_idx * (TILE_M * TILE_K) + pos] = values
        tiles = tiles.view(num_tiles, TILE_M * TILE_K)
        return unpad_tiles(tiles, m, k, TILE_M, TILE_K)

    def _count_nnz(self) -> int:
        _, value_bits = _word_layout(self.dtype)
        return int(((self._tensors["words"] & ((1 << value_bits) - 1)) != 0).sum())

    def validate(self) -> None:
        words, offsets = self._tensors["words"], self._tensors["tile_offsets"]
        m, k = self.shape
        mt, kt = tile_grid(m, k, TILE_M, TILE_K)
        num_tiles = mt * kt
        word_dtype, _ = _word_layout(self.dtype)
        if words.dtype != word_dtype or words.dim() != 1:
            raise ValueError(f"tiled_csl words must be 1-D {word_dtype} for {self.dtype} values")
        if offsets.dtype != torch.int32 or offsets.shape != (num_tiles + 2,):
            raise ValueError(
                f"tiled_csl tile_offsets must be int32 of shape ({num_tiles + 2},) for a "
                f"{m}x{k} weight, got {offsets.dtype} {tuple(offsets.shape)}"
            )
        offsets = offsets.cpu()
        lengths = offsets[1 : num_tiles + 1] - offsets[:num_tiles]
        if (
            int(offsets[0]) != 0
            or bool((lengths < 0).any())
            or bool((lengths > TILE_M * TILE_K // VECTOR).any())
            or int(offsets[-1]) != int(offsets[-2])
            or int(offsets[-1]) * VECTOR != words.numel()
        ):
            raise ValueError("tiled_csl tile_offsets are inconsistent with the words")
