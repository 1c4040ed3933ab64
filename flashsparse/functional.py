"""``flashsparse.linear``: ``F.linear`` with a sparse weight, with input checks."""

from __future__ import annotations

import torch

from .formats import SparseWeight
from .formats.base import SUPPORTED_DTYPES
from .ops import autocast_inputs, sparse_linear


def check_linear_inputs(
    x: torch.Tensor,
    k: int,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
    bias: torch.Tensor | None,
) -> None:
    """Raise a clear error for anything ``F.linear(x, weight[m, k], bias)`` could not take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., in_features], got a scalar")
    if x.shape[-1] != k:
        raise ValueError(
            f"x must have in_features={k} in its last dimension, got shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dtype != dtype:
        raise TypeError(f"x has dtype {x.dtype} but the weight is {dtype}; cast one to the other")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}; move one of them")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (m,):
            raise ValueError(f"bias must have shape ({m},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias has dtype {bias.dtype} but x is {x.dtype}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but the weight is on {device}")


def linear(x: torch.Tensor, sw: SparseWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, sw.to_dense(), bias)`` reading the weight in its compressed form."""
    if not isinstance(sw, SparseWeight):
        raise TypeError(
            f"sw must be a flashsparse SparseWeight (from flashsparse.encode), got {type(sw).__name__}"
        )
    m, k = sw.shape
    if sw.quant is not None:
        check_linear_inputs(x, k, m, sw.dtype, sw.device, bias)
        from .ops_quant import quant_linear

        return quant_linear(x, sw.tensors, m, k, bias)
    dtype, x, tensors, bias = autocast_inputs(sw.format, sw.dtype, x, sw.tensors, bias)
    check_linear_inputs(x, k, m, dtype, sw.device, bias)
    return sparse_linear(sw.format, x, tensors, m, k, bias)
