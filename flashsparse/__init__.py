"""flashsparse: Load-as-Sparse, Compute-as-Dense kernels for unstructured-sparse LLM weights."""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops  # noqa: F401  (defines torch.ops.flashsparse.*)
from .backends import BackendUnavailableError, available_backends
from .formats import Bitmap, SparseWeight, TiledCSL, encode
from .functional import linear
from .nn import SparseLinear, sparsify_
from .prune import prune

__all__ = [
    "BackendUnavailableError",
    "Bitmap",
    "SparseLinear",
    "SparseWeight",
    "TiledCSL",
    "__version__",
    "available_backends",
    "encode",
    "linear",
    "prune",
    "sparsify_",
]
