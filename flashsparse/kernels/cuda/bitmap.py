"""The CUDA bitmap kernel (decode-in-registers SpMM, ``csrc/kernels/bitmap_*``) as the
``("bitmap", "cuda")`` kernel.

Block tile: a 64-row tile row x 8/16/32 tokens, 4 warps; split-K reduced inside the one launch
by the last CTA per output tile (deterministic order) through a cached per-(device, stream)
workspace. Mirrors csrc/kernels/bitmap_layout.cuh (tests/test_bitmap_cuda.py checks it).
"""

from __future__ import annotations

import functools

import torch

from ... import backends
from . import extension
from .launch import TILE_K, WAVE_TARGET, effective_split, wave_efficiency

__all__ = [
    "available",
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
BITMAP_STAGES = 2  # each stage: 4 consecutive k tiles, one per warp
# static: the two nibble decode tables, the split-K flag, 2 mbarriers
BITMAP_TABLE_BYTES = 4096 + 32
# ptxas registers per thread by tile_n (sm_90a; fp16 and bf16 alike), for the occupancy model.
BITMAP_REGISTERS = {8: 80, 16: 100, 32: 135}
H100_SMS = 132


def bitmap_tile_n(n: int) -> int:
    """Block tile width (tokens) for ``n`` tokens (``bmp::default_tile_n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return 8 if n <= 8 else (16 if n <= 16 else 32)


def bitmap_smem_bytes(tile_n: int) -> int:
    """Dynamic shared memory of one block (``bmp::smem_bytes``): 2 stages of (masks of 4 tiles
    2 KiB + values of 4 tiles 32 KiB + 16 B slack + x tile ``tile_n`` x 264 halfwords)."""
    return BITMAP_STAGES * (2048 + 32768 + 16 + tile_n * 264 * 2)


def bitmap_ctas_per_sm(tile_n: int, *, registers: int | None = None) -> int:
    """Resident CTAs per H100 SM from the kernel's resources (registers, shared memory, threads)."""
    regs = BITMAP_REGISTERS[tile_n] if registers is None else registers
    warp_regs = -(-regs * 32 // 256) * 256  # allocated per warp in units of 256
    by_regs = 65536 // (warp_regs * BITMAP_THREADS // 32)
    by_smem = (228 * 1024) // (
        bitmap_smem_bytes(tile_n) + BITMAP_TABLE_BYTES + 1024
    )  # 1 KiB reserved per CTA
    return max(1, min(by_regs, by_smem, 2048 // BITMAP_THREADS, 32))


def bitmap_launch_plan(
    m: int,
    k: int,
    n: int,
    *,
    num_sms: int = H100_SMS,
    ctas_per_sm: int | None = None,
    tile_n: int | None = None,
    min_ctas_per_sm: int = 2,
    target: float = WAVE_TARGET,
) -> dict:
    """Launch plan of the CUDA bitmap kernel for ``y[n, m] = x[n, k] @ W[m, k]^T``.

    Output tiles are ``ceil(m / 64) x ceil(n / tile_n)``; when they give fewer than
    ``min_ctas_per_sm`` CTAs per SM, k is split: the smallest effective split reaching that
    many CTAs whose wave efficiency over ``num_sms * ctas_per_sm`` slots reaches ``target``
    (else the most efficient of the next few). Never persistent.
    """
    if m < 1 or k < 1 or n < 1:
        raise ValueError(f"m, k and n must be >= 1, got m={m}, k={k}, n={n}")
    if num_sms < 1:
        raise ValueError(f"num_sms must be >= 1, got {num_sms}")
    tn = bitmap_tile_n(n) if tile_n is None else tile_n
    if tn not in BITMAP_REGISTERS:
        raise ValueError(f"tile_n must be one of {sorted(BITMAP_REGISTERS)}, got {tile_n}")
    slots = num_sms * (bitmap_ctas_per_sm(tn) if ctas_per_sm is None else max(1, ctas_per_sm))
    tiles = -(-m // BITMAP_TILE_M) * -(-n // tn)
    k_tiles = -(-k // TILE_K)
    need = min_ctas_per_sm * num_sms
    split = 1
    if tiles < need:
        first = -(-need // tiles)
        split = effective_split(k_tiles, first)
        best, best_eff = split, -1.0
        for requested in range(first, min(k_tiles, 4 * first) + 1):
            s = effective_split(k_tiles, requested)
            if tiles * s < need:
                continue
            eff = wave_efficiency(tiles * s, slots)
            if eff >= target:
                best = s
                break
            if eff > best_eff:
                best, best_eff = s, eff
        split = best
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


# (device index, stream id) -> (counters, partials). The counters tensor is only ever used as
# counters: the kernel leaves it all zero, so it needs no memset between calls.
_bitmap_workspaces: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def bitmap_workspace(
    device: torch.device, m: int, n: int, tile_n: int, split: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The cached split-K ``(counters, partials)`` of (device, current stream), each grown when
    too small (new counters are zeros). One pair per stream, because concurrent launches must
    not share counters. Run a call once before capturing a CUDA graph so it exists."""
    n_counters, n_floats = bitmap_workspace_sizes(m, n, tile_n, split)
    if n_counters == 0:
        return None, None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (index, torch.cuda.current_stream(index).stream_id)
    counters, partials = _bitmap_workspaces.get(key, (None, None))
    if counters is None or counters.numel() < n_counters:
        counters = torch.zeros(max(n_counters, 4096), dtype=torch.int32, device=device)
    if partials is None or partials.numel() < n_floats:
        partials = torch.empty(max(n_floats, 1 << 18), dtype=torch.float32, device=device)
    _bitmap_workspaces[key] = (counters, partials)
    return counters, partials


@functools.lru_cache(maxsize=8)
def _bitmap_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _bitmap_plan(device_index: int, n: int, m: int, k: int) -> tuple[int, int]:
    plan = bitmap_launch_plan(m, k, n, num_sms=_bitmap_sms(device_index))
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
    split_k, tile_n = _bitmap_plan(x2d.device.index, x2d.shape[0], m, k)
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

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(1)
    # (m, k, n, split_k, tile_n): dense + empty tiles, odd sizes, k % 8 != 0, every width, split-K.
    for m, k, n, split, tile_n in (
        (130, 200, 3, 1, 8),
        (130, 200, 3, 4, 8),
        (300, 77, 13, 1, 16),
        (257, 136, 33, 3, 32),
        (70, 64, 40, 1, 0),
    ):
        w32 = extension.self_check_weight(m, k, g)
        x32, b32 = torch.randn(n, k, generator=g), torch.randn(m, generator=g)
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
            w, x, bias = (t.to(device=device, dtype=dtype) for t in (w32, x32, b32))
            t = Bitmap.encode(w).tensors
            tn = tile_n or bitmap_tile_n(n)
            eff = effective_split(-(-k // TILE_K), split)
            counters, partials = bitmap_workspace(device, m, n, tn, eff)
            y = torch.ops.flashsparse._bitmap_spmm_cuda(
                x, *t, m, k, bias, split, tile_n, counters, partials
            )
            ref = x.double() @ w.double().T + bias.double()
            err = float((y.double() - ref).norm() / ref.norm())
            if not err < tol:
                return (
                    f"the {KERNEL} failed its self-check on {torch.cuda.get_device_name(device)} "
                    f"({dtype}, m={m}, k={k}, n={n}, split_k={split}: relative error {err:.3g} > {tol})"
                )
    torch.cuda.synchronize(device)
    return None


available = extension.SelfCheckedKernel(KERNEL, _self_check)


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return extension.supports_reason(KERNEL, device, dtype, "Triton runs fp32")


backends.register_kernel("bitmap", "cuda", bitmap_linear, supports=_supports, available=available)
