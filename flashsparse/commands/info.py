"""``flashsparse info``: versions, device and which backends can run (and why not)."""

from __future__ import annotations

import argparse
import json
import platform

HELP = "show versions, the device and which backends are available (and why not)"


def collect() -> dict:
    import torch

    from .. import __version__
    from ..backends import backend_report, requested_backend

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
    return {
        "flashsparse": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none (CPU build)",
        "triton": triton_version,
        "device": device,
        "FLASHSPARSE_BACKEND": requested_backend(),
        "backends": backend_report(),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for key, value in report.items():
        if key != "backends":
            print(f"{key:>20}: {value}")
    print(f"{'backends':>20}:")
    for name, reason in report["backends"].items():
        print(f"{name:>20}  {'available' if reason is None else 'unavailable: ' + reason}")
    return 0
