"""``flashsparse info``: versions, device and which backends can run (and why not)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HELP = "show versions, the device and which backends are available (and why not)"


# Every environment variable flashsparse reads (setup.py reads FLASHSPARSE_CUDA and
# FLASHSPARSE_CPU; the CI scripts their own FLASHSPARSE_CI_* / *_KERNEL_CACHE ones).
ENV_VARS = (
    "FLASHSPARSE_BACKEND",
    "FLASHSPARSE_CUDA_ARCH_LIST",
    "FLASHSPARSE_CPU_ISA",
    "FLASHSPARSE_HUGE_PAGES",
    "FLASHSPARSE_CACHE_DIR",
    "FLASHSPARSE_BUILD_TIMEOUT",
    "FLASHSPARSE_VERBOSE_BUILD",
    "FLASHSPARSE_JIT",
    "FLASHSPARSE_CUDA_JIT",
    "FLASHSPARSE_CUDA",
    "FLASHSPARSE_CPU",
    "FLASHSPARSE_CI_VENV",
    "FLASHSPARSE_CI_ARCHS",
    "FLASHSPARSE_KERNEL_CACHE",
    "FLASHSPARSE_NO_KERNEL_CACHE",
)
_FLAGS = (
    "FLASHSPARSE_HUGE_PAGES",
    "FLASHSPARSE_VERBOSE_BUILD",
    "FLASHSPARSE_JIT",
    "FLASHSPARSE_CUDA_JIT",
    "FLASHSPARSE_CUDA",
    "FLASHSPARSE_CPU",
)
_FLAG_VALUES = ("", "1", "true", "yes", "on", "0", "false", "no", "off")
# The compiled backends: provider module of each (its EXTENSION is what the builder builds).
COMPILED = {"cpu": "flashsparse.kernels.cpu.bitmap", "cuda": "flashsparse.kernels.cuda"}


def check_environment() -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` about the ``FLASHSPARSE_*`` environment variables. A problem
    makes flashsparse calls fail (a bad ``FLASHSPARSE_BACKEND``, an arch list the CUDA build
    rejects, a build timeout that is not a positive number); a warning is a setting that is
    silently ignored (a misspelt name, a flag value that reads as off) or a kernel cache that
    cannot be written while a compiled backend would have to be built in it."""
    import difflib

    from ..backends import requested_backend
    from ..kernels import build

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
    try:
        build.build_timeout()
    except ValueError as exc:
        problems.append(str(exc))
    cache_warning = _unwritable_cache_warning()
    if cache_warning:
        warnings.append(cache_warning)
    for name in sorted(os.environ):
        if name.startswith("FLASHSPARSE_") and name not in ENV_VARS:
            close = difflib.get_close_matches(name, ENV_VARS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.append(f"{name} is not a flashsparse setting and is ignored{hint}")
    return problems, warnings


def _jit_args(name: str, module) -> tuple[dict, str | None]:
    """The builder's arguments for ``name``'s JIT build here, or why they are unknown."""
    if name != "cuda":
        return {}, None
    import torch

    if torch.version.cuda is None:
        return {}, "torch is a CPU-only build"
    if not os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST", "").strip() and not (
        torch.cuda.is_available()
    ):
        return {}, "no GPU to read the architecture from (FLASHSPARSE_CUDA_ARCH_LIST names one)"
    try:
        return module.jit_options(), None
    except Exception as exc:
        return {}, f"{type(exc).__name__}: {exc}"


