"""Triton kernel for bitmap weights with int8 / fp8 values: ``y = x @ W.T + b``, ``W`` dequantized.

The loop is the bitmap kernel's (:mod:`.bitmap_spmm`: the tile's row masks become nibble
ranks, prefix sums give each byte's first code, the codes of every mask byte are gathered in
registers into the dense ``[BLOCK_M, 64]`` tile), reading 8-bit codes instead of 16-bit values;
the rebuilt tile is then dequantized on chip before ``tl.dot``:

* int8 codes convert to the dot's type exactly (|code| <= 128 fits bf16 and fp16);
* fp8 e4m3 codes become fp16 by a bit move, ``(code & 0x7f) << 7`` with the sign at bit 15,
  whose value is the code's value / 256 for normal and subnormal codes alike (no fp8 hardware
  or dtype support needed: sm_80 and the interpreter run it); the 256 goes into the scale;
* scales: one per row (``GROUP == 0``) multiply the fp32 accumulator once, in the epilogue
  (the tile multiplies exact codes); groups of 64 or more columns give one scale per row and
  tile, groups of 32 one per row and half tile, applied to the rebuilt tile before the dot
  (the dequantized weight is rounded to x's dtype there, as ``to_dense`` rounds it).

Launch parameters come from the bitmap kernel's :func:`~.bitmap_spmm.choose_config`; split-K
partials are written already scaled and reduced by its deterministic reduction kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bitmap_spmm import (
    _INT32_OFFSET_LIMIT,
    INTERPRET,
    KERNEL_DTYPES,
    REDUCE_BLOCK,
    TILE,
    KernelConfig,
    _byte_nibbles,
    _bytes_j,
    _choose_config,
    _device_guard,
    _num_sms,
    _splitk_reduce_kernel,
    row_parts,
)

__all__ = ["INTERPRET", "KERNEL_DTYPES", "bitmap_quant_linear", "launch"]


@triton.jit(do_not_specialize=["n"])
def _bitmap_quant_linear_kernel(
    x_ptr,
    mask_bytes_ptr,
    values_ptr,
    tile_offsets_ptr,
    scales_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    n,
    m,
    k,
    stride_xn,
    k_tiles,
    tiles_per_split,
    groups,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
    ROW_PARTS: tl.constexpr,
    FP8: tl.constexpr,
    GROUP: tl.constexpr,
):
    TM: tl.constexpr = BLOCK_M // 64
    PART: tl.constexpr = 8 // ROW_PARTS
    UNIT: tl.constexpr = 256.0 if FP8 else 1.0
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)

    rows = tl.arange(0, BLOCK_M)
    tile_row = pid_m * TM + rows // 64
    row_ok = tile_row < tl.cdiv(m, 64)
    offs_m = pid_m * BLOCK_M + rows
    m_ok = offs_m < m
    scale_rows = scales_ptr + offs_m.to(tl.int64) * groups  # [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n
    x_rows = x_ptr + offs_n.to(tl.int64)[None, :] * stride_xn

    kt_begin = pid_s * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    if PART == 4:
        word_ptr = mask_bytes_ptr.to(tl.pointer_type(tl.uint32))
    elif PART == 2:
        word_ptr = mask_bytes_ptr.to(tl.pointer_type(tl.uint16))
    else:
        word_ptr = mask_bytes_ptr
    r_in = rows % 64
    mask_word = (r_in * ROW_PARTS)[:, None] + tl.arange(0, ROW_PARTS)[None, :]
    offs_k = tl.arange(0, 64)
    t = tile_row.to(tl.int64) * k_tiles + kt_begin
    next_words = tl.load(
        word_ptr + t[:, None] * (64 * ROW_PARTS) + mask_word, mask=row_ok[:, None], other=0
    )
    next_start = tl.load(tile_offsets_ptr + t, mask=row_ok, other=0)
    for kt in range(kt_begin, kt_end):
        words = next_words
        tile_start = next_start.to(tl.int64) * 8 if OFFSETS_64 else next_start * 8
        t = tile_row.to(tl.int64) * k_tiles + tl.minimum(kt + 1, kt_end - 1)
        next_words = tl.load(
            word_ptr + t[:, None] * (64 * ROW_PARTS) + mask_word, mask=row_ok[:, None], other=0
        )
        next_start = tl.load(tile_offsets_ptr + t, mask=row_ok, other=0)

        nib_0, cnt_0 = _byte_nibbles(words, 0, PART)
        nib_1, cnt_1 = _byte_nibbles(words, 1, PART)
        nib_2, cnt_2 = _byte_nibbles(words, 2, PART)
        nib_3, cnt_3 = _byte_nibbles(words, 3, PART)
        if PART == 1:
            part_total = cnt_0
        elif PART == 2:
            part_total = cnt_0 + cnt_1
        else:
            part_total = (cnt_0 + cnt_1) + (cnt_2 + cnt_3)
        flat = tl.reshape(part_total, [TM, 64 * ROW_PARTS])
        before_part = tl.reshape(tl.cumsum(flat, axis=1) - flat, [BLOCK_M, ROW_PARTS])
        base8_0 = values_ptr + ((tile_start - 8)[:, None] + before_part)
        base8_1 = base8_0 + cnt_0
        base8_2 = base8_1 + cnt_1
        base8_3 = base8_2 + cnt_2
        e0 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 0, PART)
        e1 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 1, PART)
        e2 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 2, PART)
        e3 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 3, PART)
        e4 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 4, PART)
        e5 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 5, PART)
        e6 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 6, PART)
        e7 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 7, PART)
        codes = tl.join(
            tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7))
        )
        codes = tl.reshape(codes, [BLOCK_M, 64])

        # Dequantize on chip: codes to numbers (fp8: value / 256), then the group scales.
        if FP8:
            bits = codes.to(tl.uint16)
            half = ((bits & 0x7F) << 7) | ((bits & 0x80) << 8)
            wq = half.to(tl.float16, bitcast=True).to(tl.float32)
        else:
            wq = codes.to(tl.float32)
        if GROUP >= 64:
            s = tl.load(scale_rows + (kt * 64) // GROUP, mask=m_ok, other=0.0) * UNIT
            wq = wq * s[:, None]
        elif GROUP > 0:
            col = kt * 64 + offs_k
            s = tl.load(
                scale_rows[:, None] + (col // GROUP)[None, :],
                mask=m_ok[:, None] & (col < k)[None, :],
                other=0.0,
            )
            wq = wq * (s * UNIT)

        kk = kt * 64 + offs_k
        xt = tl.load(x_rows + kk[:, None], mask=n_ok[None, :] & (kk < k)[:, None], other=0.0)
        if UPCAST:
            # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact.
            acc = tl.dot(wq, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wq.to(xt.dtype), xt, acc, input_precision=DOT_PRECISION)

    if GROUP == 0:
        acc = acc * (tl.load(scale_rows, mask=m_ok, other=0.0) * UNIT)[:, None]
    out_offs = offs_n.to(tl.int64)[None, :] * m + offs_m[:, None]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        tl.store(ws_ptr + pid_s.to(tl.int64) * n * m + out_offs, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def group_mode(k: int, groups: int) -> int:
    """``GROUP``: 0 for one scale per row, else the group size of ``[M, groups]`` scales."""
    from ...formats.bitmap_quant import group_size_of

    return group_size_of(k, groups) or 0


def _check(x, masks, values, tile_offsets, scales, m, k, bias, out) -> None:
    from ...formats.bitmap_quant import quant_of

    for name, t in (
        ("x", x),
        ("masks", masks),
        ("values", values),
        ("tile_offsets", tile_offsets),
        ("scales", scales),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be 2-D [N, {k}], got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if quant_of(values) is None or values.dim() != 1:
        raise TypeError(
            f"values must be 1-D int8 or float8_e4m3fn codes, got {values.dtype} "
            f"{tuple(values.shape)}"
        )
    num_tiles = -(-m // TILE) * -(-k // TILE)
    if masks.dtype != torch.int64 or masks.shape != (num_tiles * 64,):
        raise ValueError(f"masks must be int64 of shape ({num_tiles * 64},) for a {m}x{k} weight")
    if tile_offsets.dtype != torch.int32 or tile_offsets.shape != (num_tiles + 1,):
        raise ValueError(f"tile_offsets must be int32 of shape ({num_tiles + 1},)")
    if scales.dtype != torch.float32 or scales.dim() != 2 or scales.shape[0] != m:
        raise ValueError(
            f"scales must be float32 [{m}, groups], got {scales.dtype} {tuple(scales.shape)}"
        )
    group_mode(k, scales.shape[1])
    if bias is not None and (
        bias.shape != (m,) or bias.dtype != x.dtype or bias.device != x.device
    ):
        raise ValueError(f"bias must be {x.dtype} of shape ({m},) on {x.device}")
    if out is not None and (
        out.shape != (x.shape[0], m)
        or out.dtype != x.dtype
        or not out.is_contiguous()
        or out.device != x.device
    ):
        raise ValueError(f"out must be a contiguous {x.dtype} tensor of shape ({x.shape[0]}, {m})")


def bitmap_quant_linear(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` ``[N, K]`` and a quantized bitmap ``[m, k]`` weight (its
    four components). ``out``: write there (tests poison it); ``config`` overrides the launch
    heuristic (tests force split-K with it)."""
    _check(x, masks, values, tile_offsets, scales, m, k, bias, out)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    return launch(x, masks, values, tile_offsets, scales, m, k, bias, out=out, config=config)


