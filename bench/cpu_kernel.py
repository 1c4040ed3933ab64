"""CPU kernel benchmark: ``SparseLinear`` (bitmap, the C++ CPU kernel) against ``nn.Linear``.

Both run in one process, interleaved (a round of dense calls, a round of sparse calls, ...),
each side cycling through copies of its layer that together exceed twice the last-level cache,
so every call reads its weight from DRAM as a decode step of a large model does (with no
eviction work between calls to disturb the timing); the figure is the median of the per-round
time ratios, so load from other processes on a shared machine hits both alike. Also times the bitmap decode (``to_dense``: the
C++ decode against the torch decode it replaces) and, with ``--e2e``, a Llama-shaped bf16
model's greedy decode tokens/s (hidden 2048, intermediate 5632, 4 layers, vocab 32000) dense
vs 70 % pruned + sparsified.

    python bench/cpu_kernel.py                      # full matrix, 2 threads
    python bench/cpu_kernel.py --quick              # one shape, fewer rounds
    python bench/cpu_kernel.py --e2e --out bench/results/cpu-epyc-2core-2026-11-23
    python bench/cpu_kernel.py --isa avx2 --e2e --out bench/results/cpu-...-avx2
    python bench/cpu_kernel.py --summary runs.md bench/results/cpu-*.json   # several runs

``--isa avx2`` measures the AVX2 path on an AVX-512 machine against an AVX2-only dense
baseline: the script re-executes itself with ``FLASHSPARSE_CPU_ISA=avx2
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2`` set before
torch is imported, checks that torch's capability is then AVX2, and records what the dense
path ran (torch's capability, oneDNN's ISA and kernels from ``ONEDNN_VERBOSE``, an fp32 GEMM's
GFLOP/s with and without the variables) in the results.

Writes ``<out>.json`` and ``<out>.md`` (device, ISA path, dense baseline, threads, date, torch
version). On a shared VM one run's ratios move by 10-30 % from the next; ``--summary`` puts
several runs' median, minimum and maximum per cell side by side.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import flashsparse as fs
from flashsparse.formats import Bitmap
from flashsparse.kernels.cpu import bitmap as cpu_kernels

# The variables that pin torch, oneDNN and MKL to AVX2 must be in the environment when those
# load, so --isa avx2 re-executes the script with them set (see use_isa).
ISA_ENV = {
    "avx2": {
        "FLASHSPARSE_CPU_ISA": "avx2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "avx512": {"FLASHSPARSE_CPU_ISA": "avx512"},
    "scalar": {"FLASHSPARSE_CPU_ISA": "scalar"},
}
REEXEC_MARK = "FLASHSPARSE_BENCH_ISA"

SHAPES = ((4096, 4096), (14336, 4096))  # (out_features M, in_features K)
SPARSITIES = (0.5, 0.7, 0.9)


def cpu_name() -> str:
    """Model name, with family/model (a VM may show only "AMD EPYC") and the widest SIMD."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return (
        f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {simd})"
    )


def cache_bytes() -> int:
    """Last-level cache size (bytes), 32 MiB if unknown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"), reverse=True):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if size and size[-1] in units:
            return int(size[:-1]) * units[size[-1]]
        if size.isdigit():
            return int(size)
    return 32 << 20


def copies_for(module: nn.Module, cache: int) -> list[nn.Module]:
    """``module`` and deep copies of it whose weights together exceed twice the last-level
    cache, so that calling them in turn reads every weight from DRAM (as a decode step of a
    model larger than the cache does) with no eviction work between the calls."""
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    count = max(2, -(-2 * cache // max(nbytes, 1)) + 1)
    return [module] + [copy.deepcopy(module) for _ in range(count - 1)]


DENSE_PROBE = """
import time, torch
torch.set_num_threads({threads})
a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
best = float("inf")
for _ in range(12):  # the best of several: other processes only ever slow a try down
    t = time.perf_counter()
    a @ b
    best = min(best, time.perf_counter() - t)
print("GFLOPS", 2 * 512 * 2048 * 2048 / best / 1e9)
for dtype in (torch.bfloat16, torch.float32):
    for n in (1, 16):
        torch.nn.functional.linear(torch.randn(n, 4096, dtype=dtype), torch.randn(512, 4096, dtype=dtype))
