"""Small odd-shaped runs of the CUDA Tiled-CSL and bitmap kernels, for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python bench/sanitize_driver.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python bench/sanitize_driver.py
    compute-sanitizer --tool initcheck --error-exitcode 3 python bench/sanitize_driver.py
    compute-sanitizer --tool synccheck --error-exitcode 3 python bench/sanitize_driver.py

Every tensor gets its own cudaMalloc (PYTORCH_NO_CUDA_MEMORY_CACHING=1 is set before torch is
imported), so memcheck sees a read one element past ``words``, ``tile_offsets``, ``x`` or
``bias`` instead of it landing inside a larger cached block. Cases: a 100 %-dense tile, an empty
tile, a dense column, N = 1 and N = 300, K % 8 != 0 and an unaligned x pointer, forced split-K,
every block-tile width, fp16 and bf16, malformed TileOffsets and word locations (wrong data,
never an out-of-bounds access), and one call through ``flashsparse.linear``; the bitmap kernel
runs BITMAP_CASES (the same kinds of shapes; split-K twice in a row, so the reused counters are
exercised; a tile width this GPU's shared memory does not take runs the widest one it does) and
one ``flashsparse.linear`` call.

Exit status: 0 all cases match the float64 reference, 1 a mismatch, 2 the CUDA backend is
unavailable (the reason is printed).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch

import flashsparse as fs
from flashsparse.kernels.cuda import bitmap, launch, tiled_csl

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}

# (m, k, n, tile_n (0: by n), split_k, unaligned x pointer)
CASES = [
    (130, 200, 1, 0, 1, False),
    (130, 200, 7, 0, 4, False),
    (300, 77, 300, 0, 1, False),
    (257, 136, 16, 0, 3, True),
    (129, 192, 33, 0, 2, False),
    (1, 1, 1, 0, 1, False),
    (150, 100, 21, 8, 2, False),
    (150, 100, 21, 16, 1, True),
    (150, 100, 21, 32, 2, False),
    (150, 100, 21, 64, 1, False),
    (150, 100, 21, 128, 2, True),
]


# (m, k, n, tile_n (0: by n), split_k, unaligned x pointer) for the bitmap kernel
BITMAP_CASES = [
    (130, 200, 1, 0, 1, False),
    (130, 200, 7, 0, 4, False),
    (300, 77, 300, 0, 1, False),
    (257, 136, 16, 0, 3, True),
    (129, 192, 33, 0, 2, False),
    (1, 1, 1, 0, 1, False),
    (150, 100, 21, 8, 2, False),
    (150, 100, 21, 16, 1, True),
    (150, 333, 21, 32, 5, False),
]


def _bitmap(g: torch.Generator) -> int:
    failures = 0
    op = torch.ops.flashsparse._bitmap_spmm_cuda
    for m, k, n, tile_n, split_k, unaligned in BITMAP_CASES:
        w32 = _weight(m, k, g)
        for dtype in (torch.float16, torch.bfloat16):
            w = w32.to(device="cuda", dtype=dtype)
            x = _x(n, k, unaligned, dtype, g)
            bias = torch.randn(m, generator=g).to(device="cuda", dtype=dtype)
            masks, values, offsets = fs.encode(w, "bitmap").tensors
            # the case's width if this GPU's shared memory takes it, else the widest that fits
            fits = bitmap._occupancy(x.device.index, dtype == torch.bfloat16)
            tn = (
                tile_n
                if tile_n and fits[tile_n]
                else bitmap._plan(x.device.index, dtype == torch.bfloat16, n, m, k)[1]
            )
            split = launch.effective_split(-(-k // 64), split_k)
            counters, partials = bitmap.bitmap_workspace(x.device, m, n, tn, split)
            ref = x.double() @ w.double().T + bias.double()
            for _ in range(2):
                y = op(x, masks, values, offsets, m, k, bias, split_k, tn, counters, partials)
                err = float((y.double() - ref).norm() / ref.norm())
                ok = err < RTOL[dtype]
                failures += not ok
                print(
                    f"{'ok ' if ok else 'BAD'} bitmap m={m} k={k} n={n} tile_n={tile_n} "
                    f"split_k={split_k} unaligned={unaligned} {dtype}: rel err {err:.2e}"
                )
    return failures


def _weight(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.7)
    w[: min(m, 128), : min(k, 64)] = torch.randn(min(m, 128), min(k, 64), generator=g)  # dense tile
    if k > 64:
        w[: min(m, 128), 64 : min(k, 128)] = 0  # empty tile
    w[:, k // 2] = torch.randn(m, generator=g)  # dense column
    return w


def _x(n: int, k: int, unaligned: bool, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    values = torch.randn(n * k, generator=g).to(device="cuda", dtype=dtype)
    if not unaligned:
        return values.view(n, k)
    buf = torch.empty(n * k + 1, device="cuda", dtype=dtype)
    buf[1:] = values
    return buf[1:].view(n, k)  # 2 bytes past a 16-byte boundary: the aligned-vector path


def _tiled_csl_workspace_and_malformed_offsets(g: torch.Generator) -> int:
    """Tiled-CSL split-K through one explicit workspace, reused three times (its counters must
    come back to zero), and malformed TileOffsets (clamped in the kernel: memcheck must stay
    clean; the data is garbage). Returns the number of mismatches."""
    failures = 0
    op = torch.ops.flashsparse._tiled_csl_spmm_cuda
    w = _weight(257, 1000, g).to(device="cuda", dtype=torch.float16)
    x = torch.randn(5, 1000, generator=g).to(device="cuda", dtype=torch.float16)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    ws = torch.zeros(
        tiled_csl.tiled_csl_workspace_elems(257, 5, 8, 7), dtype=torch.int32, device="cuda"
    )
    ref = x.double() @ w.double().T
    for _ in range(3):
        y = op(x, words, offsets, 257, 1000, None, 7, 8, ws)
        err = float((y.double() - ref).norm() / ref.norm())
        ok = err < RTOL[torch.float16]
        failures += not ok
        print(f"{'ok ' if ok else 'BAD'} reused split-K workspace: rel err {err:.2e}")
    op(x, words, offsets + 5, 257, 1000, None, 3, 8)
    op(x, words, offsets.flip(0).contiguous(), 257, 1000, None, 1, 8)
    # Word locations past the tile (masked to it in the kernel): memcheck must stay clean.
    bad = words.clone()
    bad[::3] |= 0x7FFF0000
    for split_k, tile_n in ((1, 8), (3, 64)):
        op(x, bad, offsets, 257, 1000, None, split_k, tile_n)
    return failures


def main() -> int:
    reason = tiled_csl.available() or bitmap.available()
    if reason:
        print(f"sanitize_driver: the CUDA backend is unavailable: {reason}")
        return 2
    g = torch.Generator().manual_seed(0)
    failures = 0
    op = torch.ops.flashsparse._tiled_csl_spmm_cuda
    failures += _tiled_csl_workspace_and_malformed_offsets(g)
    for m, k, n, tile_n, split_k, unaligned in CASES:
        w32 = _weight(m, k, g)
        for dtype in (torch.float16, torch.bfloat16):
            w = w32.to(device="cuda", dtype=dtype)
            x = _x(n, k, unaligned, dtype, g)
            bias = torch.randn(m, generator=g).to(device="cuda", dtype=dtype)
            words, offsets = fs.encode(w, "tiled_csl").tensors
            y = op(x, words, offsets, m, k, bias, split_k, tile_n)
            ref = x.double() @ w.double().T + bias.double()
            err = float((y.double() - ref).norm() / ref.norm())
            ok = err < RTOL[dtype]  # False for NaN too
            failures += not ok
            print(
                f"{'ok ' if ok else 'BAD'} m={m} k={k} n={n} tile_n={tile_n} split_k={split_k} "
                f"unaligned={unaligned} {dtype}: rel err {err:.2e}"
            )
    failures += _bitmap(g)
    os.environ["FLASHSPARSE_BACKEND"] = "cuda"
    w = _weight(300, 136, g).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 3, 136, generator=g).to(device="cuda", dtype=torch.bfloat16)
    y = fs.linear(x, fs.encode(w, "tiled_csl"))
    err = float(
        (y.double() - x.double() @ w.double().T).norm() / (x.double() @ w.double().T).norm()
    )
    ok = err < RTOL[torch.bfloat16]
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} flashsparse.linear 3-D x: rel err {err:.2e}")
    y = fs.linear(x, fs.encode(w, "bitmap"))
    err = float(
        (y.double() - x.double() @ w.double().T).norm() / (x.double() @ w.double().T).norm()
    )
    ok = err < RTOL[torch.bfloat16]
    failures += not ok
    print(f"{'ok ' if ok else 'BAD'} flashsparse.linear 3-D x, bitmap: rel err {err:.2e}")
    torch.cuda.synchronize()
    print(f"sanitize_driver: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