def launch(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """:func:`bitmap_quant_linear` without the argument checks (the op's hot path)."""
    n = x.shape[0]
    if out is None:
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    fp8 = values.dtype != torch.int8
    if config is None:
        config = _choose_config(m, k, n, _num_sms(x.device), x.dtype == torch.float32)
    k_tiles = -(-k // TILE)
    per_split = -(-k_tiles // min(config.split_k, k_tiles))
    split = -(-k_tiles // per_split)
    ws = torch.empty((split, n, m), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (-(-m // config.block_m), -(-n // config.block_n), split)
    scales = scales.contiguous()
    with _device_guard(x.device):
        _bitmap_quant_linear_kernel[grid](
            x,
            masks.view(torch.uint8),
            values.view(torch.uint8) if fp8 else values,
            tile_offsets,
            scales,
            bias if bias is not None else out,
            out,
            ws,
            n,
            m,
            k,
            x.stride(0),
            k_tiles,
            per_split,
            scales.shape[1],
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            HAS_BIAS=bias is not None,
            SPLIT=split > 1,
            UPCAST=INTERPRET,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            OFFSETS_64=values.numel() >= _INT32_OFFSET_LIMIT,
            ROW_PARTS=row_parts(config.block_m, config.num_warps),
            FP8=fp8,
            GROUP=group_mode(k, scales.shape[1]),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if split > 1:
            numel = n * m
            _splitk_reduce_kernel[(triton.cdiv(numel, REDUCE_BLOCK),)](
                ws,
                bias if bias is not None else out,
                out,
                numel,
                m,
                split,
                HAS_BIAS=bias is not None,
                BLOCK=REDUCE_BLOCK,
                num_warps=4,
            )
    return out
