"""Finding the CUDA tools and compiling a kernel source to SASS (cached by content hash)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-cubin",
    "-Xptxas",
    "-v",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


def cache_dir() -> Path:
    root = os.environ.get("FLASHSPARSE_KERNEL_CACHE")
    base = (
        Path(root)
        if root
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashsparse"
    )
    return base / "kernel_report"


def find_tool(name: str) -> str | None:
    """``cuobjdump``/``nvdisasm``/``nvcc``: PATH, CUDA_HOME, next to nvcc, then the triton wheel."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
        try:  # a wrapper script that execs the real nvcc
            text = Path(nvcc).read_text(errors="ignore")[:400]
            dirs += [Path(p).parent for p in re.findall(r"(/\S+/bin/nvcc)", text)]
        except OSError:
            pass
    dirs += [Path("/usr/local/cuda/bin")]
    try:
        import triton

        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except Exception:
        pass
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def run(cmd: Sequence[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])}... failed ({res.returncode}):\n{res.stderr[-3000:]}"
        )
    return res.stdout + res.stderr


def compile_cuda(src: Path, arch: str, nvcc: str, cuobjdump: str) -> tuple[str, str]:
    """(SASS listing, ptxas log) of one source for one arch, cached by content hash."""
    version = run([nvcc, "--version"]).strip().splitlines()[-1]
    h = hashlib.sha256()
    h.update(f"{arch} {NVCC_FLAGS} {version}".encode())
    for dep in sorted(src.parent.glob("*")):
        if dep.suffix in (".cu", ".cuh", ".h") and not dep.stem.endswith("_emulator"):
            h.update(dep.name.encode() + dep.read_bytes())
    cache = cache_dir() / f"{src.stem}.sm_{arch}.{h.hexdigest()[:16]}"
    if (cache / "done").is_file():
        return (cache / "sass.txt").read_text(), (cache / "ptxas.log").read_text()
    cache.mkdir(parents=True, exist_ok=True)
    cubin = cache / "kernel.cubin"
    log = run(
        [
            nvcc,
            *NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            str(src),
            "-o",
            str(cubin),
        ]
    )
    sass = run([cuobjdump, "-sass", str(cubin)])
    (cache / "sass.txt").write_text(sass)
    (cache / "ptxas.log").write_text(log)
    (cache / "done").touch()
    return sass, log
