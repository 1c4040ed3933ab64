"""The one builder for every compiled flashsparse extension (CUDA and CPU C++).

An extension is a set of torch-glue sources (``csrc/bindings/<kernel>_<device>.cpp``) plus
torch-free kernel sources (``csrc/kernels/*.cu`` for CUDA, ``csrc/cpu/*.cpp`` for CPUs). It
comes from, in order:

1. a prebuilt module inside the package (``flashsparse._C`` for CUDA, ``flashsparse._C_cpu`` for
   the CPU kernels with ``FLASHSPARSE_CPU=1``; CUDA built by
   ``FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e .``), unless
   ``FLASHSPARSE_JIT=1`` (or the older ``FLASHSPARSE_CUDA_JIT=1``) asks to ignore it;
2. a JIT build with :func:`torch.utils.cpp_extension.load` (ninja + the system compiler, and
   nvcc for CUDA), cached under
   ``$FLASHSPARSE_CACHE_DIR/<torch version>/<device tag>/<source hash>``
   (default ``~/.cache/flashsparse``), so a second process loads it in milliseconds and an
   edited source gets a new directory.

Environment knobs shared by every extension: ``FLASHSPARSE_CACHE_DIR``,
``FLASHSPARSE_VERBOSE_BUILD=1`` (show the compiler), ``FLASHSPARSE_JIT=1``; for CUDA also
``FLASHSPARSE_CUDA_ARCH_LIST`` and ``CUDA_HOME``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import shutil
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
MIN_CUDA_CAPABILITY = (8, 0)  # cp.async, ldmatrix, mma.sync m16n8k16 with bf16


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    env = os.environ.get("FLASHSPARSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flashsparse"


def tail(text: str, limit: int = 4000) -> str:
    """The end of a long compiler log (where the error usually is)."""
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    # pip's ninja lives next to the interpreter of an un-activated virtual environment.
    beside = os.path.join(os.path.dirname(sys.executable), "ninja")
    return beside if os.path.isfile(beside) else None


def find_cxx() -> str | None:
    """The C++ compiler torch's extension builder will use (``$CXX``, else ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cuda_home() -> str | None:
    """The CUDA toolkit root: the first candidate with both nvcc and the runtime headers (an
    ``nvcc`` on PATH may be a wrapper script outside the toolkit, e.g. /usr/local/bin/nvcc)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if (
            root
            and os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))
        ):
            return root
    return None


def find_nvcc() -> str | None:
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _parse_arch(arch: str) -> tuple[str, bool]:
    """``"9.0a+PTX"`` -> (``"90a"``, True)."""
    arch = arch.strip()
    ptx = arch.upper().endswith("+PTX")
    if ptx:
        arch = arch[:-4]
    major, dot, minor = arch.partition(".")
    if not dot or not major.isdigit() or not minor[:1].isdigit():
        raise ValueError(f"CUDA arch must look like '8.0', '9.0a' or '8.6+PTX', got {arch!r}")
    if (int(major), int(minor[0])) < MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"flashsparse's CUDA kernels need compute capability >= 8.0, got arch {arch!r}"
        )
    return major + minor, ptx


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc ``-gencode`` flags for an arch list such as ``"8.0;9.0a"`` (``;``, ``,`` or spaces)."""
    archs = [a for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs:
        raise ValueError("the CUDA arch list is empty")
    flags = []
    for arch in archs:
        code, ptx = _parse_arch(arch)
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


# Kernel sources named for an instruction set (``<kernel>_<isa>.<ext>``) compile only on the
# architectures that have it; setup.py applies the same rule to its copy of the list.
ISA_ARCHS = {
    "avx2": ("x86_64", "amd64", "i386", "i686"),
    "avx512": ("x86_64", "amd64"),
    "neon": ("aarch64", "arm64"),
}


def builds_on(path: Path, machine: str | None = None) -> bool:
    """Whether the kernel source ``path`` is compiled for ``machine`` (default: this one)."""
    archs = ISA_ARCHS.get(path.stem.rsplit("_", 1)[-1])
    return archs is None or (machine or platform.machine()).lower() in archs


@dataclass(frozen=True)
class Extension:
    """What to compile for one device: glue sources matching ``bindings/*_<device>.cpp`` and
    kernel sources ``<kernel_dir>/*<kernel_suffix>`` (emulators, ``*_emulator.*``, are test
    tools with their own ``main`` and never part of an extension)."""

    device: str  # "cuda" | "cpu"
    kernel_dir: str  # under csrc/
    kernel_suffix: str  # ".cu" | ".cpp"
    prebuilt: str | None = None  # importable module name of a prebuilt build, if any
    cflags: tuple[str, ...] = ("-O3",)
    ldflags: tuple[str, ...] = ()
    headers: tuple[str, ...] = field(default=(".cuh", ".h"))

    def sources(self, csrc: Path = CSRC, machine: str | None = None) -> list[Path]:
        glue = sorted((csrc / "bindings").glob(f"*_{self.device}.cpp"))
        kernels = sorted(
            p
            for p in (csrc / self.kernel_dir).glob(f"*{self.kernel_suffix}")
            if not p.stem.endswith("_emulator") and builds_on(p, machine)
        )
        return [*glue, *kernels]

    def missing_sources(self, csrc: Path = CSRC) -> str | None:
        """Why this extension cannot be JIT-built from the sources on disk (None: it can)."""
        if not (csrc / self.kernel_dir).is_dir() or not self.sources(csrc):
            return (
                f"the {self.device} kernel sources are missing ({csrc / self.kernel_dir}); "
                "install flashsparse from a source checkout (pip install -e .)"
            )
        return None

    def prebuilt_available(self) -> bool:
        if self.prebuilt is None or env_flag("FLASHSPARSE_JIT") or env_flag("FLASHSPARSE_CUDA_JIT"):
            return False
        try:
            return importlib.util.find_spec(self.prebuilt) is not None
        except (ImportError, ValueError):
            return False

    def load(self, *, extra_cuda_cflags: Sequence[str] = (), tag: str = "") -> None:
        """Import the prebuilt module, else JIT-build and load the sources (registering their
        ops with torch). Raises with the compiler's output on failure."""
        prebuilt_error = None
        if self.prebuilt_available():
            try:
                importlib.import_module(self.prebuilt)  # type: ignore[arg-type]
                return
            except ImportError as exc:  # e.g. built against another torch: rebuild here
                prebuilt_error = f"the prebuilt {self.prebuilt} does not load ({exc})"
        try:
            self._jit(list(extra_cuda_cflags), tag)
        except Exception as exc:
            if prebuilt_error:
                raise RuntimeError(f"{prebuilt_error}; JIT build: {exc}") from exc
            raise

    def _jit(self, cuda_cflags: list[str], tag: str) -> None:
        from torch.utils import cpp_extension

        sources = self.sources()
        digest = hashlib.sha256()
        headers = sorted(
            p
            for d in ("bindings", self.kernel_dir)
            for h in self.headers
            for p in (CSRC / d).glob(f"*{h}")
        )
        for path in [*sources, *headers]:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        digest.update(" ".join([*self.cflags, *self.ldflags, *cuda_cflags, tag]).encode())
        name = f"flashsparse_{self.device}_{digest.hexdigest()[:16]}"
        device_tag = tag or self.device
        build_dir = cache_root() / torch.__version__ / device_tag / digest.hexdigest()[:16]
        build_dir.mkdir(parents=True, exist_ok=True)
        ninja = find_ninja()
        if ninja and not shutil.which("ninja"):
            os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
        kwargs = {}
        if self.device == "cuda":
            home = cuda_home()
            torch_home = cpp_extension.CUDA_HOME
            if home and not (
                torch_home
                and os.path.isfile(os.path.join(torch_home, "include", "cuda_runtime_api.h"))
            ):
                # torch guessed the toolkit from `which nvcc`; point it at the real one.
                cpp_extension.CUDA_HOME = home
            kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", *cuda_cflags]
        cpp_extension.load(
            name=name,
            sources=[str(p) for p in sources],
            extra_include_paths=[str(CSRC)],
            extra_cflags=list(self.cflags),
            extra_ldflags=list(self.ldflags),
            build_directory=str(build_dir),
            verbose=env_flag("FLASHSPARSE_VERBOSE_BUILD"),
            is_python_module=False,
            **kwargs,
        )


class LoadOnce:
    """Load (or JIT-build) an extension and self-check its kernel once per process. The outcome,
    ``None`` or why the backend cannot run, is kept: a failed build is reported on every later
    call, never retried (``flashsparse.backends`` warns once under ``auto``, raises when forced)."""

    def __init__(
        self,
        extension: str,
        kernel: str,
        load: Callable[[], None],
        self_check: Callable[[], str | None],
    ) -> None:
        self.extension, self.kernel = extension, kernel
        self._load, self._self_check = load, self_check
        self.loaded = False
        self.error: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        if self.loaded or self.error is not None:
            return self.error
        with self._lock:
            if self.loaded or self.error is not None:
                return self.error
            try:
                self._load()
            except Exception as exc:  # a build error must not take the process down under auto
                self.error = (
                    f"building or loading the {self.extension} failed ({type(exc).__name__}): "
                    f"{tail(str(exc))}"
                )
                return self.error
            try:
                self.error = self._self_check()
            except Exception as exc:
                self.error = (
                    f"the {self.kernel} failed to run its self-check ({type(exc).__name__}: {exc})"
                )
            self.loaded = self.error is None
        return self.error
