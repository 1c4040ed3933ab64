"""Time ``flashsparse.encode`` and ``to_dense`` for one weight (default: 4096x4096 fp16, 70 %).

    python bench/encode_time.py [--m 4096 --k 4096 --sparsity 0.7 --dtype fp16 --device cpu]

Prints the best of ``--repeat`` runs per format (the issue's bar: under 1 s on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

import flashsparse as fs

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def best_of(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=4096)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(args.m, args.k, generator=g, dtype=torch.float32).to(DTYPES[args.dtype])
    w = fs.prune(w.to(device), args.sparsity)
    print(
        f"{args.m}x{args.k} {args.dtype} sparsity {args.sparsity} on {device} "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    for format in ("tiled_csl", "bitmap"):
        fs.encode(w[:256], format)  # warm-up
        encode_s = best_of(lambda f=format: fs.encode(w, f), args.repeat, device)
        sw = fs.encode(w, format)
        decode_s = best_of(sw.to_dense, args.repeat, device)
        assert torch.equal(sw.to_dense(), w), "round trip is not exact"
        print(
            f"  {format:<9}  encode {encode_s:.3f} s  to_dense {decode_s:.3f} s  "
            f"{sw.nbytes / (w.numel() * w.element_size()):.3f}x dense bytes"
        )


if __name__ == "__main__":
    main()
