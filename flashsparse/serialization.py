"""Save and load models with :class:`~flashsparse.SparseLinear` layers in compressed form.

``save_sparse(model, path)`` writes one safetensors file: every parameter and buffer of the
model (the SparseLinear layers as their format's component tensors, everything else dense,
a tied weight once) and, in the safetensors ``__metadata__`` (all values are strings):

* ``format`` = ``"flashsparse"`` and ``format_version`` (an integer, :data:`FORMAT_VERSION`);
  ``flashsparse_version`` and ``torch_version`` of the writer;
* ``architecture``: JSON ``{"class", "fingerprint", "entries"}`` -- the model's class name and a
  hash of its module tree (every linear as ``out x in`` with or without bias, whether stored
  dense or sparse; every other parameter and buffer with its shape), so a file only loads
  into a model of the same architecture and size;
* ``layers``: JSON ``{fqn: {"format", "shape", "dtype", "nnz", "bias"}}`` for the sparse layers;
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

import contextlib
import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from .formats import FORMATS
from .nn import SparseLinear, is_conv1d, linear_features
from .nn.experts import SparseExperts, expert_linear_shapes, expert_projections, is_fused_experts

FORMAT_NAME = "flashsparse"
# 2: bitmap masks are one 64-bit word per tile row (1: one per 8x8 sub-tile; converted on load).
FORMAT_VERSION = 2
FILE_NAME = "flashsparse.safetensors"

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32)
}
# A safetensors header larger than this is not one we wrote (ours are a few hundred KiB even
# for 70B-parameter models): refuse it rather than read gigabytes of garbage as JSON.
_MAX_HEADER_BYTES = 256 << 20


# -- architecture identity -------------------------------------------------------------------------
def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unwrap(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch.compile wraps the model; its state lives in the original.
    return getattr(model, "_orig_mod", model)


def _linear_entry(fqn: str, module: nn.Module) -> str:
    out_f, in_f = linear_features(module)
    return f"{fqn}|linear|{out_f}x{in_f}|bias={module.bias is not None}"


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, SparseLinear)) or is_conv1d(module)


def structure(model: nn.Module) -> list[str]:
    """The entries the architecture fingerprint hashes: one per linear layer (the same for
    ``nn.Linear``, ``Conv1D`` and :class:`SparseLinear`; a dense fused MoE experts module counts
    as the per-expert linears its :class:`~flashsparse.nn.SparseExperts` holds) and one per
    other parameter and buffer (name and shape; dtypes and devices do not matter)."""
    entries = []
    for fqn, module in _unwrap(model).named_modules():
        if _is_linear(module):
            entries.append(_linear_entry(fqn, module))
            continue
        expert_params: set[str] = set()
        if is_fused_experts(module):
            for rel, out_f, in_f, bias in expert_linear_shapes(module):
                entries.append(f"{_join(fqn, rel)}|linear|{out_f}x{in_f}|bias={bias}")
            for name, _, _bias in expert_projections(module):
                expert_params.update((name, f"{name}_bias"))
        for name, param in module._parameters.items():
            if name in expert_params:
                continue
            if param is not None:
                entries.append(f"{_join(fqn, name)}|param|{tuple(param.shape)}")
        for name, buf in module._buffers.items():
            if buf is not None:
                entries.append(f"{_join(fqn, name)}|buffer|{tuple(buf.shape)}")
    return entries


def architecture(model: nn.Module) -> dict:
    """``{"class", "fingerprint", "entries"}`` identifying ``model``'s architecture and sizes."""
    model = _unwrap(model)
    entries = structure(model)
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]
    return {"class": type(model).__name__, "fingerprint": digest, "entries": len(entries)}


# -- file access -----------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def checksum(t: torch.Tensor) -> int:
    """crc32 of a CPU tensor's bytes (about 3.5 GB/s, so checking a 7B model costs seconds)."""
    return zlib.crc32(_tensor_bytes(t))


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking that the file is complete.

    Raises ``ValueError`` for a file that is too short, whose header is not valid JSON, or
    whose size differs from what the header describes (a truncated or padded file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > _MAX_HEADER_BYTES:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {length} "
                f"bytes but the file has {size}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupt: its safetensors header is not valid JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
    if 8 + length + end != size:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {8 + length + end} bytes, "
            f"the file has {size}"
        )
    return header


