"""``flashsparse build``: build the compiled kernels now, into the kernel cache, so that the first
call of a program does not (Docker images, CI jobs, shared machines)."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "build the compiled CPU/CUDA kernels ahead of time into the kernel cache (images, CI)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="build the CPU extension (needs a C++ compiler and ninja)",
    )
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="build the CUDA extension (needs a CUDA build of torch, nvcc and ninja; without a "
        "GPU, FLASHSPARSE_CUDA_ARCH_LIST names the architecture, and it must be set the same "
        "way where the kernels run)",
    )
    parser.epilog = (
        "Without --cpu or --cuda: the CPU extension, and the CUDA one where this environment "
        "can build it. The result is loaded and (where the device is here) self-checked "
        "exactly as a first call would; the cache folder is FLASHSPARSE_CACHE_DIR (default "
        "~/.cache/flashsparse). Exit status 1 if a requested build failed."
    )


def _say(line: str) -> None:
    print(line, flush=True)


def _error(target: str, message: str) -> int:
    print(f"flashsparse build: error: {target}: {message}", file=sys.stderr, flush=True)
    return 1


def _done(target: str, ext, checked: str) -> int:
    from ..kernels import build

    loaded = build.last_load(ext)
    if loaded is None:
        _say(f"{target}: ready ({checked})")
    elif loaded.origin == "prebuilt":
        _say(f"{target}: the prebuilt {ext.prebuilt} is installed and used; nothing to build")
    elif loaded.origin == "cache":
        _say(f"{target}: already built: {loaded.entry} ({checked})")
    else:
        _say(f"{target}: built in {loaded.seconds:.1f} s: {loaded.entry} ({checked})")
    return 0


def _build_cpu() -> int:
    from ..kernels import build
    from ..kernels.cpu import bitmap

    ext = bitmap.EXTENSION
    if ext.prebuilt_available():
        _say(
            f"cpu: the prebuilt {ext.prebuilt} is installed and used; nothing to build "
            "(FLASHSPARSE_JIT=1 ignores it)"
        )
        return 0
    reason = bitmap.unavailable_reason()
    if reason:
        return _error("cpu", reason)
    _say(f"cpu: building or loading {ext.title} in {build.device_folder('cpu')} ...")
    reason = bitmap._available()  # what a first call does: build or load, then self-check
    if reason:
        return _error("cpu", reason)
    return _done("cpu", ext, "self-check passed")


def _cuda_refusal() -> str | None:
    """Why the CUDA extension cannot be built in this environment (None: it can)."""
    import torch

    from ..kernels import build, cuda

    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None); "
            "install a CUDA build of torch to build the CUDA kernels"
        )
    missing = cuda.EXTENSION.missing_sources()
    if missing:
        return missing
    if build.find_nvcc() is None:
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    if build.find_ninja() is None:
        return "ninja was not found (pip install ninja)"
    if not os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST", "").strip() and not (
        torch.cuda.is_available()
    ):
        return (
            "no GPU is visible to read the architecture from: set FLASHSPARSE_CUDA_ARCH_LIST "
            "(e.g. 9.0a), the same value as where the kernels will run"
        )
    return None


def _build_cuda() -> int:
    import torch

    from ..kernels import build, cuda

    ext = cuda.EXTENSION
    if ext.prebuilt_available():
        _say(
            f"cuda: the prebuilt {ext.prebuilt} is installed and used; nothing to build "
            "(FLASHSPARSE_JIT=1 ignores it)"
        )
        return 0
    refusal = _cuda_refusal()
    if refusal:
        return _error("cuda", refusal)
    _say(f"cuda: building or loading {ext.title} in {build.device_folder('cuda')} ...")
    if torch.cuda.is_available():
        reason = cuda.available()  # build or load, then self-check every kernel on this GPU
        if reason:
            return _error("cuda", reason)
        return _done("cuda", ext, "self-check passed")
    try:
        ext.load(**cuda.jit_options())
    except Exception as exc:
        return _error("cuda", f"{type(exc).__name__}: {build.tail(str(exc))}")
    return _done("cuda", ext, "not self-checked: no GPU here; the first call on a GPU checks it")


def run(args: argparse.Namespace) -> int:
    targets = [t for t in ("cpu", "cuda") if getattr(args, t)]
    status = 0
    if not targets:
        from ..kernels import cuda

        status |= _build_cpu()
        refusal = None if cuda.EXTENSION.prebuilt_available() else _cuda_refusal()
        if refusal:
            _say(f"cuda: skipped ({refusal})")
        else:
            status |= _build_cuda()
        return status
    if "cpu" in targets:
        status |= _build_cpu()
    if "cuda" in targets:
        status |= _build_cuda()
    return status
