"""``flashsparse bench``: does sparsity pay on this GPU? Times flashsparse formats against dense
``F.linear`` (cuBLAS), torch.sparse CSR (cuSPARSE), torch 2:4 and dense layers sliced to the
same number of weights (the structured alternative) on real layer shapes."""

from __future__ import annotations

import argparse
import os
import sys

HELP = (
    "time sparse linear layers against dense F.linear, CSR, 2:4 and structured slicing "
    "on real layer shapes"
)

DTYPES = {
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
BACKEND_CHOICES = ("auto", "reference", "triton", "cuda", "cpu", "all")
FORMAT_CHOICES = ("tiled_csl", "bitmap", "auto", "all")
BASELINE_CHOICES = ("csr", "2:4", "sliced", "none")

EPILOG = """\
defaults: on a GPU, llama3-8b shapes, N 1,8,16,32, sparsity 0.5,0.7,0.9, fp16; on a CPU,
the small cpu-small shapes, N 1,16, fp32, 1 thread (seconds). Rows show what
FLASHSPARSE_BACKEND=auto runs for each format on this device (on a CPU: bitmap on the C++ CPU
kernel where it builds); a format auto would only run on the reference path (decode + dense, a
correctness path) is left out, with a note, unless --include-reference (or --backend
reference/all) asks for it. --quick: one tiny shape.
examples:
  flashsparse bench --preset llama3-8b --n 1,8,16,32 --json out.json --plot out.png
  flashsparse bench --shape 4096,11008 --sparsity 0.5,0.6,0.7,0.8,0.9 --dtype fp16,bf16
  flashsparse bench --preset opt --n 8,16,32 --format bitmap --backend all --mask row-skewed
  flashsparse bench --baseline sliced --sparsity 0.25,0.5   # vs structured slicing, same size
"""


def _split(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _choices(allowed: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        items = [t.lower() for t in _split(text)]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}"
            )
        return items

    parse.__name__ = what
    return parse


def _preset_list(text: str) -> list[str]:
    from ..microbench.shapes import PRESET_NAMES

    return _choices(PRESET_NAMES, "preset")(text)


def _shape(text: str):
    from ..microbench.shapes import parse_shape

    try:
        return parse_shape(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ns(text: str) -> list[int]:
    out = []
    for item in _split(text):
        try:
            n = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"N must be a positive integer, got {item!r}"
            ) from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"N must be a positive integer, got {item!r}")
        out.append(n)
    return out


def _sparsities(text: str) -> list[float]:
    out = []
    for item in _split(text):
        try:
            s = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"sparsity must be a number in [0, 1), got {item!r}"
            ) from None
        if not 0.0 <= s < 1.0:
            raise argparse.ArgumentTypeError(
                f"sparsity must be in [0, 1) (fraction of zeros, e.g. 0.7), got {item!r}"
            )
        out.append(s)
    return out