"""


def use_isa(isa: str, script: str, argv: list[str] | None) -> None:
    """Run the rest of ``script`` on the CPU path ``isa`` ("auto": as it is). torch, oneDNN and
    MKL read their ISA variables once, when loaded, so the first call re-executes ``script``
    (with ``argv``, or this process's arguments) with ISA_ENV[isa] set; torch is imported by
    then, but nothing of it has run. With "avx2", exits unless torch's capability is then AVX2
    (else the dense baseline would not be AVX2-only)."""
    if isa != "auto" and os.environ.get(REEXEC_MARK) != isa:
        env = {**os.environ, **ISA_ENV[isa], REEXEC_MARK: isa}
        if "ATEN_CPU_CAPABILITY" in ISA_ENV[isa] and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            # torch 2.13's inductor does not key its on-disk cache on ATEN_CPU_CAPABILITY: a
            # kernel compiled under one capability gave wrong results under the other (an MLP,
            # 2026-12-04), so a pinned run keeps its own cache.
            user = os.environ.get("USER") or str(os.getuid())
            env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
                tempfile.gettempdir(),
                f"torchinductor_{user}_aten_{ISA_ENV[isa]['ATEN_CPU_CAPABILITY']}",
            )
        argv = sys.argv[1:] if argv is None else argv
        os.execve(sys.executable, [sys.executable, os.path.abspath(script), *argv], env)
    if isa == "avx2" and torch.backends.cpu.get_cpu_capability() != "AVX2":
        raise SystemExit(
            "ATEN_CPU_CAPABILITY=avx2 did not take effect (torch reports "
            f"{torch.backends.cpu.get_cpu_capability()}): the dense baseline would not be AVX2-only"
        )


def dense_baseline(threads: int) -> dict:
    """What torch's dense path runs in this environment: its capability, oneDNN's ISA and the
    kernels it ran for bf16/fp32 linears (ONEDNN_VERBOSE), and an fp32 GEMM's GFLOP/s here and
    in a process without the ISA-limiting variables (MKL's path shows in the latter)."""
    info: dict = {"torch_capability": torch.backends.cpu.get_cpu_capability()}
    info["env"] = {k: os.environ[k] for k in ISA_ENV["avx2"] if k in os.environ}

    def probe(env: dict) -> tuple[float | None, list[str]]:
        out = subprocess.run(
            [sys.executable, "-c", DENSE_PROBE.format(threads=threads)],
            env={**env, "ONEDNN_VERBOSE": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout.splitlines()
        gflops = next((float(ln.split()[1]) for ln in out if ln.startswith("GFLOPS")), None)
        return gflops, out

    gflops, lines = probe(dict(os.environ))
    info["fp32_gemm_gflops"] = gflops
    isa = [ln.split("isa:", 1)[1] for ln in lines if ",isa:" in ln]
    info["onednn_isa"] = isa[0] if isa else "oneDNN not used"
    info["onednn_kernels"] = sorted(
        {ln.split(",")[5] for ln in lines if ",primitive,exec," in ln and len(ln.split(",")) > 5}
    )
    plain = {k: v for k, v in os.environ.items() if k not in ISA_ENV["avx2"]}
    info["fp32_gemm_gflops_unrestricted"], _ = probe(plain)
    return info


def interleaved(fns: dict, rounds: int, inner: int) -> dict[str, float]:
    """Median seconds per call of each fn, timed in alternation."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratio_median(
    dense: list, sparse: list, x: torch.Tensor, rounds: int, round_s: float = 0.02
) -> tuple[float, float, float, float, float, float, float]:
    """(dense s, sparse s, median, p20 and p80 of the per-round dense/sparse ratios, fastest
    dense s, fastest sparse s) per call. A round calls each side's copies in turn (see
    copies_for) for about ``round_s`` seconds, dense then sparse. A round that loses a core to
    another process for a scheduler slice shows in the medians; the fastest rounds are the
    ones that did not."""

    def run(mods: list, calls: int) -> float:
        t0 = time.perf_counter()
        for i in range(calls):
            mods[i % len(mods)](x)
        return (time.perf_counter() - t0) / calls

    calls = {}
    for name, mods in (("dense", dense), ("sparse", sparse)):
        first = run(mods, len(mods))  # warm-up, and the size of a round
        calls[name] = max(len(mods), round(round_s / max(first, 1e-6)))
    d_times, s_times, ratios = [], [], []
    for _ in range(rounds):
        d = run(dense, calls["dense"])
        sp = run(sparse, calls["sparse"])
        d_times.append(d)
        s_times.append(sp)
        ratios.append(d / sp)
    q = statistics.quantiles(ratios, n=5) if len(ratios) > 1 else ratios  # p20, p40, p60, p80
    return (
        statistics.median(d_times),
        statistics.median(s_times),
        statistics.median(ratios),
        q[0],
        q[-1],
        min(d_times),
        min(s_times),
    )


def linear_rows(shapes, sparsities, cases, rounds: int) -> list[dict]:
    rows = []
    cache = cache_bytes()
    for m, k in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            torch.manual_seed(0)
            dense = nn.Linear(k, m, bias=False).to(dtype)
            for s in sparsities:
                for n in cases.get((dtype, s), ()):
                    with torch.no_grad():
                        w = fs.prune(dense.weight.float(), s).to(dtype)
                        dense.weight.copy_(w)
                        sparse = fs.SparseLinear.from_linear(dense, format="bitmap")
                        x = torch.randn(n, k, dtype=dtype)
                        dense_copies = copies_for(dense, cache)
                        sparse_copies = copies_for(sparse, cache)
                        d, sp, r, r20, r80, d_best, s_best = ratio_median(
                            dense_copies, sparse_copies, x, rounds
                        )
                        del dense_copies[1:], sparse_copies
                    row = dict(
                        m=m,
                        k=k,
                        n=n,
                        dtype=str(dtype).removeprefix("torch."),
                        sparsity=s,
                        dense_ms=d * 1e3,
                        sparse_ms=sp * 1e3,
                        speedup=r,
                        speedup_p20=r20,
                        speedup_p80=r80,
                        dense_best_ms=d_best * 1e3,
                        sparse_best_ms=s_best * 1e3,
                        speedup_best=d_best / s_best,
                    )
                    print(
                        f"  {m}x{k} N={n} {row['dtype']} {s:.0%}: nn.Linear {d * 1e3:.3f} ms, "
                        f"SparseLinear {sp * 1e3:.3f} ms, {r:.2f}x [p20 {r20:.2f}, p80 {r80:.2f}]; "
                        f"fastest {d_best * 1e3:.3f} / {s_best * 1e3:.3f} ms = {d_best / s_best:.2f}x",
                        flush=True,
                    )
                    rows.append(row)
    return rows


def decode_rows(rounds: int) -> list[dict]:
    rows = []
    m = k = 4096
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        w = fs.prune(torch.randn(m, k), 0.7).to(dtype)
        t = Bitmap.encode(w).tensors
        fns = {
            "torch": lambda t=t, dtype=dtype: Bitmap.decode_reference(*t, m=m, k=k, dtype=dtype),
            "cpp": lambda t=t, dtype=dtype: fs.backends.decode(Bitmap, t, m, k, dtype),
        }
        assert torch.equal(fns["torch"]().view(torch.uint8), fns["cpp"]().view(torch.uint8))
        med = interleaved(fns, rounds, 1)
        row = dict(
            m=m,
            k=k,
            sparsity=0.7,
            dtype=str(dtype).removeprefix("torch."),
            torch_ms=med["torch"] * 1e3,
            cpp_ms=med["cpp"] * 1e3,
            speedup=med["torch"] / med["cpp"],
        )
        print(
            f"  decode {m}x{k} 70% {row['dtype']}: torch {row['torch_ms']:.1f} ms, "
            f"C++ {row['cpp_ms']:.2f} ms, {row['speedup']:.1f}x",
            flush=True,
        )
        rows.append(row)
    return rows


# The Llama-shaped model of --e2e (bench/tp_decode.py runs it under tensor parallelism too).
E2E_LLAMA = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=4,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def e2e_row(steps: int, rounds: int) -> dict:
    import os
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**E2E_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(fs.prune(mod.weight.float(), 0.7).to(torch.bfloat16))
    sparse = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    sparse.load_state_dict(model.state_dict())
    fs.sparsify_(sparse, format="bitmap")
    prompt = torch.randint(0, 32000, (1, 16))

    def run(mod):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            prefill = mod(prompt, use_cache=True)
            past = prefill.past_key_values
            tok = prefill.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(steps):
                out = mod(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            return steps / (time.perf_counter() - t1), t1 - t0

    run(model), run(sparse)
    ratios, dense_tps, sparse_tps = [], [], []
    for _ in range(rounds):
        d, _ = run(model)
        s, _ = run(sparse)
        dense_tps.append(d)
        sparse_tps.append(s)
        ratios.append(s / d)
    row = dict(
        model="llama h2048 i5632 L4 v32000",
        dtype="bfloat16",
        sparsity=0.7,
        batch=1,
        steps=steps,
        dense_tok_s=statistics.median(dense_tps),
        sparse_tok_s=statistics.median(sparse_tps),
        speedup=statistics.median(ratios),
        speedup_best=max(sparse_tps) / max(dense_tps),
    )
    print(
        f"  e2e decode: dense {row['dense_tok_s']:.1f} tok/s, sparse {row['sparse_tok_s']:.1f} "
        f"tok/s, {row['speedup']:.2f}x",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--e2e", action="store_true")
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument(
        "--isa",
        choices=("auto", *ISA_ENV),
        default="auto",
        help="CPU kernel path (FLASHSPARSE_CPU_ISA); avx2 also limits the dense baseline to AVX2 "
        "(torch, oneDNN, MKL), for the AVX2 path on an AVX-512 machine",
    )
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), action="append", help="only these dtypes"
    )
    parser.add_argument(
        "--sparsity", type=float, action="append", help="only these sparsities (of 0.5 0.7 0.9)"
    )
    parser.add_argument(
        "--m", type=int, action="append", help="only these weight shapes (out features M)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    parser.add_argument(
        "--summary",
        nargs="+",
        type=Path,
        metavar=("OUT.md", "RUN.json"),
        help="no benchmark: summarise the runs RUN.json ... into OUT.md",
    )
    args = parser.parse_args(argv)
    if args.summary:
        if len(args.summary) < 2:
            parser.error("--summary needs OUT.md and at least one RUN.json")
        args.summary[0].write_text(
            summary(
                [json.loads(f.read_text()) for f in args.summary[1:]],
                [f.name for f in args.summary[1:]],
            )
        )
        print(f"wrote {args.summary[0]}")
        return
    use_isa(args.isa, __file__, argv)
    torch.set_num_threads(args.threads)
    reason = cpu_kernels._available()
    if reason:
        raise SystemExit(f"the CPU kernel is unavailable: {reason}")
    isa = {v: k for k, v in cpu_kernels.ISAS.items()}[cpu_kernels.isa()]
    dtypes = (
        [getattr(torch, d) for d in args.dtype] if args.dtype else [torch.bfloat16, torch.float32]
    )
    sparsities = tuple(args.sparsity) if args.sparsity else SPARSITIES
    cases = {(dt, s): (1,) for dt in dtypes for s in sparsities}
    for dt in dtypes:
        if 0.7 in sparsities:
            cases[(dt, 0.7)] = (1, 16)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.m:
        shapes = tuple(s for s in SHAPES if s[0] in args.m)
    rounds = 5 if args.quick else args.rounds
    meta = dict(
        device=cpu_name(),
        threads=args.threads,
        isa=isa,
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        dense_baseline=dense_baseline(args.threads),
        load_start=os.getloadavg()[0],
        note="ratios are medians of interleaved rounds in one process, each side cycling through "
        "copies of its layer that exceed twice the last-level cache (weights read from DRAM)",
    )
    base = meta["dense_baseline"]
    print(
        f"{meta['device']}, {args.threads} threads, ISA path {isa}, torch {torch.__version__}; "
        f"dense baseline: torch {base['torch_capability']}, oneDNN {base['onednn_isa']}, fp32 "
        f"GEMM {base['fp32_gemm_gflops']:.0f} GFLOP/s (unrestricted "
        f"{base['fp32_gemm_gflops_unrestricted']:.0f})"
    )
    result = dict(meta=meta, linear=linear_rows(shapes, sparsities, cases, rounds))
    if not args.no_decode:
        result["decode"] = decode_rows(5 if args.quick else 7)
    if args.e2e:
        result["e2e"] = e2e_row(16 if args.quick else 32, 3 if args.quick else 5)
    meta["load_end"] = os.getloadavg()[0]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [
        f"# CPU bitmap kernel: SparseLinear vs nn.Linear ({meta['date']})",
        "",
        f"Device: {meta['device']}; {meta['threads']} threads; ISA path `{meta['isa']}`; "
        f"started {meta.get('started', meta['date'])}; "
        f"torch {meta['torch']}. {meta['note']}. Regenerate with `python bench/cpu_kernel.py "
        f"--e2e{' --isa ' + meta['isa'] if meta['isa'] == 'avx2' else ''} "
        "--out bench/results/<name>`.",
        "",
    ]
    if "dense_baseline" in meta:
        base = meta["dense_baseline"]
        kernels = ", ".join(base["onednn_kernels"]) or "none"
        lines += [
            f"Dense baseline (`nn.Linear`): torch CPU capability {base['torch_capability']}; "
            f"oneDNN {base['onednn_isa']} (kernels: {kernels}); fp32 GEMM (MKL) "
            f"{base['fp32_gemm_gflops']:.0f} GFLOP/s here, "
            f"{base['fp32_gemm_gflops_unrestricted']:.0f} without the ISA variables; "
            f"variables: {base['env'] or 'none'}. Load average {meta.get('load_start', 0):.2f} at "
            f"the start, {meta.get('load_end', 0):.2f} at the end.",
            "",
        ]
    lines += [
        "| weight M x K | N | dtype | sparsity | nn.Linear ms | SparseLinear ms | speed-up | "
        "p20-p80 of rounds | fastest calls (ms) and their ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["linear"]:
        best = (
            f"{r['dense_best_ms']:.3f} / {r['sparse_best_ms']:.3f} = {r['speedup_best']:.2f}x"
            if "speedup_best" in r
            else "-"
        )
        lines.append(
            f"| {r['m']}x{r['k']} | {r['n']} | {r['dtype']} | {r['sparsity']:.0%} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r.get('speedup_p20', r['speedup']):.2f}-{r.get('speedup_p80', r['speedup']):.2f} | "
            f"{best} |"
        )
    if "decode" in result:
        lines += [
            "",
            "Decode (`to_dense`), 4096x4096 at 70 %:",
            "",
            "| dtype | torch decode ms | C++ decode ms | speed-up |",
            "|---|---|---|---|",
        ]
        for r in result["decode"]:
            lines.append(
                f"| {r['dtype']} | {r['torch_ms']:.1f} | {r['cpp_ms']:.2f} | {r['speedup']:.1f}x |"
            )
    if "e2e" in result:
        r = result["e2e"]
        lines += [
            "",
            f"End to end ({r['model']}, {r['dtype']}, {r['sparsity']:.0%} pruned, batch "
            f"{r['batch']}, {r['steps']} greedy decode steps, median of rounds): dense "
            f"{r['dense_tok_s']:.1f} tok/s, sparse {r['sparse_tok_s']:.1f} tok/s, "
            f"**{r['speedup']:.2f}x**.",
        ]
    return "\n".join(lines) + "\n"


def summary(runs: list[dict], names: list[str]) -> str:
    """Median [min-max] of each cell's speed-up over the runs, and each run's start."""
    cells: dict[tuple, list[float]] = {}
    best: dict[tuple, list[float]] = {}
    for run in runs:
        for r in run["linear"]:
            key = (r["m"], r["k"], r["dtype"], r["n"], r["sparsity"])
            cells.setdefault(key, []).append(r["speedup"])
            if "speedup_best" in r:
                best.setdefault(key, []).append(r["speedup_best"])
    lines = [
        f"# CPU bitmap kernel: {len(runs)} runs",
        "",
        "Runs (file: start, device, threads):",
        "",
    ]
    for name, run in zip(names, runs, strict=True):
        meta = run["meta"]
        base = meta.get("dense_baseline")
        dense = f", dense baseline torch {base['torch_capability']}" if base else ""
        load = (
            f", load {meta['load_start']:.1f}-{meta['load_end']:.1f}" if "load_end" in meta else ""
        )
        lines.append(
            f"- `{name}`: {meta.get('started', meta['date'])}, {meta['device']}, "
            f"{meta['threads']} threads, ISA `{meta['isa']}`{dense}, torch {meta['torch']}{load}"
        )
    lines += [
        "",
        "`SparseLinear` / `nn.Linear` speed-up (each run: the median of its per-round ratios), "
        "median [min-max] over the runs"
        + (
            "; last column: the median over the runs of the ratio of each run's fastest calls "
            "(the rounds no other process interrupted)"
            if best
            else ""
        )
        + ":",
        "",
        "| weight M x K | dtype | N | sparsity | median | min | max |"
        + (" fastest calls |" if best else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if best else ""),
    ]
    for key, v in cells.items():
        m, k, dtype, n, s = key
        extra = (
            f" {statistics.median(best[key]):.2f}x |" if key in best else (" - |" if best else "")
        )
        lines.append(
            f"| {m}x{k} | {dtype} | {n} | {s:.0%} | {statistics.median(v):.2f}x | "
            f"{min(v):.2f}x | {max(v):.2f}x |{extra}"
        )
    e2e = [run["e2e"]["speedup"] for run in runs if "e2e" in run]
    if e2e:
        lines += [
            "",
            f"End to end (tokens/s, sparse / dense): median {statistics.median(e2e):.2f}x, "
            f"min {min(e2e):.2f}x, max {max(e2e):.2f}x over {len(e2e)} runs.",
        ]
        e2e_best = [
            run["e2e"]["speedup_best"] for run in runs if "speedup_best" in run.get("e2e", {})
        ]
        if e2e_best:
            lines[-1] += (
                f" Fastest rounds' tokens/s ratio: median {statistics.median(e2e_best):.2f}x "
                f"[{min(e2e_best):.2f}-{max(e2e_best):.2f}]."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