def compiled_status() -> dict:
    """For each compiled backend: its cache folder (and whether it can be written), this
    environment's entry and its state, builds in progress and the last failed build."""
    import importlib

    status = {}
    for name, module_name in COMPILED.items():
        try:
            module = importlib.import_module(module_name)
            key_args, key_problem = _jit_args(name, module)
            status[name] = module.EXTENSION.cache_status(key_args=key_args, key_problem=key_problem)
        except Exception as exc:  # a provider refusing this environment: `backends` says why
            status[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return status


def _unwritable_cache_warning() -> str | None:
    """A warning when the kernel cache cannot be written and a compiled backend would have to
    be JIT-built there (no prebuilt module, no good entry already in it)."""
    import importlib

    import torch

    from ..kernels import build

    cannot = build.writable_problem(build.extensions_root())
    if cannot is None:
        return None
    affected = []
    for name, module_name in COMPILED.items():
        if name == "cuda" and torch.version.cuda is None:
            continue
        try:
            module = importlib.import_module(module_name)
            if module.EXTENSION.prebuilt_available():
                continue
            key_args, key_problem = _jit_args(name, module)
            if key_problem is None and module.EXTENSION.missing_sources() is None:
                key = module.EXTENSION.jit_key(**key_args)
                if build.verify_entry(module.EXTENSION.entry(key))[0] is not None:
                    continue  # built ahead (e.g. `flashsparse build` in an image): read-only is fine
        except Exception:
            pass
        affected.append(name.upper())
    if not affected:
        return None
    env = os.environ.get("FLASHSPARSE_CACHE_DIR")
    where = (
        f"FLASHSPARSE_CACHE_DIR={env!r}"
        if env
        else f"the kernel cache {build.cache_root()} (the default; FLASHSPARSE_CACHE_DIR sets another)"
    )
    return (
        f"{where} cannot be written ({cannot}): the {' and '.join(affected)} kernels cannot be "
        "JIT-built there, so they will not run (the reference path runs instead); set "
        "FLASHSPARSE_CACHE_DIR to a writable folder"
    )


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
        "compiled": compiled_status(),
        "problems": problems,
        "warnings": warnings,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    add_tensor_parallel_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Exit status 0, or 1 when ``problems`` is not empty (a setting that makes flashsparse
    calls fail): the report is printed in full either way, since it is how a user diagnoses a
    setup; each problem and warning is one line on stderr."""
    report = collect()
    status = 1 if report["problems"] else 0
    if getattr(args, "model", None) is not None:
        try:
            report["tensor_parallel"] = tensor_parallel_report(args)
        except (ValueError, OSError, KeyError) as exc:
            print(f"flashsparse info: error: --model {args.model}: {exc}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    for key, value in report.items():
        if key not in ("backends", "compiled", "problems", "warnings", "tensor_parallel"):
            print(
                f"{key:>20}: {value!r}"
                if key == "FLASHSPARSE_BACKEND" and status
                else f"{key:>20}: {value}"
            )
    print(f"{'backends':>20}:")
    for name, reason in report["backends"].items():
        print(f"{name:>20}  {'available' if reason is None else 'unavailable: ' + reason}")
    print(f"{'compiled kernels':>20}:")
    for name, info in report["compiled"].items():
        for i, line in enumerate(_compiled_lines(info)):
            print(f"{name if i == 0 else '':>20}  {line}")
    if "tensor_parallel" in report:
        print_tensor_parallel(report["tensor_parallel"])
    for warning in report["warnings"]:
        print(f"flashsparse info: warning: {warning}", file=sys.stderr)
    for problem in report["problems"]:
        print(f"flashsparse info: error: {problem}", file=sys.stderr)
    return status


def _compiled_lines(info: dict) -> list[str]:
    if "error" in info:
        return [f"cannot say: {info['error']}"]
    lines = []
    if info["prebuilt"]:
        lines.append(f"prebuilt: {info['prebuilt']} (used instead of the cache)")
    writable = "writable" if info["writable"] else f"NOT writable: {info['not_writable_because']}"
    lines.append(f"cache folder: {info['folder']} ({writable})")
    entry = info["entry"]
    state = info["entry_state"]
    lines.append(f"entry: {os.path.basename(entry)}: {state}" if entry else f"entry: {state}")
    building = info["building"]
    if building:
        for b in building:
            lines.append(
                f"build in progress: {b['action']} {os.path.basename(b['entry'])} ({b['by']})"
            )
    else:
        lines.append("build in progress: none")
    error = info["last_error"]
    if error:
        first = str(error.get("error", "")).strip().splitlines()
        lines.append(
            f"last build error: {error.get('time')} (pid {error.get('pid')}, entry "
            f"{error.get('entry')}): {first[0] if first else '?'}"
            + (f" ... ({len(first) - 1} more lines; --json shows them)" if len(first) > 1 else "")
        )
    else:
        lines.append("last build error: none")
    return lines


# -- per-rank bytes of a saved model under tensor parallelism ----------------------------------------
def add_tensor_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a saved flashsparse model (directory or .safetensors file): also report the bytes "
        "each tensor-parallel rank stores (see --tp-size, --tp-plan)",
    )
    parser.add_argument(
        "--tp-size", type=int, default=2, help="tensor-parallel ranks for --model (default 2)"
    )
    parser.add_argument(
        "--tp-plan",
        default="auto",
        metavar="auto|FILE",
        help="the plan for --model: auto (transformers' plan for the config.json next to the "
        "file) or a JSON file {module pattern: style}",
    )


def tensor_parallel_report(args: argparse.Namespace) -> dict:
    from pathlib import Path

    from ..serialization.sharded import per_rank_bytes, transformers_tp_plan

    model = Path(args.model)
    if args.tp_plan == "auto":
        plan = transformers_tp_plan(model if model.is_dir() else model.parent)
    else:
        plan = json.loads(Path(args.tp_plan).read_text())
        if not isinstance(plan, dict):
            raise ValueError(f"--tp-plan {args.tp_plan} does not hold a JSON object")
    return per_rank_bytes(model, args.tp_size, plan)


def print_tensor_parallel(report: dict) -> None:
    whole = report["one_process_bytes"]
    print(f"{'tensor parallel':>20}: {report['path']}, {report['tp_size']} ranks")
    print(f"{'one process':>20}  {whole / 2**20:,.2f} MiB")
    for rank in report["ranks"]:
        total = rank["sparse_bytes"] + rank["dense_bytes"]
        print(
            f"{'rank ' + str(rank['rank']):>20}  {total / 2**20:,.2f} MiB "
            f"({total / whole:.2f}x): sparse layers {rank['sparse_bytes'] / 2**20:,.2f} MiB, "
            f"other tensors {rank['dense_bytes'] / 2**20:,.2f} MiB"
        )
    if report["unsupported"]:
        print(
            f"{'':>20}  counted whole (their plan style is not supported for sparse layers): "
            + ", ".join(report["unsupported"][:5])
        )
