"""The CPU backend for bitmap weights with int8 / fp8 values: the C++ kernels of
``csrc/cpu/bitmap_quant_*.cpp`` as the ``("bitmap_quant", "cpu")`` kernel, and the fast CPU
dequantizing decode behind ``QuantBitmap.to_dense`` and the backward pass.

They live in the same extension as the bitmap kernels (:mod:`.bitmap`: one build of
``csrc/cpu/*.cpp`` + ``csrc/bindings/*_cpu.cpp``), follow the same ``FLASHSPARSE_CPU_ISA``
choice and ``torch.get_num_threads()``, and check themselves once per process against the
torch dequantizing decode (every SIMD path this CPU runs, both code types, per-row and grouped
scales). Paths: ``avx512`` (VBMI2 ``vpexpandb`` rebuilds, codes converted in registers, fp32
FMAs), ``scalar`` (any CPU); ``avx2`` runs the scalar kernel until an AVX2 form exists.
Activations (x) stay in the model's dtype: fp32, bf16 or fp16.
"""

from __future__ import annotations

import os

import torch

from ... import backends
from .. import build
from . import bitmap as bitmap_cpu

__all__ = ["KERNEL_DTYPES", "decode", "quant_linear", "unavailable_reason"]

KERNEL_DTYPES = bitmap_cpu.KERNEL_DTYPES
KEY = "bitmap_quant"


def unavailable_reason() -> str | None:
    """Why the quantized CPU kernels cannot run in this process (None: they can). Builds nothing."""
    return _state.error or bitmap_cpu.unavailable_reason()


def _load() -> None:
    reason = bitmap_cpu._available()  # builds (or imports) the one CPU extension
    if reason:
        raise RuntimeError(reason)
    _register_fake()


def _register_fake() -> None:
    @torch.library.register_fake("flashsparse::_bitmap_quant_spmm_cpu")
    def _(x, masks, values, tile_offsets, scales, m, k, bias=None, isa=0, form=0):
        return x.new_empty((x.shape[0], m))

    @torch.library.register_fake("flashsparse::_bitmap_quant_decode_cpu")
    def _(masks, values, tile_offsets, scales, m, k, dtype, isa=0):
        return scales.new_empty((m, k), dtype=dtype)


def _self_check() -> str | None:
    from ...formats.bitmap_quant import QuantBitmap, fp8_dtype

    g = torch.Generator().manual_seed(0)
    m, k = 70, 200  # partial tiles both ways; groups of 32 and 128 straddle tiles
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w[:64, :64] = torch.randn(64, 64, generator=g)  # a dense tile
    w[:64, 64:128] = 0  # an empty tile
    x = torch.randn(10, k, generator=g)
    quants = ["int8"] + (["fp8"] if fp8_dtype() is not None else [])
    for name in bitmap_cpu.available_isas():
        code = bitmap_cpu.ISAS[name]
        for quant in quants:
            for group_size in (None, 32, 128):
                sw = QuantBitmap.encode(w, quant, group_size)
                dense = QuantBitmap.decode_reference(*sw.tensors, m=m, k=k, dtype=torch.float32)
                ours = torch.ops.flashsparse._bitmap_quant_decode_cpu(
                    *sw.tensors, m, k, torch.float32, code
                )
                if not torch.equal(ours, dense):
                    return f"the {name} quantized CPU decode failed its self-check ({quant}, group_size={group_size})"
                # n = 1 (fp32 and bf16 x: kernels of their own), the fused and the blocked kernels
                for xn in (x[:1], x[:1].bfloat16(), x[:3], x):
                    ref = xn.double() @ dense.double().T
                    y = torch.ops.flashsparse._bitmap_quant_spmm_cpu(
                        xn, *sw.tensors, m, k, None, code
                    )
                    err = float((y.double() - ref).norm() / ref.norm())
                    n = xn.shape[0]
                    if not err < (1e-2 if xn.dtype == torch.bfloat16 else 1e-5):
                        return (
                            f"the {name} quantized CPU kernel failed its self-check ({quant}, "
                            f"group_size={group_size}, n={n}: relative error {err:.3g})"
                        )
    return None


_state = build.LoadOnce(
    "flashsparse CPU extension", "quantized CPU bitmap kernel", _load, _self_check
)


def _available() -> str | None:
    """Load or JIT-build the extension and self-check the quantized kernels, once per process."""
    reason = bitmap_cpu.unavailable_reason()
    if reason:
        return reason
    return _state()


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"the quantized CPU bitmap kernel runs on CPU tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the quantized CPU bitmap kernel takes float32, bfloat16 or float16 x, not {dtype}"
    return None


def quant_linear(
    x2d: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` for a contiguous ``[N, K]`` CPU x (W dequantized)."""
    return torch.ops.flashsparse._bitmap_quant_spmm_cpu(
        x2d, masks, values, tile_offsets, scales, m, k, bias, bitmap_cpu.isa()
    )


def decode(
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    k: int,
) -> torch.Tensor | None:
    """The dequantized weight (fp32) via the C++ decode, or None where it cannot run (not a CPU
    tensor, the reference backend forced, or no extension) so the caller uses the torch decode."""
    if (
        masks.device.type != "cpu"
        or os.environ.get(backends.ENV_VAR, "").strip().lower() == "reference"
        or _available() is not None
    ):
        return None
    return torch.ops.flashsparse._bitmap_quant_decode_cpu(
        masks, values, tile_offsets, scales, m, k, torch.float32, bitmap_cpu.isa()
    )


backends.register_kernel(KEY, "cpu", quant_linear, supports=_supports, available=_available)
backends.register_decoder(KEY, "cpu", decode)
