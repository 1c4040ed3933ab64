"""Sparse modules and the model transform.

* :mod:`.linear`: :class:`SparseLinear`, a drop-in ``nn.Linear`` (also built from a
  transformers ``Conv1D``);
* :mod:`.experts`: :class:`SparseExperts`, a drop-in for transformers' fused MoE experts;
* :mod:`.sparsify`: :func:`sparsify_`, :func:`sparsify_summary` and the model-family helpers.
"""

from __future__ import annotations

from .experts import SparseExperts, is_fused_experts
from .linear import SparseLinear, is_conv1d, linear_features
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
