"""Cutting a block of rows and columns out of a tiled sparse weight without decoding it whole.

Both formats store a weight as a row-major grid of tiles, and each tile is self-contained: a
fixed number of per-tile words (the bitmap row masks) plus a run of entries (bitmap values,
Tiled-CSL words) whose length ``tile_offsets`` gives in units of 8 or 4 entries. A tile's bytes do
not depend on where the tile sits in the grid, so a block whose first row and column fall on a
tile boundary is mostly a copy of the source's tiles; only a last tile row or column that the
block's end cuts through (it also holds rows or columns beyond the block) is decoded, trimmed and
encoded again. A block that starts inside a tile is decoded and encoded band by band (a few tile
rows at a time), never the whole source. Either way the result is exactly
``encode(source.to_dense()[rows, cols])``, component for component.

Tensor-parallel loading uses this to give each rank its shard of a single-device checkpoint:
the source is then a file (``flashsparse.serialization.sharded``) that reads only the tiles
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .base import SparseWeight


@dataclass(frozen=True)
class TileLayout:
    """Where a format keeps each tile: ``fixed`` components hold ``n`` elements per tile; the
    ``run`` component holds each tile's entries, ``unit`` per ``tile_offsets`` step; the
    offsets have ``trailing`` entries after the ``#tiles + 1`` cumulative ones."""

    tile: tuple[int, int]
    fixed: tuple[tuple[str, int], ...]
    run: str
    unit: int
    trailing: int

    @property
    def components(self) -> set[str]:
        return {name for name, _ in self.fixed} | {self.run, "tile_offsets"}


LAYOUTS: dict[str, TileLayout] = {
    "bitmap": TileLayout((64, 64), (("masks", 64),), "values", 8, 0),
    "tiled_csl": TileLayout((128, 64), (), "words", 4, 1),
}


def tile_layout(cls: type[SparseWeight]) -> TileLayout:
    """The tile layout of format class ``cls``; ``ValueError`` for a format (or a variant with
    other components, e.g. quantized values with scales) whose tiles this module cannot cut."""
    layout = LAYOUTS.get(cls.format)
    if layout is None or set(cls.components) != layout.components:
        raise ValueError(
            f"cutting shards out of {cls.__name__} weights (components {cls.components}) is not "
            "supported"
        )
    return layout


class TileRuns:
    """An ordered list of tiles of one format: ``fixed[name]`` is ``[T, n]``, ``run`` the tiles'
    entries back to back, ``units[t]`` the length of tile ``t``'s run in offset units."""

    def __init__(
        self, layout: TileLayout, fixed: dict[str, torch.Tensor], run: torch.Tensor, units
    ) -> None:
        self.layout, self.fixed, self.run, self.units = layout, fixed, run, units.long()

    def __len__(self) -> int:
        return self.units.numel()

    @classmethod
    def of(cls, weight: SparseWeight) -> TileRuns:
        """Every tile of ``weight``, in its grid order."""
        layout = tile_layout(type(weight))
        state = weight.state()
        offsets = state["tile_offsets"].long()
        num_tiles = offsets.numel() - 1 - layout.trailing
        fixed = {name: state[name].view(num_tiles, n) for name, n in layout.fixed}
        return cls(
            layout, fixed, state[layout.run], offsets[1 : num_tiles + 1] - offsets[:num_tiles]
        )

    @classmethod
    def cat(cls, parts: list[TileRuns]) -> TileRuns:
        layout = parts[0].layout
        fixed = {name: torch.cat([p.fixed[name] for p in parts]) for name, _ in layout.fixed}
        return cls(
            layout,
            fixed,
            torch.cat([p.run for p in parts]),
            torch.cat([p.units for p in parts]),
        )

    def select(self, index: torch.Tensor) -> TileRuns:
        """The tiles at ``index`` (any order, repeats allowed)."""
        unit = self.layout.unit
        index = index.to(self.units.device).long()
        starts = torch.cumsum(self.units, 0) - self.units
        lengths = self.units[index]
        total = int(lengths.sum())
        first = torch.repeat_interleave(starts[index], lengths, output_size=total)
        within = torch.arange(total, device=index.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths, output_size=total
        )
        run = self.run.view(-1, unit)[first + within].reshape(-1)
        fixed = {name: t[index] for name, t in self.fixed.items()}
        return TileRuns(self.layout, fixed, run, lengths)

    def weight(
        self, cls: type[SparseWeight], shape: tuple[int, int], dtype: torch.dtype
    ) -> SparseWeight:
        """The tiles as a weight of ``shape`` (they must be its whole grid, row-major)."""
        layout = self.layout
        offsets = torch.zeros(
            len(self) + 1 + layout.trailing, dtype=torch.int32, device=self.units.device
        )
        offsets[1 : len(self) + 1] = torch.cumsum(self.units, 0)
        if layout.trailing:
            offsets[len(self) + 1 :] = offsets[len(self)]
        tensors = {name: t.reshape(-1) for name, t in self.fixed.items()}
        tensors[layout.run] = self.run
        tensors["tile_offsets"] = offsets
        return cls(tensors, shape, dtype)


