"""Triton weight-gradient kernel for trainable bitmap layers: the ``("bitmap_sddmm", "triton")``
kernel behind ``torch.ops.flashsparse.bitmap_sddmm`` (``values.grad`` of a trainable
:class:`~flashsparse.SparseLinear` on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1``).

One program per 64x64 bitmap tile that holds nonzeros:

1. ``acc [64, 64] = grad[:, tile rows].T @ x[:, tile cols]`` over the batch in ``BLOCK_N`` steps
   on the tensor cores (``tl.dot``, fp32 accumulation) -- a dense tile: on a GPU the tensor
   cores make the skipped products cheaper to compute than to avoid;
2. the tile's 64 row masks expanded to a ``[64, 64]`` 0/1 tensor; a nonzero's packed slot is the
   tile's offset + the row's exclusive prefix count + the in-row exclusive prefix count (two
   ``tl.cumsum``), the same rank every bitmap decode uses;
3. ``acc`` stored at those slots where the mask is set, and zeros in the tile's padding slots
   (so the output needs no zero fill).

Empty tiles have no slots and return at once. Under the interpreter the operands are upcast to
fp32 before ``tl.dot`` (its bf16 dot is wrong; see the forward kernel).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from ... import backends
from ...ops import SDDMM, bitmap_sddmm_reference
from .bitmap_spmm import INTERPRET, KERNEL_DTYPES, TILE, _device_guard

__all__ = ["bitmap_sddmm", "unavailable_reason"]


@triton.jit(do_not_specialize=["n"])
def _bitmap_sddmm_kernel(
    grad_ptr,
    x_ptr,
    masks_ptr,
    tile_offsets_ptr,
    out_ptr,
    n,
    m,
    k,
    stride_g,
    stride_x,
    k_tiles,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    t = tl.program_id(0)
    start = tl.load(tile_offsets_ptr + t).to(tl.int64) * 8
    end = tl.load(tile_offsets_ptr + t + 1).to(tl.int64) * 8
    if end > start:  # an empty tile has no slots
        offs = tl.arange(0, 64)
        rows = (t // k_tiles) * 64 + offs
        cols = (t % k_tiles) * 64 + offs
        row_ok = rows < m
        col_ok = cols < k
        acc = tl.zeros([64, 64], dtype=tl.float32)
        for n0 in range(0, n, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = (offs_n < n)[:, None]
            batch = offs_n.to(tl.int64)[:, None]
            g = tl.load(
                grad_ptr + batch * stride_g + rows[None, :], mask=n_ok & row_ok[None, :], other=0.0
            )
            xx = tl.load(
                x_ptr + batch * stride_x + cols[None, :], mask=n_ok & col_ok[None, :], other=0.0
            )
            if UPCAST:
                acc = tl.dot(
                    tl.trans(g.to(tl.float32)), xx.to(tl.float32), acc, input_precision="ieee"
                )
            else:
                acc = tl.dot(tl.trans(g), xx, acc, input_precision=DOT_PRECISION)
        words = tl.load(masks_ptr + t.to(tl.int64) * 64 + offs)  # [64] int64 row masks
        bits = ((words[:, None] >> offs.to(tl.int64)[None, :]) & 1).to(tl.int32)  # [64, 64]
        row_count = tl.sum(bits, axis=1)
        row_start = tl.cumsum(row_count, 0) - row_count
        slot = start + (row_start[:, None] + tl.cumsum(bits, axis=1) - bits).to(tl.int64)
        tl.store(out_ptr + slot, acc.to(out_ptr.dtype.element_ty), mask=bits != 0)
        pad = start + tl.sum(row_count) + tl.arange(0, 8).to(tl.int64)
        tl.store(out_ptr + pad, tl.zeros([8], dtype=out_ptr.dtype.element_ty), mask=pad < end)


BLOCK_N = 32


def bitmap_sddmm(
    grad: torch.Tensor,
    x: torch.Tensor,
    masks: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    num_values: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(grad.T @ x)`` ``[m, k]`` at the stored positions of a bitmap weight, in packed order,
    zero in the padding slots: ``[num_values]`` in grad's dtype (``out`` if given; every slot is
    written). ``grad [N, m]`` and ``x [N, k]`` (rows contiguous); the op layer has checked
    shapes, dtypes and devices."""
    if out is None:
        out = torch.empty(num_values, dtype=grad.dtype, device=grad.device)
    n = grad.shape[0]
    if n == 0:
        return out.zero_()
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    k_tiles = -(-k // TILE)
    num_tiles = -(-m // TILE) * k_tiles
    with _device_guard(grad.device):
        _bitmap_sddmm_kernel[(num_tiles,)](
            grad,
            x,
            masks,
            tile_offsets,
            out,
            n,
            m,
            k,
            grad.stride(0),
            x.stride(0),
            k_tiles,
            BLOCK_N=BLOCK_N,
            UPCAST=INTERPRET,
            DOT_PRECISION="ieee" if grad.dtype == torch.float32 else "tf32",
            num_warps=4,
        )
    return out


_NO_DEVICE = (
    "no CUDA device, and TRITON_INTERPRET=1 was not set before flashsparse.kernels.triton was "
    "imported (the interpreter runs the Triton kernels on CPU tensors)"
)
_self_check: str | bool | None = False  # False: not run yet


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the Triton weight-gradient kernel takes float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return None
    return f"the Triton weight-gradient kernel runs on CUDA tensors (or under TRITON_INTERPRET=1), not {device.type}"


def _run_self_check() -> str | None:
    from ...formats import Bitmap

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    m, k, n = 130, 200, 37
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w[:64, :64] = torch.randn(64, 64, generator=g)  # one fully dense tile
    w[64:128, 128:] = 0  # and an empty one
    masks, values, offsets = Bitmap.encode(w.to(device=device, dtype=torch.float16)).tensors
    grad = torch.randn(n, m, generator=g).to(device=device, dtype=torch.float16)
    x = torch.randn(n, k, generator=g).to(device=device, dtype=torch.float16)
    args = (grad, x, masks, offsets, m, k, values.numel())
    ref = bitmap_sddmm_reference(*args).float()
    err = float((bitmap_sddmm(*args).float() - ref).norm() / ref.norm())
    if not err < 2e-3:
        return f"the Triton weight-gradient kernel failed its self-check on {device} (relative error {err:.3g})"
    return None


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process (None: it can). Compiles nothing."""
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return _NO_DEVICE
    return _self_check if isinstance(_self_check, str) else None


def _available() -> str | None:
    """Once per process on CUDA: compile the kernel and compare it with the reference."""
    global _self_check
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return _NO_DEVICE
    if _self_check is False:
        try:
            _self_check = _run_self_check()
        except Exception as exc:  # a compile error must not take the process down under auto
            _self_check = f"the Triton weight-gradient kernel failed to compile or run: {type(exc).__name__}: {exc}"
        if _self_check:
            warnings.warn(f"flashsparse: {_self_check}", RuntimeWarning, stacklevel=2)
    return _self_check if isinstance(_self_check, str) else None


backends.register_kernel(SDDMM, "triton", bitmap_sddmm, supports=_supports, available=_available)
