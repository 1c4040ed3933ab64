"""Warnings flashsparse gives when it does something the user may not expect.

Every one is a :class:`FlashsparseWarning`, so ``warnings.filterwarnings("ignore",
category=flashsparse.FlashsparseWarning)`` silences them all; the reference-path notice has
its own subclass because a CPU user may want only that one gone.
"""

from __future__ import annotations

import warnings

import torch


class FlashsparseWarning(UserWarning):
    """Base class of flashsparse's warnings (nothing converted, larger than dense, ...)."""


class ReferencePathWarning(FlashsparseWarning):
    """Sparse layers will run the reference path (decode, then dense ``F.linear``): no kernel."""


# Keys of the notices already given in this process: each is given once.
_given: set[tuple] = set()


def warn_once(
    key: tuple, message: str, category: type[Warning] = FlashsparseWarning, stacklevel: int = 2
) -> bool:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process (``stacklevel``
    as for ``warnings.warn`` called where ``warn_once`` is)."""
    if key in _given:
        return False
    _given.add(key)
    warnings.warn(message, category, stacklevel=stacklevel)
    return True


def reference_path_reason(format: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``format`` weights on ``device``/``dtype`` would run the slow reference path under the
    current ``FLASHSPARSE_BACKEND`` (None: a kernel runs them, or the user asked for the
    reference path, or a forced backend will raise its own clear error on the first call).

    Decided by the backend selection itself (without building anything), so a new kernel
    backend -- a CPU one, say -- silences this notice wherever it is picked.
    """
    from . import backends

    try:
        name = backends.requested_backend()
    except ValueError:
        return None  # the first call raises the ValueError that names the bad value
    if name == "reference":
        return None
    try:
        kernel = backends._select(format, name, torch.device(device), dtype, build=False)
    except backends.BackendUnavailableError:
        return None
    if kernel.backend != "reference":
        return None
    if torch.device(device).type == "cuda":
        return (
            f"no {format} kernel runs {dtype} weights on this GPU "
            f"(`flashsparse info` says which backends are available and why not)"
        )
    if torch.device(device).type == "cpu" and format not in ("bitmap", "bitmap_quant"):
        return (
            "on a CPU only the bitmap format has a kernel (the C++ CPU backend): encode "
            "with format='bitmap' or 'auto'"
        )
    if torch.device(device).type == "cpu":
        return (
            "the C++ CPU kernel is not available here (`flashsparse info` says why: usually "
            "no C++ compiler)"
        )
    return (
        f"flashsparse's kernels run on CUDA GPUs and CPUs; on {torch.device(device).type} "
        "every format runs the reference path"
    )


def warn_reference_path(
    layers: dict[tuple[str, torch.device, torch.dtype], int], stacklevel: int = 2
) -> None:
    """One notice per (format, device type, dtype) per process for layers that will run the
    reference path; ``layers`` counts the layers of each kind."""
    for (format, device, dtype), count in layers.items():
        reason = reference_path_reason(format, device, dtype)
        if reason is None:
            continue
        warn_once(
            ("reference-path", format, torch.device(device).type, dtype),
            f"flashsparse: {count} {format} layer(s) with {str(dtype).replace('torch.', '')} "
            f"weights on {device} will run the reference path (each call decodes the weight to "
            f"dense, then F.linear: slower than nn.Linear): {reason}. "
            "On a CUDA GPU the CUDA kernels (fp16/bf16) and Triton (bitmap) run them.",
            ReferencePathWarning,
            stacklevel=stacklevel + 1,
        )