class TileSource(Protocol):
    """Tiles to cut from: a weight's ``format`` class, ``shape``, ``dtype`` and tile reads."""

    cls: type[SparseWeight]
    shape: tuple[int, int]
    dtype: torch.dtype

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> TileRuns:
        """Tiles ``[rows[0], rows[1]) x [cols[0], cols[1])`` of the grid (in tile units),
        row-major."""
        ...


class WeightTiles:
    """A :class:`TileSource` over a weight in memory."""

    def __init__(self, weight: SparseWeight) -> None:
        self.cls, self.shape, self.dtype = type(weight), tuple(weight.shape), weight.dtype
        self._runs = TileRuns.of(weight)
        self._grid_k = -(-self.shape[1] // self._runs.layout.tile[1])

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> TileRuns:
        r = torch.arange(rows[0], rows[1]).view(-1, 1)
        c = torch.arange(cols[0], cols[1]).view(1, -1)
        return self._runs.select((r * self._grid_k + c).reshape(-1))


# Rows of dense weight a band of the general path decodes at once, times its padded width.
_BAND_ELEMENTS = 1 << 24


def _decode(source: TileSource, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    tm, tk = tile_layout(source.cls).tile
    shape = ((rows[1] - rows[0]) * tm, (cols[1] - cols[0]) * tk)
    return source.read(rows, cols).weight(source.cls, shape, source.dtype).to_dense()


def _encode(source: TileSource, dense: torch.Tensor) -> TileRuns:
    return TileRuns.of(source.cls.encode(dense.contiguous()))


def cut(source: TileSource, rows: tuple[int, int], cols: tuple[int, int]) -> SparseWeight:
    """``encode(W[rows[0]:rows[1], cols[0]:cols[1]])`` of the weight ``W`` that ``source`` holds,
    in the same format, reading only the tiles the block overlaps."""
    m, k = source.shape
    (r0, r1), (c0, c1) = rows, cols
    if not (0 <= r0 < r1 <= m and 0 <= c0 < c1 <= k):
        raise ValueError(
            f"rows {r0}:{r1} and columns {c0}:{c1} are not a non-empty block of a {m}x{k} weight"
        )
    layout = tile_layout(source.cls)
    tm, tk = layout.tile
    h, w = r1 - r0, c1 - c0
    grid_m, grid_k = -(-h // tm), -(-w // tk)
    if r0 % tm or c0 % tk:
        return _cut_by_bands(source, rows, cols)
    top, left = r0 // tm, c0 // tk
    # The block's last tile row (column) also holds rows (columns) of the source beyond the
    # block unless the block ends on a tile boundary or at the source's own end (zero padding).
    cut_row = h % tm != 0 and r1 < m
    cut_col = w % tk != 0 and c1 < k
    keep_m, keep_k = grid_m - cut_row, grid_k - cut_col
    parts: list[TileRuns] = []
    order = torch.empty(grid_m, grid_k, dtype=torch.long)
    placed = 0
    if keep_m and keep_k:
        parts.append(source.read((top, top + keep_m), (left, left + keep_k)))
        order[:keep_m, :keep_k] = torch.arange(keep_m * keep_k).view(keep_m, keep_k)
        placed = keep_m * keep_k
    if cut_col and keep_m:
        band = _decode(source, (top, top + keep_m), (left + keep_k, left + grid_k))
        parts.append(_encode(source, band[:, : w - keep_k * tk]))
        order[:keep_m, keep_k] = placed + torch.arange(keep_m)
        placed += keep_m
    if cut_row:
        band = _decode(source, (top + keep_m, top + grid_m), (left, left + grid_k))
        parts.append(_encode(source, band[: h - keep_m * tm, :w]))
        order[keep_m] = placed + torch.arange(grid_k)
    runs = TileRuns.cat(parts).select(order.reshape(-1))
    return runs.weight(source.cls, (h, w), source.dtype)


def _cut_by_bands(source: TileSource, rows: tuple[int, int], cols: tuple[int, int]) -> SparseWeight:
    """The general path: a block starting inside a tile is decoded and re-encoded a band of
    whole output tile rows at a time."""
    tm, tk = tile_layout(source.cls).tile
    (r0, r1), (c0, c1) = rows, cols
    left, right = c0 // tk, -(-c1 // tk)
    band_tiles = max(1, _BAND_ELEMENTS // (tm * (right - left) * tk))
    parts = []
    for a in range(r0, r1, band_tiles * tm):
        b = min(r1, a + band_tiles * tm)
        top, bottom = a // tm, -(-b // tm)
        dense = _decode(source, (top, bottom), (left, right))
        piece = dense[a - top * tm : b - top * tm, c0 - left * tk : c1 - left * tk]
        parts.append(_encode(source, piece))
    return TileRuns.cat(parts).weight(source.cls, (r1 - r0, c1 - c0), source.dtype)