def _positive_ms(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected milliseconds (a positive number), got {text!r}"
        ) from None
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"expected milliseconds (a positive number), got {text!r}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..microbench.masks import MASKS
    from ..microbench.shapes import PRESET_NAMES
    from ..microbench.timing import TIMERS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--preset",
        type=_preset_list,
        action="append",
        metavar="NAME[,NAME]",
        help=f"layer shapes of a model: {', '.join(PRESET_NAMES)} (repeatable)",
    )
    what.add_argument(
        "--shape",
        type=_shape,
        action="append",
        metavar="M,K",
        help="a weight of M out x K in features (repeatable)",
    )
    what.add_argument(
        "--n",
        type=_ns,
        action="append",
        metavar="N[,N]",
        help="tokens per call (batch x new tokens), e.g. 1,8,16,32",
    )
    what.add_argument(
        "--sparsity",
        type=_sparsities,
        action="append",
        metavar="S[,S]",
        help="fraction of zero weights in [0, 1), e.g. 0.5,0.7,0.9",
    )
    what.add_argument(
        "--dtype",
        type=_choices(tuple(DTYPES), "dtype"),
        action="append",
        metavar="D[,D]",
        help="fp16, bf16, fp32",
    )
    what.add_argument(
        "--format",
        type=_choices(FORMAT_CHOICES, "format"),
        action="append",
        metavar="F[,F]",
        help="tiled_csl, bitmap, auto (what encode picks), all (default: tiled_csl,bitmap)",
    )
    what.add_argument(
        "--quant",
        type=_choices(("int8", "fp8"), "quant"),
        action="append",
        metavar="Q[,Q]",
        help="also time bitmap weights with int8 / fp8 values (rows bitmap+int8, bitmap+fp8 "
        "next to the unquantized ones; each reports the weight error quantizing added)",
    )
    what.add_argument(
        "--backend",
        type=_choices(BACKEND_CHOICES, "backend"),
        action="append",
        metavar="B[,B]",
        help="FLASHSPARSE_BACKEND per row: auto, reference, triton, "
        "cuda, or all (each that can run; default auto)",
    )
    what.add_argument(
        "--include-reference",
        action="store_true",
        help="also rows of formats that auto runs on the reference path here (decode + dense "
        "F.linear: a correctness path, far slower than a kernel); left out by default",
    )
    what.add_argument(
        "--baseline",
        type=_choices(BASELINE_CHOICES, "baseline"),
        action="append",
        metavar="B[,B]",
        help="besides dense F.linear: csr, 2:4 (at 0.5 only), sliced (dense F.linear on "
        "(1-s) of the rows, and of the columns), none (default: csr,2:4,sliced)",
    )
    what.add_argument(
        "--mask",
        choices=MASKS,
        default="uniform",
        help="uniform, or row-skewed like real Wanda/SparseGPT masks (default uniform)",
    )
    what.add_argument(
        "--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N"
    )
    what.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="torch CPU threads (default on a CPU: 1, steady on a busy machine; on a GPU: torch's)",
    )
    what.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    what.add_argument(
        "--quick",
        action="store_true",
        help="a tiny smoke run: one small odd shape, N 1,8, sparsity 0.5,0.9, short timing",
    )
    what.add_argument(
        "--list-presets", action="store_true", help="print the preset shapes and exit"
    )
    how = parser.add_argument_group("how to time")
    how.add_argument(
        "--timer",
        choices=TIMERS,
        default="auto",
        help="auto: triton do_bench, else CUDA events; perf_counter on a CPU",
    )
    how.add_argument("--warmup-ms", type=_positive_ms, metavar="MS", help="warm-up per measurement")
    how.add_argument("--rep-ms", type=_positive_ms, metavar="MS", help="timed time per measurement")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write rows and metadata as JSON")
    out.add_argument("--csv", metavar="PATH", help="write rows (with metadata columns) as CSV")
    out.add_argument("--plot", metavar="PNG", help="plot speed-up vs sparsity per N to a PNG")
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.set_defaults(_bench_parser=parser)


def _flat(values) -> list | None:
    if values is None:
        return None
    out: list = []
    for chunk in values:
        for item in chunk if isinstance(chunk, list) else [chunk]:
            if item not in out:
                out.append(item)
    return out


def _list_presets() -> int:
    from ..microbench.shapes import GROUPS, PRESETS

    for name, shapes in PRESETS.items():
        print(f"{name}: " + ", ".join(f"{s.label.split(':')[-1]} {s.m}x{s.k}" for s in shapes))
    for name, members in GROUPS.items():
        print(f"{name}: {', '.join(members)}")
    return 0