class _Reader:
    """Reads tensors from one or more safetensors files by name, on the CPU, checking each
    against its checksum (when known), then moves it to ``device``. Each name is read once."""

    def __init__(
        self,
        files: dict[str, Path],
        device: torch.device,
        checksums: dict[str, int] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.files, self.device = files, device
        self.checksums, self.aliases = checksums or {}, aliases or {}
        self.used: set[str] = set()
        self._cache: dict[str, torch.Tensor] = {}
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def key(self, name: str) -> str | None:
        name = self.aliases.get(name, name)
        return name if name in self.files else None

    def __contains__(self, name: str) -> bool:
        return self.key(name) is not None

    def get(self, name: str) -> torch.Tensor | None:
        key = self.key(name)
        if key is None:
            return None
        if key not in self._cache:
            from safetensors import SafetensorError, safe_open

            path = self.files[key]
            try:
                if path not in self._handles:
                    self._handles[path] = self._stack.enter_context(
                        safe_open(str(path), framework="pt")
                    )
                tensor = self._handles[path].get_tensor(key)
            except SafetensorError as exc:
                raise ValueError(f"{path}: cannot read tensor {key!r}: {exc}") from None
            expected = self.checksums.get(key)
            if expected is not None and checksum(tensor) != expected:
                raise ValueError(f"{path} is corrupt: tensor {key!r} does not match its checksum")
            self._cache[key] = tensor.to(self.device)
        self.used.add(key)
        return self._cache[key]


# -- installing tensors into a model ---------------------------------------------------------------
def _check_shape(name: str, tensor: torch.Tensor, shape: torch.Size, source: str) -> None:
    if tensor.shape != shape:
        raise ValueError(
            f"{source}: {name} has shape {tuple(tensor.shape)} but the model expects {tuple(shape)}"
        )


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight)
    if bias is not None:
        layer.bias = nn.Parameter(bias)
    return layer


def prepare_install(
    model: nn.Module,
    new_modules: dict[str, nn.Module],
    fetch: Callable[[str], torch.Tensor | None],
    source: str,
    device: torch.device,
) -> Callable[[], None]:
    """Plan giving ``model`` the modules in ``new_modules`` (by qualified name) and, for every
    other parameter and buffer, the tensor ``fetch(name)`` returns; return the function that
    makes the change.

    Everything is fetched and checked here, before anything changes: a missing or misshapen
    tensor raises ``ValueError`` with the model untouched; the returned commit cannot fail.
    Tied parameters (one object under several names) stay tied. A non-persistent buffer the
    source does not hold keeps its value (moved to ``device``), unless it is on the ``meta``
    device (then it is missing). A :class:`SparseLinear` of ``model`` that the source stores
    dense (``<name>.weight``) becomes an ``nn.Linear``.
    """
    swaps = dict(new_modules)
    new_params: list[tuple[nn.Module, str, nn.Parameter]] = []
    new_buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
    replaced: dict[int, torch.Tensor] = {}
    missing: list[str] = []
    for fqn, module in model.named_modules():
        if fqn in swaps:
            continue
        if isinstance(module, SparseLinear):
            weight = fetch(_join(fqn, "weight"))
            if weight is None:
                missing.append(_join(fqn, "weight"))
                continue
            _check_shape(
                _join(fqn, "weight"),
                weight,
                torch.Size((module.out_features, module.in_features)),
                source,
            )
            bias = fetch(_join(fqn, "bias")) if module.bias is not None else None
            if module.bias is not None and bias is None:
                missing.append(_join(fqn, "bias"))
                continue
            swaps[fqn] = _dense_linear(weight, bias)
            continue
        for name, param in module._parameters.items():
            if param is None:
                continue
            full = _join(fqn, name)
            new = replaced.get(id(param))
            if new is None:
                tensor = fetch(full)
                if tensor is None:
                    missing.append(full)
                    continue
                _check_shape(full, tensor, param.shape, source)
                new = nn.Parameter(tensor, requires_grad=param.requires_grad)
                replaced[id(param)] = new
            new_params.append((module, name, new))
        for name, buf in module._buffers.items():
            if buf is None:
                continue
            full = _join(fqn, name)
            new = replaced.get(id(buf))
            if new is None:
                tensor = fetch(full)
                if (
                    tensor is None
                    and name in module._non_persistent_buffers_set
                    and buf.device.type != "meta"
                ):
                    tensor = buf.to(device)  # computed at construction: keep it, beside the rest
                if tensor is None:
                    missing.append(full)
                    continue
                _check_shape(full, tensor, buf.shape, source)
                new = tensor
                replaced[id(buf)] = new
            new_buffers.append((module, name, new))
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise ValueError(f"{source} has no tensor for {shown}")
    # Plain tensor attributes that alias a replaced tensor follow it (transformers 4.x keeps
    # ``rotary_emb.original_inv_freq = self.inv_freq``); other meta ones cannot be restored.
    attributes: list[tuple[nn.Module, str, torch.Tensor]] = []
    stranded: list[str] = []
    for fqn, module in model.named_modules():
        if fqn in swaps:
            continue
        for name, value in vars(module).items():
            if not isinstance(value, torch.Tensor):
                continue
            if id(value) in replaced:
                attributes.append((module, name, replaced[id(value)]))
            elif value.device.type == "meta":
                stranded.append(_join(fqn, name))

    def commit() -> None:
        # Plain assignments into modules that exist: nothing here can fail halfway.
        for fqn, module in swaps.items():
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module)
        for module, name, param in new_params:
            module._parameters[name] = param
        for module, name, buf in new_buffers:
            module._buffers[name] = buf
        for module, name, value in attributes:
            module.__dict__[name] = value
        if stranded:
            warnings.warn(
                f"{', '.join(stranded[:5])}: tensor attribute(s) on the meta device that are "
                "neither parameters nor buffers, so no file holds them; build the model under "
                "flashsparse.serialization.empty_weights() if they are used",
                RuntimeWarning,
                stacklevel=3,
            )

    return commit


