"""Environment step of ``bench/gpu_check.sh``: what the GPU machine has, and whether every Python
package the checks import is there (docs/gpu_runbook.md, "Packages").

    python bench/gpu_env.py [--json PATH]

Prints one line per fact and writes them as JSON. Exit status 1 when a package that a step
needs is missing (the step that imports it would fail), else 0; optional packages only change
what is skipped and are reported as such.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (module, distribution, who needs it). The device image has all of these (KINDS.md's list).
REQUIRED = (
    ("torch", "torch", "everything"),
    ("triton", "triton", "Triton kernel, do_bench timer"),
    ("numpy", "numpy", "flashsparse dependency"),
    ("pytest", "pytest", "pytest step"),
    ("hypothesis", "hypothesis", "collection of tests/test_formats.py, tests/test_linear.py"),
    ("safetensors", "safetensors", "collection of the serialization tests"),
    ("transformers", "transformers", "e2e step; HF tests"),
    ("ninja", "ninja", "CUDA build (torch's BuildExtension, JIT)"),
    ("setuptools", "setuptools", "install and build steps"),
)
# Absent: the named tests skip (importorskip) or a feature is off; nothing fails.
OPTIONAL = (
    ("pytest_timeout", "pytest-timeout", "a per-test limit in the pytest step"),
    ("matplotlib", "matplotlib", "--plot of the full sweep; one UX test"),
    ("compressed_tensors", "compressed-tensors", "tests/test_compressed_tensors.py (skipped)"),
    ("accelerate", "accelerate", "nothing in the checks"),
)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(module: str, dist: str) -> dict:
    try:
        importlib.import_module(module)
    except Exception as exc:  # a broken install counts as missing
        return {"ok": False, "version": _version(dist), "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "version": _version(dist)}


def _tool(name: str, *args: str) -> dict:
    path = shutil.which(name)
    if path is None:
        for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
            candidate = Path(root or "/nonexistent") / "bin" / name
            if candidate.is_file():
                path = str(candidate)
                break
    if path is None:
        return {"path": None}
    try:
        out = subprocess.run(
            [path, *args], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        out = f"{type(exc).__name__}: {exc}"
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return {"path": path, "version": lines[-1] if lines else ""}


def _torch_facts() -> dict:
    import torch

    facts: dict = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts.update(
            device=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_bytes=getattr(p, "L2_cache_size", None),
            device_count=torch.cuda.device_count(),
        )
    return facts


def collect() -> tuple[dict, list[str]]:
    env: dict = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "commit": os.environ.get("GPU_CHECK_COMMIT") or None,
        "cuda_arch_list": os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST"),
        "packages": {},
        "optional": {},
        "tools": {
            "nvcc": _tool("nvcc", "--version"),
            "compute-sanitizer": _tool("compute-sanitizer", "--version"),
            "cuobjdump": _tool("cuobjdump", "--version"),
            "ninja": _tool("ninja", "--version"),
        },
    }
    problems = []
    for module, dist, needed_by in REQUIRED:
        env["packages"][dist] = _probe(module, dist)
        if not env["packages"][dist]["ok"]:
            problems.append(f"{dist} is missing or broken (needed by: {needed_by})")
    for module, dist, needed_by in OPTIONAL:
        env["optional"][dist] = {**_probe(module, dist), "used_by": needed_by}
    if env["packages"]["torch"]["ok"]:
        env.update(_torch_facts())
        try:
            import flashsparse
            from flashsparse import backends

            env["flashsparse"] = flashsparse.__version__
            env["backends"] = backends.backend_report()  # builds nothing
        except Exception as exc:
            problems.append(f"flashsparse does not import: {type(exc).__name__}: {exc}")
    numpy = env["packages"]["numpy"].get("version") or ""
    triton = env["packages"]["triton"].get("version") or ""
    if triton.startswith("3.6") and tuple(int(p) for p in numpy.split(".")[:2] if p.isdigit()) >= (
        2,
        4,
    ):
        env["note"] = (
            f"numpy {numpy} with triton {triton}: the Triton interpreter (TRITON_INTERPRET=1) "
            "needs numpy < 2.4; compiled kernels on the GPU are unaffected"
        )
    return env, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the facts here as JSON")
    args = ap.parse_args(argv)
    env, problems = collect()
    for key, value in env.items():
        if isinstance(value, dict):
            for name, fact in value.items():
                print(f"{key}.{name}: {fact}")
        else:
            print(f"{key}: {value}")
    for problem in problems:
        print(f"MISSING: {problem}")
    env["problems"] = problems
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(env, indent=1, default=str) + "\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
