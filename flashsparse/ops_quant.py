"""``torch.ops.flashsparse.bitmap_quant_linear``: the op for bitmap weights with int8 / fp8 values.

Kept apart from the unquantized ops in :mod:`flashsparse.ops`: the weight has a fourth
component (the float32 scales) and its values are 8-bit codes, not x's dtype. The op takes x
``[..., K]`` in the activation dtype (fp16, bf16 or fp32; W8A16), the components ``masks``,
``values`` (int8 or float8_e4m3fn), ``tile_offsets``, ``scales`` (float32 ``[M, G]``; the
group size follows from ``K`` and ``G``, see :func:`flashsparse.formats.bitmap_quant.group_size_of`),
the sizes ``m``, ``k`` and an optional bias ``[M]``, and returns ``x @ W.T + bias`` with ``W``
the dequantized weight. Kernels are registered with :mod:`flashsparse.backends` under the key
``"bitmap_quant"`` (reference here; C++ CPU and Triton in their providers). Autograd gives x and
bias gradients (the quantized weight is a constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backends
from .formats.bitmap_quant import QuantBitmap

KEY = QuantBitmap.op_format


def _run(
    x: torch.Tensor, tensors: tuple[torch.Tensor, ...], m: int, k: int, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features in its last dim, got shape {tuple(x.shape)}")
    if x.dim() == 2:  # the common case, without the reshape and view (about 1 us a call)
        if x.shape[0] == 0:
            return x.new_empty((0, m))
        return backends.select(KEY, x).fn(x.contiguous(), *tensors, m, k, bias)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, k)
    if x2d.shape[0] == 0:
        return x.new_empty((*lead, m))
    kernel = backends.select(KEY, x2d)
    y = kernel.fn(x2d.contiguous(), *tensors, m, k, bias)
    return y.view(*lead, m)


@torch.library.custom_op("flashsparse::bitmap_quant_linear", mutates_args=())
def bitmap_quant_linear(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    scales: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return _run(x, (masks, values, tile_offsets, scales), m, k, bias)


@bitmap_quant_linear.register_fake
def _(x, masks, values, tile_offsets, scales, m, k, bias=None):
    return x.new_empty((*x.shape[:-1], m))


def _setup(ctx, inputs, output):
    _, masks, values, tile_offsets, scales, m, k, bias = inputs
    ctx.save_for_backward(masks, values, tile_offsets, scales)
    ctx.m, ctx.k, ctx.has_bias = m, k, bias is not None


def _backward(ctx, grad):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        w = backends.decode(QuantBitmap, ctx.saved_tensors, ctx.m, ctx.k, grad.dtype)
        grad_x = grad @ w
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        grad_bias = grad.reshape(-1, ctx.m).sum(0)
    return grad_x, None, None, None, None, None, None, grad_bias


bitmap_quant_linear.register_autograd(_backward, setup_context=_setup)


def quant_linear(
    x: torch.Tensor,
    tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
    m: int,
    k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Run :func:`bitmap_quant_linear`, skipping the dispatcher when nothing needs it (as
    :func:`flashsparse.ops.sparse_linear` does: the op costs tens of microseconds per eager
    call, which decode pays for every projection)."""
    if (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or (bias is not None and bias.requires_grad))
        )
        and not torch._C._len_torch_dispatch_stack()
        and not torch._C._is_torch_function_mode_enabled()
    ):
        return _run(x, tuple(tensors), m, k, bias)
    return bitmap_quant_linear(x, *tensors, m, k, bias)


def _reference(x2d: torch.Tensor, *args) -> torch.Tensor:
    """Dequantize (to x's dtype), then ``F.linear``: any device."""
    *tensors, m, k, bias = args
    return F.linear(x2d, backends.decode(QuantBitmap, tensors, m, k, x2d.dtype), bias)


backends.register_kernel(KEY, "reference", _reference, supports=lambda device, dtype: None)
