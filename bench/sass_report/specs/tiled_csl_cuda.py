"""Spec of the CUDA Tiled-CSL kernel (``csrc/kernels/tiled_csl_kernel.cuh``) for
``bench/kernel_report.py`` (interface: ``bench/sass_report/specs/__init__.py``).

Main loop (one 64-deep k step of a ``tile_m x tile_n`` block, 128 threads): zero the next A
tile, copy the next x tile, load the next step's words, tensor-core work on the current
buffers, barrier, scatter, barrier. Data-dependent parts, derived from the real encoder's
output for a uniform random mask:

* word loads and scatters: thread ``tid`` stages storage tile ``tid // (128 / S)`` of the block
  (``S`` = 1 or 2 storage tiles of 128 rows) and handles its vectors ``htid + i * (128 / S)``,
  ``htid = tid % (128 / S)``; slot ``i`` (one unrolled block for the load, one for the scatter
  of its 4 words) runs in a warp when any of its lanes has such a vector: warp ``w`` covers
  ``htid`` in ``[32 (w % (4 / S)), +32)``. A whole tile fits in one chunk (no nested loop).
* x tile: the cp.async path runs for chunks ``q = it * 128 + tid < tile_n * 8``; the path for
  unaligned rows (``K % 8 != 0`` or an unaligned x) does not run on the benchmark shapes.
"""

from __future__ import annotations

import re

from . import CudaSpec, Instance

_NAME = re.compile(
    r"tiled_csl_spmm_kernelINS0_10TileConfigILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)EEELb([01])E"
)
_SAMPLE_K_TILES = 32
_SAMPLE_ROW_TILES = 4


def _match(mangled: str) -> Instance | None:
    m = _NAME.search(mangled)
    if m is None:
        return None
    tm, tn, _, _, v, bf16 = (int(g) for g in m.groups())
    # tcsl::TileConfig::kSmemBytes: two stages of (A + x) tiles, or the fp32 C stage.
    smem = max(2 * (tm * 64 + tn * 64) * 2, tn * (tm + 4) * 4)
    return Instance(
        dtype="bf16" if bf16 else "fp16",
        n_tile=tn,
        threads=128,
        elements=tm * 64,
        dynamic_smem=smem,
        params={"tile_m": tm, "vectors_per_thread": v},
    )


_counts_cache: dict[float, list[int]] = {}


def tile_vector_counts(sparsity: float) -> list[int]:
    """16-byte vectors per 128 x 64 storage tile of a uniform random fp16 weight at
    ``sparsity``, encoded with the real encoder (``TiledCSL.encode``)."""
    key = round(sparsity, 6)
    if key not in _counts_cache:
        import torch

        from flashsparse.formats.tiled_csl import TiledCSL

        g = torch.Generator().manual_seed(1234)
        w = torch.randn(_SAMPLE_ROW_TILES * 128, _SAMPLE_K_TILES * 64, generator=g)
        w[torch.rand(w.shape, generator=g) < sparsity] = 0
        offsets = TiledCSL.encode(w.to(torch.float16)).tensors[1]
        _counts_cache[key] = (offsets[1:-1] - offsets[:-2]).tolist()
    return _counts_cache[key]


def slot_probability(sparsity: float, inst: Instance, slot: int) -> float:
    """Probability that a warp issues word slot ``slot`` (load or scatter) in one k step."""
    tiles = inst.params["tile_m"] // 128
    per_tile = 128 // tiles
    warps_per_tile = 4 // tiles
    counts = tile_vector_counts(sparsity)
    hits = 0
    for c in counts:
        for w in range(warps_per_tile):
            hits += slot * per_tile + 32 * w < c
    return hits / (len(counts) * warps_per_tile)


def _trip_counts(sparsity: float, inst: Instance) -> list[float]:
    return []  # one chunk per tile: no loop nested in the main loop


def _opcodes(blk) -> list[str]:
    return [i.opcode for i in blk.instrs]


def _block_weights(loop, sparsity: float, inst: Instance) -> dict[int, float]:
    weights: dict[int, float] = {}
    loads = [b for b in loop.blocks if any(o.startswith("LDG") and ".NA" in o for o in _opcodes(b))]
    scatters = [b for b in loop.blocks if sum(o.startswith("STS.U16") for o in _opcodes(b)) == 4]
    for i, blk in enumerate(sorted(loads, key=lambda b: b.addr)):
        weights[blk.addr] = slot_probability(sparsity, inst, i)
    for i, blk in enumerate(sorted(scatters, key=lambda b: b.addr)):
        weights[blk.addr] = slot_probability(sparsity, inst, i)
    # x tile, cp.async path: only the threads that own a chunk (warps issue it when any does)
    x_chunks = inst.n_tile * 8
    for blk in loop.blocks:
        ops = _opcodes(blk)
        if any(o.startswith("LDGSTS") for o in ops):
            weights[blk.addr] = min(1.0, -(-x_chunks // 32) / 4)
    # unaligned-x path (plain 128-bit loads of x and the shift/select store): not taken
    plain = [
        b.addr
        for b in loop.blocks
        if any(o.startswith("LDG") and ".NA" not in o and ".128" in o for o in _opcodes(b))
    ]
    for blk in loop.blocks:
        ops = _opcodes(blk)
        if plain and min(plain) <= blk.addr <= max(plain):
            weights[blk.addr] = 0.0
        if any(o.startswith("STS.128") for o in ops) and sum(o.startswith("SEL") for o in ops) >= 8:
            weights[blk.addr] = 0.0
    return weights


SPEC = CudaSpec(
    name="tiled_csl_cuda",
    sources=("csrc/kernels/tiled_csl_f16.cu", "csrc/kernels/tiled_csl_bf16.cu"),
    match=_match,
    trip_counts=_trip_counts,
    block_weights=_block_weights,
)
