"""The flashsparse file format: save and load models with :class:`~flashsparse.SparseLinear` layers in compressed form.

``save_sparse(model, path)`` writes one safetensors file: every parameter and buffer of the
model (the SparseLinear layers as their format's component tensors, everything else dense,
a tied weight once) and, in the safetensors ``__metadata__`` (all values are strings):

* ``format`` = ``"flashsparse"`` and ``format_version`` (an integer, :data:`FORMAT_VERSION`);
  ``flashsparse_version`` and ``torch_version`` of the writer;
* ``architecture``: JSON ``{"class", "fingerprint", "entries"}`` -- the model's class name and a
  hash of its module tree (every linear as ``out x in`` with or without bias, whether stored
  dense or sparse; every other parameter and buffer with its shape), so a file only loads
  into a model of the same architecture and size;
* ``layers``: JSON ``{fqn: {"format", "shape", "dtype", "nnz", "bias"}}`` for the sparse layers
  (a layer with int8 / fp8 values also has ``"quant"``, ``"group_size"`` and ``"quant_error"``,
  and its components include ``scales``: :mod:`flashsparse.formats.bitmap_quant`);
* ``aliases``: JSON ``{name: stored name}`` for tied tensors; ``non_persistent``: JSON list of
  the buffers that are not in a state_dict (e.g. rotary ``inv_freq``), stored so that a model
  built on the ``meta`` device comes back whole;
* ``checksums``: JSON ``{stored name: crc32 of the tensor's bytes}``.

``load_sparse(model, path)`` takes a model of the same architecture -- typically built from
its config on the ``meta`` device -- and installs SparseLinear layers straight from the
compressed tensors (no dense weight is ever built for them) plus the dense remainder. It
checks the file (size, header, version, architecture, every tensor's shape and checksum, every
sparse layer's components) and builds every new module and tensor *before* it changes the
model, so a bad file raises ``ValueError`` and leaves the model as it was.

Tensors keep the dtype they were saved in; ``model.to(dtype)`` afterwards converts (SparseLinear
re-encodes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..formats import FORMATS, QuantBitmap
from ..nn import SparseLinear, linear_features
from ..nn.experts import SparseExperts, expert_projections
from .files import TensorReader, checksum
from .fingerprint import architecture, join_name, unwrap_model
from .install import expert_slots, linear_modules, prepare_install
from .sharded import ShardedLoad, is_parallel_model

FORMAT_NAME = "flashsparse"
# 2: bitmap masks are one 64-bit word per tile row (1: one per 8x8 sub-tile; converted on load).
# 3: layers may hold quantized values (int8 / fp8 codes + scales). A file without such layers is
# still written as version 2, so that older flashsparse reads it; one with them says 3, so that
# older flashsparse refuses it with "upgrade" rather than misreading the codes.
FORMAT_VERSION = 3
_QUANT_VERSION = 3
FILE_NAME = "flashsparse.safetensors"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
}


# -- save ------------------------------------------------------------------------------------------
def _file_for_save(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        return path / FILE_NAME
    if path.suffix != ".safetensors":
        raise ValueError(f"path must be a directory or end in .safetensors, got {str(path)!r}")
    if not path.parent.is_dir():
        raise ValueError(f"path's directory {str(path.parent)!r} does not exist")
    return path


def save_sparse(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (with its :class:`SparseLinear` layers compressed) to ``path``, a
    ``.safetensors`` file or a directory (then ``<path>/flashsparse.safetensors``); returns the
    file written. The file replaces any old one only once it is complete.

    A tensor-parallel model is gathered layer by layer and written by the process of global
    rank 0 in the same single-device format; call it on every rank (see
    :func:`flashsparse.serialization.sharded.save_gathered`)."""
    from safetensors.torch import save_file

    from .. import __version__

    model = unwrap_model(model)
    from .sharded import save_gathered

    if is_parallel_model(model):  # tensor-parallel: gathered, written by rank 0
        return save_gathered(model, path)
    path = _file_for_save(path)
    layers: dict[str, dict] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    non_persistent: list[str] = []
    stored: dict[int, str] = {}
    storages: set[tuple[int, int]] = set()
    for fqn, module in model.named_modules():
        if isinstance(module, SparseLinear):
            sw = module.sparse_weight
            layers[fqn] = {
                "format": sw.format,
                "shape": list(sw.shape),
                "dtype": str(sw.dtype).removeprefix("torch."),
                "nnz": sw.nnz,
                "bias": module.bias is not None,
            }
            if sw.quant is not None:
                layers[fqn].update(
                    quant=sw.quant, group_size=sw.group_size, quant_error=sw.quant_error
                )
        for kind, items in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in items.items():
                if tensor is None:
                    continue
                full = join_name(fqn, name)
                if id(tensor) in stored:
                    aliases[full] = stored[id(tensor)]
                    continue
                if tensor.device.type == "meta":
                    raise ValueError(
                        f"model {kind} {full} is on the meta device: there is nothing to save"
                    )
                cpu = tensor.detach().to("cpu").contiguous()
                # safetensors refuses two names over one storage (views of one tensor): copy.
                key = (cpu.untyped_storage().data_ptr(), cpu.untyped_storage().nbytes())
                if cpu.numel() and key in storages:
                    cpu = cpu.clone()
                storages.add(key)
                stored[id(tensor)] = full
                tensors[full] = cpu
                if kind == "buffer" and name in module._non_persistent_buffers_set:
                    non_persistent.append(full)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(
            _QUANT_VERSION if any("quant" in info for info in layers.values()) else 2
        ),
        "flashsparse_version": __version__,
        "torch_version": torch.__version__,
        "architecture": json.dumps(architecture(model)),
        "layers": json.dumps(layers),
        "aliases": json.dumps(aliases),
        "non_persistent": json.dumps(non_persistent),
        "checksums": json.dumps({name: checksum(t) for name, t in tensors.items()}),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# -- load ------------------------------------------------------------------------------------------
