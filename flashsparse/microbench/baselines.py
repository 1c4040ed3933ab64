"""What a user would run instead of flashsparse, prepared for timing.

Each ``prepare_*`` returns a :class:`Prepared` (or :class:`Skipped` with the reason it cannot
run here). A ``Prepared`` holds enough copies of its weight to rotate through (see
``timing.rotation_count``), the dense weight whose product is the right answer, and the bytes
one call must read for the weight.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .timing import Rotation, rotation_count


@dataclass
class Prepared:
    method: str  # "dense", "csr", "2:4", or a flashsparse format
    backend: str  # what executes it, e.g. "cublas", "cusparse", "cuda", "reference"
    weight_bytes: int  # bytes of one weight copy that a call reads
    reference_weight: torch.Tensor  # y must equal x @ reference_weight.T
    rotation: Rotation
    call: Callable[[torch.Tensor, object], torch.Tensor]  # (x, one weight copy) -> y
    # Quantized methods: ||W_dequantized - W|| / ||W|| (reference_weight is the dequantized W).
    quant_error: float | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(x, self.rotation.next())


@dataclass
class Skipped:
    """A method that does not run: ``status`` is ``"skipped"`` (cannot run here) or
    ``"error"`` (it should have run but preparing it failed)."""

    method: str
    backend: str
    reason: str
    status: str = "skipped"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def dense_backend(device: torch.device) -> str:
    return "cublas" if device.type == "cuda" else "torch-cpu"


def prepare_dense(w: torch.Tensor, cache: int) -> Prepared:
    """``F.linear`` on the dense weight (cuBLAS on a GPU)."""
    nbytes = w.numel() * w.element_size()
    copies = [w] + [w.clone() for _ in range(rotation_count(nbytes, cache) - 1)]
    return Prepared(
        "dense", dense_backend(w.device), nbytes, w, Rotation(copies), lambda x, wc: F.linear(x, wc)
    )


def _csr_bytes(c: torch.Tensor) -> int:
    parts = (c.values(), c.col_indices(), c.crow_indices())
    return sum(t.numel() * t.element_size() for t in parts)


def prepare_csr(w: torch.Tensor, cache: int) -> Prepared | Skipped:
    """``torch.sparse`` CSR (cuSPARSE SpMM on a GPU): ``y = (W @ x^T)^T``, with 32-bit indices
    (less to read) where torch takes them, else torch's default 64-bit ones."""
    backend = "cusparse" if w.device.type == "cuda" else "torch-cpu"
    probe = torch.ones(1, w.shape[1], dtype=w.dtype, device=w.device)
    failure: Exception | None = None
    c = None
    with warnings.catch_warnings():
        # "Sparse CSR tensor support is in beta state": known, and not the user's concern here.
        warnings.simplefilter("ignore", UserWarning)
        for index_dtype in (torch.int32, torch.int64):
            try:
                c64 = w.to_sparse_csr()
                c = torch.sparse_csr_tensor(
                    c64.crow_indices().to(index_dtype),
                    c64.col_indices().to(index_dtype),
                    c64.values(),
                    w.shape,
                    check_invariants=False,
                )
                del c64
                torch.sparse.mm(c, probe.t())
                break
            except Exception as exc:  # e.g. no Half kernel for CSR on this device
                failure, c = exc, None
    if c is None:
        reason = f"torch.sparse CSR cannot run {w.dtype} on {w.device.type}: {_first_line(failure)}"
        return Skipped("csr", backend, reason)
    nbytes = _csr_bytes(c)
    copies = [c] + [c.clone() for _ in range(rotation_count(nbytes, cache) - 1)]
    return Prepared(
        "csr", backend, nbytes, w, Rotation(copies), lambda x, cc: torch.sparse.mm(cc, x.t()).t()
    )


def semi_structured_bytes(m: int, k: int, element_size: int) -> int:
    """Bytes a 2:4 kernel reads: half the values plus 2 bits of metadata per kept value."""
    return m * k // 2 * element_size + m * k // 8


