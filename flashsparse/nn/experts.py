"""Sparse fused MoE experts: a drop-in for transformers' ``*Experts`` modules.

transformers 5.x keeps each MoE layer's experts as 3-D parameters (``gate_up_proj [E, 2I, H]``
or ``up_proj [E, I, H]``, ``down_proj [E, H, I]``; ``[E, in, out]`` when the class is declared
``is_transposed``) inside a class decorated with ``use_experts_implementation``, which
dispatches ``forward`` on ``config._experts_implementation`` through an ``ExpertsInterface``.
:class:`SparseExperts` replaces such a module the way transformers' fine-grained FP8
integration replaces experts (``FP8Experts``): a new class wrapped by
``use_experts_implementation`` with its own interface, :func:`sparse_experts_interface`, set in
place with ``set_submodule``; nothing is patched per architecture. Routing (the router and
``top_k``) is the model's and stays untouched: the module only receives ``top_k_index`` and
``top_k_weights``.

Each expert matrix becomes one :class:`~flashsparse.SparseLinear` (``gate_up_proj.<e>``,
``down_proj.<e>``, with the expert's bias if the class has one), so ``save_sparse``,
``load_sparse``, ``sparsify_summary`` and ``.to(dtype)`` treat them as they treat every
sparse layer. Two forwards:

* ``"eager"`` (``config._experts_implementation == "eager"``): the loop over the hit experts
  that transformers' eager experts run, with each product through the format's op (so the
  selected kernel backend: reference, Triton, CUDA or a CPU kernel);
* every other implementation name (``grouped_mm``, transformers' default, ``batched_mm``, ...):
  tokens sorted by expert, then one ``torch.ops.flashsparse.grouped_linear`` call per
  projection over all (expert, token-group) work items. That op's reference implementation
  loops over the experts with tokens (one sync for the counts), each through the op's
  kernel selection; the op boundary keeps ``torch.compile(fullgraph=True)`` unbroken.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import grouped_linear
from .linear import SparseLinear

# The 3-D parameter names of transformers' experts: the first projection, then the second.
_UP_NAMES = ("gate_up_proj", "up_proj")
_DOWN_NAME = "down_proj"


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a dense transformers experts module (3-D expert weights under a
    ``use_experts_implementation`` class)."""
    if isinstance(module, SparseExperts):
        return False
    down = module._parameters.get(_DOWN_NAME)
    up = next(
        (module._parameters.get(n) for n in _UP_NAMES if module._parameters.get(n) is not None),
        None,
    )
    return (
        isinstance(down, torch.Tensor)
        and down.dim() == 3
        and isinstance(up, torch.Tensor)
        and up.dim() == 3
        and hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
    )


