"""CPU kernel benchmark: ``SparseLinear`` (bitmap, the C++ CPU kernel) against ``nn.Linear``.

Both run in one process, interleaved (dense, sparse, dense, sparse, ...), and the figure is
the median of the per-round time ratios, so load from other processes on a shared machine
hits both alike. Also times the bitmap decode (``to_dense``: the C++ decode against the torch
decode it replaces) and, with ``--e2e``, a Llama-shaped bf16 model's greedy decode tokens/s
(hidden 2048, intermediate 5632, 4 layers, vocab 32000) dense vs 70 % pruned + sparsified.

    python bench/cpu_kernel.py                      # full matrix, 2 threads
    python bench/cpu_kernel.py --quick              # one shape, fewer rounds
    python bench/cpu_kernel.py --e2e --out bench/results/cpu-epyc-2core-2026-11-23
    python bench/cpu_kernel.py --summary runs.md bench/results/cpu-*.json   # several runs

Writes ``<out>.json`` and ``<out>.md`` (device, threads, date, torch version). On a shared
VM one run's ratios move by 10-30 % from the next; ``--summary`` puts several runs' median,
minimum and maximum per cell side by side.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

import flashsparse as fs
from flashsparse.formats import Bitmap
from flashsparse.kernels.cpu import bitmap as cpu_kernels

SHAPES = ((4096, 4096), (14336, 4096))  # (out_features M, in_features K)
SPARSITIES = (0.5, 0.7, 0.9)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


def ratio_median(fns: dict, rounds: int, inner: int) -> tuple[float, float, float, float, float]:
    """(dense s, sparse s, median, p20 and p80 of the per-round dense/sparse ratios)."""
    dense, sparse = fns["dense"], fns["sparse"]
    dense(), sparse()
    d_times, s_times, ratios = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            dense()
        t1 = time.perf_counter()
        for _ in range(inner):
            sparse()
        t2 = time.perf_counter()
        d_times.append((t1 - t0) / inner)
        s_times.append((t2 - t1) / inner)
        ratios.append((t1 - t0) / (t2 - t1))
    q = statistics.quantiles(ratios, n=5) if len(ratios) > 1 else ratios  # p20, p40, p60, p80
    return (
        statistics.median(d_times),
        statistics.median(s_times),
        statistics.median(ratios),
        q[0],
        q[-1],
    )


def linear_rows(shapes, sparsities, cases, rounds: int) -> list[dict]:
    rows = []
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
                        inner = max(1, int(0.02 / (m * k * 2 * 1e-10 * n)) if n else 1)
                        inner = min(inner, 20)
                        d, sp, r, r20, r80 = ratio_median(
                            {
                                "dense": lambda d=dense, x=x: d(x),
                                "sparse": lambda s=sparse, x=x: s(x),
                            },
                            rounds,
                            inner,
                        )
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
                    )
                    print(
                        f"  {m}x{k} N={n} {row['dtype']} {s:.0%}: nn.Linear {d * 1e3:.3f} ms, "
                        f"SparseLinear {sp * 1e3:.3f} ms, {r:.2f}x [p20 {r20:.2f}, p80 {r80:.2f}]",
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
    torch.set_num_threads(args.threads)
    reason = cpu_kernels._available()
    if reason:
        raise SystemExit(f"the CPU kernel is unavailable: {reason}")
    isa = {v: k for k, v in cpu_kernels.ISAS.items()}[cpu_kernels.isa()]
    cases = {(dt, s): (1,) for dt in (torch.bfloat16, torch.float32) for s in SPARSITIES}
    for dt in (torch.bfloat16, torch.float32):
        cases[(dt, 0.7)] = (1, 16)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = 5 if args.quick else args.rounds
    meta = dict(
        device=cpu_name(),
        threads=args.threads,
        isa=isa,
        torch=torch.__version__,
        date=datetime.date.today().isoformat(),
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        note=f"load average {os.getloadavg()[0]:.2f} at the start (other processes on the "
        "same cores show here); ratios are medians of interleaved rounds in one process",
    )
    print(f"{meta['device']}, {args.threads} threads, ISA {isa}, torch {torch.__version__}")
    result = dict(meta=meta, linear=linear_rows(shapes, SPARSITIES, cases, rounds))
    if not args.no_decode:
        result["decode"] = decode_rows(5 if args.quick else 7)
    if args.e2e:
        result["e2e"] = e2e_row(16 if args.quick else 32, 3 if args.quick else 5)
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
        "--e2e --out bench/results/<name>`.",
        "",
        "| weight M x K | N | dtype | sparsity | nn.Linear ms | SparseLinear ms | speed-up | "
        "p20-p80 of rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["linear"]:
        lines.append(
            f"| {r['m']}x{r['k']} | {r['n']} | {r['dtype']} | {r['sparsity']:.0%} | "
            f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['speedup']:.2f}x | "
            f"{r.get('speedup_p20', r['speedup']):.2f}-{r.get('speedup_p80', r['speedup']):.2f} |"
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
    for run in runs:
        for r in run["linear"]:
            cells.setdefault((r["m"], r["k"], r["dtype"], r["n"], r["sparsity"]), []).append(
                r["speedup"]
            )
    lines = [
        f"# CPU bitmap kernel: {len(runs)} runs",
        "",
        "Runs (file: start, device, threads):",
        "",
    ]
    for name, run in zip(names, runs, strict=True):
        meta = run["meta"]
        lines.append(
            f"- `{name}`: {meta.get('started', meta['date'])}, {meta['device']}, "
            f"{meta['threads']} threads, ISA `{meta['isa']}`, torch {meta['torch']}"
        )
    lines += [
        "",
        "`SparseLinear` / `nn.Linear` speed-up, median [min-max] over the runs:",
        "",
        "| weight M x K | dtype | N | sparsity | median | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for (m, k, dtype, n, s), v in cells.items():
        lines.append(
            f"| {m}x{k} | {dtype} | {n} | {s:.0%} | {statistics.median(v):.2f}x | "
            f"{min(v):.2f}x | {max(v):.2f}x |"
        )
    e2e = [run["e2e"]["speedup"] for run in runs if "e2e" in run]
    if e2e:
        lines += [
            "",
            f"End to end (tokens/s, sparse / dense): median {statistics.median(e2e):.2f}x, "
            f"min {min(e2e):.2f}x, max {max(e2e):.2f}x over {len(e2e)} runs.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
