"""Sparse layers under ``torch.distributed`` tensor parallelism.

A tensor-parallel plan (``torch.distributed.tensor.parallel.parallelize_module`` with
``ColwiseParallel``/``RowwiseParallel``, or transformers' ``tp_plan="auto"``) leaves each
``nn.Linear`` with a DTensor weight over a 1-D device mesh: ``Shard(0)`` (colwise: this rank
holds a block of output rows), ``Shard(1)`` (rowwise: a block of input columns) or
``Replicate()``. The plan's communication lives outside the layer's own forward: torch registers
forward pre/post hooks on the module that turn the input into a DTensor of the layout the layer
needs and the output into the layout the next layer expects; transformers replaces the
module's ``forward`` with a wrapper doing the same, and hands the layer local tensors when the
layer says it runs a local kernel (``_hf_quantized_needs_local_tp``, as its quantized layers do).

:class:`ShardedSparseLinear` replaces such a layer by the sparse encoding of this rank's LOCAL
shard only (a :class:`~flashsparse.SparseLinear` without bias, named ``shard``) plus the layer's
bias as it was (a DTensor where the plan made one). Its forward takes what the dense layer's
forward received and returns what it returned:

* a DTensor input (torch's hooks): redistributed to what the weight's layout needs (replicated
  for a colwise or replicated weight, sharded on the last dimension for a rowwise one) through
  the DTensor API, multiplied locally, and returned as a DTensor ``Shard(-1)`` (colwise),
  ``Partial()`` (rowwise: the plan's hook reduces it) or ``Replicate()``; the bias is added as the
  dense layer's DTensor arithmetic would;
* a local tensor (transformers' local path): the local product plus the bias the module holds at
  call time (transformers hides a rowwise layer's bias during the forward and adds it once after
  the reduction).

``in_features``/``out_features`` are the global sizes, as on the dense layer under the plan. The
plan's hooks move to the replacement: torch's forward (and backward) hooks are carried over;
transformers' replaced ``forward`` is installed again on the replacement by the same parallel
style object with the same mesh. No communication is written here: every collective is the
DTensor API's or the plan's own.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .linear import SparseLinear, is_conv1d


def dtensor_type() -> type | None:
    """``torch.distributed.tensor.DTensor``, or None while nothing has imported it (then no
    DTensor exists, and plain models pay no import)."""
    if "torch.distributed.tensor" not in sys.modules:
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(tensor: object) -> bool:
    cls = dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor; any other tensor as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of this process under torch.distributed, else ``(0, 1)``."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``index`` when ``size`` is split into ``parts`` as DTensor's
    ``Shard`` splits it (``torch.chunk``: parts of ``ceil(size / parts)``, the last ones shorter
    or empty)."""
    step = -(-size // parts)
    start = min(size, step * index)
    return start, min(size, start + step)


@dataclass(frozen=True)
class ShardLayout:
    """How one parallel linear is split over its 1-D ``mesh``: ``dim`` 0 (colwise: output rows),
    1 (rowwise: input columns) or None (replicated); this rank is ``rank`` of ``size``."""

    mesh: object  # torch.distributed.device_mesh.DeviceMesh
    dim: int | None
    rank: int
    size: int
    out_features: int
    in_features: int

    @property
    def rows(self) -> tuple[int, int]:
        """The rows (output features) of the global weight this rank holds."""
        if self.dim == 0:
            return chunk_range(self.out_features, self.size, self.rank)
        return 0, self.out_features

    @property
    def cols(self) -> tuple[int, int]:
        """The columns (input features) of the global weight this rank holds."""
        if self.dim == 1:
            return chunk_range(self.in_features, self.size, self.rank)
        return 0, self.in_features

    @property
    def kind(self) -> str:
        return {0: "colwise", 1: "rowwise", None: "replicated"}[self.dim]

    def describe(self) -> str:
        (r0, r1), (c0, c1) = self.rows, self.cols
        return (
            f"{self.kind}, rank {self.rank} of {self.size}: rows {r0}:{r1}, columns {c0}:{c1} of "
            f"{self.out_features}x{self.in_features}"
        )


def _placement_dim(placement: object, ndim: int) -> int | str | None:
    """The tensor dimension a 1-D placement shards, None for Replicate, or its description."""
    from torch.distributed.tensor import Replicate, Shard

    if type(placement) is Shard:
        return placement.dim % ndim
    if type(placement) is Replicate:
        return None
    return repr(placement)


def weight_layout(module: nn.Module, fqn: str) -> ShardLayout | None:
    """The :class:`ShardLayout` of a linear whose weight is a DTensor (None for a plain weight).

    Raises ``ValueError`` naming the layer for what a :class:`ShardedSparseLinear` cannot
    represent: a mesh of more than one dimension, a placement other than ``Shard(0)``,
    ``Shard(1)`` or ``Replicate()`` (e.g. transformers' packed ``_StridedShard``), a bias split
    differently from the weight's output rows, a ``Conv1D``, or a split that leaves some rank
    without rows or columns."""
    weight = module._parameters.get("weight")
    if not is_dtensor(weight):
        return None
    name = fqn or type(module).__name__
    if is_conv1d(module) or not isinstance(module, nn.Linear):
        raise ValueError(
            f"{name}: a tensor-parallel {type(module).__name__} is not supported (only "
            "nn.Linear layers with DTensor weights are)"
        )
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{name}: its weight is laid out over a {mesh.ndim}-D device mesh "
            f"{tuple(mesh.shape)} with placements {tuple(weight.placements)}; a sparse "
            "tensor-parallel layer supports 1-D meshes only"
        )
    dim = _placement_dim(weight.placements[0], 2)
    if isinstance(dim, str):
        raise ValueError(
            f"{name}: weight placement {dim} is not supported (Shard(0), Shard(1) or Replicate())"
        )
    out_features, in_features = weight.shape
    layout = ShardLayout(
        mesh, dim, mesh.get_local_rank(), mesh.size(), int(out_features), int(in_features)
    )
    if dim is not None:
        width = (out_features, in_features)[dim]
        empty = [r for r in range(layout.size) if chunk_range(width, layout.size, r)[0] >= width]
        if empty:
            raise ValueError(
                f"{name}: splitting its {width} {'output' if dim == 0 else 'input'} features over "
                f"{layout.size} ranks leaves rank(s) {empty} with none; a sparse layer needs at "
                "least one row and one column per rank"
            )
    (r0, r1), (c0, c1) = layout.rows, layout.cols
    if tuple(weight.to_local().shape) != (r1 - r0, c1 - c0):
        raise ValueError(
            f"{name}: its local weight is {tuple(weight.to_local().shape)}, not the "
            f"{(r1 - r0, c1 - c0)} block {layout.describe()} that DTensor's Shard split gives"
        )
    bias = module._parameters.get("bias")
    if bias is not None:
        # A colwise bias is split like the output rows; any other is whole on every rank.
        if not is_dtensor(bias):
            if dim == 0:
                raise ValueError(
                    f"{name}: a colwise weight with a plain-tensor bias is not supported"
                )
        elif bias.device_mesh.ndim != 1 or _placement_dim(bias.placements[0], 1) != (
            0 if dim == 0 else None
        ):
            raise ValueError(
                f"{name}: its bias is laid out as {tuple(bias.placements)} over a "
                f"{bias.device_mesh.ndim}-D mesh; a {layout.kind} weight needs "
                f"{'Shard(0)' if dim == 0 else 'Replicate()'} over its own 1-D mesh"
            )
    return layout


