"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight lives in a tiled sparse format."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import FORMATS, QuantBitmap, SparseWeight, encode
from ..formats.base import SUPPORTED_DTYPES
from ..functional import check_linear_inputs
from ..ops import sparse_linear
from ..ops_quant import quant_linear


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer with a transposed
    ``[in, out]`` weight; checked by class name and module, so transformers is never imported)."""
    return any(
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
        for cls in type(module).__mro__
    )


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, ``SparseLinear`` or ``Conv1D``."""
    if is_conv1d(module):
        return module.nf, module.nx
    return module.out_features, module.in_features


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` stored compressed.

    The format's component tensors are buffers named after the components (``words``,
    ``tile_offsets`` for tiled_csl; ``masks``, ``values``, ``tile_offsets`` for bitmap), so the
    state_dict holds plain tensors that safetensors can store; ``bias`` stays a Parameter as in
    ``nn.Linear``. ``load_state_dict`` accepts component tensors of any length (they depend on
    the nonzero count) and validates them. ``.to(device)`` moves the components; ``.to(dtype)``
    re-encodes the weight in the new dtype.
    """

    def __init__(self, weight: SparseWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, SparseWeight):
            raise TypeError(f"weight must be a SparseWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.format = weight.format
        self._set_weight(weight)
        if bias is not None:
            check_linear_inputs(
                weight.tensors[0].new_empty((0, self.in_features), dtype=weight.dtype),
                self.in_features,
                self.out_features,
                weight.dtype,
                weight.device,
                bias,
            )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, weight: SparseWeight) -> None:
        self._dtype = weight.dtype
        self._nnz = weight._nnz
        # Quantized values (int8 / fp8 codes + float32 scales): None, or the scale layout.
        self.quant = weight.quant
        self.group_size = weight.group_size
        self.quant_error = weight.quant_error
        for name, tensor in weight.state().items():
            self.register_buffer(name, tensor)
        self._components = type(weight).components

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        format: str = "auto",
        *,
        quant: str | None = None,
        group_size: int | None = None,
    ) -> SparseLinear:
        """From a dense pruned weight ``[out_features, in_features]`` (encoded on its device).
        ``quant="int8"`` / ``"fp8"`` stores the nonzeros as 8-bit codes with float32 scales
        (one per output row, or per ``group_size`` columns); see ``flashsparse.encode``."""
        return cls(encode(weight.detach(), format, quant, group_size=group_size), bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        format: str = "auto",
        *,
        quant: str | None = None,
        group_size: int | None = None,
    ) -> SparseLinear:
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; its weight is stored
        ``[in, out]``, so it is transposed first)."""
        kw = {"quant": quant, "group_size": group_size}
        if is_conv1d(linear):
            return cls.from_dense(
                linear.weight.detach().t().contiguous(), linear.bias, format, **kw
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}"
            )
        return cls.from_dense(linear.weight, linear.bias, format, **kw)

    # -- the weight -------------------------------------------------------------------------------
    @property
    def sparse_weight(self) -> SparseWeight:
        if self.quant is not None:
            return self._quant_weight({c: self._buffers[c] for c in QuantBitmap.components})
        cls = FORMATS[self.format]
        tensors = {name: self._buffers[name] for name in cls.components}
        return cls(tensors, (self.out_features, self.in_features), self._dtype, self._nnz)

    def _quant_weight(self, tensors: dict[str, torch.Tensor], nnz: int | None = -1) -> QuantBitmap:
        return QuantBitmap(
            tensors,
            (self.out_features, self.in_features),
            self._dtype,
            self._nnz if nnz == -1 else nnz,
            group_size=self.group_size,
            quant_error=self.quant_error,
        )

    @property
    def weight(self) -> SparseWeight:
        """The compressed weight (has ``shape``, ``dtype``, ``device``, ``to_dense()``)."""
        return self.sparse_weight

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def kernel_format(self) -> str:
        """The key its kernels are registered under: the format, or ``"bitmap_quant"``."""
        return QuantBitmap.op_format if self.quant is not None else self.format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = [self._buffers[name] for name in self._components]
        check_linear_inputs(
            x, self.in_features, self.out_features, self._dtype, tensors[0].device, self.bias
        )
        if self.quant is not None:
            return quant_linear(x, tensors, self.out_features, self.in_features, self.bias)
        return sparse_linear(
            self.format, x, tensors, self.out_features, self.in_features, self.bias
        )

    def extra_repr(self) -> str:
        sw = self.sparse_weight
        dense = (
            self.out_features * self.in_features * torch.empty((), dtype=self._dtype).element_size()
        )
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, "
            + (f"quant={self.quant}, group_size={self.group_size}, " if self.quant else "")
            + f"dtype={self._dtype}, "
            f"sparsity={sw.sparsity:.1%}, bytes={sw.nbytes} (dense {dense}, "
            f"{sw.nbytes / dense:.2f}x)"
        )

    # -- state and conversions --------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Component lengths follow the nonzero count: take the incoming sizes once they are
        # shown to form a valid weight of this layer's shape; the generic copy then fits.
        cls = QuantBitmap if self.quant is not None else FORMATS[self.format]
        incoming = {c: state_dict.get(prefix + c) for c in cls.components}
        if all(isinstance(t, torch.Tensor) for t in incoming.values()):
            device = getattr(self, cls.components[0]).device
            moved = {c: t.to(device) for c, t in incoming.items()}
            candidate = (
                self._quant_weight(moved, None)
                if self.quant is not None
                else cls(moved, (self.out_features, self.in_features), self._dtype)
            )
            try:
                candidate.validate()
                if candidate.quant != self.quant:
                    raise ValueError(
                        f"the state holds {candidate.quant} values but the layer is {self.quant}"
                    )
            except ValueError as exc:
                error_msgs.append(f"{prefix or 'SparseLinear'}: {exc}")
                return
            for c, t in candidate.state().items():
                self._buffers[c] = torch.empty_like(t)
            self._nnz = None
            self.quant_error = None  # of the weight this layer held before
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse: bool = True):
        # nn.Module would cast the bitmap values but not the tiled_csl words on .half() or
        # .to(dtype), leaving bits that no longer mean what the dtype says: re-encode instead.
        sw = self.sparse_weight
        probe = fn(torch.empty(0, dtype=self._dtype, device=sw.device))
        if self.quant is not None:
            # A float cast must not reach the float32 scales or the fp8 codes: the components
            # only move, and the new dtype is the activations' (no requantization).
            if probe.dtype not in SUPPORTED_DTYPES:
                raise TypeError(
                    f"SparseLinear supports float16, bfloat16 and float32, not {probe.dtype}"
                )
            self._set_weight(sw.to(probe.device, probe.dtype))
            if self.bias is not None:
                self.bias.data = fn(self.bias.data)
            return self
        if probe.dtype == self._dtype:
            return super()._apply(fn, recurse)
        if probe.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"SparseLinear supports float16, bfloat16 and float32, not {probe.dtype}"
            )
        self._set_weight(sw.to(probe.device, probe.dtype))
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self