def semi_structured_unavailable_reason(
    device: torch.device, dtype: torch.dtype, k: int
) -> str | None:
    if device.type != "cuda":
        return "torch's 2:4 semi-structured kernels need a CUDA GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"2:4 semi-structured needs compute capability 8.0 or newer, this GPU is sm_{major}{minor}"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 semi-structured is benchmarked for fp16/bf16 only, not {dtype}"
    if k % 4:
        return f"2:4 needs K divisible by 4, got K={k}"
    return None


def prepare_semi_structured(w24: torch.Tensor, cache: int) -> Prepared | Skipped:
    """``F.linear`` on ``torch.sparse.to_sparse_semi_structured(w24)`` (cuSPARSELt or CUTLASS);
    ``w24`` must already follow the 2:4 pattern (``masks.prune_2_4``)."""
    reason = semi_structured_unavailable_reason(w24.device, w24.dtype, w24.shape[1])
    if reason:
        return Skipped("2:4", "torch-2:4", reason)
    try:
        from torch.sparse import to_sparse_semi_structured

        first = to_sparse_semi_structured(w24)
        backend = (
            type(first).__name__.replace("SparseSemiStructuredTensor", "").lower() or "torch-2:4"
        )
        F.linear(torch.ones(1, w24.shape[1], dtype=w24.dtype, device=w24.device), first)
        nbytes = semi_structured_bytes(*w24.shape, w24.element_size())
        copies = [first] + [
            to_sparse_semi_structured(w24.clone()) for _ in range(rotation_count(nbytes, cache) - 1)
        ]
    except Exception as exc:  # shape or dtype constraints of the installed torch/GPU
        return Skipped("2:4", "torch-2:4", f"torch 2:4 semi-structured failed: {_first_line(exc)}")
    return Prepared("2:4", backend, nbytes, w24, Rotation(copies), lambda x, wc: F.linear(x, wc))


# -- structured slicing (SliceGPT-style) --------------------------------------------------------
SLICED_METHODS = ("sliced-out", "sliced-in")


def kept(size: int, sparsity: float) -> int:
    """Rows (or columns) a structured method keeps to store the same number of weights as an
    unstructured layer at ``sparsity``: the nearest integer to ``(1 - sparsity) * size``, at
    least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return max(1, round((1.0 - sparsity) * size))


def sliced_variants(m: int, k: int, sparsity: float) -> list[tuple[str, int, int]]:
    """``(method, rows, columns)`` of the sliced weights for an ``m x k`` layer at ``sparsity``:
    ``sliced-out`` keeps output rows, ``sliced-in`` keeps input columns. ``sliced-in`` is left
    out only where its weight has the same shape as ``sliced-out``'s (nothing new to time)."""
    out = [("sliced-out", kept(m, sparsity), k)]
    k_in = kept(k, sparsity)
    if (m, k_in) != out[0][1:]:
        out.append(("sliced-in", m, k_in))
    return out


def prepare_sliced(w: torch.Tensor, method: str, rows: int, cols: int, cache: int) -> Prepared:
    """``F.linear`` on the leading ``rows x cols`` block of ``w``, as a dense contiguous weight:
    the fastest any structured method storing that many weights can run here. For ``sliced-in``
    the caller passes an ``x`` of ``cols`` features (the sliced model's activations are
    narrower); the reference is the same sliced problem."""
    if method not in SLICED_METHODS:
        raise ValueError(f"method must be one of {', '.join(SLICED_METHODS)}, got {method!r}")
    m, k = w.shape
    if not (1 <= rows <= m and 1 <= cols <= k):
        raise ValueError(f"rows x cols must fit in the {m}x{k} weight, got {rows}x{cols}")
    ws = w[:rows, :cols].contiguous()
    nbytes = ws.numel() * ws.element_size()
    copies = [ws] + [ws.clone() for _ in range(rotation_count(nbytes, cache) - 1)]
    return Prepared(
        method, dense_backend(w.device), nbytes, ws, Rotation(copies), lambda x, wc: F.linear(x, wc)
    )
