"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight lives in a tiled sparse format, and
``sparsify_``, the one-call model transform."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .formats import FORMATS, SparseWeight, check_format, encode
from .formats.base import SUPPORTED_DTYPES
from .functional import check_linear_inputs
from .ops import sparse_linear


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
                self.in_features, self.out_features, weight.dtype, weight.device, bias,
            )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)

    def _set_weight(self, weight: SparseWeight) -> None:
        self._dtype = weight.dtype
        self._nnz = weight._nnz
        for name, tensor in weight.state().items():
            self.register_buffer(name, tensor)
        self._components = type(weight).components

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, weight: torch.Tensor, bias: torch.Tensor | None = None, format: str = "auto"
    ) -> SparseLinear:
        """From a dense pruned weight ``[out_features, in_features]`` (encoded on its device)."""
        return cls(encode(weight.detach(), format), bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto") -> SparseLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        return cls.from_dense(linear.weight, linear.bias, format)

    # -- the weight -------------------------------------------------------------------------------
    @property
    def sparse_weight(self) -> SparseWeight:
        cls = FORMATS[self.format]
        tensors = {name: self._buffers[name] for name in cls.components}
        return cls(tensors, (self.out_features, self.in_features), self._dtype, self._nnz)

    @property
    def weight(self) -> SparseWeight:
        """The compressed weight (has ``shape``, ``dtype``, ``device``, ``to_dense()``)."""
        return self.sparse_weight

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = [self._buffers[name] for name in self._components]
        check_linear_inputs(
            x, self.in_features, self.out_features, self._dtype, tensors[0].device, self.bias
        )
        return sparse_linear(self.format, x, tensors, self.out_features, self.in_features, self.bias)

    def extra_repr(self) -> str:
        sw = self.sparse_weight
        dense = self.out_features * self.in_features * torch.empty((), dtype=self._dtype).element_size()
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format}, dtype={self._dtype}, "
            f"sparsity={sw.sparsity:.1%}, bytes={sw.nbytes} (dense {dense}, "
            f"{sw.nbytes / dense:.2f}x)"
        )

    # -- state and conversions --------------------------------------------------------------------
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Component lengths follow the nonzero count: take the incoming sizes once they are
        # shown to form a valid weight of this layer's shape; the generic copy then fits.
        cls = FORMATS[self.format]
        incoming = {c: state_dict.get(prefix + c) for c in cls.components}
        if all(isinstance(t, torch.Tensor) for t in incoming.values()):
            device = getattr(self, cls.components[0]).device
            candidate = cls(
                {c: t.to(device) for c, t in incoming.items()},
                (self.out_features, self.in_features),
                self._dtype,
            )
            try:
                candidate.validate()
            except ValueError as exc:
                error_msgs.append(f"{prefix or 'SparseLinear'}: {exc}")
                return
            for c, t in candidate.state().items():
                self._buffers[c] = torch.empty_like(t)
            self._nnz = None
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _apply(self, fn, recurse: bool = True):
        # nn.Module would cast the bitmap values but not the tiled_csl words on .half() or
        # .to(dtype), leaving bits that no longer mean what the dtype says: re-encode instead.
        sw = self.sparse_weight
        probe = fn(torch.empty(0, dtype=self._dtype, device=sw.device))
        if probe.dtype == self._dtype:
            return super()._apply(fn, recurse)
        if probe.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"SparseLinear supports float16, bfloat16 and float32, not {probe.dtype}")
        self._set_weight(sw.to(probe.device, probe.dtype))
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self


def _weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def sparsify_(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    format: str = "auto",
    min_sparsity: float = 0.0,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` for which ``filter_fn(module, fqn)`` is
    true (all if None) and whose weight sparsity is at least ``min_sparsity`` by a
    :class:`SparseLinear` holding the same (pruned) weight. Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_format(format)
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)):
        raise TypeError(f"min_sparsity must be a float in [0, 1], got {type(min_sparsity).__name__}")
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be a callable (module, fqn) -> bool or None")
    targets = []
    for fqn, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            continue
        if _weight_sparsity(module.weight) < min_sparsity:
            continue
        targets.append((fqn, module))
    for fqn, module in targets:
        replacement = SparseLinear.from_linear(module, format)
        if fqn == "":
            raise ValueError("model is itself an nn.Linear: use SparseLinear.from_linear(model)")
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, replacement)
    return model