def run(args: argparse.Namespace) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:  # --threads must not outlive the command when it runs in-process (tests, notebooks)
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import torch

    from .. import backends
    from ..microbench import report
    from ..microbench.bandwidth import measure_copy_bandwidth
    from ..microbench.runner import BenchConfig, Sweep, backend_env, count_tasks
    from ..microbench.runner import hidden_formats as runner_hidden_formats
    from ..microbench.shapes import expand_presets
    from ..microbench.timing import cache_bytes, make_timer
    from .common import output_file_problem, parse_device
    from .info import collect

    parser: argparse.ArgumentParser = args._bench_parser
    if args.list_presets:
        return _list_presets()

    # -- device ------------------------------------------------------------------------------
    try:
        device = parse_device(args.device, allow_auto=True)
    except ValueError as exc:
        parser.error(f"argument --device: {exc}")
    if device.type == "cuda":
        device = torch.device(
            "cuda", device.index if device.index is not None else torch.cuda.current_device()
        )
        torch.cuda.set_device(device)
    gpu = device.type == "cuda"
    if args.threads is not None and args.threads < 1:
        parser.error(f"argument --threads: expected a positive integer, got {args.threads}")
    cores = os.cpu_count() or 1
    if args.threads is not None and args.threads > cores:
        print(
            f"flashsparse bench: warning: --threads {args.threads} is more than this machine's "
            f"{cores} CPU core(s); the threads will compete and the times will say so",
            file=sys.stderr,
        )
    # One thread by default on a CPU: the reference-path numbers are only a smoke test, and a
    # multi-threaded GEMM on a machine whose cores are busy stalls for whole scheduler slices.
    threads = args.threads if args.threads is not None else None if gpu else 1
    if threads is not None:
        torch.set_num_threads(threads)

    # -- workload, with defaults by device -----------------------------------------------------
    shapes = expand_presets(_flat(args.preset) or [])
    shapes += [s for s in (args.shape or []) if s not in shapes]
    if not shapes:
        shapes = expand_presets(["tiny" if args.quick else "llama3-8b" if gpu else "cpu-small"])
    ns = _flat(args.n) or ([1, 8] if args.quick else [1, 8, 16, 32] if gpu else [1, 16])
    sparsities = _flat(args.sparsity) or ([0.5, 0.9] if args.quick else [0.5, 0.7, 0.9])
    dtype_names = _flat([DTYPES[d] for d in _flat(args.dtype)] if args.dtype else None)
    dtypes = (
        [getattr(torch, d) for d in dtype_names]
        if dtype_names
        else [torch.float16 if gpu else torch.float32]
    )
    formats = _flat(args.format) or ["tiled_csl", "bitmap"]
    if "all" in formats:
        formats = ["tiled_csl", "bitmap"] + (["auto"] if "auto" in formats else [])
    # FLASHSPARSE_BACKEND picks the backend when --backend is not given, as it does for the
    # library; both given and different is refused rather than one silently ignored.
    env_backend = backends.requested_backend()
    backend_names = _flat(args.backend) or [env_backend]
    if "all" in backend_names:
        backend_names = ["all"]
    if args.backend and env_backend != "auto" and backend_names != [env_backend]:
        parser.error(
            f"argument --backend: {','.join(backend_names)} contradicts "
            f"{backends.ENV_VAR}={env_backend}; drop one of the two"
        )
    backend_flag = "argument --backend: " if args.backend else f"{backends.ENV_VAR}="
    baselines = _flat(args.baseline) or ["csr", "2:4", "sliced"]
    if "none" in baselines:
        if len(baselines) > 1:
            parser.error("argument --baseline: 'none' cannot be combined with other baselines")
        baselines = []
    warmup_ms = args.warmup_ms or (25.0 if gpu else 2.0 if args.quick else 5.0)
    rep_ms = args.rep_ms or (100.0 if gpu else 10.0 if args.quick else 40.0)

    if args.plot:
        reason = report.plot_unavailable_reason()
        if reason:
            parser.error(f"argument --plot: {reason}")

    # A backend the user named must be able to run every format and dtype asked for, here;
    # every reason is given at once, so one fix is enough.
    for name in backend_names:
        if name in ("auto", "all", "reference"):
            continue
        reasons: dict[str, list[str]] = {}
        runs: list[str] = []
        for fmt in [f for f in formats if f != "auto"] or ["tiled_csl", "bitmap"]:
            for dtype in dtypes:
                probe = torch.zeros(1, 64, dtype=dtype, device=device)
                try:
                    with backend_env(name):
                        backends.select(fmt, probe)
                except backends.BackendUnavailableError as exc:
                    reason = str(exc).split(": ", 1)[-1]
                    reasons.setdefault(reason, []).append(f"{fmt} {report_dtype(dtype)}")
                else:
                    runs.append(fmt)
        if reasons:
            detail = "; ".join(f"{', '.join(what)}: {why}" for why, what in reasons.items())
            hint = (
                f" (--format {','.join(dict.fromkeys(runs))} runs what it can)"
                if runs
                else " (--backend all runs every backend that can and skips the rest, with reasons)"
                if args.backend
                else f" (unset {backends.ENV_VAR} to let auto pick what runs here)"
            )
            parser.error(f"{backend_flag}{name} cannot run here: {detail}{hint}")

    for option in ("json", "csv", "plot"):
        path = getattr(args, option)
        problem = output_file_problem(path) if path else None
        if problem:
            parser.error(f"argument --{option}: {problem}")
    replaced = {p for p in (args.json, args.csv, args.plot) if p and os.path.exists(p)}

    try:
        timer = make_timer(device, warmup_ms, rep_ms, args.timer)
    except ValueError as exc:
        parser.error(f"argument --timer: {exc}")

    info = collect()
    # the CPU kernel's path only where a row may run it (finding it loads, or builds, the extension)
    cpu_kernel_rows = bool({"bitmap", "auto"} & set(formats)) or bool(args.quant)
    device_name = _gpu_name(device) if gpu else _cpu_name(torch.get_num_threads(), cpu_kernel_rows)
    info["device"] = device_name
    cache = cache_bytes(device)
    print(
        f"flashsparse bench on {device_name}; torch {info['torch']}, triton {info['triton']}, "
        f"flashsparse {info['flashsparse']}"
    )
    if not gpu:
        print(report.planned_notice(backend_names))
    bandwidth = measure_copy_bandwidth(device, timer)
    print(
        f"timer: {timer.name}; copy bandwidth {bandwidth.gbps:.1f} GB/s (read + write, "
        f"{bandwidth.buffer_bytes / 2**20:.0f} MiB buffer); weights rotated over >= 2 x "
        f"{cache / 2**20:.0f} MiB of cache"
    )
    print()

    cfg = BenchConfig(
        shapes=shapes,
        ns=ns,
        sparsities=sparsities,
        dtypes=dtypes,
        formats=formats,
        backends=backend_names,
        baselines=baselines,
        mask=args.mask,
        device=device,
        timer=timer,
        cache=cache,
        bandwidth=bandwidth,
        seed=args.seed,
        include_reference=args.include_reference,
        quants=_flat(args.quant) or [],
    )
    hidden = {report_dtype(d): names for d in dtypes if (names := runner_hidden_formats(cfg, d))}
    if hidden:
        what = "; ".join(f"{', '.join(names)} ({dt})" for dt, names in hidden.items())
        print(
            f"not shown: {what}: no kernel for this device, so FLASHSPARSE_BACKEND=auto runs "
            "the reference path (decode + dense F.linear), a correctness path, not a kernel; "
            "--include-reference shows those rows"
        )
        print()
    progress = report.Progress(count_tasks(cfg), enabled=False if args.no_progress else None)

    def on_block(rows: list[dict]) -> None:
        progress.clear()
        print(report.format_block(rows))
        print(flush=True)

    rows = Sweep(cfg, progress=progress.advance, on_block=on_block, on_skip=progress.skip).run()
    progress.clear()

    summary = report.format_summary(rows)
    if summary:
        print(summary)
        print()
    ran = sorted(
        {
            r["backend"]
            for r in rows
            if r["status"] == "ok" and r["requested_backend"] not in (None, "-")
        }
    )
    settings = {
        "shapes": [[s.label, s.m, s.k] for s in shapes],
        "n": ns,
        "sparsity": sparsities,
        "dtype": [report_dtype(d) for d in dtypes],
        "format": formats,
        "backend": backend_names,
        "baseline": baselines,
        "include_reference": args.include_reference,
        "not_shown": hidden,
        "quant": _flat(args.quant) or [],
        "mask": args.mask,
        "seed": args.seed,
        "warmup_ms": warmup_ms,
        "rep_ms": rep_ms,
        "cpu_threads": torch.get_num_threads(),
    }
    meta = report.build_metadata(
        info,
        settings,
        device_type=device.type,
        timer=timer.name,
        cache_bytes=cache,
        bandwidth_gbps=bandwidth.gbps,
        copy_bytes=bandwidth.buffer_bytes,
        backends_ran=ran,
    )
    print(meta["notice"])
    if args.json:
        report.write_json(args.json, meta, rows)
        print(
            f"wrote {args.json}"
            + (" (replaced the existing file)" if args.json in replaced else "")
        )
    if args.csv:
        report.write_csv(args.csv, meta, rows)
        print(
            f"wrote {args.csv}" + (" (replaced the existing file)" if args.csv in replaced else "")
        )
    if args.plot:
        report.write_plot(args.plot, meta, rows)
        print(
            f"wrote {args.plot}"
            + (" (replaced the existing file)" if args.plot in replaced else "")
        )
    bad = [r for r in rows if r["status"] in ("WRONG", "error")]
    if bad:
        print(
            f"{len(bad)} row(s) WRONG or failed: see the notes under their tables", file=sys.stderr
        )
        return 1
    return 0


