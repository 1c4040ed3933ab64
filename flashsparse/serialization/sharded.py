"""Single-device flashsparse files and tensor-parallel models.

Loading (:class:`ShardedLoad`, used by ``load_sparse``): into a model whose linears a parallel
plan split (DTensor weights over a 1-D mesh, possibly on the ``meta`` device, or
:class:`~flashsparse.nn.parallel.ShardedSparseLinear` layers), each rank reads from the file
only the tiles of its own block of every sparse layer (:func:`flashsparse.formats.slicing.cut`;
a tile row or column that a shard boundary cuts through is decoded and re-encoded, nothing else
is) and only its part of every dense DTensor parameter. The layers become
``ShardedSparseLinear`` with the plan's hooks carried over. Tensors read in part cannot be
checked against their whole-tensor checksums; the shards built from them are validated instead,
and every tensor read whole is checked as usual.

Saving (:func:`save_gathered`, used by ``save_sparse``): every rank joins the gathers (DTensor's
``full_tensor``, one layer at a time: a sparse shard is decoded, gathered dense and re-encoded in
its format), and the process of global rank 0 writes the same single-device file a one-process
model would give; the others wait for it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..formats.base import SparseWeight, tile_grid
from ..formats.slicing import TileRuns, cut, tile_layout
from ..nn import SparseLinear
from ..nn.experts import is_fused_experts
from ..nn.parallel import (
    ShardedSparseLinear,
    ShardLayout,
    dtensor_type,
    is_dtensor,
    parallel_hooks,
    plan_conversion,
    weight_layout,
)
from .files import TensorReader
from .fingerprint import join_name


def is_parallel_model(model: nn.Module) -> bool:
    """Whether ``model`` holds DTensors or :class:`ShardedSparseLinear` layers."""
    if dtensor_type() is None:
        return False
    return any(isinstance(m, ShardedSparseLinear) for m in model.modules()) or any(
        is_dtensor(t) for t in [*model.parameters(), *model.buffers()]
    )


def _dtensor_from_local(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as ``like`` (same mesh, placements and global shape) from its local part."""
    from torch.distributed.tensor import DTensor

    shape = tuple(like.shape)
    return DTensor.from_local(
        local,
        like.device_mesh,
        like.placements,
        run_check=False,
        shape=shape,
        stride=torch.empty(shape, device="meta").stride(),
    )


def _local_block(like: torch.Tensor, name: str) -> tuple[slice, ...]:
    """The index of this rank's part of a DTensor of ``like``'s layout in the full tensor."""
    from ..nn.parallel import _placement_dim, chunk_range

    mesh = like.device_mesh
    index = [slice(None)] * like.ndim
    for mesh_dim, placement in enumerate(like.placements):
        dim = _placement_dim(placement, like.ndim)
        if isinstance(dim, str):
            raise ValueError(f"{name}: placement {dim} cannot be loaded from a single-device file")
        if dim is None:
            continue
        if index[dim] != slice(None):
            raise ValueError(f"{name}: dimension {dim} is split over two mesh dimensions")
        start, stop = chunk_range(
            like.shape[dim], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim)
        )
        index[dim] = slice(start, stop)
    expected = tuple(len(range(*s.indices(n))) for s, n in zip(index, like.shape, strict=True))
    if expected != tuple(like.to_local().shape):
        raise ValueError(
            f"{name}: its local part is {tuple(like.to_local().shape)}, not the {expected} block "
            "DTensor's Shard split gives"
        )
    return tuple(index)