def expert_projections(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``[(name, weight [E, ...], bias [E, out] or None)]`` of a dense experts module, in the
    order the forward applies them."""
    up_name = "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    out = []
    for name in (up_name, _DOWN_NAME):
        bias = (
            module._parameters.get(f"{name}_bias") if getattr(module, "has_bias", False) else None
        )
        out.append((name, module._parameters[name], bias))
    return out


def expert_matrix(weight: torch.Tensor, e: int, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s matrix as ``[out_features, in_features]``."""
    return weight[e].t() if transposed else weight[e]


def expert_linear_shapes(module: nn.Module) -> list[tuple[str, int, int, bool]]:
    """``[(relative name "<proj>.<e>", out_features, in_features, has_bias)]`` of a dense
    experts module: what its :class:`SparseExperts` holds as SparseLinear layers."""
    shapes = []
    for name, weight, bias in expert_projections(module):
        n_exp, a, b = weight.shape
        out_f, in_f = (b, a) if module.is_transposed else (a, b)
        shapes.extend((f"{name}.{e}", out_f, in_f, bias is not None) for e in range(n_exp))
    return shapes


def _sort_by_expert(
    top_k_index: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, k) slots ordered by expert and the token count per expert."""
    expert_ids = top_k_index.reshape(-1)
    _, perm = torch.sort(expert_ids, stable=True)
    # scatter_add, not bincount: a static output shape keeps torch.compile's graph whole.
    counts = torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids.clamp(max=num_experts - 1), torch.ones_like(expert_ids))
    return perm, counts


def sparse_grouped_experts_forward(
    self: SparseExperts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """All experts' products as one grouped op call per projection (see the module doc)."""
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    perm, counts = _sort_by_expert(top_k_index, self.num_experts)
    x = hidden_states[perm // num_top_k]
    up = self._projection(0)
    h = grouped_linear(
        up[0].format,
        x,
        counts,
        self._flat(up),
        up[0].out_features,
        up[0].in_features,
        self._bias(up),
    )
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    down = self._projection(1)
    h = grouped_linear(
        down[0].format,
        h,
        counts,
        self._flat(down),
        down[0].out_features,
        down[0].in_features,
        self._bias(down),
    )
    if self.has_post_expert_norm:
        h = self.post_expert_norm(h)
    h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    out = h[inv].view(num_tokens, num_top_k, hidden_dim).sum(dim=1)
    return out.to(hidden_states.dtype)


class SparseExperts(nn.Module):
    """Fused MoE experts with every expert matrix a :class:`~flashsparse.SparseLinear`.

    Build it with :meth:`from_experts` (from a dense experts module) or :meth:`from_layers`
    (from already sparse layers, as ``load_sparse`` does). Attributes of the original module
    that are not expert weights (``act_fn``, ``num_experts``, clamp limits, a
    ``post_expert_norm``) are kept, and so is its class's ``_apply_gate``.
    """

    def __init__(self, config, layers: dict[str, list[SparseLinear]], attributes: dict) -> None:
        super().__init__()
        for name, value in attributes.items():
            setattr(self, name, value)
        for name, experts in layers.items():
            setattr(self, name, nn.ModuleList(experts))
        self._projection_names = tuple(layers)

    # -- construction -----------------------------------------------------------------------------
    @staticmethod
    def _attributes(experts: nn.Module) -> dict:
        skip = {
            "config",
            "training",
            "has_gate",
            "has_bias",
            "has_post_expert_norm",
            "is_transposed",
            "is_concatenated",
            "_is_expert_parallel",
        }
        attrs = {
            k: v
            for k, v in vars(experts).items()
            if not k.startswith("_") and k not in skip and not isinstance(v, torch.Tensor)
        }
        attrs.update(experts._modules)  # act_fn, post_expert_norm: not expert weights
        return attrs

    @classmethod
    def _class_for(cls, experts: nn.Module) -> type[SparseExperts]:
        from transformers.integrations.moe import use_experts_implementation

        key = (
            type(experts),
            experts.has_gate,
            getattr(experts, "has_bias", False),
            getattr(experts, "has_post_expert_norm", False),
        )
        if key not in _CLASSES:
            # The original class's gate (clamped SwiGLU, interleaved gate/up, ...) is part of the
            # architecture's math: keep it rather than the default.
            namespace = (
                {"_apply_gate": type(experts)._apply_gate}
                if hasattr(type(experts), "_apply_gate")
                else {}
            )
            sub = type(f"Sparse{type(experts).__name__}", (cls,), namespace)
            _CLASSES[key] = use_experts_implementation(
                sub,
                experts_interface=sparse_experts_interface(),
                has_gate=key[1],
                has_bias=key[2],
                has_post_expert_norm=key[3],
                is_transposed=False,  # each expert is stored as [out, in]
            )
        return _CLASSES[key]

    @classmethod
    def from_layers(
        cls, experts: nn.Module, layers: dict[str, list[SparseLinear]]
    ) -> SparseExperts:
        """A sparse replacement of the dense ``experts`` (possibly on the meta device) holding
        ``layers`` (``{"gate_up_proj" | "up_proj": [...], "down_proj": [...]}``, one per expert)."""
        if not is_fused_experts(experts):
            raise TypeError(
                f"experts must be a transformers fused experts module, got {type(experts).__name__}"
            )
        want = {name: weight.shape[0] for name, weight, _ in expert_projections(experts)}
        if set(layers) != set(want) or any(len(layers[n]) != want[n] for n in want):
            raise ValueError(
                f"layers must hold {want} SparseLinear layers, got "
                f"{ {n: len(v) for n, v in layers.items()} }"
            )
        new_cls = cls._class_for(experts)
        config = getattr(experts, "config", None)
        ordered = {name: layers[name] for name in want}
        return new_cls(config, ordered, cls._attributes(experts))

    @classmethod
    def from_experts(cls, experts: nn.Module, format: str = "auto") -> SparseExperts:
        """Encode every expert matrix of the dense ``experts`` (pruned already) in ``format``."""
        if not is_fused_experts(experts):
            raise TypeError(
                f"experts must be a transformers fused experts module, got {type(experts).__name__}"
            )
        layers = {}
        for name, weight, bias in expert_projections(experts):
            layers[name] = [
                SparseLinear.from_dense(
                    expert_matrix(weight, e, experts.is_transposed).contiguous(),
                    None if bias is None else bias[e],
                    format,
                )
                for e in range(weight.shape[0])
            ]
        return cls.from_layers(experts, layers)

    # -- forward ----------------------------------------------------------------------------------
    def _projection(self, i: int) -> nn.ModuleList:
        return getattr(self, self._projection_names[i])

    @staticmethod
    def _flat(layers: nn.ModuleList) -> list[torch.Tensor]:
        if any(layer.trainable for layer in layers):
            raise ValueError(
                "SparseExperts cannot train its experts' values (the grouped op has no weight "
                "gradient): call trainable_(False) on the expert layers"
            )
        return [layer._buffers[c] for layer in layers for c in layer._components]

    @staticmethod
    def _bias(layers: nn.ModuleList) -> torch.Tensor | None:
        if layers[0].bias is None:
            return None
        return torch.stack([layer.bias for layer in layers])

    def _eager_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # transformers' eager experts loop, with each product a sparse layer call.
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = torch.nn.functional.one_hot(
                top_k_index, num_classes=self.num_experts + 1
            ).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        up, down = self._projection(0), self._projection(1)
        up_flat, down_flat = self._flat(up), self._flat(down)
        up_bias, down_bias = self._bias(up), self._bias(down)
        for expert_idx in hit:
            e = expert_idx[0]
            if e == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            # One expert's product as a grouped call whose only non-empty group is e: the expert
            # is chosen by a tensor, so torch.compile needs no Python int (no extra graph break).
            counts = torch.zeros(self.num_experts, dtype=torch.int64, device=e.device)
            counts = counts.index_fill(0, e.view(1), token_idx.shape[0])
            h = grouped_linear(
                up[0].format,
                hidden_states[token_idx],
                counts,
                up_flat,
                up[0].out_features,
                up[0].in_features,
                up_bias,
            )
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = grouped_linear(
                down[0].format,
                h,
                counts,
                down_flat,
                down[0].out_features,
                down[0].in_features,
                down_bias,
            )
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            h = h * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, h.to(final.dtype))
        return final

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self._eager_forward(hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        up = self._projection(0)[0]
        down = self._projection(1)[0]
        return (
            f"num_experts={len(self._projection(0))}, {self._projection_names[0]}={up.out_features}x"
            f"{up.in_features}, down_proj={down.out_features}x{down.in_features}, format={up.format}"
        )


_CLASSES: dict[tuple, type[SparseExperts]] = {}


_INTERFACE = None


def sparse_experts_interface():
    """The ``ExpertsInterface`` of :class:`SparseExperts`: every experts implementation name
    transformers knows maps to the grouped sparse forward ("eager" is the class's own forward).
    Built on first use so that importing flashsparse does not import transformers."""
    global _INTERFACE
    if _INTERFACE is None:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

        class SparseExpertsInterface(ExpertsInterface):
            _global_mapping = {  # noqa: RUF012
                name: sparse_grouped_experts_forward for name in ALL_EXPERTS_FUNCTIONS
            }

        _INTERFACE = SparseExpertsInterface()
    return _INTERFACE
