"""flashsparse: Load-as-Sparse, Compute-as-Dense kernels for unstructured-sparse LLM weights."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, ops_quant  # noqa: F401  (define torch.ops.flashsparse.*)
from .backends import BackendUnavailableError, available_backends
from .formats import Bitmap, QuantBitmap, SparseWeight, TiledCSL, encode
from .functional import linear
from .nn import SparseExperts, SparseLinear, SparsifySummary, sparsify_, sparsify_summary
from .notices import FlashsparseWarning, ReferencePathWarning
from .prune import prune
from .serialization import load_sparse, save_sparse

__all__ = [
    "BackendUnavailableError",
    "Bitmap",
    "FlashsparseWarning",
    "QuantBitmap",
    "ReferencePathWarning",
    "SparseExperts",
    "SparseLinear",
    "SparseWeight",
    "SparsifySummary",
    "TiledCSL",
    "__version__",
    "available_backends",
    "encode",
    "linear",
    "load_sparse",
    "prune",
    "save_sparse",
    "sparsify_",
    "sparsify_summary",
]
