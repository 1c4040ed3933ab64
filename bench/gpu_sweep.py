"""Sweep step of ``bench/gpu_check.sh --budget``: the reduced benchmark, with the static model's
prediction beside each measurement.

    python bench/gpu_sweep.py --out DIR [--predictions bench/results/gpu_predictions_h200.json]
                              [--chunks bitmap-cuda-bf16,...]

Llama-3-8B shapes, N 1 and 16, sparsity 50 / 70 / 90 %, bf16 and fp16: the CUDA bitmap, Triton
bitmap and CUDA Tiled-CSL kernels against dense ``F.linear`` (cuBLAS), through
``flashsparse bench`` (same checks against float64, same timer and cold-weight rotation), run
in-process one chunk at a time, most important first (CUDA bitmap bf16, fp16; Triton bitmap
bf16, fp16; Tiled-CSL bf16, fp16). One chunk is one kernel and one dtype, so a backend that fails
to build costs only its own chunks, and each chunk is saved the moment it ends: ``DIR/sweep.json``
(every finished chunk's rows, each joined to the prediction: ``predicted_us``,
``predicted_speedup``, ``predicted_bound``, ``measured_over_predicted``; chunk statuses, which
``gpu_check.sh --rerun`` reads) and ``DIR/sweep.md`` (the table, measured beside predicted, and
geometric means per kernel, dtype and sparsity). Each chunk's raw ``flashsparse bench`` JSON
stays in ``--work`` (default ``$GPU_CHECK_LOGS/sweep_chunks``, so it travels in logs.tar.gz).

When ``GPU_CHECK_STEP_LIMIT`` (seconds, set by gpu_check) says a chunk cannot finish in what is
left (judged by the slowest chunk so far), it is not started and marked ``not run (no time)``.
Exit status 0 every chunk ran clean, 1 otherwise (a WRONG row, an error, a chunk not run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for p in (str(BENCH), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

import gpu_predictions  # noqa: E402

COMMON = (
    "--preset llama3-8b --n 1,16 --sparsity 0.5,0.7,0.9 --baseline none "
    "--warmup-ms 10 --rep-ms 50 --no-progress"
)
# name -> flashsparse bench options, in the order they run (most important first).
CHUNKS: dict[str, str] = {
    "bitmap-cuda-bf16": "--format bitmap --backend cuda --dtype bf16",
    "bitmap-cuda-fp16": "--format bitmap --backend cuda --dtype fp16",
    "bitmap-triton-bf16": "--format bitmap --backend triton --dtype bf16",
    "bitmap-triton-fp16": "--format bitmap --backend triton --dtype fp16",
    "tiled_csl-cuda-bf16": "--format tiled_csl --backend cuda --dtype bf16",
    "tiled_csl-cuda-fp16": "--format tiled_csl --backend cuda --dtype fp16",
}
NO_TIME = "not run (no time)"


def run_chunk(options: Sequence[str], json_path: Path) -> tuple[str, float]:
    """One ``flashsparse bench`` run in this process; ``(status, seconds)``."""
    from flashsparse.cli import main as cli

    start = time.perf_counter()
    try:
        rc = cli(["bench", *options, "--json", str(json_path)])
    except SystemExit as exc:  # argparse errors (e.g. a backend that cannot run here): exit 2
        rc = exc.code if isinstance(exc.code, int) else 2
    except Exception as exc:
        print(f"gpu_sweep: chunk raised {type(exc).__name__}: {exc}", flush=True)
        return f"error: {type(exc).__name__}: {exc}"[:300], time.perf_counter() - start
    seconds = time.perf_counter() - start
    if rc == 0 and json_path.is_file():
        return "ok", seconds
    return f"failed (exit {rc})", seconds


def joined_rows(work: Path, chunks: Mapping[str, dict], idx: Mapping) -> tuple[list[dict], dict]:
    rows: list[dict] = []
    meta: dict = {}
    for name in chunks:
        path = work / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        meta = meta or data.get("meta", {})
        for row in data.get("rows", []):
            row = {"chunk": name, **row, **gpu_predictions.lookup(idx, row)}
            ms, pred = row.get("median_ms"), row.get("predicted_us")
            row["measured_over_predicted"] = (
                round(ms * 1e3 / pred, 3) if row.get("status") == "ok" and ms and pred else None
            )
            rows.append(row)
    return rows, meta


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: Sequence[Mapping]) -> str:
    lines = [
        "| layer | M | K | dtype | N | sparsity | kernel | status | measured µs | predicted µs "
        "| meas/pred | speed-up | predicted | of BW | bound (model) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernel = f"{r['method']}/{r['backend']}"  # dense/cublas is the baseline
        us = None if r.get("median_ms") is None else r["median_ms"] * 1e3
        lines.append(
            f"| {r['layer']} | {r['m']} | {r['k']} | {r['dtype']} | {r['n']} | "
            f"{'-' if r.get('sparsity') is None else format(r['sparsity'], '.0%')} | {kernel} | "
            f"{r['status']} | {_f(us, '.1f')} | {_f(r.get('predicted_us'), '.1f')} | "
            f"{_f(r.get('measured_over_predicted'), '.2f')} | {_f(r.get('speedup'), '.2f')} | "
            f"{_f(r.get('predicted_speedup'), '.2f')} | {_f(r.get('bw_fraction'), '.0%')} | "
            f"{r.get('predicted_bound') or '-'} |"
        )
    return "\n".join(lines)


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _geomean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def geomeans(rows: Sequence[Mapping]) -> str:
    """Per kernel, dtype and sparsity: measured and predicted speed-up over dense and the
    measured/predicted time ratio (what the model's constants need), over shapes and N."""
    groups: dict[tuple, list[Mapping]] = {}
    for r in rows:
        if r.get("method") == "dense" or r.get("status") != "ok":
            continue
        groups.setdefault((f"{r['method']}/{r['backend']}", r["dtype"], r["sparsity"]), []).append(
            r
        )
    lines = [
        "| kernel | dtype | sparsity | rows | speed-up (measured) | speed-up (predicted) | "
        "time measured / predicted |",
        "|---|---|---|---|---|---|---|",
    ]
    for (kernel, dtype, sparsity), rs in sorted(groups.items()):
        lines.append(
            f"| {kernel} | {dtype} | {sparsity:.0%} | {len(rs)} | "
            f"{_x(_geomean([r.get('speedup') for r in rs]))} | "
            f"{_x(_geomean([r.get('predicted_speedup') for r in rs]))} | "
            f"{_f(_geomean([r.get('measured_over_predicted') for r in rs]), '.2f')} |"
        )
    return "\n".join(lines)


def write(
    out: Path, chunks: Mapping, rows: list[dict], meta: Mapping, pmeta: Mapping, notes
) -> None:
    data = {
        "meta": meta,
        "predictions": pmeta,
        "notes": list(notes),
        "chunks": chunks,
        "rows": rows,
    }
    for path, text in (
        (out / "sweep.json", json.dumps(data, indent=1, default=str) + "\n"),
        (out / "sweep.md", markdown(chunks, rows, meta, pmeta, notes)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def markdown(chunks: Mapping, rows: list[dict], meta: Mapping, pmeta: Mapping, notes) -> str:
    head = [
        "# Reduced GPU sweep: measured beside the static model's prediction",
        "",
        f"Device: {meta.get('device', '?')}; torch {meta.get('torch', '?')}, triton "
        f"{meta.get('triton', '?')}; timer {meta.get('timer', '?')}; copy bandwidth "
        f"{_f(meta.get('copy_bandwidth_gbps'), '.0f')} GB/s; date {meta.get('date', '?')}.",
        f"Predictions: {pmeta.get('source', '?')} ({pmeta.get('gpu_model', {}).get('name', '?')} "
        f"model, triton {pmeta.get('triton', '?')}, commit {pmeta.get('commit', '?')}, "
        f"{pmeta.get('generated', '?')}); fp16 instances, so bf16 rows get the fp16 prediction.",
        "",
        "Chunks: "
        + "; ".join(f"{n} {c['status']} ({c.get('seconds', 0):.0f} s)" for n, c in chunks.items()),
        "",
    ]
    head += [f"Note: {n}" for n in notes]
    return "\n".join([*head, "", geomeans(rows), "", table(rows), ""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for sweep.json and sweep.md")
    ap.add_argument(
        "--predictions",
        type=Path,
        default=ROOT / "bench" / "results" / "gpu_predictions_h200.json",
    )
    ap.add_argument("--chunks", default="", help="comma-separated chunk names (default: all)")
    ap.add_argument("--work", type=Path, default=None, help="folder for each chunk's raw JSON")
    ap.add_argument("--common", default=COMMON, help="options every chunk gets")
    ap.add_argument(
        "--chunk",
        action="append",
        default=[],
        metavar="NAME=OPTIONS",
        help="define the chunks instead of the built-in ones (repeatable; CPU rehearsals)",
    )
    args = ap.parse_args(argv)
    defined = dict(CHUNKS)
    if args.chunk:
        defined = {}
        for spec in args.chunk:
            name, sep, options = spec.partition("=")
            if not sep or not name:
                ap.error(f"--chunk takes NAME=OPTIONS, got {spec!r}")
            defined[name] = options
    wanted = [c for c in args.chunks.split(",") if c] or list(defined)
    unknown = [c for c in wanted if c not in defined]
    if unknown:
        ap.error(f"unknown chunk {unknown[0]!r}; chunks: {', '.join(defined)}")
    logs = os.environ.get("GPU_CHECK_LOGS")
    work = args.work or (Path(logs) / "sweep_chunks" if logs else Path(tempfile.mkdtemp()))
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)

    notes: list[str] = []
    try:
        pdata = gpu_predictions.load(args.predictions)
    except (OSError, json.JSONDecodeError) as exc:
        pdata = {"meta": {}, "predictions": []}
        notes.append(f"no predictions ({args.predictions}: {exc})")
    pmeta = pdata.get("meta", {})
    if pmeta.get("sources_sha256") and pmeta["sources_sha256"] != gpu_predictions.sources_sha256():
        notes.append(
            "the kernel sources differ from those the predictions were computed from: rerun "
            "bench/gpu_predictions.py on the CPU machine before trusting meas/pred"
        )
    try:
        import triton

        if pmeta.get("triton") and triton.__version__ != pmeta["triton"]:
            notes.append(
                f"predictions use triton {pmeta['triton']}'s code, this machine runs triton "
                f"{triton.__version__}"
            )
    except ImportError:
        pass
    for n in notes:
        print(f"gpu_sweep: note: {n}", flush=True)
    idx = gpu_predictions.index(pdata.get("predictions", []))

    limit = float(os.environ.get("GPU_CHECK_STEP_LIMIT") or "inf")
    start = time.perf_counter()
    chunks: dict[str, dict] = {
        name: {"status": "not run", "options": f"{args.common} {defined[name]}"} for name in wanted
    }
    slowest = 0.0
    for name in wanted:
        left = limit - (time.perf_counter() - start)
        if slowest and left < slowest:
            chunks[name]["status"] = NO_TIME
            print(f"gpu_sweep: {name}: {NO_TIME} ({left:.0f} s left, a chunk took {slowest:.0f} s)")
            continue
        options = shlex.split(chunks[name]["options"])
        print(f"== chunk {name}: flashsparse bench {' '.join(options)}", flush=True)
        json_path = work / f"{name}.json"
        with contextlib.suppress(FileNotFoundError):
            json_path.unlink()
        status, seconds = run_chunk(options, json_path)
        slowest = max(slowest, seconds)
        chunks[name].update(status=status, seconds=round(seconds, 1))
        rows, meta = joined_rows(work, chunks, idx)
        chunks[name]["rows"] = sum(1 for r in rows if r["chunk"] == name)
        write(args.out, chunks, rows, meta, pmeta, notes)
        print(f"-- chunk {name}: {status} in {seconds:.0f} s; measured beside predicted:")
        print(table([r for r in rows if r["chunk"] == name]), flush=True)
    rows, meta = joined_rows(work, chunks, idx)
    write(args.out, chunks, rows, meta, pmeta, notes)
    print(geomeans(rows))
    print(f"gpu_sweep: wrote {args.out / 'sweep.json'} and {args.out / 'sweep.md'}")
    return 0 if all(c["status"] == "ok" for c in chunks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