class _FileTiles:
    """A :class:`~flashsparse.formats.slicing.TileSource` reading one sparse layer's tiles from
    a flashsparse file: its ``tile_offsets`` whole (checked), then only the runs asked for."""

    def __init__(
        self,
        reader: TensorReader,
        fqn: str,
        cls: type[SparseWeight],
        shape: tuple[int, int],
        dtype: torch.dtype,
        version: int,
        path: Path,
    ) -> None:
        self.cls, self.shape, self.dtype = cls, shape, dtype
        self.layout = tile_layout(cls)
        self.version = version
        self.fqn, self.path = fqn, path
        tm, tk = self.layout.tile
        self.grid = tile_grid(shape[0], shape[1], tm, tk)
        num_tiles = self.grid[0] * self.grid[1]
        offsets = reader.get(join_name(fqn, "tile_offsets"))
        if offsets is None:
            raise ValueError(f"{path} is corrupt: sparse layer {fqn} has no 'tile_offsets' tensor")
        offsets = offsets.cpu()
        if offsets.dtype != torch.int32 or offsets.shape != (num_tiles + 1 + self.layout.trailing,):
            raise ValueError(
                f"{path} is corrupt: sparse layer {fqn}: tile_offsets must be int32 of shape "
                f"({num_tiles + 1 + self.layout.trailing},), got {offsets.dtype} "
                f"{tuple(offsets.shape)}"
            )
        self.offsets = offsets.long()
        lengths = self.offsets[1 : num_tiles + 1] - self.offsets[:num_tiles]
        self.slices = {}
        for name in [n for n, _ in self.layout.fixed] + [self.layout.run]:
            view = reader.get_slice(join_name(fqn, name))
            if view is None:
                raise ValueError(f"{path} is corrupt: sparse layer {fqn} has no {name!r} tensor")
            self.slices[name] = view
        run_length = self.slices[self.layout.run].get_shape()[0]
        if (
            int(self.offsets[0]) != 0
            or bool((lengths < 0).any())
            or int(self.offsets[num_tiles]) * self.layout.unit != run_length
        ):
            raise ValueError(
                f"{path} is corrupt: sparse layer {fqn}: tile_offsets do not match its "
                f"{self.layout.run}"
            )

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> TileRuns:
        grid_k = self.grid[1]
        if cols == (0, grid_k):  # whole tile rows are one contiguous range
            ranges = [(rows[0] * grid_k, rows[1] * grid_k)]
        else:
            ranges = [(r * grid_k + cols[0], r * grid_k + cols[1]) for r in range(*rows)]
        layout, unit = self.layout, self.layout.unit
        parts = []
        for t0, t1 in ranges:
            fixed = {name: self.slices[name][t0 * n : t1 * n] for name, n in layout.fixed}
            start, stop = int(self.offsets[t0]) * unit, int(self.offsets[t1]) * unit
            run = self.slices[layout.run][start:stop]
            # Older file layouts are upgraded tile by tile (the formats' upgrades are per tile).
            upgraded = self.cls.upgrade(
                {**fixed, layout.run: run, "tile_offsets": self.offsets[t0 : t1 + 1]}, self.version
            )
            parts.append(
                TileRuns(
                    layout,
                    {name: upgraded[name].view(t1 - t0, n) for name, n in layout.fixed},
                    upgraded[layout.run],
                    self.offsets[t0 + 1 : t1 + 1] - self.offsets[t0:t1],
                )
            )
        return TileRuns.cat(parts)


class ShardedLoad:
    """The tensor-parallel part of loading a flashsparse file into ``model`` (see the module
    doc): which linears are split, how to build their shards, and a fetch that returns this
    rank's part of every dense DTensor parameter."""

    def __init__(self, model: nn.Module, linears: dict[str, nn.Module], layers: dict) -> None:
        for fqn, module in model.named_modules():
            if is_fused_experts(module):
                plan_conversion(module, fqn)  # refuses experts a parallel plan laid out
        self.layouts: dict[str, ShardLayout] = {}
        self.carries: dict[str, object] = {}
        self.biases: dict[str, torch.Tensor | None] = {}
        for fqn, module in linears.items():
            if isinstance(module, ShardedSparseLinear):
                layout = module.layout
            else:
                layout = weight_layout(module, fqn)
            carry = parallel_hooks(module, fqn)
            if layout is None:
                if carry is not None and fqn in layers:
                    raise ValueError(
                        f"{fqn}: loading a sparse layer into a linear with a parallel plan but a "
                        "plain weight is not supported"
                    )
                continue
            if fqn not in layers:
                if isinstance(module, ShardedSparseLinear):
                    raise ValueError(
                        f"{fqn} is a sharded sparse layer in the model but dense in the file: "
                        "load the file into the dense parallel model"
                    )
                continue  # a dense DTensor linear: its weight is a dense DTensor parameter
            self.layouts[fqn] = layout
            self.carries[fqn] = carry
            self.biases[fqn] = module._parameters.get("bias")
        self.dtensors = {
            join_name(fqn, name): tensor
            for fqn, module in model.named_modules()
            if fqn not in self.layouts and not isinstance(module, ShardedSparseLinear)
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]
            if is_dtensor(tensor)
        }

    def __bool__(self) -> bool:
        return bool(self.layouts or self.dtensors)

    def layer(
        self,
        reader: TensorReader,
        path: Path,
        fqn: str,
        cls: type[SparseWeight],
        shape: tuple[int, int],
        dtype: torch.dtype,
        has_bias: bool,
        version: int,
        device: torch.device,
    ) -> ShardedSparseLinear:
        """This rank's shard of sparse layer ``fqn`` of the file, with the layer's plan."""
        layout = self.layouts[fqn]
        if (layout.out_features, layout.in_features) != tuple(shape):
            raise ValueError(
                f"{path}: sparse layer {fqn} is {shape[0]}x{shape[1]}, the model's is "
                f"{layout.out_features}x{layout.in_features}"
            )
        try:
            source = _FileTiles(reader, fqn, cls, shape, dtype, version, path)
            sw = cut(source, layout.rows, layout.cols)
            sw.validate()
        except ValueError as exc:
            raise ValueError(f"{path}: sparse layer {fqn} ({layout.describe()}): {exc}") from None
        shard = SparseLinear(sw.to(device))
        bias = None
        like = self.biases[fqn]
        if has_bias:
            full = reader.get_slice(join_name(fqn, "bias"))
            if full is None or like is None:
                raise ValueError(
                    f"{path}: sparse layer {fqn}: the file and the model disagree on its bias"
                )
            if is_dtensor(like):
                local = full[_local_block(like, join_name(fqn, "bias"))].to(device)
                bias = nn.Parameter(_dtensor_from_local(local, like), like.requires_grad)
            else:
                bias = nn.Parameter(full[:].to(device), like.requires_grad)
        layer = ShardedSparseLinear(shard, bias, layout)
        if self.carries[fqn] is not None:
            self.carries[fqn](layer)
        return layer

    def fetch(self, reader: TensorReader, device: torch.device):
        """``reader.get`` for the dense tensors, but this rank's part only of a DTensor."""

        def get(name: str) -> torch.Tensor | None:
            like = self.dtensors.get(name)
            if like is None:
                return reader.get(name)
            view = reader.get_slice(name)
            if view is None:
                return None
            if tuple(view.get_shape()) != tuple(like.shape):
                return reader.get(name)  # install reports the shape mismatch
            local = view[_local_block(like, name)].to(device)
            return _dtensor_from_local(local, like)

        return get


