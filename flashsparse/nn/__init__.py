"""Sparse modules and the model transform.

* :mod:`.linear`: :class:`SparseLinear`, a drop-in ``nn.Linear`` (also built from a
  transformers ``Conv1D``);
* :mod:`.experts`: :class:`SparseExperts`, a drop-in for transformers' fused MoE experts;
* :mod:`.sparsify`: :func:`sparsify_`, :func:`sparsify_summary` and the model-family helpers;
* :mod:`.parallel`: :class:`ShardedSparseLinear`, one rank's block of a tensor-parallel linear.
"""

from __future__ import annotations

from .experts import SparseExperts, is_fused_experts
from .linear import SparseLinear, is_conv1d, linear_features
from .parallel import ShardedSparseLinear
from .sparsify import (
    LayerSummary,
    SparsifySummary,
    default_skipped_linears,
    dense_projections,
    is_transformers_model,
    notice_reference_path,
    sparsify_,
    sparsify_summary,
)

__all__ = [
    "LayerSummary",
    "ShardedSparseLinear",
    "SparseExperts",
    "SparseLinear",
    "SparsifySummary",
    "default_skipped_linears",
    "dense_projections",
    "is_conv1d",
    "is_fused_experts",
    "is_transformers_model",
    "linear_features",
    "notice_reference_path",
    "sparsify_",
    "sparsify_summary",
]
