"""Spec of the CUDA bitmap kernel (``csrc/kernels/bitmap_kernel.cuh``) for ``bench/kernel_report.py``.

Instantiations: ``bitmap_spmm_kernel<kBF16, NT, kXAligned>``; ``kXAligned = true`` (x rows
16-byte aligned and K % 8 == 0, the path every benchmark shape takes) is primary; the 16-bit
load x fallback is reported as a non-primary variant (``params["x_aligned"] = False``).

A pipeline stage is 4 consecutive k tiles of one tile row, one whole 64x64 tile per warp. The
main loop runs TWO stages per trip (so that the double buffer's addresses and mbarriers are
compile-time constants), so one main-loop iteration consumes 2 x 4 x 4096 = 32768 dense weight
elements with 128 threads, for a block tile of 64 rows x 8*NT tokens.

Data-dependent control flow in the main loop (:func:`block_weights`; every weight is an issue
count per iteration, averaged over the CTA's 4 warps):

* sm_80 (and any arch without bulk copies): the cp.async copy of a stage's packed values,
  ``for (rem = chunks - (256 w + lane); rem > 0; rem -= 1024)`` with 8 predicated copies per
  trip: warp w issues ``ceil((chunks - 256 w) / 1024)`` trips (0 when non-positive); a trip is
  issued when any lane of the warp takes it. The blocks of that loop get the mean trips over
  the 4 warps and over the stages of a uniformly random weight at the given sparsity, encoded
  with the real encoder (fixed seed) -- :func:`value_copy_trips`.
* sm_90: one thread (tid 0) copies a stage's masks and values with two ``cp.async.bulk``
  (SASS ``UBLKCP``) on an mbarrier. Only warp 0 issues that code, so its blocks -- from the
  block holding the proxy fence (``FENCE``/``MEMBAR``) to the last block holding a ``UBLKCP``
  before the next fence, including the waterfall loops ptxas wraps around each ``UBLKCP``
  (one trip: one active thread) -- count 1/4 of a whole-CTA block (``ELECTED_WEIGHT``). The
  mbarrier wait is ``SYNCS.PHASECHK.TRANS64.TRYWAIT`` in line plus an out-of-line retry loop;
  the retry blocks are counted once per stage (a conservative bound: in the steady state the
  stage has landed by the time the barrier is reached and the retry never runs).
* x copy: a stage whose 256 x columns all belong to its split (CTA-uniform) copies with
  unpredicated cp.async; otherwise (a split's partial last stage, whose other columns are the
  next split's, or the stage reaching past K) a checked path (zero stores, predicated copies)
  runs. Its blocks -- between the predicated branch to the unpredicated-copy block and that
  block -- get :func:`checked_stage_fraction`: the largest fraction of (CTA, stage) pairs taking
  it over the benchmark shapes' launch plans for the tile width on the arch's GPU.

The stage load guarded by ``i + 1 < stages`` is skipped only in a split's last stage, and the
second step of a trip only when a split has an odd number of stages; both are counted every
iteration (the steady state). Everything else in the loop body is branch-free.
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
STAGES_PER_ITERATION = 2  # the main loop runs two pipeline steps per trip (static buffers)
COPY_CHUNKS = 1024  # value chunks per trip of the sm_80 copy loop (8 per thread)
ELECTED_WEIGHT = 1 / 4  # a block only warp 0 (of 4) issues


def smem_bytes(n_tile: int) -> int:
    """``bmp::smem_bytes`` (dynamic): 2 stages of (masks of 4 tiles, values of 4 tiles + slack,
    x tile ``n_tile`` x 264 halfwords). The 4 KiB decode tables are static (ptxas reports them)."""
    return STAGES * (2048 + 32768 + 16 + n_tile * 264 * 2)


def _match(mangled: str) -> Instance | None:
    m = _NAME.search(mangled)
    if m is None:
        return None
    bf16, nt, aligned = m.group(1) == "1", int(m.group(2)), m.group(3) == "1"
    return Instance(
        dtype="bf16" if bf16 else "fp16",
        n_tile=8 * nt,
        threads=THREADS,
        elements=STAGES_PER_ITERATION * TILES_PER_STAGE * TILE * TILE,
        dynamic_smem=smem_bytes(8 * nt),
        params={
            "tile_m": TILE,
            "tiles_per_iteration": STAGES_PER_ITERATION * TILES_PER_STAGE,
            "x_aligned": aligned,
        },
        primary=aligned,
    )


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


@functools.lru_cache(maxsize=16)
def checked_stage_fraction(n_tile: int, arch: str = "90a") -> float:
    """The largest fraction, over the benchmark shapes' launch plans with this tile width on
    the GPU ``arch``'s plans target (``launch.LIMITS_BY_ARCH``), of (CTA, stage) pairs whose 256
    x columns reach past the end of their split's columns (the checked x-copy path; a split
    ends at a multiple of 64 or at K)."""
    from flashsparse.kernels.cuda import bitmap, launch

    from ..model import NS, SHAPES

    device = launch.LIMITS_BY_ARCH.get(arch, launch.H100)
    worst = 0.0
    for _, m, k in SHAPES:
        for n in NS:
            plan = bitmap.bitmap_launch_plan(m, k, n, device=device)
            if plan["tile_n"] != n_tile:
                continue
            k_tiles = -(-k // TILE)
            per = -(-k_tiles // plan["split_k"])
            stages = checked = 0
            for z in range(plan["split_k"]):
                num = min(per, k_tiles - z * per)
                end = min(k, TILE * (z * per + num))
                for s in range(-(-num // TILES_PER_STAGE)):
                    stages += 1
                    checked += end - TILE * (z * per + TILES_PER_STAGE * s) < TILES_PER_STAGE * TILE
            worst = max(worst, checked / stages)
    return worst


def block_weights(loop, sparsity: float, inst: Instance) -> dict[int, float]:
    """Per-iteration weights of the data-dependent and single-warp blocks (module docstring)."""
    weights: dict[int, float] = {}
    by_addr = {b.addr: b for b in loop.blocks}

    def ops(addr: int) -> list[str]:
        return [i.opcode for i in by_addr[addr].instrs]

    bulk = [b.addr for b in loop.blocks if any(op.startswith("UBLKCP") for op in ops(b.addr))]
    fences = sorted(
        b.addr for b in loop.blocks if any(op.startswith(("FENCE", "MEMBAR")) for op in ops(b.addr))
    )
    # One elected region per stage load: from its fence to the last UBLKCP before the next fence.
    for k, lo in enumerate(fences):
        nxt = fences[k + 1] if k + 1 < len(fences) else float("inf")
        mine = [a for a in bulk if lo <= a < nxt]
        if not mine:
            continue
        for b in loop.blocks:
            if lo <= b.addr <= max(mine):
                weights[b.addr] = ELECTED_WEIGHT
    # The x copy: a checked path (zero stores + predicated copies) for a stage reaching past K,
    # skipped by a CTA-uniform branch to the unpredicated copies otherwise.
    tail = checked_stage_fraction(inst.n_tile, inst.arch or "90a")
    for fast in loop.blocks:
        ins = by_addr[fast.addr].instrs
        copies = [i for i in ins if i.opcode.startswith("LDGSTS")]
        if (
            len(copies) < 2
            or any(i.pred for i in copies)
            or any(i.opcode.startswith("STS") for i in ins)
        ):
            continue
        target = f"0x{fast.addr:x}"
        branch = [
            b.addr
            for b in loop.blocks
            if b.addr < fast.addr
            and b.instrs
            and b.instrs[-1].opcode.startswith("BRA")
            and b.instrs[-1].pred
            and target in b.instrs[-1].operands
        ]
        if not branch:
            continue
        for b in loop.blocks:
            if max(branch) < b.addr < fast.addr:
                weights[b.addr] = tail
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
