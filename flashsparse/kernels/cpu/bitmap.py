"""The CPU backend: the bitmap format's C++ kernels (``csrc/cpu/``) as the ``("bitmap", "cpu")``
kernel and the fast CPU decode behind ``Bitmap.to_dense`` and the backward pass.

Imported lazily by :mod:`flashsparse.backends`; importing it builds nothing. The first call
that needs the kernels JIT-builds ``csrc/bindings/*_cpu.cpp`` + ``csrc/cpu/*.cpp`` with the
system C++ compiler through :mod:`flashsparse.kernels.build` (cached; ~1 minute once), then
checks every SIMD path this CPU has against the vectorised torch decode (a prebuilt
``flashsparse._C_cpu`` from ``FLASHSPARSE_CPU=1 pip install --no-build-isolation -e .`` is
used instead when present, unless ``FLASHSPARSE_JIT=1``). Without a compiler
(or ninja), or if the build fails, :func:`unavailable_reason` says why:
``FLASHSPARSE_BACKEND=auto`` then warns once and runs the reference path, and
``FLASHSPARSE_BACKEND=cpu`` raises.

One extension holds every SIMD path (each source file is compiled for its own instruction
set); the path is chosen per call from the CPU's features, or forced with
``FLASHSPARSE_CPU_ISA`` = ``avx512`` (AVX-512 F/BW/VL/VBMI2/BF16), ``avx2``
(AVX2/FMA/F16C/BMI2), ``neon`` (any aarch64 CPU; BFDOT / FMLAL where it has FEAT_BF16 /
FEAT_FHM, see docs/backends/bitmap_neon.md) or ``scalar`` (any CPU) -- an unknown value or a
path this CPU lacks is an error. Threads follow ``torch.get_num_threads()``. The x86 paths and
their per-tile forms are described in docs/backends/bitmap_cpu.md.
"""

from __future__ import annotations

import os
import sys

import torch

from ... import backends
from .. import build

__all__ = ["ISAS", "KERNEL_DTYPES", "available_isas", "decode", "isa", "unavailable_reason"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISA_ENV = "FLASHSPARSE_CPU_ISA"
ISAS = {
    "scalar": 0,
    "avx2": 1,
    "avx512": 2,
    "neon": 3,  # aarch64 (never on the same CPU as the two above)
}  # op argument values, in order of preference (last best)


def openmp_flags() -> tuple[str, ...]:
    """Compiler and linker flags the CPU extension needs to run on torch's threads.

    Under torch's OpenMP backend, ``at::parallel_for`` is inline in ATen's headers and runs
    serially in a translation unit built without ``-fopenmp``. The libgomp it links resolves
    (by soname) to the copy torch has loaded, so the kernel shares torch's thread pool and
    follows ``torch.set_num_threads``. Other platforms/backends build without it (still correct).
    """
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ("-fopenmp",)
    return ()


OPENMP_FLAGS = openmp_flags()
EXTENSION = build.Extension(
    device="cpu",
    kernel_dir="cpu",
    kernel_suffix=".cpp",
    prebuilt="flashsparse._C_cpu",
    cflags=("-O3", *OPENMP_FLAGS),
    ldflags=OPENMP_FLAGS,
)

_isa_by_env: dict[str, int] = {}


def unavailable_reason() -> str | None:
    """Why the CPU kernels cannot run in this process (None: they can). Builds nothing."""
    if _state.error is not None:
        return _state.error
    if _state.loaded or EXTENSION.prebuilt_available():
        return None
    missing = EXTENSION.missing_sources()
    if missing:
        return missing
    if build.find_cxx() is None:
        return (
            f"no C++ compiler was found ({os.environ.get('CXX', 'c++')!r} is not on PATH; "
            "install g++ or clang++, or set CXX) to build the flashsparse CPU kernels"
        )
    if build.find_ninja() is None:
        return "ninja was not found (pip install ninja); it is needed to build the CPU kernels"
    return None


def available_isas() -> list[str]:
    """SIMD paths this CPU runs, worst first (needs the extension: call after a successful
    :func:`_available`)."""
    return [
        name for name, code in ISAS.items() if torch.ops.flashsparse._bitmap_cpu_isa_supported(code)
    ]


def isa() -> int:
    """The path for this call: ``FLASHSPARSE_CPU_ISA`` if set, else the best this CPU has."""
    value = backends.getenv(ISA_ENV, "")
    code = _isa_by_env.get(value)
    if code is None:
        name = value.strip().lower() or "auto"
        if name == "auto":
            code = ISAS[available_isas()[-1]]
        elif name not in ISAS:
            raise ValueError(f"{ISA_ENV} must be one of auto, {', '.join(ISAS)}; got {value!r}")
        elif name not in available_isas():
            raise ValueError(
                f"{ISA_ENV}={name}: this CPU lacks the instructions that path needs "
                f"(it runs: {', '.join(available_isas())})"
            )
        else:
            code = ISAS[name]
        _isa_by_env[value] = code
    return code


def _self_check() -> str | None:
    from ...formats import Bitmap

    g = torch.Generator().manual_seed(0)
    m, k = 70, 130  # partial tiles both ways
    w32 = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.6)
    w32[:64, :64] = torch.randn(64, 64, generator=g)  # a dense tile
    w32[:64, 64:128] = 0  # an empty tile
    x32 = torch.randn(3, k, generator=g)
    for name in available_isas():
        for dtype in KERNEL_DTYPES:
            w, x = w32.to(dtype), x32.to(dtype)
            tensors = Bitmap.encode(w).tensors
            dense = Bitmap.decode_reference(*tensors, m=m, k=k, dtype=dtype)
            ours = torch.ops.flashsparse._bitmap_decode_cpu(*tensors, m, k, ISAS[name])
            if not torch.equal(ours.view(torch.uint8), dense.view(torch.uint8)):  # bit-exact
                return f"the {name} CPU decode failed its self-check ({dtype})"
            tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
            for n in (1, 3):  # decode steps have kernels of their own
                ref = x[:n].double() @ w.double().T
                y = torch.ops.flashsparse._bitmap_spmm_cpu(x[:n], *tensors, m, k, None, ISAS[name])
                err = float((y.double() - ref).norm() / ref.norm())
                if not err < tol:
                    return f"the {name} CPU kernel failed its self-check ({dtype}, n={n}: relative error {err:.3g})"
    return None


