"""The Triton backend: registers the ``("bitmap", "triton")`` kernel (and, from
:mod:`.bitmap_quant`, ``("bitmap_quant", "triton")`` for int8 / fp8 values).

Imported lazily by :mod:`flashsparse.backends`. It runs on CUDA tensors, and on CPU tensors
when ``TRITON_INTERPRET=1`` was set before this module was imported (Triton fixes the
interpreter choice when a kernel is defined). On CUDA, :func:`_available` checks the compiled
kernel once against the reference decode, so a miscompiled kernel is never used under
``FLASHSPARSE_BACKEND=auto``.
"""

from __future__ import annotations

import warnings

try:
    import triton  # noqa: F401  (the import is the availability check)
except ImportError as exc:
    raise ImportError(
        "the Triton backend needs the `triton` package: pip install triton "
        "(or pip install 'flashsparse[triton]')"
    ) from exc

import torch

from ... import backends
from . import (
    bitmap_quant,  # noqa: F401  (registers the int8 / fp8 bitmap kernel)
    bitmap_sddmm,  # noqa: F401  (registers the weight gradient of trainable layers)
)
from .bitmap_spmm import (
    INTERPRET,
    KERNEL_DTYPES,
    KernelConfig,
    bitmap_linear,
    choose_config,
    launch,
    launch_grouped,
)

__all__ = ["INTERPRET", "KernelConfig", "bitmap_linear", "choose_config", "unavailable_reason"]

_NO_DEVICE = (
    "no CUDA device, and TRITON_INTERPRET=1 was not set before flashsparse.kernels.triton was imported "
    "(the interpreter runs the Triton kernels on CPU tensors)"
)
_self_check: str | bool | None = False  # False: not run yet


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the Triton bitmap kernel takes float16, bfloat16 or float32, not {dtype}"
    if device.type == "cuda" or (device.type == "cpu" and INTERPRET):
        return None
    if device.type == "cpu":
        return (
            "the Triton kernel runs on CPU tensors only under the interpreter: set "
            "TRITON_INTERPRET=1 before flashsparse.kernels.triton is imported"
        )
    return f"the Triton kernel runs on CUDA tensors, not {device.type}"


def unavailable_reason() -> str | None:
    """Why the Triton backend cannot run in this process (None: it can). Compiles nothing."""
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return _NO_DEVICE
    return _self_check if isinstance(_self_check, str) else None


def _run_self_check() -> str | None:
    from ...formats import Bitmap

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    m, k, n = 130, 200, 3
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w[:64, :64] = torch.randn(64, 64, generator=g)  # one fully dense tile
    w[64:128, 128:] = 0  # and an empty one
    w = w.to(device=device, dtype=torch.float16)
    x = torch.randn(n, k, generator=g).to(device=device, dtype=torch.float16)
    bias = torch.randn(m, generator=g).to(device=device, dtype=torch.float16)
    sw = Bitmap.encode(w)
    dense = Bitmap.decode(*sw.tensors, m=m, k=k, dtype=torch.float32)
    ref = x.float() @ dense.T + bias.float()
    for split in (1, 3):
        config = KernelConfig(64, 16, split, 4, 3)
        y = bitmap_linear(x, *sw.tensors, m, k, bias, config=config).float()
        err = float((y - ref).norm() / ref.norm())
        if not err < 2e-3:
            return (
                f"the Triton bitmap kernel failed its self-check on {device} "
                f"(split_k={split}: relative error {err:.3g})"
            )
    return None


def _available() -> str | None:
    """Once per process on CUDA: compile the kernel and compare it with the reference decode."""
    global _self_check
    if INTERPRET:
        return None
    if not torch.cuda.is_available():
        return _NO_DEVICE
    if _self_check is False:
        try:
            _self_check = _run_self_check()
        except Exception as exc:  # a compile error must not take the process down under auto
            _self_check = (
                f"the Triton bitmap kernel failed to compile or run: {type(exc).__name__}: {exc}"
            )
        if _self_check:
            warnings.warn(f"flashsparse: {_self_check}", RuntimeWarning, stacklevel=2)
    return _self_check if isinstance(_self_check, str) else None


backends.register_kernel("bitmap", "triton", launch, supports=_supports, available=_available)
backends.register_grouped_kernel("bitmap", "triton", launch_grouped)