def _json_field(metadata: dict, key: str, path: Path, kind: type) -> object:
    try:
        value = json.loads(metadata[key])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"{path} is corrupt: its metadata has no valid {key!r} entry") from None
    if not isinstance(value, kind):
        raise ValueError(f"{path} is corrupt: its metadata entry {key!r} is not a {kind.__name__}")
    return value


def _quant_entry(info: dict, version: int) -> dict | None:
    """The QuantBitmap keywords of a quantized layer entry (None for an unquantized one)."""
    from ..formats.bitmap_quant import QUANTS, check_group_size

    if "quant" not in info:
        return None
    if version < _QUANT_VERSION or info["format"] != "bitmap" or info["quant"] not in QUANTS:
        raise ValueError(f"bad quant entry {info.get('quant')!r}")
    error = info.get("quant_error")
    return {
        "group_size": check_group_size(info.get("group_size")),
        "quant_error": None if error is None else float(error),
    }


def _describe_linear(out_features: int, in_features: int, bias: bool) -> str:
    return f"{out_features}x{in_features}" + (" with bias" if bias else "")


def _describe_mismatch(model: nn.Module, header: dict, layers: dict) -> str:
    """The first few differences between the model's structure and what the file stores."""
    model_linears = {
        fqn: _describe_linear(*linear_features(m), m.bias is not None)
        for fqn, m in linear_modules(model).items()
    }
    model_linears.update(
        (fqn, _describe_linear(*shape, False))
        for fqn, (_, _, _, shape) in expert_slots(model).items()
    )
    problems = []
    for fqn, info in layers.items():
        shape = info.get("shape", [0, 0])
        want = _describe_linear(shape[0], shape[1], bool(info.get("bias")))
        if fqn not in model_linears:
            problems.append(f"the file has a sparse layer {fqn} the model lacks")
        elif model_linears[fqn] != want:
            problems.append(f"{fqn} is {model_linears[fqn]} in the model, {want} in the file")
    names = {n for n in header if n != "__metadata__"}
    for fqn, module in model.named_modules():
        if fqn in layers:
            continue
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            full = join_name(fqn, name)
            if t is None or isinstance(module, SparseLinear):
                continue
            info = header.get(full)
            if info is not None and list(info.get("shape", [])) != list(t.shape):
                problems.append(
                    f"{full} is {tuple(t.shape)} in the model, {tuple(info['shape'])} in the file"
                )
            elif (
                info is None
                and full not in names
                and name not in module._non_persistent_buffers_set
            ):
                problems.append(f"{full} is not in the file")
    return "; ".join(problems[:5]) or "the module trees differ"


