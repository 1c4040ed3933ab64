"""Backend registry and per-call kernel selection.

Kernels are looked up by ``(format, backend)``. The reference backend lives in
``flashsparse.ops``; the Triton and CUDA backends live in modules that are imported lazily
(importing them may import triton or build an extension) and call :func:`register_kernel`
at import time.

``FLASHSPARSE_BACKEND`` is read on every call so tests and users can switch at run time:

* ``auto`` (default): the CUDA kernel where built and the format supports it, else Triton for
  CUDA tensors; the C++ CPU kernel for CPU tensors (bitmap); else the reference path. A failing
  CUDA or CPU build under ``auto`` warns once and falls back.
* ``reference`` | ``triton`` | ``cuda`` | ``cpu``: that backend or a :class:`BackendUnavailableError`;
  a forced backend never silently falls back.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "reference", "triton", "cuda", "cpu")
ENV_VAR = "FLASHSPARSE_BACKEND"

# Modules that register the kernels of a backend when imported.
_PROVIDERS = {
    "triton": "flashsparse.kernels.triton",
    "cuda": "flashsparse.kernels.cuda",
    "cpu": "flashsparse.kernels.cpu",
}
# Backends tried in order by ``auto`` for a device type; a failing build of a "warn" backend is
# reported once before falling back.
_AUTO_ORDER = {"cuda": ("cuda", "triton"), "cpu": ("cpu",)}
_WARN_ON_FAILURE = ("cuda", "cpu")


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot run this call (not installed, not built, or unsupported input)."""


@dataclass(frozen=True)
class Kernel:
    """A kernel for one format on one backend.

    ``fn(x2d, *weight_tensors, m, k, bias) -> y2d`` gets a contiguous ``[N, K]`` x (N >= 1) in
    the weight's dtype and returns a new ``[N, M]`` tensor in that dtype.
    ``supports(device, dtype) -> reason | None`` says why this kernel cannot take such an
    input; ``available() -> reason | None`` why it cannot run in this process at all (may be
    slow the first time, e.g. a JIT build; the provider caches it).
    """

    backend: str
    fn: Callable[..., torch.Tensor]
    supports: Callable[[torch.device, torch.dtype], str | None]
    available: Callable[[], str | None]


_KERNELS: dict[tuple[str, str], Kernel] = {}
# Grouped kernels (all experts' products in one launch) by (format, backend):
# ``fn(x2d, counts: list[int], weights: list[tuple of components], m, k, bias [E, m] | None)``.
_GROUPED: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}
# select() results by (format, FLASHSPARSE_BACKEND value, device type, dtype): the decision
# is made once, so the per-call cost is one environment read and one dict lookup.
_selected: dict[tuple, Kernel] = {}
# Fast decodes to dense by (format, device type): ``fn(*tensors, m, k) -> dense | None`` (None:
# cannot run now). Behind ``SparseWeight.to_dense``, the reference kernels and the backward pass.
_DECODERS: dict[tuple[str, str], Callable[..., torch.Tensor | None]] = {}
_provider_errors: dict[str, str] = {}
_warned: set[str] = set()


def getenv(name: str, default: str) -> str:
    """``os.environ.get(name, default)`` for the per-call reads of the kernel choice.

    ``os.environ.get`` encodes the key and decodes the value on every call (about 0.5 us; a
    decode step reads two variables per projection). ``os.environ`` keeps its encoded pairs in
    ``_data`` and updates them on every assignment, so reading that dict sees every change.
    """
    data = getattr(os.environ, "_data", None)
    if not isinstance(data, dict):
        return os.environ.get(name, default)
    key = _env_keys.get(name)
    if key is None:
        key = _env_keys[name] = os.environ.encodekey(name)
    raw = data.get(key)
    if raw is None:
        return default
    value = _env_values.get(raw)
    if value is None:
        if len(_env_values) > 64:
            _env_values.clear()
        value = _env_values[raw] = os.environ.decodevalue(raw)
    return value


_env_keys: dict[str, object] = {}
_env_values: dict[object, str] = {}


def register_kernel(
    format: str,
    backend: str,
    fn: Callable[..., torch.Tensor],
    *,
    supports: Callable[[torch.device, torch.dtype], str | None],
    available: Callable[[], str | None] = lambda: None,
) -> None:
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _KERNELS[(format, backend)] = Kernel(backend, fn, supports, available)
    _selected.clear()


def register_decoder(format: str, device_type: str, fn: Callable[..., torch.Tensor | None]) -> None:
    """A decode of ``format`` to dense for tensors on ``device_type`` that beats the format's torch
    decode; it returns None when it cannot run (then the torch decode runs)."""
    _DECODERS[(format, device_type)] = fn


def decode(
    format_cls: type, tensors: tuple | list, m: int, k: int, dtype: torch.dtype
) -> torch.Tensor:
    """The dense ``[m, k]`` weight: a registered fast decode for the tensors' device where one
    runs (never under ``FLASHSPARSE_BACKEND=reference``), else the format's own torch decode."""
    device_type = tensors[0].device.type
    if device_type in _PROVIDERS and requested_backend() != "reference":
        _load_provider(device_type)
        # A quantized format's decoders are keyed by its op key (QuantBitmap: "bitmap_quant").
        fn = _DECODERS.get((getattr(format_cls, "op_format", format_cls.format), device_type))
        dense = fn(*tensors, m, k) if fn is not None else None
        if dense is not None:
            return dense.to(dtype)
    return format_cls.decode(*tensors, m=m, k=k, dtype=dtype)


