"""Bitmap format with quantized nonzeros: int8 or fp8 (e4m3) values and float32 scales.

``encode(w, format="bitmap", quant="int8" | "fp8", group_size=None)`` stores a pruned
``[M, K]`` weight as the :mod:`bitmap <flashsparse.formats.bitmap>` layout whose ``values``
are 8-bit codes, plus one ``scales`` tensor outside the tiles. Weight-only (W8A16): the
activations stay in the model's dtype, which is ``sw.dtype``; ``sw.to_dense()`` is the
dequantized weight in that dtype.

Layout (four components, in the order the ``flashsparse::bitmap_quant_linear`` op takes them):

* ``masks`` (int64 ``[#tiles * 64]``) and ``tile_offsets`` (int32 ``[#tiles + 1]``): exactly as
  in the bitmap format (64x64 tiles numbered row-major, one 64-bit mask per tile row, LSB =
  column 0, offsets in units of 8 values). The mask comes from the weight *before* quantizing:
  a nonzero whose code rounds to 0 stays a stored nonzero (it counts in ``nnz``), and -0.0 is a
  zero.
* ``values``: the codes of each tile's nonzeros in row-major order, each tile's run zero-padded
  to a multiple of 8 codes; ``torch.int8`` (``quant="int8"``: symmetric, -127..127; a checkpoint
  may also hold -128) or ``torch.float8_e4m3fn`` (``quant="fp8"``: finite e4m3 codes, at most
  +-448; the NaN codes 0x7f and 0xff are refused).
* ``scales``: float32 ``[M, G]``, row-major, outside the tiles. ``group_size=None`` (the
  default): ``G = 1``, one scale per output row. ``group_size=g`` (a power of two >= 32, e.g.
  32 or 128): ``G = ceil(K / g)`` and column ``c`` of row ``r`` uses ``scales[r, c // g]``; the
  last group may be partial. A group of 32 covers half a tile row, a group of 64 or more whole
  tile rows, so a kernel needs one or two scales per 64-column row segment.

Dequantized weight: ``W[r, c] = code(r, c) * scales[r, c // g]`` (fp32 product; ``to_dense``
then rounds it to ``sw.dtype``; kernels multiply in fp32 and accumulate in fp32).

Quantizing (``encode``): per group, ``scale = max|w| / Q`` with ``Q = 127`` (int8) or ``448``
(fp8, the largest finite e4m3 value); int8 codes are ``round(w / scale)`` (half to even)
clamped to +-127, fp8 codes ``w / scale`` rounded to the nearest e4m3 value (half to even). An
all-zero group stores scale 0. Non-finite weights (NaN, +-Inf) are refused with a
``ValueError``: a NaN or Inf would set its group's scale to NaN/Inf and silently zero or
corrupt every other weight of the group, and 8-bit codes cannot hold them
(:func:`flashsparse.sparsify_` names the layer). ``sw.quant_error`` is the relative Frobenius
error the quantization adds, ``||W_dequantized - W|| / ||W||`` (fp32 dequantized weight; None
where unknown, e.g. for a layer read from a quantized checkpoint).

Worked example: the 2x3 bf16 weight ``[[0, 1.5, 0.004], [0, 0, -2]]`` with ``quant="int8"``
(per row) is one tile with ``masks = [0b110, 0b100, 0, ..., 0]``, ``scales = [[1.5 / 127],
[2 / 127]]`` (float32: 0.011811024, 0.015748031), ``values = [127, 0, -127, 0, 0, 0, 0, 0]``
(int8; 0.004 / 0.011811 = 0.34 rounds to the code 0 but keeps its mask bit, so ``nnz = 3``),
``tile_offsets = [0, 1]``. ``to_dense()`` gives ``[[0, 1.5, 0], [0, 0, -2]]`` in bf16. With
``group_size=32`` and ``K = 100`` the scales would be ``[2, 4]``: columns 0-31, 32-63, 64-95
and 96-99 of each row.

Bytes per element at sparsity ``s``: ``(1 - s) + 1/8`` for the codes and mask, plus ``4 / g``
for the scales (``4 / K`` per row), 4 bytes per tile and the padding; against ``2 (1 - s) +
1/8`` for 16-bit values (0.43 vs 0.73 at 70 %).
"""

