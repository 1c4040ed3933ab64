"""Pure-Python install by default; FLASHSPARSE_CUDA=1 (with --no-build-isolation) also builds
the CUDA extension ``flashsparse._C`` from csrc/, and FLASHSPARSE_CPU=1 the CPU extension
``flashsparse._C_cpu`` (csrc/bindings/*_cpu.cpp + csrc/cpu/*.cpp). Without them, the first call
JIT-builds the same sources (flashsparse/kernels/build.py).

    FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e .
    FLASHSPARSE_CPU=1 pip install --no-build-isolation -e .
    FLASHSPARSE_CUDA=1 FLASHSPARSE_CUDA_ARCH_LIST="8.0;8.6;9.0a" pip install --no-build-isolation -e .

Arch list: FLASHSPARSE_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else "8.0;9.0a" (sm_80 or newer
only; "+PTX" adds PTX for newer GPUs). torch is imported only when FLASHSPARSE_CUDA=1.
"""

import os
import platform
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _fail(message: str) -> None:
    sys.exit(f"flashsparse setup.py (FLASHSPARSE_CUDA=1): {message}")


def _gencode_flags(arch_list: str) -> list:
    # Same rules as flashsparse.kernels.build.gencode_flags (setup.py cannot import the package: it
    # imports torch at the top level, and a build must not need the package installed).
    flags = []
    for arch in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.upper().endswith("+PTX")
        base = arch[:-4] if ptx else arch
        major, dot, minor = base.partition(".")
        if not dot or not major.isdigit() or not minor[:1].isdigit():
            _fail(f"CUDA arch must look like '8.0', '9.0a' or '8.6+PTX', got {arch!r}")
        if (int(major), int(minor[0])) < (8, 0):
            _fail(f"the Tiled-CSL kernel needs compute capability >= 8.0, got arch {arch!r}")
        code = major + minor
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    if not flags:
        _fail("the CUDA arch list is empty")
    return flags


# Same rule as flashsparse.kernels.build.ISA_ARCHS: a kernel source named for an instruction
# set compiles only on the architectures that have it.
_ISA_ARCHS = {
    "avx2": ("x86_64", "amd64", "i386", "i686"),
    "avx512": ("x86_64", "amd64"),
    "neon": ("aarch64", "arm64"),
}


def _builds_here(path: Path) -> bool:
    archs = _ISA_ARCHS.get(path.stem.rsplit("_", 1)[-1])
    return archs is None or platform.machine().lower() in archs


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cpu_extension() -> dict:
    if not _flag("FLASHSPARSE_CPU"):
        return {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "flashsparse setup.py (FLASHSPARSE_CPU=1): torch is not importable in the build "
            "environment; install torch first and pass --no-build-isolation"
        )
    import torch

    openmp = (
        ["-fopenmp"]
        if sys.platform.startswith("linux") and torch.backends.openmp.is_available()
        else []
    )
    # The same list as flashsparse.kernels.build.Extension.sources for device "cpu".
    glue = sorted((ROOT / "csrc" / "bindings").glob("*_cpu.cpp"))
    kernels = sorted(
        p
        for p in (ROOT / "csrc" / "cpu").glob("*.cpp")
        if not p.stem.endswith("_emulator") and _builds_here(p)
    )
    extension = cpp_extension.CppExtension(
        name="flashsparse._C_cpu",
        sources=[str(p.relative_to(ROOT)) for p in [*glue, *kernels]],
        include_dirs=[str(ROOT / "csrc")],
        # See flashsparse/kernels/cpu.py (openmp_flags): at::parallel_for needs it.
        extra_compile_args=["-O3", *openmp],
        extra_link_args=list(openmp),
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


def _cuda_extension() -> dict:
    if os.environ.get("FLASHSPARSE_CUDA", "").strip().lower() not in ("1", "true", "yes", "on"):
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _fail(
            "torch is not importable in the build environment; install a CUDA build of torch "
            "first and pass --no-build-isolation (pip builds in an isolated env without torch)"
        )
    if torch.version.cuda is None:
        _fail(f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch")
    home = cpp_extension.CUDA_HOME
    if not home or not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        _fail(
            f"no CUDA toolkit found (torch's CUDA_HOME is {home!r}); set CUDA_HOME to the "
            "toolkit root (the directory holding bin/nvcc and include/cuda_runtime_api.h)"
        )
    arch_list = (
        os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST")
        or os.environ.get("TORCH_CUDA_ARCH_LIST")
        or DEFAULT_ARCH_LIST
    )
    # The same list as flashsparse.kernels.build.Extension.sources for device "cuda".
    glue = sorted((ROOT / "csrc" / "bindings").glob("*_cuda.cpp"))
    kernels = sorted(
        p for p in (ROOT / "csrc" / "kernels").glob("*.cu") if not p.stem.endswith("_emulator")
    )
    sources = [str(p.relative_to(ROOT)) for p in [*glue, *kernels]]
    extension = cpp_extension.CUDAExtension(
        name="flashsparse._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo", *_gencode_flags(arch_list)],
        },
    )
    return {
        "ext_modules": [extension],
        "cmdclass": {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    }


def _extensions() -> dict:
    cuda, cpu = _cuda_extension(), _cpu_extension()
    if cuda and cpu:
        cuda["ext_modules"] += cpu["ext_modules"]
        return cuda
    return cuda or cpu


setup(**_extensions())
