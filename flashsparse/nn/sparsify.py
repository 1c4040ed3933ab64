"""``sparsify_``, the one-call model transform, and ``sparsify_summary``: which projections
a model holds sparse and which dense (nn.Linear, transformers Conv1D, fused MoE experts)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..formats import check_format, check_group_size, check_quant, check_quant_format
from ..notices import FlashsparseWarning
from . import parallel
from .experts import SparseExperts, expert_projections, is_fused_experts
from .linear import SparseLinear, check_trainable_format, is_conv1d


def _weight_sparsity(weight: torch.Tensor) -> float:
    return 1.0 - int(torch.count_nonzero(weight)) / weight.numel()


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _projection_weights(module: nn.Module) -> list[torch.Tensor]:
    if is_fused_experts(module):
        return [weight for _, weight, _ in expert_projections(module)]
    return [module.weight]


def dense_projections(
    model: nn.Module, skipped: set[str] | frozenset[str] = frozenset()
) -> list[str]:
    """Names of the projection-like weights of ``model`` that are stored dense: ``nn.Linear``
    and ``Conv1D`` layers (by module name), dense fused MoE experts (by module name) and any
    other matrix parameter (2+ dimensions, the last two both > 1) outside an ``nn.Embedding`` and not tied to one (by
    parameter name, e.g. a MoE router's weight), except the modules named in ``skipped``."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    names: list[str] = []
    inside_sparse: list[str] = []
    for fqn, module in model.named_modules():
        if any(fqn.startswith(p + ".") for p in inside_sparse):
            continue
        if isinstance(module, (SparseLinear, SparseExperts)):
            inside_sparse.append(fqn)
            continue
        if isinstance(module, nn.Embedding) or fqn in skipped:
            continue
        if _is_projection(module) or is_fused_experts(module):
            names.append(fqn)
            continue
        for name, param in module._parameters.items():
            # A matrix, not a vector stored as [1, n] (e.g. a router's score-correction bias).
            if (
                param is not None
                and param.dim() >= 2
                and min(param.shape[-2:]) > 1
                and id(param) not in embedding_weights
            ):
                names.append(f"{fqn}.{name}" if fqn else name)
    return names


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` ``PreTrainedModel`` (checked by class
    name and module, so transformers is never imported here)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers")
        for cls in type(model).__mro__
    )


def default_skipped_linears(model: nn.Module) -> set[str]:
    """Names of the ``nn.Linear`` layers that ``sparsify_(model)`` leaves dense without a filter.

    For a ``transformers`` model: the LM head (``model.get_output_embeddings()``) and any linear
    whose weight is an ``nn.Embedding``'s weight (a tied head: compressing it would add a
    compressed copy of a matrix the embedding keeps dense anyway, and untie the two). For any
    other model: nothing -- every ``nn.Linear`` is converted, as the contract says.
    """
    if not is_transformers_model(model):
        return set()
    try:
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        head = None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {
        fqn
        for fqn, module in model.named_modules()
        if _is_projection(module) and (module is head or id(module.weight) in embedding_weights)
    }


class _Progress:
    """A progress bar on stderr: tqdm when installed, else a line every ~10 %."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self._bar = total, 0, enabled and total > 0, None
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(
                    total=total, desc="flashsparse: sparsify", unit="layer", file=sys.stderr
                )
            except ImportError:
                self._bar = None

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(
                f"flashsparse: sparsify {self.done}/{self.total} layers",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


# Auto progress: only for models whose projections are this large (a 1B-parameter model in
# 16-bit is about 2 GiB); small models convert in well under a second.
_PROGRESS_AUTO_BYTES = 1 << 30


def sparsify_(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    *,
    format: str = "auto",
    min_sparsity: float = 0.0,
    progress: bool | None = None,
    trainable: bool = False,
    quant: str | None = None,
    group_size: int | None = None,
) -> nn.Module:
    """Replace, in place, every projection of ``model`` for which ``filter_fn(module, fqn)`` is
    true (all if None) and whose weight sparsity is at least ``min_sparsity`` by its sparse
    form holding the same (pruned) weights. Returns ``model``.

    Projections: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2) become :class:`SparseLinear`;
    transformers' fused MoE experts (3-D ``gate_up_proj``/``down_proj`` weights) become a
    :class:`~flashsparse.nn.SparseExperts` with one SparseLinear per expert matrix (their
    sparsity is that of all their expert weights together). ``filter_fn`` sees each of these
    modules under its own name.

    With ``filter_fn=None`` on a Hugging Face ``transformers`` model the embeddings and the LM
    head stay dense: the head (``get_output_embeddings()``) and any linear tied to an
    ``nn.Embedding`` are skipped (see :func:`default_skipped_linears`); pass a ``filter_fn`` to
    decide yourself (``lambda module, fqn: True`` converts the head too). Plain ``nn.Module``
    models get every ``nn.Linear`` converted.

    Every projection-like weight left dense other than the LM head and weights tied to
    embeddings -- filtered out, below ``min_sparsity``, or of a kind this function does not
    convert (a MoE router's weight, an unknown layout) -- is named in one ``UserWarning``.

    ``progress``: show a progress bar on stderr (``None``: when stderr is a terminal and the
    layers to convert hold at least 1 GiB). Each dense layer is released as soon as its
    replacement exists, so peak memory is the model plus one layer's encoding temporaries.
    :func:`sparsify_summary` reports what the model holds afterwards.

    Under ``torch.distributed`` tensor parallelism (linears with DTensor weights, from
    transformers' ``tp_plan="auto"`` or torch's ``parallelize_module``), each split linear becomes
    a :class:`~flashsparse.nn.parallel.ShardedSparseLinear` holding the encoding of this rank's
    block only, with the plan's hooks carried over, so the model computes what it computed
    before (docs/distributed.md); call it on every rank. A layout it cannot keep (a 2-D mesh, a
    packed placement, experts split by expert parallelism) raises ``ValueError`` naming the
    layer before any layer is converted.

    ``trainable=True`` (format ``"auto"`` or ``"bitmap"``): every converted layer's packed
    nonzeros become an ``nn.Parameter`` (:meth:`SparseLinear.trainable_`) for sparse
    fine-tuning with the mask fixed; fused MoE experts cannot be trained that way yet (a
    ``ValueError`` names them: leave them out with ``filter_fn``), nor tensor-parallel layers.

    Warns (:class:`flashsparse.FlashsparseWarning`, once per call each) when layers are left
    dense because of ``min_sparsity`` (naming them), when nothing is converted, and when the
    converted layers are no smaller than dense; and once per process per format, device and
    dtype (:class:`flashsparse.ReferencePathWarning`) when no kernel runs the layers here.

    ``quant="int8"`` / ``"fp8"`` (with an optional ``group_size``) stores the converted linear
    layers' nonzeros as 8-bit codes with float32 scales (``format`` "bitmap" or "auto"; see
    :func:`flashsparse.encode`); a layer with a NaN or Inf weight is refused (``ValueError``
    naming it) before anything is converted. Fused MoE experts stay unquantized (a warning says
    so). :func:`sparsify_summary` reports the relative weight error quantization added per layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_format(format)
    quant = check_quant(quant)
    group_size = check_group_size(group_size)
    check_quant_format(format, quant, group_size)
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)):
        raise TypeError(
            f"min_sparsity must be a float in [0, 1], got {type(min_sparsity).__name__}"
        )
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("filter_fn must be a callable (module, fqn) -> bool or None")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be a bool, got {type(trainable).__name__}")
    if trainable:
        format = check_trainable_format(format)
    head_and_tied = default_skipped_linears(model)
    skipped = head_and_tied if filter_fn is None else set()
    # Names only: holding the modules would keep every dense weight alive until the end.
    targets: list[str] = []
    target_bytes = 0
    linears = 0
    too_dense: list[tuple[str, float]] = []  # (fqn, sparsity) of layers below min_sparsity
    filtered: list[str] = []  # layers filter_fn rejected
    conversions: dict[str, parallel.ParallelConversion] = {}  # tensor-parallel targets
    for fqn, module in model.named_modules():
        if not (_is_projection(module) or is_fused_experts(module)):
            continue
        linears += 1
        if fqn in skipped:
            continue
        if filter_fn is not None and not filter_fn(module, fqn):
            filtered.append(fqn)
            continue
        # Tensor-parallel layers are checked here, before any layer is converted.
        conversion = parallel.plan_conversion(module, fqn)
        weights = _projection_weights(module)
        # A sharded layer's sparsity is the whole layer's (a collective) only when it matters.
        zeros, elements = parallel.zero_count(weights, whole_layer=min_sparsity > 0)
        sparsity = zeros / max(1, elements)
        if sparsity < min_sparsity:
            too_dense.append((fqn, sparsity))
            continue
        if fqn == "":
            raise ValueError("model is itself a projection: use SparseLinear.from_linear(model)")
        targets.append(fqn)
        if conversion is not None:
            conversions[fqn] = conversion
        target_bytes += sum(parallel.local_tensor(w).numel() * w.element_size() for w in weights)
    if trainable and quant is not None:
        raise ValueError(
            "trainable=True and quant= cannot be combined: quantized values have no "
            "weight-gradient kernel; fine-tune first, then quantize"
        )
    if trainable and conversions:
        raise ValueError(
            "trainable=True cannot train tensor-parallel layers yet: "
            f"{_names([repr(c) for c in conversions])}"
        )
    if quant is not None and conversions:
        raise ValueError(
            "quant= is not supported for tensor-parallel layers yet: "
            f"{_names([repr(c) for c in conversions])}"
        )
    if trainable:
        experts = [fqn for fqn in targets if is_fused_experts(model.get_submodule(fqn))]
        if experts:
            raise ValueError(
                "trainable=True cannot train fused MoE experts yet (their grouped op has no "
                f"weight gradient): {_names([repr(e) for e in experts])}; leave them out, e.g. "
                "filter_fn=lambda module, fqn: not flashsparse.nn.is_fused_experts(module)"
            )
    if quant is not None:
        _check_finite_targets(model, targets)
    if progress is None:
        isatty = getattr(sys.stderr, "isatty", None)
        progress = target_bytes >= _PROGRESS_AUTO_BYTES and bool(isatty and isatty())
    bar = _Progress(len(targets), progress)
    unquantized_experts: list[str] = []
    try:
        for fqn in targets:
            parent_name, _, child = fqn.rpartition(".")
            parent = model.get_submodule(parent_name)
            dense = getattr(parent, child)
            if fqn in conversions:
                sparse: nn.Module = parallel.convert(dense, conversions[fqn], format, fqn)
            elif is_fused_experts(dense):
                sparse = SparseExperts.from_experts(dense, format)
                if quant is not None:
                    unquantized_experts.append(fqn)
            else:
                sparse = SparseLinear.from_linear(
                    dense, format, trainable=trainable, quant=quant, group_size=group_size
                )
            setattr(parent, child, sparse)
            del dense
            bar.update()
    finally:
        bar.close()
    if unquantized_experts:
        warnings.warn(
            f"sparsify_: quant={quant!r} applies to linear layers; the fused MoE experts of "
            f"{len(unquantized_experts)} module(s) ({_names(unquantized_experts, 4)}) are stored "
            "sparse with unquantized values (no grouped quantized kernel yet).",
            FlashsparseWarning,
            stacklevel=2,
        )
    _report_sparsify(
        model, targets, linears, len(skipped), too_dense, filtered, head_and_tied, min_sparsity
    )
    return model


def _check_finite_targets(model: nn.Module, targets: list[str]) -> None:
    """Quantization needs finite weights: name the first layer that has a NaN or Inf."""
    for fqn in targets:
        module = model.get_submodule(fqn)
        if is_fused_experts(module):
            continue  # stored unquantized: NaN / Inf are kept exactly
        bad = int((~torch.isfinite(module.weight)).sum())
        if bad:
            raise ValueError(
                f"sparsify_(quant=...): layer {fqn!r} has {bad} non-finite weight(s) (NaN or "
                "Inf); int8/fp8 quantization needs finite weights. Fix the weights, or leave "
                "the layer out with filter_fn (nothing was converted)."
            )


def _names(items: list[str], limit: int = 10) -> str:
    return ", ".join(items[:limit]) + (
        f" and {len(items) - limit} more" if len(items) > limit else ""
    )


def _report_sparsify(
    model: nn.Module,
    targets: list[str],
    linears: int,
    default_skipped: int,
    too_dense: list[tuple[str, float]],
    filtered: list[str],
    head_and_tied: set[str],
    min_sparsity: float,
) -> None:
    """The warnings of :func:`sparsify_`: whatever it did that the user may not expect is said
    once, in one warning each (stacklevel points at the caller of ``sparsify_``). Every
    projection left dense (but the LM head and tied weights by default) is named in ONE
    warning, grouped by why."""
    below = {fqn for fqn, _ in too_dense}
    rejected = set(filtered)
    other = [
        name
        for name in dense_projections(model, head_and_tied)
        if not any(name == r or name.startswith(r + ".") for r in below | rejected)
    ]
    everything_filtered = not targets and not too_dense and not other and len(filtered) == linears
    if (too_dense or filtered or other) and not everything_filtered:
        head = (
            "sparsify_ converted nothing: "
            if not targets
            else f"sparsify_ converted {len(targets)} layer(s) but "
        )
        parts = []
        if too_dense:
            parts.append(
                f"{len(too_dense)} below min_sparsity={min_sparsity:g}: "
                + _names([f"{fqn!r} ({sp:.1%})" for fqn, sp in too_dense])
            )
        if filtered:
            parts.append(
                f"{len(filtered)} rejected by filter_fn: " + _names([repr(f) for f in filtered])
            )
        if other:
            parts.append(
                f"{len(other)} of a kind sparsify_ does not convert: "
                + _names([repr(o) for o in other])
            )
        advice = (
            " Prune them first (flashsparse.prune(weight, 0.5)) or lower min_sparsity."
            if too_dense
            else ""
        )
        warnings.warn(
            f"{head}left {len(too_dense) + len(filtered) + len(other)} projection(s) dense: "
            + "; ".join(parts)
            + "."
            + advice
            + " fs.sparsify_summary(model) counts them.",
            FlashsparseWarning,
            stacklevel=3,
        )
    elif not targets and not any(isinstance(m, SparseLinear) for m in model.modules()):
        # (A model already holding SparseLinear layers, sparsified before: nothing to say.)
        where = (
            "model has no projection layer"
            if linears == 0
            else f"all {linears} projection layer(s) are the LM head or tied to an embedding, "
            "which stay dense by default"
            if default_skipped == linears
            else f"filter_fn rejected all {linears} projection layer(s)"
        )
        warnings.warn(f"sparsify_ converted nothing: {where}.", FlashsparseWarning, stacklevel=3)
    if not targets:
        return
    nbytes = dense = zeros = elements = 0
    for fqn in targets:
        for layer in model.get_submodule(fqn).modules():  # one, or an experts module's many
            if not isinstance(layer, SparseLinear):
                continue
            sw = layer.sparse_weight
            m, k = sw.shape
            nbytes += sw.nbytes
            dense += m * k * torch.empty((), dtype=sw.dtype).element_size()
            zeros += m * k - sw.nnz
            elements += m * k
    if nbytes >= dense:
        advice = (
            "Prune the weights first (flashsparse.prune(weight, 0.5)) or set min_sparsity=0.5 "
            "to leave dense layers dense."
            if zeros / elements < 0.1
            else "tiled_csl is smaller than dense only above 50 % zeros; format='bitmap' "
            "(or 'auto') from about 10 %."
        )
        warnings.warn(
            f"sparsify_: the {len(targets)} converted layer(s) take {nbytes / dense:.2f}x their "
            f"dense size ({nbytes:,} vs {dense:,} bytes) at {zeros / elements:.1%} sparsity. "
            + advice,
            FlashsparseWarning,
            stacklevel=3,
        )
    notice_reference_path(model, stacklevel=4)


def notice_reference_path(model: nn.Module, stacklevel: int = 2) -> None:
    """Warn once per (format, device type, dtype) per process if ``model``'s
    :class:`SparseLinear` layers will run the slow reference path here (no kernel)."""
    from ..notices import warn_reference_path

    kinds: dict[tuple[str, torch.device, torch.dtype], int] = {}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            key = (
                module.kernel_format,
                module._buffers[module._components[0]].device,
                module.dtype,
            )
            kinds[key] = kinds.get(key, 0) + 1
    warn_reference_path(kinds, stacklevel=stacklevel + 1)


@dataclass(frozen=True)
class LayerSummary:
    """One :class:`SparseLinear` of a model: its compressed and its dense size."""

    name: str
    format: str
    shape: tuple[int, int]
    dtype: torch.dtype
    sparsity: float
    nbytes: int
    dense_nbytes: int
    #: For one rank's part of a tensor-parallel layer: which part (``name`` is the layer's,
    #: ``shape`` and the sizes are this rank's shard's); None for a whole layer.
    shard: str | None = None
    #: "int8" / "fp8" for quantized values (None otherwise) and the relative Frobenius error
    #: ``||W_dequantized - W|| / ||W||`` quantizing added (None where unknown, e.g. a layer
    #: read from a quantized checkpoint).
    quant: str | None = None
    quant_error: float | None = None


@dataclass(frozen=True)
class SparsifySummary:
    """What a model holds: its :class:`SparseLinear` layers and everything else.

    ``other_nbytes`` counts every other parameter and buffer once (embeddings, norms, the LM
    head, linears left dense, biases; a tied weight once), so ``model_nbytes`` is the model's
    size as it is and ``model_dense_nbytes`` what it would be with every layer dense again.
    """

    layers: tuple[LayerSummary, ...]
    dense_linear_layers: int
    other_nbytes: int
    #: Names of the projection-like weights stored dense (see :func:`dense_projections`; the LM
    #: head included); ``dense_linear_layers`` is their number.
    dense_projections: tuple[str, ...] = ()
    #: Under torch.distributed: this process's rank and the world size. Every size is then
    #: this rank's (its shards of tensor-parallel layers, its parts of other DTensors).
    rank: int = 0
    world_size: int = 1

    @property
    def sharded_layers(self) -> int:
        """Sparse layers of which this rank holds one shard (tensor parallelism)."""
        return sum(layer.shard is not None for layer in self.layers)

    @property
    def sparse_layers(self) -> int:
        return len(self.layers)

    @property
    def formats(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.format] = counts.get(layer.format, 0) + 1
        return counts

    @property
    def quant_errors(self) -> dict[str, float | None]:
        """Relative weight error quantization added, per quantized layer (None: unknown)."""
        return {layer.name: layer.quant_error for layer in self.layers if layer.quant}

    @property
    def linear_nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def linear_dense_nbytes(self) -> int:
        return sum(layer.dense_nbytes for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Zeros over elements across the sparse layers (0.0 if there are none)."""
        elements = sum(layer.shape[0] * layer.shape[1] for layer in self.layers)
        zeros = sum(layer.sparsity * layer.shape[0] * layer.shape[1] for layer in self.layers)
        return zeros / elements if elements else 0.0

    @property
    def model_nbytes(self) -> int:
        return self.other_nbytes + self.linear_nbytes

    @property
    def model_dense_nbytes(self) -> int:
        return self.other_nbytes + self.linear_dense_nbytes

    def as_dict(self) -> dict:
        return {
            "sparse_layers": self.sparse_layers,
            "dense_linear_layers": self.dense_linear_layers,
            "dense_projections": list(self.dense_projections),
            "formats": self.formats,
            "sparsity": self.sparsity,
            "linear_nbytes": self.linear_nbytes,
            "linear_dense_nbytes": self.linear_dense_nbytes,
            "other_nbytes": self.other_nbytes,
            "model_nbytes": self.model_nbytes,
            "model_dense_nbytes": self.model_dense_nbytes,
            "rank": self.rank,
            "world_size": self.world_size,
            "sharded_layers": self.sharded_layers,
            "quant": {
                layer.name: {"quant": layer.quant, "quant_error": layer.quant_error}
                for layer in self.layers
                if layer.quant
            },
        }

    def _quant_lines(self) -> list[str]:
        """Lines on the quantized layers: kinds and the weight error quantization added."""
        quantized = [layer for layer in self.layers if layer.quant]
        if not quantized:
            return []
        kinds: dict[str, int] = {}
        for layer in quantized:
            kinds[layer.quant] = kinds.get(layer.quant, 0) + 1
        known = sorted(
            (layer for layer in quantized if layer.quant_error is not None),
            key=lambda layer: layer.quant_error,
        )
        kinds_text = ", ".join(f"{q}: {n}" for q, n in sorted(kinds.items()))
        if not known:
            return [
                f"quantized:       {len(quantized)} layer(s) ({kinds_text}); weight error unknown"
            ]
        median = known[len(known) // 2].quant_error
        worst = ", ".join(f"{layer.name} {layer.quant_error:.2%}" for layer in known[::-1][:3])
        return [
            f"quantized:       {len(quantized)} layer(s) ({kinds_text}); relative weight error "
            f"added: median {median:.2%}, largest {worst}"
            + (f" ({len(quantized) - len(known)} unknown)" if len(known) < len(quantized) else "")
        ]

    def __str__(self) -> str:
        def mib(n: int) -> str:
            return f"{n / 2**20:,.2f} MiB"

        def ratio(a: int, b: int) -> str:
            return f"{a / b:.2f}x" if b else "n/a"

        formats = ", ".join(f"{name}: {n}" for name, n in sorted(self.formats.items())) or "none"
        return "\n".join(
            [
                f"sparse layers:   {self.sparse_layers} ({formats}); {self.dense_linear_layers} "
                "projection(s) left dense"
                + (
                    f" ({', '.join(self.dense_projections[:4])}"
                    + (", ..." if len(self.dense_projections) > 4 else "")
                    + ")"
                    if self.dense_projections
                    else ""
                ),
                f"sparse weights:  {mib(self.linear_dense_nbytes)} dense -> "
                f"{mib(self.linear_nbytes)} compressed "
                f"({ratio(self.linear_nbytes, self.linear_dense_nbytes)}) at "
                f"{self.sparsity:.1%} sparsity",
                f"whole model:     {mib(self.model_dense_nbytes)} dense -> "
                f"{mib(self.model_nbytes)} ({ratio(self.model_nbytes, self.model_dense_nbytes)})",
                *self._quant_lines(),
            ]
            + (
                [
                    f"per rank:        the sizes above are rank {self.rank} of {self.world_size}'s"
                    f" ({self.sharded_layers} of its sparse layers are tensor-parallel shards)"
                ]
                if self.world_size > 1
                else []
            )
        )


def sparsify_summary(model: nn.Module) -> SparsifySummary:
    """Layers converted and dense vs compressed bytes of ``model`` as it is now (for example
    right after :func:`sparsify_`, whose contract is to return the model itself)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = []
    component_ids: set[int] = set()
    shards = {  # tensor-parallel layers: their shard is summarised under the layer's name
        id(module.shard): (fqn, module.layout.describe())
        for fqn, module in model.named_modules()
        if isinstance(module, parallel.ShardedSparseLinear)
    }
    for fqn, module in model.named_modules():
        if isinstance(module, SparseLinear):
            sw = module.sparse_weight
            component_ids.update(id(t) for t in sw.tensors)
            m, k = sw.shape
            name, shard = shards.get(id(module), (fqn, None))
            layers.append(
                LayerSummary(
                    name,
                    sw.format,
                    (m, k),
                    sw.dtype,
                    sw.sparsity,
                    sw.nbytes,
                    m * k * torch.empty((), dtype=sw.dtype).element_size(),
                    shard,
                    sw.quant,
                    sw.quant_error,
                )
            )
    seen: set[int] = set()
    other = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in component_ids or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = parallel.local_tensor(tensor)  # a DTensor: this rank's part
        other += local.numel() * local.element_size()
    dense = tuple(dense_projections(model))
    rank, world = parallel.rank_and_world()
    return SparsifySummary(tuple(layers), len(dense), other, dense, rank, world)