from __future__ import annotations

import torch

from .base import (
    SUPPORTED_DTYPES,
    SparseWeight,
    check_weight,
    pad_to_tiles,
    tile_grid,
)
from .bitmap import ALIGN, SUB, TILE, Bitmap, pack_masks, unpack_masks

QUANTS = ("int8", "fp8")
#: Largest code magnitude a scale maps max|w| to.
QMAX = {"int8": 127.0, "fp8": 448.0}
MIN_GROUP_SIZE = 32
# Rows quantized per step: bounds the fp32 temporaries of a large layer to about 64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def fp8_dtype() -> torch.dtype | None:
    """``torch.float8_e4m3fn`` where this torch has it (torch >= 2.1), else None."""
    return getattr(torch, "float8_e4m3fn", None)


def check_quant(quant: object) -> str | None:
    """``None``, ``"int8"`` or ``"fp8"`` (the latter only where torch has float8_e4m3fn)."""
    if quant is None:
        return None
    if not isinstance(quant, str) or quant not in QUANTS:
        raise ValueError(f"quant must be None, 'int8' or 'fp8'; got {quant!r}")
    if quant == "fp8" and fp8_dtype() is None:
        raise ValueError(
            f"quant='fp8' needs torch.float8_e4m3fn, which torch {torch.__version__} lacks "
            "(torch >= 2.1 has it); use quant='int8'"
        )
    return quant


def check_group_size(group_size: object) -> int | None:
    """``None`` (one scale per output row) or a power of two >= 32."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(
            f"group_size must be None or an int (a power of two >= {MIN_GROUP_SIZE}), "
            f"got {type(group_size).__name__}"
        )
    if group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(
            f"group_size must be None (one scale per output row) or a power of two >= "
            f"{MIN_GROUP_SIZE} such as 32 or 128 (a group is half a 64-column tile row or "
            f"whole tile rows), got {group_size}"
        )
    return group_size


def scale_groups(k: int, group_size: int | None) -> int:
    """``G``, the number of scale columns: ``ceil(K / group_size)``, 1 per row if None."""
    return 1 if group_size is None else -(-k // group_size)


def group_size_of(k: int, groups: int) -> int | None:
    """The group size a ``[M, groups]`` scale tensor means for ``K = k`` columns: None (one per
    row) for one column, else the power of two >= 32 with ``ceil(k / g) == groups``. Raises
    ``ValueError`` if there is none (so kernels can take the group size from the shapes)."""
    if groups == 1:
        return None
    g = MIN_GROUP_SIZE
    while groups >= 1 and -(-k // g) > groups:
        g *= 2
    if groups < 1 or -(-k // g) != groups:
        raise ValueError(
            f"scales with {groups} columns match no group size for {k} input features "
            f"(ceil({k} / group_size) columns, group_size a power of two >= {MIN_GROUP_SIZE})"
        )
    return g


def quant_of(values: torch.Tensor) -> str | None:
    """The quant name of a values tensor's dtype (None if it is not a quantized one)."""
    if values.dtype == torch.int8:
        return "int8"
    if fp8_dtype() is not None and values.dtype == fp8_dtype():
        return "fp8"
    return None


def _check_finite(w: torch.Tensor, name: str) -> None:
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        r, c = (int(v) for v in bad[0])
        raise ValueError(
            f"{name} has {bad.shape[0]} non-finite value(s) (first {float(w[r, c])} at row {r}, "
            f"column {c}); int8/fp8 quantization needs finite weights (a NaN or Inf would "
            "become its group's scale and wipe out the other weights of the group)"
        )


