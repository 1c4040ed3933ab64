"""Spec of the CUDA bitmap kernel (``csrc/kernels/bitmap_kernel.cuh``) for ``bench/kernel_report.py``.

Instantiations: ``bitmap_spmm_kernel<kBF16, NT, kXAligned>``; ``kXAligned = true`` (x rows
16-byte aligned and K % 8 == 0, the path every benchmark shape takes) is primary; the 16-bit
load x fallback is reported as a non-primary variant (``params["x_aligned"] = False``). One main-loop iteration consumes one 64x64
weight tile (4096 dense elements) with 128 threads, for a block tile of 64 rows x 8*NT tokens.

Data-dependent control flow in the main loop: the only nested loop is the cp.async copy of the
tile's packed values (``for c = tid; c < chunks; c += 128``, 16-byte chunks). Its trip count
per warp is ``ceil((chunks - 32 w) / 128)`` for warp w (0 when non-positive): a block is issued
when any lane of the warp takes it. :func:`trip_counts` averages that over the four warps and
over the tiles of a uniformly random weight at the given sparsity, encoded with the real
encoder (fixed seed). The stage load guarded by ``ahead < num`` is skipped only in a split's
last two iterations; it is counted every iteration (the steady state). Everything else in the
loop body is branch-free.
"""

from __future__ import annotations

import functools
import re

from . import CudaSpec, Instance

_NAME = re.compile(r"bitmap_spmm_kernelILb([01])ELi(\d+)ELb([01])E")
THREADS = 128
TILE = 64
STAGES = 2
TILES_PER_STAGE = 4
COPY_CHUNKS = 1024  # value chunks per trip of the copy loop (8 per thread)


def smem_bytes(n_tile: int) -> int:
    """``bmp::smem_bytes``: nibble table + 3 stages of (masks, values + slack, x tile)."""
    return STAGES * (2048 + 32768 + 16 + n_tile * 264 * 2)


def _match(mangled: str) -> Instance | None:
    m = _NAME.search(mangled)
    if m is None:
        return None
    bf16, nt, aligned = m.group(1) == "1", int(m.group(2)), m.group(3) == "1"
    return Instance(dtype="bf16" if bf16 else "fp16", n_tile=8 * nt, threads=THREADS,
                    elements=TILES_PER_STAGE * TILE * TILE, dynamic_smem=smem_bytes(8 * nt),
                    params={"tile_m": TILE, "x_aligned": aligned}, primary=aligned)


@functools.lru_cache(maxsize=16)
def value_copy_trips(sparsity: float, tiles: int = 256, seed: int = 0) -> float:
    """Mean warp-issued trips of the value-copy loop per stage (4 consecutive k tiles of one tile
    row, their values contiguous), from an encoded random weight."""
    import torch

    from flashsparse.formats import Bitmap

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(TILE, TILE * tiles, generator=g) + 0.1
    w = w * (torch.rand(w.shape, generator=g) >= sparsity)
    offsets = Bitmap.encode(w.half()).tensors[2].long()
    chunks = offsets[TILES_PER_STAGE::TILES_PER_STAGE] - offsets[:-1:TILES_PER_STAGE]  # per stage
    first = torch.arange(THREADS // 32) * COPY_CHUNKS // 4  # warp w's first chunk of a trip
    trips = ((chunks[:, None] - first[None, :]).clamp(min=0) + COPY_CHUNKS - 1) // COPY_CHUNKS
    return float(trips.double().mean())


def trip_counts(sparsity: float, inst: Instance) -> list[float]:
    return [value_copy_trips(round(float(sparsity), 6))]


SPEC = CudaSpec(
    name="bitmap_cuda",
    sources=("csrc/kernels/bitmap_f16.cu", "csrc/kernels/bitmap_bf16.cu"),
    match=_match,
    trip_counts=trip_counts,
)
