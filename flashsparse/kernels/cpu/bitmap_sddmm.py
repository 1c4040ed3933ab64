"""The CPU backend's weight-gradient kernel for trainable bitmap layers (``csrc/cpu/
bitmap_sddmm_*.cpp``): the ``("bitmap_sddmm", "cpu")`` kernel behind
``torch.ops.flashsparse.bitmap_sddmm``, i.e. ``values.grad`` of a trainable
:class:`~flashsparse.SparseLinear` on CPU tensors.

It lives in the one CPU extension :mod:`.bitmap` builds and loads (importing this builds
nothing), runs the SIMD path :func:`.bitmap.isa` picks (``FLASHSPARSE_CPU_ISA`` = ``avx512``,
``avx2`` or ``scalar``, else the best this CPU has) and is checked once per process against
the torch reference on every path before ``FLASHSPARSE_BACKEND=auto`` uses it.
"""

from __future__ import annotations

import torch

from ... import backends
from ...ops import SDDMM, bitmap_sddmm_reference
from .. import build
from . import bitmap as _extension

__all__ = ["bitmap_sddmm"]


def _load() -> None:
    reason = _extension._available()
    if reason is not None:
        raise RuntimeError(reason)

    @torch.library.register_fake("flashsparse::_bitmap_sddmm_cpu")
    def _(grad, x, masks, tile_offsets, m, k, num_values, isa=0):
        return grad.new_empty(num_values)


def _self_check() -> str | None:
    from ...formats import Bitmap

    g = torch.Generator().manual_seed(0)
    m, k = 70, 130  # partial tiles both ways
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w[:64, :64] = torch.randn(64, 64, generator=g)  # a dense tile
    w[:64, 64:128] = 0  # an empty tile
    for name in _extension.available_isas():
        for dtype in _extension.KERNEL_DTYPES:
            tensors = Bitmap.encode(w.to(dtype)).tensors
            for n in (1, 37):
                grad = torch.randn(n, m, generator=g).to(dtype)
                x = torch.randn(n, k, generator=g).to(dtype)
                args = (grad, x, tensors[0], tensors[2], m, k, tensors[1].numel())
                ref = bitmap_sddmm_reference(*args).double()
                ours = torch.ops.flashsparse._bitmap_sddmm_cpu(*args, _extension.ISAS[name])
                err = float((ours.double() - ref).norm() / ref.norm())
                tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
                if not err < tol:
                    return (
                        f"the {name} CPU weight-gradient kernel failed its self-check "
                        f"({dtype}, n={n}: relative error {err:.3g})"
                    )
    return None


_state = build.LoadOnce(
    "flashsparse CPU extension", "CPU bitmap weight-gradient kernel", _load, _self_check
)


def _available() -> str | None:
    reason = _extension.unavailable_reason()
    if reason:
        return reason
    return _state()


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"the CPU weight-gradient kernel runs on CPU tensors, not {device.type}"
    if dtype not in _extension.KERNEL_DTYPES:
        return f"the CPU weight-gradient kernel takes float32, bfloat16 or float16, not {dtype}"
    return None


def bitmap_sddmm(
    grad: torch.Tensor,
    x: torch.Tensor,
    masks: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    num_values: int,
) -> torch.Tensor:
    """``(grad.T @ x)`` at the stored positions of a bitmap weight, in packed order."""
    return torch.ops.flashsparse._bitmap_sddmm_cpu(
        grad, x, masks, tile_offsets, m, k, num_values, _extension.isa()
    )


backends.register_kernel(SDDMM, "cpu", bitmap_sddmm, supports=_supports, available=_available)
