"""The CUDA bitmap kernel (decode-in-registers SpMM, ``csrc/kernels/bitmap_*``) as the
``("bitmap", "cuda")`` kernel.

Block tile: a 64-row tile row x 8/16/32 tokens, 4 warps; split-K reduced inside the one launch
by the last CTA per output tile (deterministic order). Mirrors csrc/kernels/bitmap_layout.cuh
(tests/test_bitmap_cuda.py checks it).

Launch plan (:func:`bitmap_launch_plan`, pure, for any :class:`~.launch.DeviceLimits`): the
widest tile for N whose shared memory fits the device's per-block limit (the 32-wide tile needs
~105 KiB: it fits sm_80 and sm_90 but not the 99 KiB of sm_86/89/120, where N > 16 runs
16-wide tiles), and a split-K factor that gives every SM at least two CTAs. On a GPU the CTAs
per SM and the fit come from the occupancy calculator (``_bitmap_cuda_occupancy``).

Workspaces (:func:`bitmap_workspace`): eager calls share one pair of split-K buffers per
(device, stream), grown when too small; a call under CUDA-graph capture gets its own pair from
the graph's memory pool, never a cached one, so a graph's buffers are never freed, regrown or
used by an eager call or another graph while it can still replay.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from ... import backends
from . import extension
from .launch import (
    H100,
    TILE_K,
    WAVE_TARGET,
    DeviceLimits,
    device_limits,
    effective_split,
    resident_blocks,
    wave_efficiency,
)

__all__ = [
    "BITMAP_TILE_NS",
    "available",
    "bitmap_block_smem",
    "bitmap_ctas_per_sm",
    "bitmap_launch_plan",
    "bitmap_linear",
    "bitmap_smem_bytes",
    "bitmap_tile_n",
    "bitmap_workspace",
    "bitmap_workspace_sizes",
]

KERNEL = "CUDA bitmap kernel"
BITMAP_TILE_M = 64
BITMAP_THREADS = 128
BITMAP_STAGES = 2  # double buffer
BITMAP_TILES_PER_STAGE = 4  # each stage: 4 consecutive k tiles, one per warp
BITMAP_TILE_NS = (8, 16, 32)
# Static shared memory (ptxas): the two nibble decode tables (4 KiB), the split-K flag and the
# stage mbarriers: 4,112 B on sm_80/sm_86, 4,128 B on sm_90a. The model takes the larger; on a
# GPU the fit comes from the compiled kernel itself.
BITMAP_STATIC_SMEM = 4128
# ptxas registers per thread by tile_n (sm_90a; fp16 and bf16 alike), for the occupancy model.
BITMAP_REGISTERS = {8: 80, 16: 100, 32: 135}


def bitmap_tile_n(n: int) -> int:
    """Block tile width (tokens) for ``n`` tokens on a GPU where every width fits
    (``bmp::default_tile_n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 8 if n <= 8 else (16 if n <= 16 else 32)


def bitmap_smem_bytes(tile_n: int) -> int:
    """Dynamic shared memory of one block (``bmp::smem_bytes``): 2 stages of (masks of 4 tiles
    2 KiB + values of 4 tiles 32 KiB + 16 B slack + x tile ``tile_n`` x 264 halfwords)."""
    return BITMAP_STAGES * (2048 + 32768 + 16 + tile_n * 264 * 2)


def bitmap_block_smem(tile_n: int, static_smem: int = BITMAP_STATIC_SMEM) -> int:
    """Shared memory of one block, static + dynamic: what must fit the per-block limit."""
    return bitmap_smem_bytes(tile_n) + static_smem


def bitmap_ctas_per_sm(
    tile_n: int,
    device: DeviceLimits = H100,
    *,
    registers: int | None = None,
    static_smem: int = BITMAP_STATIC_SMEM,
) -> int:
    """Resident CTAs per SM of the tile width on ``device`` from the kernel's resources
    (registers, shared memory, threads); 0 when its shared memory does not fit the device."""
    if tile_n not in BITMAP_TILE_NS:
        raise ValueError(f"tile_n must be one of {BITMAP_TILE_NS}, got {tile_n}")
    return resident_blocks(
        device,
        threads=BITMAP_THREADS,
        registers=BITMAP_REGISTERS[tile_n] if registers is None else registers,
        smem_bytes=bitmap_block_smem(tile_n, static_smem),
    )


def bitmap_launch_plan(
    m: int,
    k: int,
    n: int,
    *,
    device: DeviceLimits = H100,
    ctas_per_sm: Mapping[int, int] | None = None,
    tile_n: int | None = None,
    min_ctas_per_sm: int = 2,
    target: float = WAVE_TARGET,
) -> dict:
    """Launch plan of the CUDA bitmap kernel for ``y[n, m] = x[n, k] @ W[m, k]^T`` on ``device``.

    ``ctas_per_sm``: resident CTAs per SM of each tile width (0: it does not fit the device);
    by default the model of :func:`bitmap_ctas_per_sm`. The tile width is the widest one that
    fits and that N needs (:func:`bitmap_tile_n`), or ``tile_n`` (which must fit). Output
    tiles are ``ceil(m / 64) x ceil(n / tile_n)``; when they give fewer than
    ``min_ctas_per_sm`` CTAs per SM, k is split: the smallest effective split reaching that
    many CTAs whose wave efficiency over ``device.sms * ctas_per_sm`` slots reaches ``target``,
    preferring one whose splits are whole 4-tile pipeline stages (else the most efficient of the
    next few). Never persistent.
    """
    if m < 1 or k < 1 or n < 1:
        raise ValueError(f"m, k and n must be >= 1, got m={m}, k={k}, n={n}")
    if device.sms < 1:
        raise ValueError(f"device.sms must be >= 1, got {device.sms}")
    per_sm = (
        {tn: bitmap_ctas_per_sm(tn, device) for tn in BITMAP_TILE_NS}
        if ctas_per_sm is None
        else {tn: int(ctas_per_sm.get(tn, 0)) for tn in BITMAP_TILE_NS}
    )
    fitting = [tn for tn in BITMAP_TILE_NS if per_sm[tn] > 0]
    if not fitting:
        raise ValueError(
            f"no bitmap tile width fits {device.name}: "
            f"{device.smem_per_block_optin} bytes of shared memory per block"
        )
    if tile_n is None:
        tn = max([t for t in fitting if t <= bitmap_tile_n(n)], default=fitting[0])
    elif tile_n not in BITMAP_TILE_NS:
        raise ValueError(f"tile_n must be one of {BITMAP_TILE_NS}, got {tile_n}")
    elif tile_n not in fitting:
        raise ValueError(
            f"tile_n={tile_n} does not fit {device.name}: it needs about "
            f"{bitmap_block_smem(tile_n)} bytes of shared memory per block, the device allows "
            f"{device.smem_per_block_optin}"
        )
    else:
        tn = tile_n
    slots = device.sms * per_sm[tn]
    tiles = -(-m // BITMAP_TILE_M) * -(-n // tn)
    k_tiles = -(-k // TILE_K)
    need = min_ctas_per_sm * device.sms
    split = 1
    if tiles < need:
        first = -(-need // tiles)
        candidates = [
            s
            for s in sorted(
                {effective_split(k_tiles, r) for r in range(first, min(k_tiles, 4 * first) + 1)}
            )
            if tiles * s >= need
        ] or [effective_split(k_tiles, first)]
        eff = {s: wave_efficiency(tiles * s, slots) for s in candidates}
        good = [s for s in candidates if eff[s] >= target]
        # A split whose k tiles are whole pipeline stages (4 k tiles) wastes no warp on an
        # absent tile and copies x without the checked path; take one when it reaches the
        # target too, unless it needs more than twice the splits (shorter pipelines, more
        # partial sums).
        whole = [
            s for s in good if -(-k_tiles // s) % BITMAP_TILES_PER_STAGE == 0 and s <= 2 * good[0]
        ]
        if whole:
            split = whole[0]
        elif good:
            split = good[0]
        else:
            split = max(candidates, key=lambda s: (eff[s], -s))
    return {
        "ctas": tiles * split,
        "split_k": split,
        "persistent": False,
        "tile_m": BITMAP_TILE_M,
        "tile_n": tn,
    }


def bitmap_workspace_sizes(m: int, n: int, tile_n: int, split: int) -> tuple[int, int]:
    """``(counters, partial floats)`` a launch needs (``bitmap_output_tiles`` /
    ``bitmap_partial_floats`` of bitmap_api.cuh); ``(0, 0)`` without a split."""
    if split <= 1:
        return 0, 0
    return -(-m // BITMAP_TILE_M) * -(-n // tile_n), split * n * m


# (device index, stream handle) -> (counters, partials) of eager calls. The counters tensor is
# only ever used as counters: the kernel leaves it all zero, so it needs no memset between calls.
_bitmap_workspaces: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def bitmap_workspace(
    device: torch.device, m: int, n: int, tile_n: int, split: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split-K ``(counters, partials)`` for a launch on ``device``'s current stream; ``(None,
    None)`` without a split.

    Eager: the cached pair of (device, stream), each grown when too small (new counters are
    zeros); one pair per stream, because concurrent launches must not share counters. Under
    CUDA-graph capture: a new pair from the graph's private memory pool (counters zeroed by a
    captured memset), owned by that graph alone -- a graph can be replayed at any later time,
    concurrently with eager calls or other graphs, so it never shares or caches its buffers.
    """
    n_counters, n_floats = bitmap_workspace_sizes(m, n, tile_n, split)
    if n_counters == 0:
        return None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if extension.capturing(index):
        return (
            torch.zeros(n_counters, dtype=torch.int32, device=device),
            torch.empty(n_floats, dtype=torch.float32, device=device),
        )
    key = (index, torch.cuda.current_stream(index).cuda_stream)
    counters, partials = _bitmap_workspaces.get(key, (None, None))
    if counters is None or counters.numel() < n_counters:
        counters = torch.zeros(max(n_counters, 4096), dtype=torch.int32, device=device)
    if partials is None or partials.numel() < n_floats:
        partials = torch.empty(max(n_floats, 1 << 18), dtype=torch.float32, device=device)
    _bitmap_workspaces[key] = (counters, partials)
    return counters, partials


@functools.lru_cache(maxsize=64)
def _occupancy(device_index: int, bf16: bool) -> dict[int, int]:
    """Resident CTAs per SM of every tile width on a device (0: does not fit), from the
    compiled kernel (this opts each fitting width into its shared memory)."""
    with torch.cuda.device(device_index):
        return {
            tn: int(torch.ops.flashsparse._bitmap_cuda_occupancy(tn, bf16)) for tn in BITMAP_TILE_NS
        }


@functools.lru_cache(maxsize=4096)
def _plan(device_index: int, bf16: bool, n: int, m: int, k: int) -> tuple[int, int]:
    """``(split_k, tile_n)`` for one call shape on one device."""
    plan = bitmap_launch_plan(
        m, k, n, device=device_limits(device_index), ctas_per_sm=_occupancy(device_index, bf16)
    )
    return plan["split_k"], plan["tile_n"]


def bitmap_linear(
    x2d: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` for a contiguous ``[N, K]`` x and a bitmap weight (fp16/bf16)."""
    index = x2d.device.index if x2d.device.index is not None else torch.cuda.current_device()
    split_k, tile_n = _plan(index, x2d.dtype == torch.bfloat16, x2d.shape[0], m, k)
    counters, partials = bitmap_workspace(x2d.device, m, x2d.shape[0], tile_n, split_k)
    return torch.ops.flashsparse._bitmap_spmm_cuda(
        x2d, masks, values, tile_offsets, m, k, bias, split_k, tile_n, counters, partials
    )


# --- self-check ---------------------------------------------------------------------------------
def _register_fake() -> None:
    @torch.library.register_fake("flashsparse::_bitmap_spmm_cuda")
    def _(
        x,
        masks,
        values,
        tile_offsets,
        m,
        k,
        bias=None,
        split_k=1,
        tile_n=0,
        counters=None,
        partials=None,
    ):
        return x.new_empty((x.shape[0], m))


extension.after_load(_register_fake)


def _self_check() -> str | None:
    from ...formats import Bitmap

    index = torch.cuda.current_device()
    device = torch.device("cuda", index)
    # Occupancy of every tile width and dtype now, outside any capture: it opts each width
    # that fits into its shared memory, so later plans never call into the driver.
    fits = {tn for bf16 in (False, True) for tn, c in _occupancy(index, bf16).items() if c > 0}
    if 8 not in fits:
        return f"the {KERNEL} does not fit {torch.cuda.get_device_name(device)} (shared memory)"
    g = torch.Generator().manual_seed(1)
    # (m, k, n, split_k, tile_n): dense + empty tiles, odd sizes, k % 8 != 0, every width that
    # fits this GPU, split-K, and an Inf in x under split-K (the next split's x must not meet
    # this split's empty tiles).
    for m, k, n, split, tile_n in (
        (130, 200, 3, 1, 8),
        (130, 200, 3, 4, 8),
        (300, 77, 13, 1, 16),
        (257, 136, 33, 3, 32),
        (70, 64, 40, 1, 0),
        (64, 640, 2, 2, 0),
    ):
        if tile_n and tile_n not in fits:
            tile_n = 0  # the op's own choice: the widest width that fits
        w32 = extension.self_check_weight(m, k, g)
        x32, b32 = torch.randn(n, k, generator=g), torch.randn(m, generator=g)
        if k == 640:
            x32[0, 400] = float("inf")
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
            w, x, bias = (t.to(device=device, dtype=dtype) for t in (w32, x32, b32))
            t = Bitmap.encode(w).tensors
            tn = tile_n or _plan(index, dtype == torch.bfloat16, n, m, k)[1]
            eff = effective_split(-(-k // TILE_K), split)
            counters, partials = bitmap_workspace(device, m, n, tn, eff)
            y = torch.ops.flashsparse._bitmap_spmm_cuda(
                x, *t, m, k, bias, split, tn, counters, partials
            )
            ref = x.double() @ w.double().T + bias.double()
            finite = torch.isfinite(ref)
            same_specials = torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(
                torch.isinf(y), torch.isinf(ref)
            )
            err = float((y.double()[finite] - ref[finite]).norm() / ref[finite].norm())
            if not (err < tol and same_specials):
                return (
                    f"the {KERNEL} failed its self-check on {torch.cuda.get_device_name(device)} "
                    f"({dtype}, m={m}, k={k}, n={n}, split_k={split}, tile_n={tn}: relative "
                    f"error {err:.3g} (bound {tol}), NaN/Inf as the reference: {same_specials})"
                )
    torch.cuda.synchronize(device)
    return None


available = extension.SelfCheckedKernel(KERNEL, _self_check)


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return extension.supports_reason(KERNEL, device, dtype, "Triton runs fp32")


backends.register_kernel("bitmap", "cuda", bitmap_linear, supports=_supports, available=available)
