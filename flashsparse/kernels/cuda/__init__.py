"""The CUDA backend: torch-free kernels in ``csrc/kernels/``, torch glue in
``csrc/bindings/*_cuda.cpp``, one compiled extension for all of them (:mod:`.extension`).

One module per kernel registers it with :mod:`flashsparse.backends` when imported:
:mod:`.tiled_csl` (Flash-LLM's Tiled-CSL SpMM, ``("tiled_csl", "cuda")``) and :mod:`.bitmap`
(the decode-in-registers bitmap SpMM, ``("bitmap", "cuda")``); :mod:`.launch` holds the
split-K arithmetic they share. Importing this package builds nothing.

Before its first use a kernel loads (or JIT-builds) the extension once per process and checks
itself against a float64 reference on small problems (:class:`.extension.SelfCheckedKernel`).
A build error or a failed check is reported as the reason the kernel is unavailable, so
``FLASHSPARSE_BACKEND=auto`` falls back with one warning and ``FLASHSPARSE_BACKEND=cuda``
raises it. That first use synchronises the device, so it must happen outside a CUDA-graph
capture: a first call during a capture raises a RuntimeError saying so.

A new CUDA kernel adds its torch-free sources under ``csrc/kernels/``, its glue as
``csrc/bindings/<kernel>_cuda.cpp``, a module here with its launch plan, self-check and one
``backends.register_kernel`` line, and an import below.

Environment knobs: ``FLASHSPARSE_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0a"``; default: the current
GPU), plus the builder's (``FLASHSPARSE_VERBOSE_BUILD``, ``FLASHSPARSE_CACHE_DIR``,
``FLASHSPARSE_JIT``).
"""

from __future__ import annotations

from . import bitmap, launch, tiled_csl
from .extension import EXTENSION, jit_options, unavailable_reason

__all__ = [
    "EXTENSION",
    "available",
    "bitmap",
    "jit_options",
    "launch",
    "tiled_csl",
    "unavailable_reason",
]


def available() -> str | None:
    """Load (or build) the extension and self-check every CUDA kernel, as their first calls
    would; None if all passed, else the first reason one cannot run."""
    for kernel in (tiled_csl, bitmap):
        reason = kernel.available()
        if reason:
            return reason
    return None
