"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight lives in a tiled sparse format."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..formats import FORMATS, QuantBitmap, SparseWeight, encode
from ..formats.base import SUPPORTED_DTYPES
from ..functional import check_linear_inputs
from ..hugepages import in_huge_pages
from ..ops import autocast_inputs, sparse_linear
from ..ops_quant import quant_linear

# Formats whose packed values can be trained (a component of their own, and a gradient kernel):
# tiled_csl packs each value with its location in one word.
TRAINABLE_COMPONENT = {"bitmap": "values"}


def check_trainable_format(format: str) -> str:
    """The format to encode a trainable layer in: ``"auto"`` means bitmap; other formats than
    bitmap raise a ``ValueError``."""
    if format == "auto":
        return "bitmap"
    if format not in TRAINABLE_COMPONENT:
        raise ValueError(
            f"trainable=True needs format='bitmap' (or 'auto'), got format={format!r}: only "
            "bitmap stores its nonzeros apart from their positions and has a weight-gradient "
            "kernel (tiled_csl packs each value with its location in one 32-bit word)"
        )
    return format


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

    ``trainable=True`` (bitmap only; see :meth:`trainable_`) makes the packed nonzero values an
    ``nn.Parameter`` named ``values`` (the state_dict keys stay the same): ``loss.backward()``
    fills ``values.grad`` at exactly the stored positions; masks, tile offsets and padding
    slots never change.
    """

    def __init__(
        self, weight: SparseWeight, bias: torch.Tensor | None = None, *, trainable: bool = False
    ) -> None:
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
        if trainable:
            self.trainable_(True)

    def _set_weight(self, weight: SparseWeight) -> None:
        self._dtype = weight.dtype
        self._nnz = weight._nnz
        # Quantized values (int8 / fp8 codes + float32 scales): None, or the scale layout.
        self.quant = weight.quant
        self.group_size = weight.group_size
        self.quant_error = weight.quant_error
        for name, tensor in weight.state().items():
            self.register_buffer(name, in_huge_pages(tensor))
        self._components = type(weight).components

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        format: str = "auto",
        *,
        trainable: bool = False,
        quant: str | None = None,
        group_size: int | None = None,
    ) -> SparseLinear:
        """From a dense pruned weight ``[out_features, in_features]`` (encoded on its device).
        ``trainable=True``: the nonzeros become a Parameter (format ``"auto"`` or ``"bitmap"``).
        ``quant="int8"`` / ``"fp8"`` stores the nonzeros as 8-bit codes with float32 scales
        (one per output row, or per ``group_size`` columns); see ``flashsparse.encode``."""
        if trainable and quant is not None:
            raise ValueError(
                "trainable=True and quant= cannot be combined: quantized values have no "
                "weight-gradient kernel; fine-tune first, then quantize"
            )
        if trainable:
            format = check_trainable_format(format)
            return cls(encode(weight.detach(), format), bias, trainable=True)
        return cls(encode(weight.detach(), format, quant, group_size=group_size), bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        format: str = "auto",
        *,
        trainable: bool = False,
        quant: str | None = None,
        group_size: int | None = None,
    ) -> SparseLinear:
        """From an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; its weight is stored
        ``[in, out]``, so it is transposed first). ``trainable``, ``quant``, ``group_size``: see
        :meth:`from_dense`."""
        kw = {"trainable": trainable, "quant": quant, "group_size": group_size}
        if is_conv1d(linear):
            return cls.from_dense(
                linear.weight.detach().t().contiguous(), linear.bias, format, **kw
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(
                f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}"
            )
        return cls.from_dense(linear.weight, linear.bias, format, **kw)

    # -- training the nonzeros --------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        """Whether the packed nonzero values are an ``nn.Parameter`` (see :meth:`trainable_`)."""
        name = TRAINABLE_COMPONENT.get(self.format)
        return name is not None and name in self._parameters

    def trainable_(self, mode: bool = True) -> SparseLinear:
        """Make the packed nonzero values an ``nn.Parameter`` (``mode=True``, requiring grad) or
        a buffer again (``False``); returns ``self``. Same tensor, same state_dict key.

        The mask is fixed: ``values.grad`` is dL/dW at the stored positions only, and zero in
        the padding slots, so any ``torch.optim`` optimizer over ``model.parameters()`` keeps
        the padding at zero and the sparsity exactly as it is. Build the optimizer after this
        call (it changes ``parameters()``). Only the bitmap format can train its values.
        """
        if not isinstance(mode, bool):
            raise TypeError(f"mode must be a bool, got {type(mode).__name__}")
        name = TRAINABLE_COMPONENT.get(self.format)
        if mode and getattr(self, "quant", None) is not None:
            raise ValueError(
                f"this SparseLinear holds {self.quant}-quantized values, which cannot be trained "
                "(no weight-gradient kernel for codes and scales): fine-tune an unquantized "
                "layer, then quantize it"
            )
        if name is None:
            if not mode:
                return self
            raise ValueError(
                f"this SparseLinear holds a {self.format} weight, which cannot be trained: only "
                "format='bitmap' stores its nonzeros apart from their positions and has a "
                "weight-gradient kernel; re-encode it with "
                "SparseLinear.from_dense(layer.weight.to_dense(), layer.bias, format='bitmap', "
                "trainable=True)"
            )
        if mode == self.trainable:
            if mode:
                self._parameters[name].requires_grad_(True)
            return self
        if mode:
            tensor = self._buffers.pop(name)
            self.register_parameter(name, nn.Parameter(tensor.detach(), requires_grad=True))
        else:
            tensor = self._parameters.pop(name)
            self.register_buffer(name, tensor.detach())
        return self

    def _component(self, name: str) -> torch.Tensor:
        tensor = self._parameters.get(name)
        return tensor if tensor is not None else self._buffers[name]

    # -- the weight -------------------------------------------------------------------------------
    @property
    def sparse_weight(self) -> SparseWeight:
        if self.quant is not None:
            return self._quant_weight({c: self._buffers[c] for c in QuantBitmap.components})
        cls = FORMATS[self.format]
        tensors = {name: self._component(name) for name in cls.components}
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
        tensors = [self._component(name) for name in self._components]
        if self.quant is not None:
            check_linear_inputs(
                x, self.in_features, self.out_features, self._dtype, tensors[0].device, self.bias
            )
            return quant_linear(x, tensors, self.out_features, self.in_features, self.bias)
        dtype, x, tensors, bias = autocast_inputs(self.format, self._dtype, x, tensors, self.bias)
        check_linear_inputs(x, self.in_features, self.out_features, dtype, tensors[0].device, bias)
        return sparse_linear(self.format, x, tensors, self.out_features, self.in_features, bias)

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
    def __deepcopy__(self, memo: dict) -> SparseLinear:
        # copy.deepcopy's own steps (a new object, the state deep-copied, __setstate__), then the
        # copies' components go into huge pages as at construction: tensor deep copies are plain
        # torch allocations (model copies, the benchmarks' weight rotations).
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        for name in new._components:
            if name in new._buffers:
                new._buffers[name] = in_huge_pages(new._buffers[name])
        return new

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
                param = self._parameters.get(c)
                if param is None:
                    self._buffers[c] = in_huge_pages(torch.empty_like(t))
                elif param.shape != t.shape or param.dtype != t.dtype:
                    # A trained component of another size: a new Parameter (an optimizer built
                    # before this load holds the old one). Same size: copied in place below.
                    self._parameters[c] = nn.Parameter(
                        torch.empty_like(t), requires_grad=param.requires_grad
                    )
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
        if self.trainable:
            # The mask is fixed while training: cast the values Parameter as nn.Linear casts its
            # weight (same Parameter object; masks and offsets are integers and stay).
            super()._apply(fn, recurse)
            self._dtype = probe.dtype
            return self
        self._set_weight(sw.to(probe.device, probe.dtype))
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        return self
