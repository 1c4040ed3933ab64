"""Bitmap format (SpInfer-style): one 64-bit mask per 8x8 sub-tile plus packed values.

Layout (for an ``[M, K]`` weight, ``M`` = out_features):

* The weight is zero-padded to whole ``64 x 64`` tiles, numbered row-major over the tile grid:
  ``t = (row // 64) * ceil(K / 64) + col // 64``.
* ``masks``: int64 (read as uint64), shape ``[#tiles * 64]``. Tile ``t`` owns
  ``masks[t * 64 : (t + 1) * 64]``, one per 8x8 sub-tile, sub-tiles row-major
  (``s = (r // 8) * 8 + c // 8`` for in-tile row ``r`` and column ``c``). Bit
  ``(r % 8) * 8 + c % 8`` (LSB first) is set where the weight is nonzero (NaN counts as
  nonzero, -0.0 as zero). Read as little-endian bytes, byte ``r % 8`` of a mask is row ``r``'s
  eight bits of that sub-tile, so a kernel can fetch one tile row as 8 bytes at stride 8.
* ``values``: the nonzeros of tile ``t`` in row-major order of their in-tile position
  (row by row, left to right), in the weight's dtype, starting at ``tile_offsets[t] * 8``;
  each tile's run is zero-padded to a multiple of 8 values (16-byte aligned for 16-bit values).
* ``tile_offsets``: int32, ``#tiles + 1`` entries in units of 8 values; tile ``t`` spans
  ``[tile_offsets[t], tile_offsets[t + 1])``.

Decoding: a nonzero at in-tile ``(r, c)`` is ``values[tile_offsets[t] * 8 + rank]`` where
``rank`` = (set bits in rows ``< r`` of the tile) + (set bits of row ``r`` left of ``c``): an
exclusive prefix sum of the expanded mask bits, row-wise and then over the row totals.

Worked example: the 2x3 fp16 weight ``[[0, 1.5, 0], [0, 0, -2]]`` is one tile whose only
non-empty sub-tile is ``s = 0`` with bits 1 (row 0, col 1) and 10 (row 1, col 2):
``masks = [0b100_0000_0010, 0, ..., 0]`` (64 entries), ``values = [1.5, -2, 0, 0, 0, 0, 0, 0]``,
``tile_offsets = [0, 1]``.

Bytes per element at sparsity ``s``: ``2 (1 - s) + 1/8`` for 16-bit values, plus 4 bytes per
tile and the padding.
"""

from __future__ import annotations

import torch

from .base import SparseWeight, check_weight, pad_to_tiles, tile_grid, unpad_tiles

TILE = 64
SUB = 8
ALIGN = 8  # values per alignment unit of tile_offsets


def _bits_to_subtile_order(bits: torch.Tensor) -> torch.Tensor:
    """``[T, 64*64]`` row-major tiles -> ``[T, 64 sub-tiles, 8 rows, 8 cols]``."""
    t = bits.shape[0]
    return bits.view(t, SUB, SUB, SUB, SUB).transpose(2, 3)


def pack_masks(nonzero: torch.Tensor) -> torch.Tensor:
    """``[T, 4096]`` bool (row-major tiles) -> ``[T * 64]`` int64 masks."""
    sub = _bits_to_subtile_order(nonzero).to(torch.uint8)  # [T, sr, sc, rr, cc]
    weights = torch.tensor([1 << i for i in range(SUB)], dtype=torch.uint8, device=nonzero.device)
    row_bytes = (sub * weights).sum(-1, dtype=torch.uint8)  # [T, sr, sc, rr]
    return row_bytes.contiguous().view(torch.int64).reshape(-1)