# -- saving -----------------------------------------------------------------------------------------
def save_gathered(model: nn.Module, path: str | os.PathLike) -> Path:
    """``save_sparse`` for a tensor-parallel model: call it on every rank (see the module doc)."""
    import torch.distributed as dist

    from .file_format import _file_for_save, save_sparse

    if not dist.is_initialized():
        raise ValueError(
            "model holds DTensors but torch.distributed is not initialized: save_sparse gathers "
            "the shards with collectives"
        )
    writer = dist.get_rank() == 0
    # The writer checks the path; every rank learns the verdict before any collective starts.
    verdict: list[object] = [None]
    if writer:
        try:
            verdict[0] = _file_for_save(path)
        except ValueError as exc:
            verdict[0] = str(exc)
    dist.broadcast_object_list(verdict, src=0)
    if isinstance(verdict[0], str):
        raise ValueError(verdict[0])
    target = Path(verdict[0])
    view = _gathered(model, writer)
    failure: list[object] = [None]
    if writer:
        try:
            save_sparse(view, target)
        except Exception as exc:  # said on every rank, not only the writer's
            failure[0] = f"{type(exc).__name__}: {exc}"
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise ValueError(f"save_sparse on rank 0 failed: {failure[0]}")
    return target


def _gathered(model: nn.Module, keep: bool) -> nn.Module | None:
    """A single-device view of ``model`` (shallow copies of its modules; every DTensor gathered,
    every :class:`ShardedSparseLinear` a whole :class:`SparseLinear`) on the ranks that ``keep``
    it; the others only join the collectives. Tied tensors stay tied."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    full: dict[int, torch.Tensor] = {}

    def gather(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or not is_dtensor(tensor):
            return tensor
        if id(tensor) not in full:
            whole = tensor.full_tensor().detach()
            full[id(tensor)] = whole if keep else whole.new_empty(0)
        return full[id(tensor)]

    def visit(module: nn.Module) -> nn.Module | None:
        if isinstance(module, ShardedSparseLinear):
            layout = module.layout
            local = module.shard.sparse_weight.to_dense()
            placement = {0: Shard(0), 1: Shard(1), None: Replicate()}[layout.dim]
            shape = (layout.out_features, layout.in_features)
            dense = DTensor.from_local(
                local, layout.mesh, [placement], run_check=False, shape=shape, stride=(shape[1], 1)
            ).full_tensor()
            bias = gather(module.bias)
            if not keep:
                return None
            layer = SparseLinear.from_dense(dense, bias, module.format)
            if bias is not None:
                layer.bias.requires_grad_(module.bias.requires_grad)
            return layer
        new = copy.copy(module) if keep else None
        params = {name: gather(t) for name, t in module._parameters.items()}
        buffers = {name: gather(t) for name, t in module._buffers.items()}
        children = {name: visit(child) for name, child in module._modules.items()}
        if not keep:
            return None
        new.__dict__["_parameters"] = params  # plain tensors where gathered: only saved
        new.__dict__["_buffers"] = buffers
        new.__dict__["_modules"] = children
        return new

    return visit(model)


# -- per-rank sizes of a file (flashsparse info) ------------------------------------------------------
def _style_dims(style_name: str) -> tuple[int | None, int | None] | None:
    """``(weight dim, bias dim)`` a transformers tensor-parallel style splits (None: kept
    whole), or None for a style whose split a single-device file cannot give (packed, unit)."""
    from transformers.distributed.tensor_parallel import (
        ALL_PARALLEL_STYLES,
        ColwiseParallel,
        EmbeddingParallel,
        RowwiseParallel,
    )

    style = ALL_PARALLEL_STYLES[style_name]
    if type(style) is ColwiseParallel:
        return 0, 0
    if type(style) is RowwiseParallel:
        return 1, None
    if type(style) is EmbeddingParallel:
        return style.shard_dim, None
    if "Packed" in type(style).__name__ or "Unit" in type(style).__name__:
        return None
    return None, None


def transformers_tp_plan(model_dir: str | os.PathLike) -> dict[str, str]:
    """The tensor-parallel plan transformers applies with ``tp_plan="auto"`` to the model whose
    ``config.json`` is in ``model_dir`` (the model is built on the meta device to read it)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return dict(model.tp_plan or {})


