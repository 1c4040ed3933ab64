"""Installing loaded tensors and modules into a model: all checked first, then one commit."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..nn import SparseLinear
from ..nn.experts import expert_linear_shapes, is_fused_experts
from .fingerprint import is_linear, join_name


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
    # Modules inside a replaced one (a tensor-parallel sparse layer's shard) go with it.
    inside = tuple(f"{fqn}." for fqn in swaps)
    for fqn, module in model.named_modules():
        if fqn in swaps or fqn.startswith(inside):
            continue
        if isinstance(module, SparseLinear):
            weight = fetch(join_name(fqn, "weight"))
            if weight is None:
                missing.append(join_name(fqn, "weight"))
                continue
            _check_shape(
                join_name(fqn, "weight"),
                weight,
                torch.Size((module.out_features, module.in_features)),
                source,
            )
            bias = fetch(join_name(fqn, "bias")) if module.bias is not None else None
            if module.bias is not None and bias is None:
                missing.append(join_name(fqn, "bias"))
                continue
            swaps[fqn] = _dense_linear(weight, bias)
            continue
        for name, param in module._parameters.items():
            if param is None:
                continue
            full = join_name(fqn, name)
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
            full = join_name(fqn, name)
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
        if fqn in swaps or fqn.startswith(inside):
            continue
        for name, value in vars(module).items():
            if not isinstance(value, torch.Tensor):
                continue
            if id(value) in replaced:
                attributes.append((module, name, replaced[id(value)]))
            elif value.device.type == "meta":
                stranded.append(join_name(fqn, name))

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


def target_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {fqn: module for fqn, module in model.named_modules() if is_linear(module)}


def expert_slots(model: nn.Module) -> dict[str, tuple[str, str, int, tuple[int, int]]]:
    """``{"<experts>.<proj>.<e>": (experts fqn, proj, e, (out, in))}`` for the dense fused MoE
    experts of ``model``: where a file's per-expert sparse layers go."""
    slots = {}
    for fqn, module in model.named_modules():
        if is_fused_experts(module):
            for rel, out_f, in_f, _ in expert_linear_shapes(module):
                proj, _, e = rel.rpartition(".")
                slots[join_name(fqn, rel)] = (fqn, proj, int(e), (out_f, in_f))
    return slots
