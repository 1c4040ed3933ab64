"""The Triton backend for bitmap weights with int8 / fp8 values: registers the
``("bitmap_quant", "triton")`` kernel (:mod:`.bitmap_quant_spmm`).

Runs where the bitmap Triton kernel runs (CUDA tensors; CPU tensors under the interpreter). On
CUDA, :func:`_available` checks the compiled kernel once against the dequantizing reference
decode (int8 and fp8, per-row and grouped scales, with and without split-K), so a miscompiled
kernel is never used under ``FLASHSPARSE_BACKEND=auto``.
"""

from __future__ import annotations

import warnings

import torch

from ... import backends
from .bitmap_quant_spmm import INTERPRET, KERNEL_DTYPES, KernelConfig, bitmap_quant_linear, launch

_self_check: str | bool | None = False  # False: not run yet


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return (
            f"the Triton quantized bitmap kernel takes float16, bfloat16 or float32 x, not {dtype}"
        )
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return None
    if device.type == "cpu":
        return (
            "the Triton kernel runs on CPU tensors only under the interpreter: set "
            "TRITON_INTERPRET=1 before flashsparse.kernels.triton is imported"
        )
    return f"the Triton kernel runs on CUDA tensors, not {device.type}"


def _run_self_check() -> str | None:
    from ...formats.bitmap_quant import QuantBitmap, fp8_dtype

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    m, k, n = 130, 300, 3
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w[:64, :64] = torch.randn(64, 64, generator=g)
    w[64:128, 128:] = 0
    x = torch.randn(n, k, generator=g).to(device=device, dtype=torch.float16)
    bias = torch.randn(m, generator=g).to(device=device, dtype=torch.float16)
    for quant in ["int8"] + (["fp8"] if fp8_dtype() is not None else []):
        for group_size in (None, 32, 128):
            sw = QuantBitmap.encode(w.to(device), quant, group_size)
            dense = QuantBitmap.decode(*sw.tensors, m=m, k=k, dtype=torch.float32)
            ref = x.float() @ dense.T + bias.float()
            for split in (1, 3):
                y = bitmap_quant_linear(
                    x, *sw.tensors, m, k, bias, config=KernelConfig(64, 16, split, 4, 3)
                ).float()
                err = float((y - ref).norm() / ref.norm())
                if not err < 2e-3:
                    return (
                        f"the Triton quantized bitmap kernel failed its self-check on {device} "
                        f"({quant}, group_size={group_size}, split_k={split}: relative error "
                        f"{err:.3g})"
                    )
    return None


def _available() -> str | None:
    """Once per process on CUDA: compile the kernel and compare it with the reference decode."""
    global _self_check
    from . import unavailable_reason

    reason = unavailable_reason()
    if reason or INTERPRET:
        return reason
    if _self_check is False:
        try:
            _self_check = _run_self_check()
        except Exception as exc:  # a compile error must not take the process down under auto
            _self_check = (
                "the Triton quantized bitmap kernel failed to compile or run: "
                f"{type(exc).__name__}: {exc}"
            )
        if _self_check:
            warnings.warn(f"flashsparse: {_self_check}", RuntimeWarning, stacklevel=2)
    return _self_check if isinstance(_self_check, str) else None


backends.register_kernel("bitmap_quant", "triton", launch, supports=_supports, available=_available)
