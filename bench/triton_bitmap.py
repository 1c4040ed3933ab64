"""Kernel benchmark: the Triton bitmap kernel vs ``F.linear`` (cuBLAS) on one GPU.

For every (shape, N, sparsity) it checks the kernel against the reference decode, then times
it and the dense baseline with ``triton.testing.do_bench`` (median), rotating several weight
buffers so that the working set exceeds the L2 and every call reads its weights from HBM.
The device-to-device copy bandwidth is measured once; each kernel's effective bandwidth is
(weight bytes as stored + x bytes + y bytes) / time, also given as a fraction of that copy
bandwidth.

    python bench/triton_bitmap.py                                 # Llama-2-7B shapes, fp16
    python bench/triton_bitmap.py --dtype bf16 --n 1,16 --sparsity 0.5,0.9
    python bench/triton_bitmap.py --shapes 4096x4096 --n 1 --sweep  # try other launch configs
    python bench/triton_bitmap.py --out bench/results/triton_bitmap_h100.json

``--sweep`` also times a grid of :class:`KernelConfig` values per case and reports the best
next to the heuristic's choice (material for tuning ``choose_config``). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import flashsparse as fs

LLAMA2_7B = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
L2_FLUSH_BYTES = 200 * 2**20  # 4x the H100's 50 MB L2


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(d) for d in s.lower().split("x")) for s in text.split(",") if s]


def copy_bandwidth(do_bench) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting read + write."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * 2**30 / (ms * 1e-3)


class Rotating:
    """Calls ``fn(item)`` on the next of ``items`` each time (defeats the L2 between calls)."""

    def __init__(self, items: list, fn) -> None:
        self.items, self.fn, self.i = items, fn, 0

    def __call__(self):
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return self.fn(item)


def _sweep_configs(n: int):
    from flashsparse.kernels.triton.bitmap_spmm import KernelConfig, n_bucket

    bucket = n_bucket(n)
    for bm, bn, warps, split in itertools.product(
        (64, 128), sorted({16, bucket, min(128, 2 * bucket)}), (4, 8), (1, 2, 4, 8, 16)
    ):
        yield KernelConfig(bm, bn, split, warps, 2)


def run(args: argparse.Namespace) -> dict:
    import triton.testing
    from triton.testing import do_bench

    from flashsparse.kernels.triton.bitmap_spmm import _num_sms, bitmap_linear, choose_config

    dtype = DTYPES[args.dtype]
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(do_bench)
    props = torch.cuda.get_device_properties(device)
    print(
        f"# {props.name}, {props.multi_processor_count} SMs, copy bandwidth "
        f"{bandwidth / 1e12:.2f} TB/s (read + write), triton {triton.__version__}, "
        f"torch {torch.__version__}, {args.dtype}"
    )
    print(
        "| M | K | N | sparsity | split | dense us | bitmap us | speed-up | bitmap TB/s | "
        "of copy BW | max speed-up (bytes) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for (m, k), sparsity in itertools.product(args.shapes, args.sparsity):
        dense_bytes = m * k * 2
        copies = max(2, min(32, -(-L2_FLUSH_BYTES // dense_bytes)))
        g = torch.Generator(device=device).manual_seed(m * 7 + k)
        weights, encoded = [], []
        for _ in range(copies):
            w = torch.randn(m, k, device=device, dtype=dtype, generator=g)
            w = fs.prune(w, sparsity)
            weights.append(w)
            encoded.append(fs.encode(w, "bitmap"))
        sparse_bytes = encoded[0].nbytes
        for n in args.n:
            x = torch.randn(n, k, device=device, dtype=dtype)
            ref = x.double() @ weights[0].double().T
            y = bitmap_linear(x, *encoded[0].tensors, m, k)
            err = float((y.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err < (2e-3 if dtype == torch.float16 else 1e-2):
                sys.exit(f"wrong result for {m}x{k} N={n} s={sparsity}: relative error {err:.3g}")
            io_bytes = (n * k + n * m) * 2
            t_dense = do_bench(Rotating(weights, lambda w, x=x: F.linear(x, w)), warmup=25, rep=100)
            t_sparse = do_bench(
                Rotating(encoded, lambda sw, x=x, m=m, k=k: bitmap_linear(x, *sw.tensors, m, k)),
                warmup=25,
                rep=100,
            )
            config = choose_config(m, k, n, _num_sms(device))
            row = dict(
                m=m,
                k=k,
                n=n,
                sparsity=sparsity,
                dtype=args.dtype,
                config=config.__dict__,
                dense_us=t_dense * 1e3,
                bitmap_us=t_sparse * 1e3,
                speedup=t_dense / t_sparse,
                bitmap_bytes=sparse_bytes,
                dense_bytes=dense_bytes,
                bitmap_tbps=(sparse_bytes + io_bytes) / (t_sparse * 1e-3) / 1e12,
                dense_tbps=(dense_bytes + io_bytes) / (t_dense * 1e-3) / 1e12,
                bytes_ratio=dense_bytes / sparse_bytes,
                rel_err=err,
            )
            row["bitmap_frac_copy_bw"] = row["bitmap_tbps"] * 1e12 / bandwidth
            if args.sweep:
                best = (t_sparse, config)
                for cand in _sweep_configs(n):
                    try:
                        t = do_bench(
                            Rotating(
                                encoded,
                                lambda sw, x=x, c=cand, m=m, k=k: bitmap_linear(
                                    x, *sw.tensors, m, k, config=c
                                ),
                            ),
                            warmup=10,
                            rep=40,
                        )
                    except Exception as exc:  # e.g. out of shared memory for a big config
                        print(f"  skip {cand}: {type(exc).__name__}", file=sys.stderr)
                        continue
                    if t < best[0]:
                        best = (t, cand)
                row["sweep_best_us"] = best[0] * 1e3
                row["sweep_best_config"] = best[1].__dict__
            rows.append(row)
            print(
                f"| {m} | {k} | {n} | {sparsity:.0%} | {config.split_k} | {row['dense_us']:.1f} | "
                f"{row['bitmap_us']:.1f} | {row['speedup']:.2f}x | {row['bitmap_tbps']:.2f} | "
                f"{row['bitmap_frac_copy_bw']:.0%} | {row['bytes_ratio']:.2f}x |"
                + (
                    f" sweep best {row['sweep_best_us']:.1f} us {row['sweep_best_config']}"
                    if args.sweep
                    else ""
                ),
                flush=True,
            )
        del weights, encoded
        torch.cuda.empty_cache()
    return dict(
        device=props.name,
        sms=props.multi_processor_count,
        copy_bandwidth_tbps=bandwidth / 1e12,
        torch=torch.__version__,
        triton=triton.__version__,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        rows=rows,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", type=_shapes, default=LLAMA2_7B, help="MxK,MxK,... (default: Llama-2-7B)"
    )
    p.add_argument("--n", type=_ints, default=[1, 16, 32, 128], help="rows of x, comma separated")
    p.add_argument("--sparsity", type=_floats, default=[0.5, 0.7, 0.9])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--sweep", action="store_true", help="also time a grid of launch configs")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench/triton_bitmap.py needs a CUDA GPU (the interpreter is not a measurement)",
            file=sys.stderr,
        )
        return 2
    result = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
