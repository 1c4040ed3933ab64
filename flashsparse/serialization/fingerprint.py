"""A model's architecture identity: the module tree a flashsparse file may be loaded into."""

from __future__ import annotations

import hashlib

from torch import nn

from ..nn import SparseLinear, is_conv1d, linear_features
from ..nn.experts import expert_linear_shapes, expert_projections, is_fused_experts


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def unwrap_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    # torch.compile wraps the model; its state lives in the original.
    return getattr(model, "_orig_mod", model)


def _linear_entry(fqn: str, module: nn.Module) -> str:
    out_f, in_f = linear_features(module)
    return f"{fqn}|linear|{out_f}x{in_f}|bias={module.bias is not None}"


def is_linear(module: nn.Module) -> bool:
    from ..nn.parallel import ShardedSparseLinear

    return isinstance(module, (nn.Linear, SparseLinear, ShardedSparseLinear)) or is_conv1d(module)


def structure(model: nn.Module) -> list[str]:
    """The entries the architecture fingerprint hashes: one per linear layer (the same for
    ``nn.Linear``, ``Conv1D`` and :class:`SparseLinear`; a dense fused MoE experts module counts
    as the per-expert linears its :class:`~flashsparse.nn.SparseExperts` holds) and one per
    other parameter and buffer (name and shape; dtypes and devices do not matter)."""
    entries = []
    inside: tuple[str, ...] = ()  # a tensor-parallel sparse layer's parts: the layer counts once
    for fqn, module in unwrap_model(model).named_modules():
        if inside and fqn.startswith(inside):
            continue
        if is_linear(module):
            entries.append(_linear_entry(fqn, module))
            if module._modules:
                inside = (*inside, fqn + ".")
            continue
        expert_params: set[str] = set()
        if is_fused_experts(module):
            for rel, out_f, in_f, bias in expert_linear_shapes(module):
                entries.append(f"{join_name(fqn, rel)}|linear|{out_f}x{in_f}|bias={bias}")
            for name, _, _bias in expert_projections(module):
                expert_params.update((name, f"{name}_bias"))
        for name, param in module._parameters.items():
            if name in expert_params:
                continue
            if param is not None:
                entries.append(f"{join_name(fqn, name)}|param|{tuple(param.shape)}")
        for name, buf in module._buffers.items():
            if buf is not None:
                entries.append(f"{join_name(fqn, name)}|buffer|{tuple(buf.shape)}")
    return entries


def architecture(model: nn.Module) -> dict:
    """``{"class", "fingerprint", "entries"}`` identifying ``model``'s architecture and sizes."""
    model = unwrap_model(model)
    entries = structure(model)
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]
    return {"class": type(model).__name__, "fingerprint": digest, "entries": len(entries)}