def _target_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def _linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {fqn: module for fqn, module in model.named_modules() if _is_linear(module)}


def _expert_slots(model: nn.Module) -> dict[str, tuple[str, str, int, tuple[int, int]]]:
    """``{"<experts>.<proj>.<e>": (experts fqn, proj, e, (out, in))}`` for the dense fused MoE
    experts of ``model``: where a file's per-expert sparse layers go."""
    slots = {}
    for fqn, module in model.named_modules():
        if is_fused_experts(module):
            for rel, out_f, in_f, _ in expert_linear_shapes(module):
                proj, _, e = rel.rpartition(".")
                slots[_join(fqn, rel)] = (fqn, proj, int(e), (out_f, in_f))
    return slots


@contextlib.contextmanager
def empty_weights() -> Iterator[None]:
    """Build modules with their parameters on the ``meta`` device and their buffers real.

    For checkpoints that do not store non-persistent buffers (a Hugging Face checkpoint has no
    rotary ``inv_freq``): ``with empty_weights(): model = AutoModelForCausalLM.from_config(c)``
    allocates no weight memory (a parameter is moved to ``meta`` as it is registered, before any
    initialisation touches it) while buffers computed in ``__init__`` keep their values.
    Files written by :func:`save_sparse` hold every buffer, so ``torch.device("meta")`` is
    enough for them.
    """
    register = nn.Module.register_parameter

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is None or param.device.type == "meta":
            return
        if type(param) is nn.Parameter:
            moved = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
        else:  # a Parameter subclass takes its attributes as constructor arguments
            moved = type(param)(
                param.to("meta"), **{**param.__dict__, "requires_grad": param.requires_grad}
            )
        self._parameters[name] = moved

    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        nn.Module.register_parameter = register


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
    file written. The file replaces any old one only once it is complete."""
    from safetensors.torch import save_file

    from . import __version__

    model = _unwrap(model)
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
        for kind, items in (("parameter", module._parameters), ("buffer", module._buffers)):
            for name, tensor in items.items():
                if tensor is None:
                    continue
                full = _join(fqn, name)
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
        "format_version": str(FORMAT_VERSION),
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


def _describe_linear(out_features: int, in_features: int, bias: bool) -> str:
    return f"{out_features}x{in_features}" + (" with bias" if bias else "")


def _describe_mismatch(model: nn.Module, header: dict, layers: dict) -> str:
    """The first few differences between the model's structure and what the file stores."""
    model_linears = {
        fqn: _describe_linear(*linear_features(m), m.bias is not None)
        for fqn, m in _linear_modules(model).items()
    }
    model_linears.update(
        (fqn, _describe_linear(*shape, False))
        for fqn, (_, _, _, shape) in _expert_slots(model).items()
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
            full = _join(fqn, name)
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


def _load_flashsparse(
    model: nn.Module, path: Path, header: dict, device: torch.device, verify: bool
) -> None:
    from . import __version__

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
    linears = _linear_modules(model)
    slots = _expert_slots(model)
    experts: dict[str, dict[str, dict[int, SparseLinear]]] = {}
    with _Reader(names, device, checksums, aliases) as reader:
        new_modules: dict[str, nn.Module] = {}
        for fqn, info in layers.items():
            try:
                cls = FORMATS[info["format"]]
                shape = (int(info["shape"][0]), int(info["shape"][1]))
                dtype = _DTYPES[info["dtype"]]
                nnz = int(info["nnz"])
                has_bias = bool(info["bias"])
            except (KeyError, TypeError, ValueError, IndexError):
                raise ValueError(
                    f"{path} is corrupt: bad layer entry for {fqn}: {info!r}"
                ) from None
            target = linears.get(fqn)
            slot = slots.get(fqn)
            if target is None and slot is None:
                raise ValueError(f"{path}: sparse layer {fqn} is not a linear layer of the model")
            components = {}
            for c in cls.components:
                tensor = reader.get(_join(fqn, c))
                if tensor is None:
                    raise ValueError(f"{path} is corrupt: sparse layer {fqn} has no {c!r} tensor")
                components[c] = tensor
            components = cls.upgrade(components, version)
            sw = cls(components, shape, dtype, nnz)
            try:
                sw.validate()
            except ValueError as exc:
                raise ValueError(f"{path} is corrupt: sparse layer {fqn}: {exc}") from None
            bias = reader.get(_join(fqn, "bias")) if has_bias else None
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
        commit = prepare_install(model, new_modules, reader.get, str(path), device)
        unused = set(names) - reader.used
    if unused:
        # Unreachable for a file written by save_sparse for this architecture (the fingerprint
        # matched), so this file was edited: say so rather than drop data silently.
        raise ValueError(
            f"{path} holds tensors this model has no place for: {', '.join(sorted(unused)[:8])}"
        )
    commit()


def load_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    format: str = "auto",
    verify: bool = True,
) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (same architecture, for example
    built from its config under ``torch.device("meta")``) and return ``model``.

    ``path``: the ``.safetensors`` file or a directory holding ``flashsparse.safetensors``. A
    compressed-tensors ``sparse-bitmask`` checkpoint (a Hugging Face model directory or one of
    its safetensors files) is converted on the fly by
    :func:`flashsparse.compressed_tensors.load_compressed_tensors` (``format`` picks the format
    its layers are converted to; a flashsparse file keeps the formats it was saved with).
    ``device``: where the tensors go (default: where the model's tensors are, ``cpu`` for a
    meta model). ``verify``: check each tensor's checksum (about 3.5 GB/s on one core).

    Raises ``ValueError`` for a file of another architecture, a newer format version, or a
    corrupt or truncated file -- and then the model is left exactly as it was. Warns once
    (:class:`flashsparse.notices.ReferencePathWarning`) if no kernel runs the loaded layers here.
    """
    from .commands.common import parse_device
    from .nn import notice_reference_path

    if device is not None:
        try:  # before anything is read: torch's own error for "cuda" here is an AssertionError
            parse_device(str(device))
        except ValueError as exc:
            raise ValueError(f"device: {exc}") from None
    model = _load_sparse(model, path, device=device, format=format, verify=verify)
    notice_reference_path(model, stacklevel=3)
    return model


def _load_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None,
    format: str,
    verify: bool,
) -> nn.Module:
    model = _unwrap(model)
    target = _target_device(model, device)
    path = Path(path)
    if path.is_dir():
        if (path / FILE_NAME).is_file():
            path = path / FILE_NAME
        else:
            from .compressed_tensors import (
                is_compressed_tensors_checkpoint,
                load_compressed_tensors,
            )

            if is_compressed_tensors_checkpoint(path):
                return load_compressed_tensors(model, path, format=format, device=target)
            raise ValueError(
                f"{path} holds neither {FILE_NAME} nor a compressed-tensors sparse-bitmask checkpoint"
            )
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist")
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        from .compressed_tensors import has_bitmask_tensors, load_compressed_tensors

        if has_bitmask_tensors(header):
            return load_compressed_tensors(model, path, format=format, device=target)
        raise ValueError(
            f"{path} is not a flashsparse file (no 'format: flashsparse' in its metadata) and "
            "holds no compressed-tensors bitmask tensors"
        )
    _load_flashsparse(model, path, header, target, verify)
    return model