# -- the plan's hooks -------------------------------------------------------------------------------
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def _is_torch_tp_hook(hook: object) -> bool:
    """A hook ``torch.distributed.tensor.distribute_module`` registered (parallel styles do)."""
    return getattr(hook, "__qualname__", "").startswith("distribute_module.")


def _installed_by_transformers(forward: object) -> bool:
    """Whether ``forward`` is a wrapper a transformers parallel style's ``install_forward`` made
    (``tp_forward`` for tensor parallelism, ``ep_forward`` for expert parallelism)."""
    return getattr(forward, "__module__", "").startswith("transformers.") and (
        ".install_forward.<locals>." in getattr(forward, "__qualname__", "")
    )


def _transformers_parallel_forward(module: nn.Module) -> dict | None:
    """The closure of the ``tp_forward`` that transformers' tensor-parallel ``install_forward``
    put on ``module`` (``{"self": style, "mesh": ..., "config": ...}``), else None."""
    forward = module.__dict__.get("forward")
    if (
        not _installed_by_transformers(forward)
        or not forward.__qualname__.endswith(".tp_forward")
        or not forward.__closure__
    ):
        return None
    closure = {
        name: cell.cell_contents
        for name, cell in zip(forward.__code__.co_freevars, forward.__closure__, strict=True)
    }
    return closure if {"self", "mesh"} <= closure.keys() else None