def load_flashsparse(
    model: nn.Module, path: Path, header: dict, device: torch.device, verify: bool
) -> None:
    from .. import __version__

    metadata = header.get("__metadata__") or {}
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise ValueError(
            f"{path} is corrupt: bad format_version {metadata.get('format_version')!r}"
        ) from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} uses flashsparse file format version {version} (written by flashsparse "
            f"{metadata.get('flashsparse_version', '?')}); this flashsparse ({__version__}) reads "
            f"versions up to {FORMAT_VERSION}: upgrade flashsparse to load it"
        )
    if version < 1:
        raise ValueError(f"{path} is corrupt: bad format_version {version}")
    arch = _json_field(metadata, "architecture", path, dict)
    layers = _json_field(metadata, "layers", path, dict)
    aliases = _json_field(metadata, "aliases", path, dict)
    checksums = _json_field(metadata, "checksums", path, dict) if verify else {}
    _json_field(metadata, "non_persistent", path, list)
    mine = architecture(model)
    if arch.get("class") != mine["class"]:
        raise ValueError(
            f"{path} holds a {arch.get('class')} model; cannot load it into a {mine['class']} "
            "(build the model from the same config)"
        )
    if arch.get("fingerprint") != mine["fingerprint"]:
        raise ValueError(
            f"{path} holds a {arch.get('class')} of another size or layout than this model: "
            f"{_describe_mismatch(model, header, layers)}"
        )
    names = {n: path for n in header if n != "__metadata__"}
    linears = linear_modules(model)
    slots = expert_slots(model)
    sharded = ShardedLoad(model, linears, layers) if is_parallel_model(model) else None
    experts: dict[str, dict[str, dict[int, SparseLinear]]] = {}
    with TensorReader(names, device, checksums, aliases) as reader:
        new_modules: dict[str, nn.Module] = {}
        for fqn, info in layers.items():
            try:
                cls = FORMATS[info["format"]]
                shape = (int(info["shape"][0]), int(info["shape"][1]))
                dtype = _DTYPES[info["dtype"]]
                nnz = int(info["nnz"])
                has_bias = bool(info["bias"])
                quant = _quant_entry(info, version)
                if quant is not None:
                    cls = QuantBitmap
            except (KeyError, TypeError, ValueError, IndexError):
                raise ValueError(
                    f"{path} is corrupt: bad layer entry for {fqn}: {info!r}"
                ) from None
            target = linears.get(fqn)
            slot = slots.get(fqn)
            if target is None and slot is None:
                raise ValueError(f"{path}: sparse layer {fqn} is not a linear layer of the model")
            if sharded is not None and fqn in sharded.layouts:  # this rank's shard only
                new_modules[fqn] = sharded.layer(
                    reader, path, fqn, cls, shape, dtype, has_bias, version, device
                )
                continue
            components = {}
            for c in cls.components:
                tensor = reader.get(join_name(fqn, c))
                if tensor is None:
                    raise ValueError(f"{path} is corrupt: sparse layer {fqn} has no {c!r} tensor")
                components[c] = tensor
            if quant is not None:
                sw = QuantBitmap(components, shape, dtype, nnz, **quant)
            else:
                components = cls.upgrade(components, version)
                sw = cls(components, shape, dtype, nnz)
            try:
                sw.validate()
                if quant is not None and sw.quant != info["quant"]:
                    raise ValueError(f"it says {info['quant']} but holds {sw.quant} values")
            except ValueError as exc:
                raise ValueError(f"{path} is corrupt: sparse layer {fqn}: {exc}") from None
            bias = reader.get(join_name(fqn, "bias")) if has_bias else None
            if has_bias and bias is None:
                raise ValueError(f"{path} is corrupt: sparse layer {fqn} has no bias tensor")
            layer = SparseLinear(sw, bias)
            if slot is not None:
                if tuple(shape) != slot[3]:
                    raise ValueError(
                        f"{path}: sparse layer {fqn} is {shape}, the model expects {slot[3]}"
                    )
                experts.setdefault(slot[0], {}).setdefault(slot[1], {})[slot[2]] = layer
                continue
            if bias is not None and target.bias is not None:
                layer.bias.requires_grad_(target.bias.requires_grad)
            if (
                isinstance(target, SparseLinear)
                and target.trainable
                and layer.format == target.format
            ):
                layer.trainable_(True)  # loading into a model being fine-tuned keeps it trainable
            new_modules[fqn] = layer
        # Fused experts come back as SparseExperts built straight from their sparse layers: the
        # model's dense [E, ...] expert weights (on the meta device, typically) are dropped.
        for efqn, by_proj in experts.items():
            dense = model.get_submodule(efqn)
            wanted = {name: weight.shape[0] for name, weight, _ in expert_projections(dense)}
            if any(len(by_proj.get(name, {})) != n for name, n in wanted.items()):
                raise ValueError(
                    f"{path} is corrupt: the experts of {efqn} are not all stored sparse"
                )
            new_modules[efqn] = SparseExperts.from_layers(
                dense, {name: [by_proj[name][e] for e in range(n)] for name, n in wanted.items()}
            )
        fetch = reader.get if sharded is None else sharded.fetch(reader, device)
        commit = prepare_install(model, new_modules, fetch, str(path), device)
        unused = set(names) - reader.used
    if unused:
        # Unreachable for a file written by save_sparse for this architecture (the fingerprint
        # matched), so this file was edited: say so rather than drop data silently.
        raise ValueError(
            f"{path} holds tensors this model has no place for: {', '.join(sorted(unused)[:8])}"
        )
    commit()
