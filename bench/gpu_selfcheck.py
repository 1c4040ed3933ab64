"""Build step of ``bench/gpu_check.sh``: load (prebuilt ``flashsparse._C``, else a JIT build) and
self-check every GPU kernel registered with :mod:`flashsparse.backends`, then run each once
through ``flashsparse.linear`` on odd shapes against a float64 reference.

    python bench/gpu_selfcheck.py [--backends cuda,triton]

Kernels are found in the backend registry, not named here, so a kernel that registers itself
is checked without a change to this file. Prints one line per kernel and dtype, the seconds
its build/load + self-check took, and (where cuobjdump exists) the registers, shared memory
and stack of every function in the built extension as compiled on this machine. Exit status
0 every kernel passed, 1 some kernel is unavailable or wrong.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RTOL = {"float16": 2e-3, "bfloat16": 1e-2}
# (m, k, n): no tile multiple anywhere; N = 1 (decode) and an N past one 8-wide tile.
SHAPES = ((300, 200, 1), (257, 136, 13))


def gpu_kernels(wanted: tuple[str, ...]) -> list[tuple[str, str, object]]:
    """``(format, backend, Kernel)`` of every registered kernel on the ``wanted`` backends."""
    from flashsparse import backends

    for name in wanted:
        reason = backends._load_provider(name)
        if reason:
            print(f"FAIL provider {name}: {reason}")
    return sorted(
        (fmt, backend, kernel)
        for (fmt, backend), kernel in backends._KERNELS.items()
        if backend in wanted
    )


def odd_weight(m: int, k: int, dtype, device, seed: int):
    """70 % zeros with one fully dense 128x64 tile, one empty tile, one dense column."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.7)
    w[: min(m, 128), : min(k, 64)] = torch.randn(min(m, 128), min(k, 64), generator=g)
    if k > 64:
        w[: min(m, 128), 64 : min(k, 128)] = 0
    w[:, k // 2] = torch.randn(m, generator=g)
    return w.to(device=device, dtype=dtype)


def check_kernel(fmt: str, backend: str, kernel) -> bool:
    import torch

    import flashsparse as fs
    from flashsparse import backends

    start = time.perf_counter()
    try:
        reason = kernel.available()
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    took = time.perf_counter() - start
    if reason:
        print(f"FAIL {fmt}/{backend}: unavailable after {took:.1f} s: {reason}")
        return False
    print(f"ok   {fmt}/{backend}: built/loaded and self-checked in {took:.1f} s")
    device = torch.device("cuda", torch.cuda.current_device())
    good = True
    old = os.environ.get(backends.ENV_VAR)
    os.environ[backends.ENV_VAR] = backend
    try:
        for dtype in (torch.float16, torch.bfloat16):
            why = kernel.supports(device, dtype)
            if why:
                print(f"     {fmt}/{backend} {dtype}: not supported ({why})")
                continue
            for seed, (m, k, n) in enumerate(SHAPES):
                w = odd_weight(m, k, dtype, device, seed)
                g = torch.Generator().manual_seed(100 + seed)
                x = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)
                bias = torch.randn(m, generator=g).to(device=device, dtype=dtype)
                sw = fs.encode(w, fmt)
                ran = backends.select(fmt, x).backend
                y = fs.linear(x, sw, bias)
                ref = x.double() @ w.double().T + bias.double()
                err = float((y.double() - ref).norm() / ref.norm())
                tol = RTOL[str(dtype).split(".")[-1]]
                ok = err < tol and ran == backend  # NaN fails too
                good &= ok
                print(
                    f"{'ok  ' if ok else 'FAIL'} {fmt}/{backend} {str(dtype).split('.')[-1]} "
                    f"m={m} k={k} n={n}: rel err {err:.2e} (tol {tol:g}), kernel ran: {ran}"
                )
        torch.cuda.synchronize()
    except Exception as exc:
        print(f"FAIL {fmt}/{backend}: {type(exc).__name__}: {exc}")
        good = False
    finally:
        if old is None:
            os.environ.pop(backends.ENV_VAR, None)
        else:
            os.environ[backends.ENV_VAR] = old
    return good


def resource_usage() -> None:
    """Registers / shared memory / stack per function of the built extension, as compiled here
    (to compare with the static report's sm_90a figures)."""
    import importlib.util

    spec = importlib.util.find_spec("flashsparse._C")
    tool = shutil.which("cuobjdump") or (
        "/usr/local/cuda/bin/cuobjdump" if os.path.isfile("/usr/local/cuda/bin/cuobjdump") else None
    )
    libs = [spec.origin] if spec and spec.origin else []
    libs += glob.glob(os.path.expanduser("~/.cache/flashsparse/*/cu*/*/*.so"))
    if not tool or not libs:
        print(f"resource usage: skipped (cuobjdump: {tool}, built extension: {libs or None})")
        return
    print(f"resource usage of {libs[0]} ({'prebuilt' if spec else 'JIT'}):")
    try:
        out = subprocess.run(
            [tool, "-res-usage", libs[0]], capture_output=True, text=True, timeout=60, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"  cuobjdump failed: {exc}")
        return
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Function") and i + 1 < len(lines):
            print(f"  {line.strip()}  {lines[i + 1].strip()}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="cuda,triton", help="backends whose kernels to check")
    args = ap.parse_args(argv)
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print(f"FAIL no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda})")
        return 1
    print(
        f"{torch.cuda.get_device_name()} sm_{''.join(map(str, torch.cuda.get_device_capability()))}; "
        f"torch {torch.__version__}; FLASHSPARSE_CUDA_ARCH_LIST="
        f"{os.environ.get('FLASHSPARSE_CUDA_ARCH_LIST', '(unset: this GPU)')}; prebuilt "
        f"flashsparse._C: {'yes' if importlib.util.find_spec('flashsparse._C') else 'no (JIT)'}"
    )
    wanted = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    kernels = gpu_kernels(wanted)
    if not kernels:
        print(f"FAIL no kernel is registered for {', '.join(wanted)}")
        return 1
    results = [check_kernel(fmt, backend, kernel) for fmt, backend, kernel in kernels]
    resource_usage()
    print(f"gpu_selfcheck: {sum(results)}/{len(results)} kernels passed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