def per_rank_bytes(path: str | os.PathLike, tp_size: int, plan: dict[str, str]) -> dict:
    """What each of ``tp_size`` tensor-parallel ranks stores when a flashsparse file is loaded
    into a model split by ``plan`` (transformers' ``{module pattern: style}``): exact bytes of
    each rank's shards of the sparse layers (cut from the file as ``load_sparse`` cuts them) and
    of its parts of the dense tensors; every tensor the plan does not split counts whole on
    each rank. Reads the file once per rank."""
    import json
    import re

    from ..formats import FORMATS
    from ..nn.parallel import chunk_range
    from .file_format import _DTYPES, FILE_NAME, FORMAT_VERSION
    from .files import read_header

    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive int, got {tp_size!r}")
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    layers = json.loads(metadata.get("layers", "{}"))
    version = int(metadata.get("format_version", FORMAT_VERSION))

    def style_of(name: str) -> str | None:
        generic = re.sub(r"\.\d+(\.|$)", r".*\1", name)
        return plan.get(generic)

    sparse = [0] * tp_size
    dense = [0] * tp_size
    whole = 0
    unsupported: list[str] = []
    components: set[str] = set()
    with TensorReader({n: path for n in header if n != "__metadata__"}, torch.device("cpu")) as r:
        for fqn, info in layers.items():
            cls = FORMATS[info["format"]]
            shape = (int(info["shape"][0]), int(info["shape"][1]))
            components.update(join_name(fqn, c) for c in cls.components)
            style = style_of(fqn)
            dims = _style_dims(style) if style else (None, None)
            if dims is None:
                unsupported.append(f"{fqn} ({style})")
                dims = (None, None)
            source = _FileTiles(r, fqn, cls, shape, _DTYPES[info["dtype"]], version, path)
            for rank in range(tp_size):
                rows = chunk_range(shape[0], tp_size, rank) if dims[0] == 0 else (0, shape[0])
                cols = chunk_range(shape[1], tp_size, rank) if dims[0] == 1 else (0, shape[1])
                if rows[0] < rows[1] and cols[0] < cols[1]:
                    sparse[rank] += cut(source, rows, cols).nbytes
            whole += sum(
                int(header[join_name(fqn, c)]["data_offsets"][1])
                - int(header[join_name(fqn, c)]["data_offsets"][0])
                for c in cls.components
            )
        for name, entry in header.items():
            if name == "__metadata__" or name in components:
                continue
            module, _, param = name.rpartition(".")
            style = style_of(module)
            dims = _style_dims(style) if style else (None, None)
            dim = None if dims is None else (dims[1] if param == "bias" else dims[0])
            shape = entry["shape"]
            nbytes = int(entry["data_offsets"][1]) - int(entry["data_offsets"][0])
            whole += nbytes
            for rank in range(tp_size):
                if dim is None or dim >= len(shape) or shape[dim] == 0:
                    dense[rank] += nbytes
                else:
                    start, stop = chunk_range(shape[dim], tp_size, rank)
                    dense[rank] += nbytes // shape[dim] * (stop - start)
    return {
        "path": str(path),
        "tp_size": tp_size,
        "one_process_bytes": whole,
        "ranks": [
            {"rank": r, "sparse_bytes": sparse[r], "dense_bytes": dense[r]} for r in range(tp_size)
        ],
        "unsupported": unsupported,
    }
