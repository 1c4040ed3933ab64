"""The one CUDA extension behind every CUDA kernel, and the per-kernel self-check gate.

The compiled ops come from :mod:`flashsparse.kernels.build`: a prebuilt ``flashsparse._C``, else
a JIT build of ``csrc/bindings/*_cuda.cpp`` + ``csrc/kernels/*.cu`` for the running GPU's
architecture only (``FLASHSPARSE_CUDA_ARCH_LIST``, e.g. ``"8.0;9.0a"``, overrides it). The
extension is loaded once per process; a build error is kept and reported as the reason every
CUDA kernel is unavailable.

Each kernel then checks itself against the float64 reference on small problems before its
first use (:class:`SelfCheckedKernel`), independently of the other kernels: one kernel failing
its check does not switch another one off. Loading and self-checking synchronise the device, so
they cannot happen inside a CUDA-graph capture; a first call made during a capture raises a
RuntimeError saying so (and caches nothing, so a warm-up call outside the capture still works).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .. import build
from ..build import gencode_flags

__all__ = [
    "EXTENSION",
    "KERNEL_DTYPES",
    "MIN_CAPABILITY",
    "SelfCheckedKernel",
    "capturing",
    "gencode_flags",
    "jit_options",
    "kernel_sources",
    "unavailable_reason",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = build.MIN_CUDA_CAPABILITY

EXTENSION = build.Extension(
    device="cuda", kernel_dir="kernels", kernel_suffix=".cu", prebuilt="flashsparse._C"
)

# Run after the extension is loaded (e.g. fake-tensor registrations of each kernel's op).
_after_load: list[Callable[[], None]] = []


def after_load(fn: Callable[[], None]) -> None:
    """Call ``fn`` once the extension's ops exist (each kernel module registers its fakes)."""
    _after_load.append(fn)


def kernel_sources(csrc: Path = build.CSRC) -> list[Path]:
    """The extension's sources: the torch glue (``csrc/bindings/*_cuda.cpp``) and every kernel
    translation unit."""
    return EXTENSION.sources(csrc)


def _jit_arch_list() -> str:
    env = os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    major, minor = torch.cuda.get_device_capability()
    # sm_90a lets a future wgmma path exist; the mma.sync kernels run the same either way.
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def jit_options() -> dict:
    """The builder's arguments for a JIT build (the running GPU's arch, or
    ``FLASHSPARSE_CUDA_ARCH_LIST``); also used by ``flashsparse build`` and ``info``."""
    flags = gencode_flags(_jit_arch_list())
    tag = f"cu{torch.version.cuda}-" + "_".join(f.rsplit("=", 1)[-1] for f in flags)
    return {"extra_cuda_cflags": flags, "tag": tag}


def _load() -> None:
    """Make the compiled CUDA ops exist (prebuilt, else JIT for the running GPU)."""
    EXTENSION.load(**jit_options())
    for fn in _after_load:
        fn()


_state = build.LoadOnce("flashsparse CUDA extension", "CUDA extension", _load, lambda: None)


def unavailable_reason() -> str | None:
    """Why no CUDA kernel can run in this process (None: the extension can be loaded).
    Builds nothing."""
    if _state.error is not None:
        return _state.error
    if torch.version.cuda is None:
        return (
            "torch is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"the CUDA kernels need compute capability 8.0 or newer (sm_80); "
            f"{torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}"
        )
    if _state.loaded or EXTENSION.prebuilt_available():
        return None
    missing = EXTENSION.missing_sources()
    if missing:
        return (
            f"{missing}, and no prebuilt flashsparse._C exists "
            "(FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e . builds one)"
        )
    if build.find_nvcc() is None:
        return (
            "nvcc was not found (set CUDA_HOME or put nvcc on PATH) and no prebuilt flashsparse._C "
            "exists (FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e . builds one)"
        )
    if build.find_ninja() is None:
        return "ninja was not found (pip install ninja); it is needed to JIT-build the CUDA kernels"
    return None


def capturing(device_index: int) -> bool:
    """Whether the current stream of CUDA device ``device_index`` is capturing a CUDA graph."""
    if device_index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device_index):
        return torch.cuda.is_current_stream_capturing()


def supports_reason(kernel: str, device: torch.device, dtype: torch.dtype, fp32: str) -> str | None:
    """Why ``kernel`` cannot take a ``device``/``dtype`` input (``fp32``: who runs fp32)."""
    if device.type != "cuda":
        return f"the {kernel} runs on CUDA tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the {kernel} takes float16 or bfloat16 weights, not {dtype} ({fp32})"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"the {kernel} needs compute capability 8.0 or newer; {device} is older"
    return None


_PENDING = object()


class SelfCheckedKernel:
    """One kernel's gate: the extension loads, then the kernel passes ``check`` (a float64
    comparison on small problems; returns None or why not) once per process. The outcome is
    kept; a call during a CUDA-graph capture before the outcome exists raises instead."""

    def __init__(self, kernel: str, check: Callable[[], str | None]) -> None:
        self.kernel = kernel
        self._check = check
        self._result: object = _PENDING
        self._lock = threading.Lock()

    @property
    def passed(self) -> bool:
        return self._result is None

    def __call__(self) -> str | None:
        result = self._result
        if result is not _PENDING:
            return result  # type: ignore[return-value]
        reason = unavailable_reason()
        if reason:
            return reason
        if torch.cuda.is_current_stream_capturing():
            # Building, self-checking (device syncs) and allocating would invalidate the capture.
            raise RuntimeError(
                f"the first call of the {self.kernel} in this process happened inside a "
                "CUDA-graph capture; it must load the CUDA extension and self-check the kernel "
                "first, which cannot be captured. Run the model once before capturing (a "
                "warm-up call)."
            )
        reason = _state()
        if reason:
            return reason
        with self._lock:
            if self._result is _PENDING:
                try:
                    self._result = self._check()
                except Exception as exc:
                    self._result = (
                        f"the {self.kernel} failed to run its self-check "
                        f"({type(exc).__name__}: {exc})"
                    )
        return self._result  # type: ignore[return-value]


def self_check_weight(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    """A self-check weight: ~30 % dense with a 100 %-dense tile, an empty tile and a dense
    column (the cases where tile-level bookkeeping goes wrong)."""
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.7)
    w[: min(m, 128), : min(k, 64)] = torch.randn(min(m, 128), min(k, 64), generator=g)
    if k > 64:
        w[: min(m, 128), 64 : min(k, 128)] = 0
    w[:, k // 2] = torch.randn(m, generator=g)
    return w