def report_dtype(dtype) -> str:
    from ..microbench.runner import DTYPE_NAMES

    return DTYPE_NAMES[dtype]


def _cpu_name(threads: int, kernel_path: bool = True) -> str:
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model
            )
    except OSError:
        pass
    path = f"; {_cpu_kernel_path()}" if kernel_path else ""
    return f"CPU {model} ({threads} thread{'s' * (threads != 1)}{path})"


def _cpu_kernel_path() -> str:
    """Which SIMD path the C++ CPU kernels take here, and why (auto or forced), or why they
    cannot run: the rows' "cpu" backend means that path."""
    from ..kernels.cpu import bitmap as cpu_kernels

    reason = cpu_kernels._available()
    if reason is not None:
        return f"C++ CPU kernels unavailable: {reason}"
    try:
        code = cpu_kernels.isa()
    except ValueError as exc:  # a FLASHSPARSE_CPU_ISA this CPU cannot run: the rows will say so
        return str(exc)
    name = next(n for n, c in cpu_kernels.ISAS.items() if c == code)
    forced = os.environ.get(cpu_kernels.ISA_ENV, "").strip().lower() not in ("", "auto")
    how = f"forced by {cpu_kernels.ISA_ENV}" if forced else "auto: the best this CPU runs"
    return f"C++ kernel path {name}, {how}"


def _gpu_name(device) -> str:
    import torch

    p = torch.cuda.get_device_properties(device)
    return (
        f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
        f"{p.total_memory / 2**30:.0f} GiB)"
    )
