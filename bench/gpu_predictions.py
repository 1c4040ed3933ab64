"""The static model's predictions for the GPU sweep, computed ahead on a CPU machine.

    python bench/gpu_predictions.py [--gpu h200] [--out bench/results/gpu_predictions_h200.json]

``bench/kernel_report.py`` predicts each kernel's time and speed-up over dense from its compiled
SASS; it needs nvcc and cuobjdump (the triton wheel's will do) and the Triton version of the
machine the prediction is for, since Triton 3.6 compiles the same source into other code than
3.9: run this with the device machine's versions (torch 2.11 cu130, triton 3.6; the
venv of docs/gpu_runbook.md). The GPU run only reads the file this writes (``gpu_sweep.py``
joins it to its measurements), so it needs neither tool there.

The file keeps, for the benchmark shapes, every prediction (kernel, M, K, N, sparsity ->
predicted µs, dense µs, speed-up, bound), the sm_90 kernel table (registers, spills, shared
memory, CTAs per SM, instructions per element) and where it came from: date, commit, tool
versions and a hash of the kernel sources (``sources_sha256``); the sweep warns when the
sources it runs hash differently, i.e. when the predictions are stale.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "gpu_predictions_h200.json"
# Everything the predictions depend on: kernel sources, launch planners, the model's specs.
SOURCE_GLOBS = (
    "csrc/kernels/*.cu",
    "csrc/kernels/*.cuh",
    "flashsparse/kernels/triton/*.py",
    "flashsparse/kernels/cuda.py",
    "flashsparse/kernels/cuda/*.py",
    "bench/kernel_specs/*.py",
    "bench/sass_report/*.py",
    "bench/sass_report/specs/*.py",
)
KERNEL_KEYS = (
    "kernel",
    "arch",
    "dtype",
    "n_tile",
    "registers",
    "spill_bytes",
    "smem_bytes",
    "ctas_per_sm_h100",
    "instr_per_element",
)


def sources_sha256(root: Path = ROOT) -> str:
    digest = hashlib.sha256()
    files = sorted(
        {p for g in SOURCE_GLOBS for p in root.glob(g) if not p.stem.endswith("_emulator")}
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def compact(report: Mapping, gpu: str, commit: str | None, tools: Mapping) -> dict:
    """The parts of a ``kernel_report.py --json`` report the GPU run needs."""
    kernels = [
        {k: e.get(k) for k in KERNEL_KEYS}
        for e in report.get("kernels", [])
        if str(e.get("arch", "")).startswith("sm_90") and e.get("detail", {}).get("primary", True)
    ]
    meta = report.get("meta", {})
    return {
        "meta": {
            "generated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "gpu": gpu,
            "gpu_model": meta.get("gpu_model"),
            "triton": meta.get("triton"),
            **tools,
            "sources_sha256": sources_sha256(),
            "source": f"bench/kernel_report.py --gpu {gpu}",
            "log": meta.get("log", []),
            "note": "model estimates from compiled SASS, fp16 instances (bf16 compiles to the same "
            "main loop); no GPU ran",
        },
        "kernels": kernels,
        "predictions": report.get("predictions", []),
    }


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def _tool_versions() -> dict:
    import shutil

    out: dict = {"python": sys.version.split()[0]}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:
        out["torch"] = None
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        text = subprocess.run(
            [nvcc, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
        out["nvcc"] = text.strip().splitlines()[-1] if text.strip() else None
    except OSError:
        out["nvcc"] = None
    return out


# --- the join (used by gpu_sweep.py on the GPU machine) ------------------------------------------
def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def index(predictions: Iterable[Mapping]) -> dict[tuple, Mapping]:
    """``(kernel, m, k, n, sparsity) -> prediction``; ``("dense", m, k, n, None)`` -> the
    model's dense (cuBLAS) time, which depends on the shape and N only."""
    out: dict[tuple, Mapping] = {}
    for p in predictions:
        key = (p["kernel"], int(p["m"]), int(p["k"]), int(p["n"]), round(float(p["sparsity"]), 4))
        out[key] = p
        out.setdefault(("dense", int(p["m"]), int(p["k"]), int(p["n"]), None), p)
    return out


def kernel_of(method: str | None, backend: str | None) -> str:
    """The report's kernel name for a sweep row (``bitmap`` on ``cuda`` -> ``bitmap_cuda``)."""
    if method == "dense":
        return "dense"
    return f"{method}_{backend}"


def lookup(idx: Mapping[tuple, Mapping], row: Mapping) -> dict:
    """``predicted_us``, ``predicted_speedup``, ``predicted_bound`` for a sweep row (None where the
    model has no prediction for it)."""
    kernel = kernel_of(row.get("method"), row.get("backend"))
    sparsity = None if kernel == "dense" else round(float(row.get("sparsity") or 0.0), 4)
    p = idx.get((kernel, int(row["m"]), int(row["k"]), int(row["n"]), sparsity))
    if p is None:
        return {"predicted_us": None, "predicted_speedup": None, "predicted_bound": None}
    if kernel == "dense":
        return {
            "predicted_us": p.get("dense_us"),
            "predicted_speedup": 1.0,
            "predicted_bound": "memory",
        }
    return {
        "predicted_us": p.get("time_us"),
        "predicted_speedup": p.get("speedup"),
        "predicted_bound": p.get("bound"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", default="h200", choices=("h100", "h200"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or DEFAULT_OUT.with_name(f"gpu_predictions_{args.gpu}.json")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "report.json"
        cmd = [sys.executable, str(ROOT / "bench" / "kernel_report.py"), "--gpu", args.gpu]
        res = subprocess.run([*cmd, "--json", str(raw)], cwd=ROOT, check=False)
        if res.returncode != 0 or not raw.is_file():
            print(
                f"gpu_predictions: {' '.join(cmd)} failed (exit {res.returncode})", file=sys.stderr
            )
            return 1
        report = json.loads(raw.read_text())
    commit = _git("rev-parse", "--short=12", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+uncommitted"
    data = compact(report, args.gpu, commit, _tool_versions())
    problems = [m for m in data["meta"]["log"] if m.startswith(("ERROR", "SKIP"))]
    uncounted = sorted({p["kernel"] for p in data["predictions"] if not p.get("counted")})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"wrote {out}: {len(data['predictions'])} predictions, {len(data['kernels'])} sm_90 "
        f"kernel instances (triton {data['meta']['triton']}, {data['meta']['nvcc']})"
    )
    for p in problems:
        print(f"  {p}")
    if uncounted:
        print(f"  no instruction counts (memory-bound ceiling only) for: {', '.join(uncounted)}")
    return 1 if problems or uncounted else 0


if __name__ == "__main__":
    sys.exit(main())
