"""Bitmap format (SpInfer-style): one 64-bit mask per row of a 64x64 tile plus packed values.

Layout (for an ``[M, K]`` weight, ``M`` = out_features):

* The weight is zero-padded to whole ``64 x 64`` tiles, numbered row-major over the tile grid:
  ``t = (row // 64) * ceil(K / 64) + col // 64``.
* ``masks``: int64 (read as uint64), shape ``[#tiles * 64]``, one per tile row: tile ``t``
  owns ``masks[t * 64 : (t + 1) * 64]`` and ``masks[t * 64 + r]`` is in-tile row ``r``. Bit
  ``c`` (LSB first) is set where the weight at in-tile column ``c`` is nonzero (NaN counts as
  nonzero, -0.0 as zero). Read as little-endian bytes, byte ``j`` of a row mask covers columns
  ``8j .. 8j + 7``. (Layout version 2; version 1 stored one mask per 8x8 sub-tile, see
  :func:`masks_from_v1`.)
* ``values``: the nonzeros of tile ``t`` in row-major order of their in-tile position
  (row by row, left to right), in the weight's dtype, starting at ``tile_offsets[t] * 8``;
  each tile's run is zero-padded to a multiple of 8 values (16-byte aligned for 16-bit values).
* ``tile_offsets``: int32, ``#tiles + 1`` entries in units of 8 values; tile ``t`` spans
  ``[tile_offsets[t], tile_offsets[t + 1])``.

Decoding: a nonzero at in-tile ``(r, c)`` is ``values[tile_offsets[t] * 8 + rank]`` where
``rank`` = popcount(masks of rows ``< r`` of the tile) + popcount(row ``r``'s mask below bit
``c``). Every kernel reads the same layout: a row's mask is one 64-bit word, so a CPU expands
32 weights from one 32-bit half, and a GPU thread that owns four adjacent columns of a row
reads one nibble.

Worked example: the 2x3 fp16 weight ``[[0, 1.5, 0], [0, 0, -2]]`` is one tile with
``masks = [0b010, 0b100, 0, ..., 0]`` (64 entries: row 0 has column 1, row 1 has column 2),
``values = [1.5, -2, 0, 0, 0, 0, 0, 0]``, ``tile_offsets = [0, 1]``.

Bytes per element at sparsity ``s``: ``2 (1 - s) + 1/8`` for 16-bit values, plus 4 bytes per
tile and the padding.
"""

from __future__ import annotations

import torch

from .base import SparseWeight, check_weight, pad_to_tiles, tile_grid, unpad_tiles

TILE = 64
SUB = 8
ALIGN = 8  # values per alignment unit of tile_offsets


LAYOUT_VERSION = 2


def pack_masks(nonzero: torch.Tensor) -> torch.Tensor:
    """``[T, 4096]`` bool (row-major tiles) -> ``[T * 64]`` int64 row masks."""
    bits = nonzero.view(-1, TILE * TILE // SUB, SUB).to(torch.uint8)  # [T, 64 rows * 8 bytes, 8]
    weights = torch.tensor([1 << i for i in range(SUB)], dtype=torch.uint8, device=nonzero.device)
    row_bytes = (bits * weights).sum(-1, dtype=torch.uint8)  # [T, 512] little-endian row words
    return row_bytes.contiguous().view(torch.int64).reshape(-1)


def unpack_masks(masks: torch.Tensor, num_tiles: int) -> torch.Tensor:
    """Inverse of :func:`pack_masks`: ``[T, 4096]`` bool, row-major tiles."""
    row_bytes = masks.contiguous().view(torch.uint8).view(num_tiles, TILE * TILE // SUB)
    shifts = torch.arange(SUB, dtype=torch.uint8, device=masks.device)
    return ((row_bytes.unsqueeze(-1) >> shifts) & 1).view(num_tiles, TILE * TILE).bool()


def masks_from_v1(masks: torch.Tensor) -> torch.Tensor:
    """Layout-1 masks (one uint64 per 8x8 sub-tile, byte ``r % 8`` = that row's eight bits) as
    layout-2 row masks; values and offsets are the same in both layouts."""
    t = masks.numel() // (SUB * SUB)
    by = masks.contiguous().view(torch.uint8).view(t, SUB, SUB, SUB)  # [T, sub-row, sub-col, row]
    return by.permute(0, 1, 3, 2).contiguous().view(torch.int64).reshape(-1)


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
        """The vectorised torch decode (any device): the reference every kernel is tested on.
        Faster decodes registered by kernel providers run through :func:`flashsparse.backends.decode`."""
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

    decode_reference = decode  # the name tests and benchmarks use for this torch decode

    @classmethod
    def upgrade(
        cls, tensors: dict[str, torch.Tensor], file_version: int
    ) -> dict[str, torch.Tensor]:
        if file_version < 2 and tensors["masks"].numel() % (SUB * SUB) == 0:
            tensors = {**tensors, "masks": masks_from_v1(tensors["masks"])}
        return tensors

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