def quantize(
    w: torch.Tensor, quant: str, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(codes [M, K], scales [M, G] float32, relative error)`` of a finite dense ``w``.

    ``codes`` is int8 for ``"int8"`` and the uint8 bits of float8_e4m3fn codes for ``"fp8"``.
    The relative error is ``||codes * scales - w|| / ||w||`` (0 for an all-zero ``w``).
    """
    m, k = w.shape
    g = group_size or k
    groups = scale_groups(k, group_size)
    qmax = QMAX[quant]
    codes = torch.empty(m, k, dtype=torch.int8 if quant == "int8" else torch.uint8, device=w.device)
    scales = torch.empty(m, groups, dtype=torch.float32, device=w.device)
    err2 = torch.zeros((), dtype=torch.float64, device=w.device)
    norm2 = torch.zeros((), dtype=torch.float64, device=w.device)
    tiny = torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps  # 2 ** -149
    rows = max(1, _CHUNK_ELEMENTS // (groups * g))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        wf = w[r0:r1].float()
        if groups * g != k:
            wf = torch.nn.functional.pad(wf, (0, groups * g - k))
        wg = wf.view(r1 - r0, groups, g)
        absmax = wg.abs().amax(-1)
        # A scale that underflows float32 (max|w| below ~2e-43) would divide by zero.
        scale = torch.where(absmax > 0, (absmax / qmax).clamp_min(tiny), torch.zeros_like(absmax))
        t = wg / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        if quant == "int8":
            q = t.round().clamp_(-qmax, qmax)
            codes_chunk = q.to(torch.int8)
        else:
            # e4m3fn has no Inf: out-of-range values would become NaN, so clamp first.
            codes_chunk = t.clamp_(-qmax, qmax).to(fp8_dtype()).view(torch.uint8)
            q = codes_chunk.view(fp8_dtype()).float()
        deq = q * scale.unsqueeze(-1)
        err2 += (deq - wg).double().square().sum()
        norm2 += wg.double().square().sum()
        codes[r0:r1] = codes_chunk.view(r1 - r0, groups * g)[:, :k]
        scales[r0:r1] = scale
    error = float(err2.sqrt() / norm2.sqrt()) if float(norm2) > 0 else 0.0
    return codes, scales, error


def pack_codes(codes: torch.Tensor, nonzero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(masks, values, tile_offsets)`` of the bitmap layout for 8-bit ``codes [M, K]`` at the
    positions ``nonzero [M, K]`` says (not where the codes are nonzero: a code may be 0)."""
    tiles = pad_to_tiles(codes, TILE, TILE)
    nz_tiles = pad_to_tiles(nonzero, TILE, TILE)
    num_tiles = tiles.shape[0]
    counts = nz_tiles.sum(1)
    tile_offsets = torch.zeros(num_tiles + 1, dtype=torch.int32, device=codes.device)
    tile_offsets[1:] = torch.cumsum((counts + ALIGN - 1) // ALIGN, 0)
    tile_idx, pos = nz_tiles.nonzero(as_tuple=True)  # grouped by tile, row-major inside
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pos.numel(), device=codes.device) - starts[tile_idx]
    dest = tile_offsets[tile_idx].long() * ALIGN + rank
    values = codes.new_zeros(int(tile_offsets[-1]) * ALIGN)
    values[dest] = tiles[tile_idx, pos]
    return pack_masks(nz_tiles), values, tile_offsets


class QuantBitmap(SparseWeight):
    """A bitmap weight whose nonzeros are int8 or fp8 codes with float32 scales (see the module
    doc). ``format`` is ``"bitmap"``; ``quant`` is ``"int8"`` or ``"fp8"``; ``dtype`` is the
    dtype of the dequantized weight and of the activations it multiplies."""

    format = "bitmap"
    #: The key of its kernels and of the ``flashsparse::bitmap_quant_linear`` op.
    op_format = "bitmap_quant"
    components = ("masks", "values", "tile_offsets", "scales")

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype,
        nnz: int | None = None,
        *,
        group_size: int | None = None,
        quant_error: float | None = None,
    ) -> None:
        super().__init__(tensors, shape, dtype, nnz)
        self.group_size = check_group_size(group_size)
        self.quant_error = quant_error

    @property
    def quant(self) -> str | None:  # type: ignore[override]
        return quant_of(self._tensors["values"])

    # -- encode / decode ------------------------------------------------------------------------
    @classmethod
    def encode(  # type: ignore[override]
        cls, w: torch.Tensor, quant: str = "int8", group_size: int | None = None, *, name: str = "w"
    ) -> QuantBitmap:
        """Quantize and encode a dense pruned weight (on its device). ``name`` is used in the
        error for non-finite weights."""
        w = check_weight(w, name)
        quant = check_quant(quant)
        if quant is None:
            raise ValueError("QuantBitmap.encode needs quant='int8' or 'fp8'")
        group_size = check_group_size(group_size)
        _check_finite(w, name)
        nonzero = w != 0
        codes, scales, error = quantize(w, quant, group_size)
        masks, values, tile_offsets = pack_codes(codes, nonzero)
        if quant == "fp8":
            values = values.view(fp8_dtype())
        return cls(
            {"masks": masks, "values": values, "tile_offsets": tile_offsets, "scales": scales},
            tuple(w.shape),
            w.dtype,
            int(nonzero.sum()),
            group_size=group_size,
            quant_error=error,
        )

    @staticmethod
    def decode(  # type: ignore[override]
        masks: torch.Tensor,
        values: torch.Tensor,
        tile_offsets: torch.Tensor,
        scales: torch.Tensor,
        *,
        m: int,
        k: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """The dequantized dense weight in ``dtype`` (vectorised torch, any device): the
        reference every quantized kernel is tested on."""
        # float64 asked for (a test reference): exact products; else the kernels' fp32 ones.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        codes = Bitmap.decode(masks, values.to(work), tile_offsets, m=m, k=k, dtype=work)
        g = group_size_of(k, scales.shape[1]) or k
        expanded = scales.to(work).repeat_interleave(g, dim=1)[:, :k]
        return (codes * expanded).to(dtype)

    decode_reference = decode

    def to_dense(self) -> torch.Tensor:
        from ..backends import decode  # fast decodes registered by kernel providers

        return decode(type(self), self.tensors, self._shape[0], self._shape[1], self._dtype)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> QuantBitmap:
        """A copy on ``device``; a new ``dtype`` changes the dequantized (activation) dtype and
        keeps the codes and scales as they are (no requantization)."""
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        return QuantBitmap(
            {c: t.to(device) for c, t in self._tensors.items()},
            self._shape,
            dtype or self._dtype,
            self._nnz,
            group_size=self.group_size,
            quant_error=self.quant_error,
        )

    # -- checks ---------------------------------------------------------------------------------
    def _count_nnz(self) -> int:
        m, k = self.shape
        mt, kt = tile_grid(m, k, TILE, TILE)
        return int(unpack_masks(self._tensors["masks"], mt * kt).sum())

    def validate(self) -> None:
        masks, values, offsets, scales = (self._tensors[c] for c in self.components)
        m, k = self.shape
        quant = quant_of(values)
        if quant is None or values.dim() != 1:
            raise ValueError(
                f"quantized bitmap values must be 1-D int8 or float8_e4m3fn, got {values.dtype} "
                f"{tuple(values.shape)}"
            )
        groups = scale_groups(k, self.group_size)
        if scales.dtype != torch.float32 or scales.shape != (m, groups):
            raise ValueError(
                f"quantized bitmap scales must be float32 of shape ({m}, {groups}) for a {m}x{k} "
                f"weight with group_size={self.group_size}, got {scales.dtype} "
                f"{tuple(scales.shape)}"
            )
        if not bool(torch.isfinite(scales).all()):
            raise ValueError("quantized bitmap scales must be finite")
        if quant == "fp8" and bool(((values.view(torch.uint8) & 0x7F) == 0x7F).any()):
            raise ValueError("fp8 values hold NaN codes (0x7f / 0xff); weights must be finite")
        check_structure(masks, values.numel(), offsets, m, k)


def check_structure(
    masks: torch.Tensor, num_values: int, offsets: torch.Tensor, m: int, k: int
) -> None:
    """The bitmap format's mask / offset / value-count consistency, for any value type."""
    mt, kt = tile_grid(m, k, TILE, TILE)
    num_tiles = mt * kt
    if masks.dtype != torch.int64 or masks.shape != (num_tiles * SUB * SUB,):
        raise ValueError(
            f"bitmap masks must be int64 of shape ({num_tiles * 64},) for a {m}x{k} weight, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
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
        or int(offsets[-1]) * ALIGN != num_values
    ):
        raise ValueError("bitmap tile_offsets are inconsistent with the masks and values")


__all__ = [
    "QMAX",
    "QUANTS",
    "QuantBitmap",
    "check_group_size",
    "check_quant",
    "check_structure",
    "fp8_dtype",
    "group_size_of",
    "quant_of",
    "quantize",
]
