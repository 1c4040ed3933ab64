"""Tiled sparse weight formats and the encoder entry point."""

from __future__ import annotations

import torch

from .base import SparseWeight, check_weight
from .bitmap import Bitmap
from .bitmap_quant import QuantBitmap, check_group_size, check_quant
from .tiled_csl import TiledCSL

FORMATS: dict[str, type[SparseWeight]] = {"tiled_csl": TiledCSL, "bitmap": Bitmap}
FORMAT_NAMES = ("auto", *FORMATS)


def check_format(format: object) -> str:
    if format not in FORMAT_NAMES:
        raise ValueError(f"format must be one of {', '.join(FORMAT_NAMES)}; got {format!r}")
    return format  # type: ignore[return-value]


def encoded_nbytes(format: str, w: torch.Tensor) -> int:
    """Exact size of ``encode(w, format).nbytes`` without encoding."""
    from .base import pad_to_tiles

    nonzero = w != 0
    value = w.element_size()
    if format == "tiled_csl":
        counts = pad_to_tiles(nonzero, 128, 64).sum(1)
        word = 8 if w.dtype == torch.float32 else 4
        return int(((counts + 3) // 4).sum()) * 4 * word + 4 * (counts.numel() + 2)
    counts = pad_to_tiles(nonzero, 64, 64).sum(1)
    return (
        int(((counts + 7) // 8).sum()) * 8 * value
        + 8 * 64 * counts.numel()
        + 4 * (counts.numel() + 1)
    )


def choose_format(w: torch.Tensor) -> str:
    """``format="auto"``: the smaller encoding among formats a fast kernel can run for ``w``'s
    device and dtype under the current backend setting (all formats if none can)."""
    from ..backends import has_fast_kernel

    sizes = {name: encoded_nbytes(name, w) for name in FORMATS}
    runnable = [name for name in FORMATS if has_fast_kernel(name, w.device, w.dtype)] or list(
        FORMATS
    )
    return min(runnable, key=sizes.__getitem__)


def check_quant_format(format: str, quant: str | None, group_size: int | None) -> None:
    """The format / quant / group_size combination ``encode`` accepts (arguments checked)."""
    if quant is not None and format == "tiled_csl":
        raise ValueError(
            f"quant={quant!r} needs format='bitmap' (or 'auto'): the quantized values live in "
            "the bitmap layout; tiled_csl stores 16/32-bit words"
        )
    if quant is None and group_size is not None:
        raise ValueError(f"group_size={group_size} needs quant='int8' or 'fp8'")


def encode(
    w: torch.Tensor,
    format: str = "auto",
    quant: str | None = None,
    *,
    group_size: int | None = None,
) -> SparseWeight:
    """Encode a dense pruned 2-D weight ``[M, K]`` (fp16, bf16 or fp32) on its own device.

    ``quant``: None (values in ``w``'s dtype), ``"int8"`` or ``"fp8"`` (e4m3; symmetric, one
    float32 scale per output row, or per ``group_size`` columns); ``format="auto"`` then picks
    bitmap (see :mod:`flashsparse.formats.bitmap_quant`).
    """
    check_format(format)
    quant = check_quant(quant)
    group_size = check_group_size(group_size)
    check_quant_format(format, quant, group_size)
    check_weight(w)
    if quant is not None:
        return QuantBitmap.encode(w, quant, group_size)
    if format == "auto":
        format = choose_format(w)
    return FORMATS[format].encode(w)


__all__ = [
    "FORMATS",
    "Bitmap",
    "QuantBitmap",
    "SparseWeight",
    "TiledCSL",
    "check_group_size",
    "check_quant",
    "check_quant_format",
    "encode",
]