def _register_fake() -> None:
    @torch.library.register_fake("flashsparse::_bitmap_spmm_cpu")
    def _(x, masks, values, tile_offsets, m, k, bias=None, isa=0, form=0):
        return x.new_empty((x.shape[0], m))

    @torch.library.register_fake("flashsparse::_bitmap_decode_cpu")
    def _(masks, values, tile_offsets, m, k, isa=0):
        return values.new_empty((m, k))


def _load() -> None:
    EXTENSION.load()
    _register_fake()


def _available() -> str | None:
    """Load or JIT-build the extension and self-check it, once per process."""
    reason = unavailable_reason()
    if reason or _state.loaded:
        return reason
    return _state()


_state = build.LoadOnce("flashsparse CPU extension", "CPU bitmap kernel", _load, _self_check)


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"the CPU bitmap kernel runs on CPU tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the CPU bitmap kernel takes float32, bfloat16 or float16, not {dtype}"
    return None


def bitmap_linear(
    x2d: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` for a contiguous ``[N, K]`` CPU x in the weight's dtype."""
    return torch.ops.flashsparse._bitmap_spmm_cpu(
        x2d, masks, values, tile_offsets, m, k, bias, isa()
    )


def decode(
    masks: torch.Tensor, values: torch.Tensor, tile_offsets: torch.Tensor, m: int, k: int
) -> torch.Tensor | None:
    """The dense weight via the C++ decode, or None where it cannot run (not a CPU tensor, the
    reference backend forced, or no extension) so the caller uses the torch decode."""
    if (
        masks.device.type != "cpu"
        or values.dtype not in KERNEL_DTYPES
        or os.environ.get(backends.ENV_VAR, "").strip().lower() == "reference"
        or _available() is not None
    ):
        return None
    return torch.ops.flashsparse._bitmap_decode_cpu(masks, values, tile_offsets, m, k, isa())


backends.register_kernel("bitmap", "cpu", bitmap_linear, supports=_supports, available=_available)
backends.register_decoder("bitmap", "cpu", decode)
