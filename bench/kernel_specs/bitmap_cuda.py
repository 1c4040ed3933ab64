"""Spec of the CUDA bitmap kernel (``csrc/kernels/bitmap_kernel.cuh``) for ``bench/kernel_report.py``.

Instantiations: ``bitmap_spmm_kernel<kBF16, NT, kXAligned>``; ``kXAligned = true`` (x rows
16-byte aligned and K % 8 == 0, the path every benchmark shape takes) is primary; the 16-bit
load x fallback is reported as a non-primary variant (``params["x_aligned"] = False``).

One main-loop iteration is one pipeline stage: the CTA's 4 warps each decode one whole 64x64
weight tile (4 consecutive k tiles of the same tile row), so it consumes 4 x 4096 = 16384 dense
elements with 128 threads, for a block tile of 64 rows x 8*NT tokens.

Data-dependent control flow in the main loop, per arch (:func:`block_weights`; weights are
issue counts per iteration and per warp, averaged over the CTA's 4 warps):

* sm_80 (and any arch without bulk copies): the cp.async copy of the stage's packed values,
  ``for (rem = chunks - (256 w + lane); rem > 0; rem -= 1024)`` with 8 predicated copies per
  trip: warp w issues ``ceil((chunks - 256 w) / 1024)`` trips (0 when non-positive); a trip is
  issued when any lane of the warp takes it. The blocks of that loop get the mean trips over
  the 4 warps and over the stages of a uniformly random weight at the given sparsity, encoded
  with the real encoder (fixed seed) -- :func:`value_copy_trips`.
* sm_90: one thread (tid 0) copies the stage's masks and values with two ``cp.async.bulk``
  (SASS ``UBLKCP``) on an mbarrier. Only warp 0 issues that code, so its blocks -- from the
  first block holding the proxy fence (``FENCE``/``MEMBAR``) to the last block holding a
  ``UBLKCP``, including the waterfall loops ptxas wraps around each ``UBLKCP`` (one trip: one
  active thread) -- count 1/4 of a whole-CTA block. The mbarrier wait is
  ``SYNCS.PHASECHK.TRYWAIT`` in the loop head plus an out-of-line retry loop; the retry block is
  counted once per iteration (a conservative bound: in the steady state the stage has landed
  by the time the barrier is reached and the retry never runs).

The stage load guarded by ``i + 1 < stages`` is skipped only in a split's last iteration; it is
counted every iteration (the steady state). Everything else in the loop body is branch-free.
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
COPY_CHUNKS = 1024  # value chunks per trip of the sm_80 copy loop (8 per thread)
ELECTED_WEIGHT = 1 / 4  # a block only warp 0 (of 4) issues


def smem_bytes(n_tile: int) -> int:
    """``bmp::smem_bytes`` (dynamic): 2 stages of (masks of 4 tiles, values of 4 tiles + slack,
    x tile ``n_tile`` x 264 halfwords). The 8 KiB decode tables are static (ptxas reports them)."""
    return STAGES * (2048 + 32768 + 16 + n_tile * 264 * 2)


def _match(mangled: str) -> Instance | None:
    m = _NAME.search(mangled)
    if m is None:
        return None
    bf16, nt, aligned = m.group(1) == "1", int(m.group(2)), m.group(3) == "1"
    return Instance(dtype="bf16" if bf16 else "fp16", n_tile=8 * nt, threads=THREADS,
                    elements=TILES_PER_STAGE * TILE * TILE, dynamic_smem=smem_bytes(8 * nt),
                    params={"tile_m": TILE, "tiles_per_iteration": TILES_PER_STAGE, "x_aligned": aligned},
                    primary=aligned)


@functools.lru_cache(maxsize=16)
def value_copy_trips(sparsity: float, tiles: int = 256, seed: int = 0) -> float:
    """Mean warp-issued trips of the sm_80 value-copy loop per stage (4 consecutive k tiles of
    one tile row, their values contiguous), from an encoded random weight."""
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


def block_weights(loop, sparsity: float, inst: Instance) -> dict[int, float]:
    """Per-iteration weights of the data-dependent and single-warp blocks (module docstring)."""
    weights: dict[int, float] = {}
    by_addr = {b.addr: b for b in loop.blocks}

    def ops(addr: int) -> list[str]:
        return [i.opcode for i in by_addr[addr].instrs]

    bulk = [b.addr for b in loop.blocks if any(op.startswith("UBLKCP") for op in ops(b.addr))]
    if bulk:
        fences = [b.addr for b in loop.blocks
                  if any(op.startswith(("FENCE", "MEMBAR")) for op in ops(b.addr)) and b.addr < min(bulk)]
        lo = min(fences) if fences else min(bulk)
        for b in loop.blocks:
            if lo <= b.addr <= max(bulk):
                weights[b.addr] = ELECTED_WEIGHT
    trips = value_copy_trips(round(float(sparsity), 6))
    for lp in loop.nested:
        if any(op.startswith("LDGSTS") for a in lp.body for op in ops(a)):
            for a in lp.body:
                weights[a] = trips
    return weights


SPEC = CudaSpec(
    name="bitmap_cuda",
    sources=("csrc/kernels/bitmap_f16.cu", "csrc/kernels/bitmap_bf16.cu"),
    match=_match,
    block_weights=block_weights,
)