def unpack_masks(masks: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: ``[T, 4096]`` bool, row-major tiles."""
    row_bytes = masks.view(torch.uint8).view(num_tiles, SUB, SUB, SUB)  # [T, sr, sc, rr]
    shifts = torch.arange(SUB, dtype=torch.uint8, device=masks.device)
    sub = (row_bytes.unsqueeze(-1) >> shifts) & 1  # [T, sr, sc, rr, cc]
    return sub.transpose(2, 3).reshape(num_tiles, TILE * TILE).bool()


class Bitmap(SparseWeight):
    format = "bitmap"
    components = ("masks", "values", "tile_offsets")

    @classmethod
    def encode(cls, w: torch.Tensor) -> Bitmap:
        w = check_weight(w)
        m, k = w.shape
        tiles = pad_to_tiles(w, TILE, TILE)  # [T, 4096]
        num_tiles = tiles.shape[0]
        nonzero = tiles != 0
        counts = nonzero.sum(1)
        units = (counts + ALIGN - 1) // ALIGN
        tile_offsets = torch.zeros(num_tiles + 1, dtype=torch.int32, device=w.device)
        tile_offsets[1:] = torch.cumsum(units, 0)
        tile_idx, pos = nonzero.nonzero(as_tuple=True)  # grouped by tile, row-major inside
        starts = torch.cumsum(counts, 0) - counts  # first nonzero of each tile in `pos`
        rank = torch.arange(pos.numel(), device=w.device) - starts[tile_idx]
        dest = tile_offsets[tile_idx].long() * ALIGN + rank
        values = w.new_zeros(int(tile_offsets[-1]) * ALIGN)
        values[dest] = tiles[tile_idx, pos]
        return cls(
            {"masks": pack_masks(nonzero), "values": values, "tile_offsets": tile_offsets},
            (m, k),
            w.dtype,
            pos.numel(),
        )

    @staticmethod
    def decode(
        masks: torch.Tensor,
        values: torch.Tensor,
        tile_offsets: torch.Tensor,
        *,
        m: int,
        k: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        mt, kt = tile_grid(m, k, TILE, TILE)
        num_tiles = mt * kt
        nonzero = unpack_masks(masks, num_tiles)
        # Row-major masked assignment visits the nonzeros in storage order: only the padding
        # at the end of each tile's run has to be skipped.
        starts = tile_offsets.long() * ALIGN
        lengths = starts[1:] - starts[:-1]
        owner = torch.repeat_interleave(
            torch.arange(num_tiles, device=masks.device), lengths, output_size=values.numel()
        )
        in_run = torch.arange(values.numel(), device=masks.device) - starts[owner]
        stored = in_run < nonzero.sum(1)[owner]
        tiles = torch.zeros(num_tiles, TILE * TILE, dtype=dtype, device=masks.device)
        tiles[nonzero] = values[stored]
        return unpad_tiles(tiles, m, k, TILE, TILE)

    def _count_nnz(self) -> int:
        m, k = self.shape
        mt, kt = tile_grid(m, k, TILE, TILE)
        return int(unpack_masks(self._tensors["masks"], mt * kt).sum())

    def validate(self) -> None:
        masks, values, offsets = (self._tensors[c] for c in self.components)
        m, k = self.shape
        mt, kt = tile_grid(m, k, TILE, TILE)
        num_tiles = mt * kt
        if masks.dtype != torch.int64 or masks.shape != (num_tiles * SUB * SUB,):
            raise ValueError(
                f"bitmap masks must be int64 of shape ({num_tiles * 64},) for a {m}x{k} weight, "
                f"got {masks.dtype} {tuple(masks.shape)}"
            )
        if values.dtype != self.dtype or values.dim() != 1:
            raise ValueError(f"bitmap values must be 1-D {self.dtype}, got {values.dtype}")
        if offsets.dtype != torch.int32 or offsets.shape != (num_tiles + 1,):
            raise ValueError(
                f"bitmap tile_offsets must be int32 of shape ({num_tiles + 1},), "
                f"got {offsets.dtype} {tuple(offsets.shape)}"
            )
        counts = unpack_masks(masks, num_tiles).sum(1).cpu()
        offsets = offsets.cpu().long()
        units = offsets[1:] - offsets[:-1]
        if (
            int(offsets[0]) != 0
            or bool((units * ALIGN < counts).any())
            or int(offsets[-1]) * ALIGN != values.numel()
        ):
            raise ValueError("bitmap tile_offsets are inconsistent with the masks and values")