def _foreign_forward(module: nn.Module, fqn: str) -> ValueError:
    forward = module.__dict__["forward"]
    return ValueError(
        f"{fqn or type(module).__name__}: its forward was replaced by "
        f"{getattr(forward, '__qualname__', forward)!r}, which flashsparse cannot carry over to "
        "a sparse layer (transformers' tensor-parallel forward and torch's parallel-style hooks "
        "are supported)"
    )


def parallel_hooks(module: nn.Module, fqn: str) -> Callable[[nn.Module], None] | None:
    """What carries ``module``'s tensor-parallel hooks to a replacement, or None when it has
    none (no torch parallel-style hook, no transformers parallel ``forward``).

    Raises ``ValueError`` naming the layer when a tensor-parallel layer (DTensor weight or
    parallel hooks) has a ``forward`` replaced by something other than transformers'
    tensor-parallel wrapper: it cannot be carried over. (A plain layer's replaced ``forward``,
    e.g. accelerate's offloading hooks, is left to ``sparsify_``'s usual handling.)"""
    forward = module.__dict__.get("forward")
    closure = _transformers_parallel_forward(module)
    torch_hooks = any(
        _is_torch_tp_hook(hook)
        for name in ("_forward_pre_hooks", "_forward_hooks")
        for hook in getattr(module, name).values()
    )
    sharded = is_dtensor(module._parameters.get("weight"))
    if closure is None and not torch_hooks and not _installed_by_transformers(forward):
        if forward is not None and sharded:
            raise _foreign_forward(module, fqn)
        return None
    if closure is None and forward is not None:
        raise _foreign_forward(module, fqn)

    def carry(new: nn.Module) -> None:
        for attr in _HOOK_DICTS:
            getattr(new, attr).update(getattr(module, attr))
        if closure is not None:
            closure["self"].install_forward(new, closure["mesh"], config=closure.get("config"))
            new._is_hooked = getattr(module, "_is_hooked", True)

    return carry


# -- the layer --------------------------------------------------------------------------------------
def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, step = [], 1
    for size in reversed(shape):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


class ShardedSparseLinear(nn.Module):
    """One rank's part of a tensor-parallel linear, stored sparse (see the module docstring).

    ``shard``: a :class:`~flashsparse.SparseLinear` (no bias) holding this rank's block of the
    weight; ``bias``: the layer's bias as the plan laid it out; ``layout``: a
    :class:`ShardLayout`. Build it with :meth:`from_linear` (from the dense parallel layer) or
    directly from a shard cut out of a checkpoint.
    """

    # transformers' parallel styles hand a module that runs a local kernel local tensors.
    _hf_quantized_needs_local_tp = True

    def __init__(self, shard: SparseLinear, bias: torch.Tensor | None, layout: ShardLayout) -> None:
        super().__init__()
        if not isinstance(shard, SparseLinear):
            raise TypeError(f"shard must be a SparseLinear, got {type(shard).__name__}")
        if shard.bias is not None:
            raise ValueError("shard must have no bias: pass the layer's bias as bias")
        (r0, r1), (c0, c1) = layout.rows, layout.cols
        if (shard.out_features, shard.in_features) != (r1 - r0, c1 - c0):
            raise ValueError(
                f"shard is {shard.out_features}x{shard.in_features}, the layout "
                f"({layout.describe()}) needs {r1 - r0}x{c1 - c0}"
            )
        self.shard = shard
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=bias.requires_grad)
        self.bias = bias
        self.layout = layout
        self.out_features, self.in_features = layout.out_features, layout.in_features

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, format: str = "auto", *, name: str = ""
    ) -> ShardedSparseLinear:
        """This rank's shard of the tensor-parallel ``linear`` (a DTensor weight), encoded in
        ``format``; the bias is kept as it is. The plan's hooks are NOT carried over here (see
        :func:`parallel_hooks`)."""
        layout = weight_layout(linear, name)
        if layout is None:
            raise TypeError(
                f"{name or 'linear'}: its weight is not a DTensor; use SparseLinear.from_linear"
            )
        shard = SparseLinear.from_dense(linear.weight.to_local(), None, format)
        return cls(shard, linear.bias, layout)

    @property
    def format(self) -> str:
        return self.shard.format

    @property
    def dtype(self) -> torch.dtype:
        return self.shard.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if is_dtensor(x):
            return self._forward_dtensor(x)
        y = self.shard(x)
        if self.bias is not None:
            y = y + local_tensor(self.bias)
        return y

    def _forward_dtensor(self, x: torch.Tensor) -> torch.Tensor:
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        mesh, dim = self.layout.mesh, self.layout.dim
        need = Shard(x.ndim - 1) if dim == 1 else Replicate()
        if tuple(x.placements) != (need,):
            x = x.redistribute(mesh, [need])
        y = self.shard(x.to_local())
        shape = (*x.shape[:-1], self.out_features)
        stride = _contiguous_stride(shape)
        if dim == 1:
            out = DTensor.from_local(
                y, mesh, [Partial()], run_check=False, shape=shape, stride=stride
            )
            if self.bias is not None:  # DTensor arithmetic adds it once over the reduction
                bias = self.bias
                if not is_dtensor(bias):
                    bias = DTensor.from_local(bias, mesh, [Replicate()], run_check=False)
                out = out + bias
            return out
        if self.bias is not None:
            y = y + local_tensor(self.bias)
        placement = Shard(y.ndim - 1) if dim == 0 else Replicate()
        return DTensor.from_local(y, mesh, [placement], run_check=False, shape=shape, stride=stride)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self.layout.describe()}"
        )


