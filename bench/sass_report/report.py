"""Building the whole report (every kernel, plans, predictions) and the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import analyse
from .model import ARCH_GPUS, GPUS, H100, NS, SHAPES, SPARSITIES, Gpu, gpu_for_arch, predict
from .plans import pick_instance, plan_for
from .render import format_report
from .specs import KERNEL_NAMES, CudaSpec


def build_report(
    kernels: Iterable[str] = KERNEL_NAMES, plans: bool = True, jobs: int = 2, gpu: Gpu = H100
) -> tuple[dict[str, Any], list[str]]:
    """(JSON-ready report, log lines: skips and errors).

    ``plans``: one row per kernel, compiled arch, benchmark shape, N and sparsity (``arch``,
    ``gpu``: the GPU the plan targets, ``smem_bytes``: static + dynamic shared memory per CTA
    of the instance it launches); ``predictions``: one per plan row of the sm_90 arch, on the
    ``gpu`` model."""
    log: list[str] = []
    results: list[analyse.KernelResult] = []
    names = list(kernels)
    archs: dict[str, tuple[str, ...]] = {}
    for name in names:
        archs[name] = ("90",) if name.endswith("_triton") else ("90a",)
        try:
            spec = analyse.load_spec(name)
        except ImportError as e:
            log.append(f"ERROR {name}: no spec (bench/sass_report/specs/{name}.py): {e}")
            continue
        archs[name] = tuple(spec.archs) if isinstance(spec, CudaSpec) else (str(spec.arch),)
        try:
            results += (
                analyse.report_cuda(spec, log, jobs)
                if isinstance(spec, CudaSpec)
                else analyse.report_triton(spec, log)
            )
        except Exception as e:
            log.append(f"ERROR {name}: {type(e).__name__}: {e}")
    plan_rows: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    if plans:
        for name in names:
            for arch in archs[name]:
                target = gpu_for_arch(arch, gpu)
                try:
                    rows = [
                        (m, k, n, s, plan_for(name, m, k, n, s, results, gpu, arch))
                        for _, m, k in SHAPES
                        for n in NS
                        for s in SPARSITIES
                    ]
                except Exception as e:
                    log.append(
                        f"ERROR {name}: no launch plan for sm_{arch}: {type(e).__name__}: {e}"
                    )
                    continue
                for m, k, n, s, plan in rows:
                    plan_rows.append(
                        {
                            "kernel": name,
                            "arch": f"sm_{arch}",
                            "gpu": target.name,
                            "m": m,
                            "k": k,
                            "n": n,
                            "sparsity": s,
                            "ctas": int(plan["ctas"]),
                            "split_k": int(plan["split_k"]),
                            "persistent": bool(plan["persistent"]),
                            "tile_m": plan.get("tile_m"),
                            "tile_n": plan.get("tile_n"),
                            "smem_bytes": plan.get("smem_bytes"),
                            "smem_limit": target.max_smem_per_cta,
                        }
                    )
                    if not arch.startswith("90"):
                        continue
                    inst = pick_instance(results, name, plan.get("tile_n"), arch)
                    pred = predict(name, m, k, n, s, plan, inst, gpu)
                    predictions.append(
                        {
                            "kernel": name,
                            "m": m,
                            "k": k,
                            "n": n,
                            "sparsity": s,
                            "gpu": gpu.name,
                            "dtype": "fp16",
                            "counted": inst is not None,
                            **pred,
                        }
                    )
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    report = {
        "kernels": [r.entry() for r in results],
        "plans": plan_rows,
        "predictions": predictions,
        "meta": {
            "triton": triton_version,
            "gpu_model": gpu.__dict__,
            "plan_gpus": {f"sm_{a}": gpu_for_arch(a, gpu).__dict__ for a in ARCH_GPUS},
            "log": log,
            "sparsities": list(SPARSITIES),
        },
    }
    return report, log


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Static kernel report: GPU speed from the compiled machine code, without a GPU."
    )
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    ap.add_argument(
        "--kernels", default=",".join(KERNEL_NAMES), help="comma-separated kernel names"
    )
    ap.add_argument("--no-plans", action="store_true", help="skip launch plans and predictions")
    ap.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel nvcc runs"
    )
    ap.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default="h100",
        help="GPU of the speed-up model and of the sm_90 plans (h200: same SMs, 4.8 TB/s)",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    unknown = [n for n in names if n not in KERNEL_NAMES]
    if unknown:
        ap.error(f"--kernels: unknown {unknown}; expected a subset of {list(KERNEL_NAMES)}")
    gpu = GPUS[args.gpu]
    report, _ = build_report(names, plans=not args.no_plans, jobs=args.jobs, gpu=gpu)
    print(format_report(report, gpu))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
