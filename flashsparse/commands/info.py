"""``flashsparse info``: versions, device and which backends can run (and why not)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HELP = "show versions, the device and which backends are available (and why not)"


# Every environment variable flashsparse reads (setup.py reads FLASHSPARSE_CUDA; the CI
# scripts their own FLASHSPARSE_CI_* / *_KERNEL_CACHE ones).
ENV_VARS = (
    "FLASHSPARSE_BACKEND",
    "FLASHSPARSE_CUDA_ARCH_LIST",
    "FLASHSPARSE_CACHE_DIR",
    "FLASHSPARSE_VERBOSE_BUILD",
    "FLASHSPARSE_CUDA_JIT",
    "FLASHSPARSE_CUDA",
    "FLASHSPARSE_CI_VENV",
    "FLASHSPARSE_CI_ARCHS",
    "FLASHSPARSE_KERNEL_CACHE",
    "FLASHSPARSE_NO_KERNEL_CACHE",
)
_FLAGS = ("FLASHSPARSE_VERBOSE_BUILD", "FLASHSPARSE_CUDA_JIT", "FLASHSPARSE_CUDA")
_FLAG_VALUES = ("", "1", "true", "yes", "on", "0", "false", "no", "off")


def check_environment() -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` about the ``FLASHSPARSE_*`` environment variables. A problem
    makes flashsparse calls fail (a bad ``FLASHSPARSE_BACKEND``, an arch list the CUDA build
    rejects); a warning is a setting that is silently ignored (a misspelt name, a flag value
    that reads as off, a cache directory that cannot be written)."""
    import difflib

    from ..backends import requested_backend

    problems: list[str] = []
    warnings: list[str] = []
    try:
        requested_backend()
    except ValueError as exc:
        problems.append(str(exc))
    arch_list = os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST", "").strip()
    if arch_list:
        try:
            from ..kernels.build import gencode_flags
        except Exception:  # the provider refusing this environment: `backends` says why
            gencode_flags = None
        try:
            if gencode_flags is not None:
                gencode_flags(arch_list)
        except ValueError as exc:
            problems.append(f"FLASHSPARSE_CUDA_ARCH_LIST={arch_list!r}: {exc}")
    for name in _FLAGS:
        value = os.environ.get(name)
        if value is not None and value.strip().lower() not in _FLAG_VALUES:
            warnings.append(
                f"{name}={value!r} is read as off (on: 1, true, yes, on; off: 0, false, no, off)"
            )
    cache = os.environ.get("FLASHSPARSE_CACHE_DIR")
    if cache:
        path = os.path.abspath(os.path.expanduser(cache))
        probe = path
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)  # the first existing ancestor is what mkdir needs
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            warnings.append(
                f"FLASHSPARSE_CACHE_DIR={cache!r} cannot be created or written "
                f"({probe} is not a writable directory): a JIT build of the CUDA kernel would fail"
            )
    for name in sorted(os.environ):
        if name.startswith("FLASHSPARSE_") and name not in ENV_VARS:
            close = difflib.get_close_matches(name, ENV_VARS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a flashsparse setting and is ignored{hint}")
    return problems, warnings


def collect() -> dict:
    import torch

    from .. import __version__
    from ..backends import ENV_VAR, backend_report, requested_backend

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"not installed ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        device = "CPU only (no CUDA device visible to torch)"
    problems, warnings = check_environment()
    try:
        backend = requested_backend()
    except ValueError:
        backend = os.environ.get(ENV_VAR, "")
    return {
        "flashsparse": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "device": device,
        "FLASHSPARSE_BACKEND": backend,
        "backends": backend_report(),
        "problems": problems,
        "warnings": warnings,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when ``problems`` is not empty (a setting that makes flashsparse
    calls fail): the report is printed in full either way, since it is how a user diagnoses a
    setup; each problem and warning is one line on stderr."""
    report = collect()
    status = 1 if report["problems"] else 0
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    for key, value in report.items():
        if key not in ("backends", "problems", "warnings"):
            print(
                f"{key:>20}: {value!r}"
                if key == "FLASHSPARSE_BACKEND" and status
                else f"{key:>20}: {value}"
            )
    print(f"{'backends':>20}:")
    for name, reason in report["backends"].items():
        print(f"{name:>20}  {'available' if reason is None else 'unavailable: ' + reason}")
    for warning in report["warnings"]:
        print(f"flashsparse info: warning: {warning}", file=sys.stderr)
    for problem in report["problems"]:
        print(f"flashsparse info: error: {problem}", file=sys.stderr)
    return status