# -- sparsify_ support ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParallelConversion:
    """How :func:`~flashsparse.sparsify_` converts one layer of a parallel model."""

    layout: ShardLayout | None  # None: the weight is a plain tensor
    carry: Callable[[nn.Module], None] | None  # the plan's hooks, onto the replacement


def plan_conversion(module: nn.Module, fqn: str) -> ParallelConversion | None:
    """None for a layer no parallel plan touched; else what converting it takes. Raises
    ``ValueError`` naming the layer for a layout or hook that cannot be kept (called for every
    layer before any is converted, so a bad one leaves the model as it was)."""
    from .experts import expert_projections, is_fused_experts

    if is_fused_experts(module):
        sharded = [n for n, w, _ in expert_projections(module) if is_dtensor(w)]
        if sharded or _installed_by_transformers(module.__dict__.get("forward")):
            raise ValueError(
                f"{fqn}: fused MoE experts laid out by a parallel plan (DTensor expert weights "
                f"{sharded} or a replaced forward, e.g. transformers' expert parallelism) are not "
                "supported; transformers' tensor-parallel plans leave experts replicated, which "
                "is supported"
            )
        return None
    layout = weight_layout(module, fqn)
    carry = parallel_hooks(module, fqn)
    if layout is None and carry is None:
        return None
    return ParallelConversion(layout, carry)


def convert(module: nn.Module, conversion: ParallelConversion, format: str, fqn: str) -> nn.Module:
    """The sparse replacement of ``module`` with its plan's behaviour (see the module doc)."""
    if conversion.layout is not None:
        sparse: nn.Module = ShardedSparseLinear.from_linear(module, format, name=fqn)
    else:
        sparse = SparseLinear.from_linear(module, format)
    if conversion.carry is not None:
        conversion.carry(sparse)
    return sparse


def zero_count(weights: list[torch.Tensor], *, whole_layer: bool) -> tuple[int, int]:
    """``(zeros, elements)`` of ``weights`` (one layer's): of this rank's parts of DTensors, or,
    with ``whole_layer``, of the whole layer summed over its mesh (a collective every rank of
    the mesh must join; used only when ``min_sparsity`` asks for a layer's sparsity)."""
    zeros = elements = 0
    group = None
    for w in weights:
        if is_dtensor(w):
            if any(_placement_dim(p, w.ndim) is not None for p in w.placements):
                group = w.device_mesh.get_group() if w.device_mesh.ndim == 1 else None
            w = w.to_local()
        zeros += w.numel() - int(torch.count_nonzero(w))
        elements += w.numel()
    if not (whole_layer and group is not None):
        return zeros, elements
    import torch.distributed as dist

    # On the weights' device: NCCL reduces only GPU tensors.
    counts = torch.tensor([zeros, elements], dtype=torch.int64, device=w.device)
    dist.all_reduce(counts, group=group)
    return int(counts[0]), int(counts[1])