def register_grouped_kernel(format: str, backend: str, fn: Callable[..., torch.Tensor]) -> None:
    """A kernel that runs E weights of one format and shape in one launch (MoE experts); the
    backend's plain kernel for ``format`` must be registered too (it decides availability)."""
    _GROUPED[(format, backend)] = fn


def select_grouped(format: str, x: torch.Tensor) -> Callable[..., torch.Tensor] | None:
    """The grouped kernel for ``format`` and input ``x`` under the current ``FLASHSPARSE_BACKEND``,
    or None (then the caller runs the groups one by one through :func:`select`). The selected
    backend's own grouped kernel if it has one; under ``auto`` on a GPU, also any available
    backend's (one launch beats one launch per expert at decode-time token counts)."""
    kernel = select(format, x)
    fn = _GROUPED.get((format, kernel.backend))
    if fn is not None or requested_backend() != "auto" or x.device.type != "cuda":
        return fn
    for backend in _AUTO_ORDER.get(x.device.type, ()):
        if (format, backend) in _GROUPED and _resolve(format, backend, x.device, x.dtype)[
            0
        ] is not None:
            return _GROUPED[(format, backend)]
    return None


def _load_provider(backend: str) -> str | None:
    """Import the module that registers ``backend``'s kernels; return why it failed, if it did."""
    if backend not in _PROVIDERS:
        return None
    if backend not in _provider_errors:
        try:
            importlib.import_module(_PROVIDERS[backend])
            _provider_errors[backend] = ""
        except Exception as exc:  # ImportError, or a provider refusing this environment
            _provider_errors[backend] = f"{type(exc).__name__}: {exc}"
    return _provider_errors[backend] or None


def requested_backend() -> str:
    name = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


def _resolve(
    format: str, backend: str, device: torch.device, dtype: torch.dtype, *, build: bool = True
) -> tuple[Kernel | None, str | None, bool]:
    """``(kernel, None, _)`` if ``backend`` can run, else ``(None, reason, broken)`` where
    ``broken`` means the input is supported but the backend itself failed to come up."""
    reason = _load_provider(backend)
    if reason:
        return None, f"the {backend} backend failed to load ({reason})", True
    kernel = _KERNELS.get((format, backend))
    if kernel is None:
        return None, f"the {backend} backend has no kernel for the {format!r} format", False
    reason = kernel.supports(device, dtype)
    if reason:
        return None, reason, False
    if build:
        reason = kernel.available()
        if reason:
            return None, reason, True
    return kernel, None, False


def select(format: str, x: torch.Tensor) -> Kernel:
    """The kernel that runs ``format`` for input ``x`` under the current ``FLASHSPARSE_BACKEND``."""
    name = getenv(ENV_VAR, "auto")
    key = (format, name, x.device.type, x.dtype)
    kernel = _selected.get(key)
    if kernel is None:
        kernel = _select(format, requested_backend(), x.device, x.dtype)
        _selected[key] = kernel
    return kernel


def _select(
    format: str, name: str, device: torch.device, dtype: torch.dtype, *, build: bool = True
) -> Kernel:
    """``build=False`` predicts the choice without building anything (a kernel that would
    still have to build or self-check counts as chosen)."""
    if name == "reference":
        return _KERNELS[(format, "reference")]
    if name != "auto":
        kernel, reason, _ = _resolve(format, name, device, dtype, build=build)
        if kernel is None:
            raise BackendUnavailableError(
                f"{ENV_VAR}={name} cannot run format {format!r} on a {device.type} "
                f"{dtype} input: {reason}"
            )
        return kernel
    for backend in _AUTO_ORDER.get(device.type, ()):
        kernel, reason, broken = _resolve(format, backend, device, dtype, build=build)
        if kernel is not None:
            return kernel
        if broken and backend in _WARN_ON_FAILURE and backend not in _warned:
            _warned.add(backend)
            fallback = "the next backend" if device.type == "cuda" else "the slow reference path"
            warnings.warn(
                f"flashsparse: {reason}; falling back to {fallback} "
                f"(set {ENV_VAR}={backend} to make this an error)",
                RuntimeWarning,
                stacklevel=4,
            )
    return _KERNELS[(format, "reference")]


def has_fast_kernel(format: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the current backend setting would run ``format`` on ``device``/``dtype`` with a
    kernel that reads the compressed weight (used by ``format="auto"``). Builds nothing."""
    name = requested_backend()
    if name == "reference" or device.type not in _AUTO_ORDER:
        return True  # every format runs alike there
    candidates = _AUTO_ORDER[device.type] if name == "auto" else (name,)
    return any(_resolve(format, b, device, dtype, build=False)[0] for b in candidates)


def available_backends() -> list[str]:
    """Backends that can run in this process, e.g. ``["reference", "triton", "cuda"]``."""
    return [name for name, reason in backend_report().items() if reason is None]


def backend_report() -> dict[str, str | None]:
    """``{backend: None if usable else the reason it is not}``, without building anything."""
    report: dict[str, str | None] = {"reference": None}
    for backend in ("triton", "cuda", "cpu"):
        reason = _load_provider(backend)
        if reason:
            report[backend] = reason
            continue
        probe = getattr(importlib.import_module(_PROVIDERS[backend]), "unavailable_reason", None)
        report[backend] = probe() if probe else f"no {backend} kernels are registered"
    return report
