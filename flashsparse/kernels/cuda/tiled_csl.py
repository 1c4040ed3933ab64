"""The CUDA Tiled-CSL kernel (Flash-LLM's Load-as-Sparse, Compute-as-Dense SpMM,
``csrc/kernels/tiled_csl_*``) as the ``("tiled_csl", "cuda")`` kernel.

The launch plan is decided here, in Python (unit-tested on CPU): the block tile by N
(:func:`tile_config`, as in Flash-LLM plus 256x8 for N <= 8) and the split-K factor
(:func:`tiled_csl_launch_plan`): enough splits that every SM gets at least two blocks, reduced
inside the kernel in split order (deterministic) through a workspace cached per device and
stream for eager calls (:func:`_workspace`; allocated only when it must grow) and owned by the
graph for calls under CUDA-graph capture. The SM count and resident blocks per SM come from
the device (``torch.cuda.get_device_properties`` and the occupancy calculator); every block
tile needs at most 74 KiB of shared memory, so each fits any sm_80+ GPU.
"""

from __future__ import annotations

import functools
import sys

import torch

from ... import backends
from . import extension
from .launch import TILE_K, device_limits, effective_split, wave_efficiency

__all__ = [
    "CTAS_PER_SM",
    "TILE_CONFIGS",
    "available",
    "tile_config",
    "tiled_csl_launch_plan",
    "tiled_csl_linear",
    "tiled_csl_workspace_elems",
]

KERNEL = "CUDA Tiled-CSL kernel"
STORAGE_TILE_M = 128
# (max N, tile_n, tile_m): the block tile for N tokens; mirrors tcsl::default_tile_n /
# tile_m_for in csrc/kernels/tiled_csl_layout.cuh (the op takes tile_n explicitly).
TILE_CONFIGS: tuple[tuple[int, int, int], ...] = (
    (8, 8, 256),
    (16, 16, 256),
    (32, 32, 256),
    (64, 64, 128),
    (sys.maxsize, 128, 128),
)
# Resident blocks per SM of each block tile on sm_90a (H100): ptxas gives every configuration
# 206-254 registers x 128 threads, so the register file (64 Ki) holds two blocks; shared memory
# (66-74 KiB per block) would allow three. The provider queries the real value at run time.
CTAS_PER_SM = 2
MIN_CTAS_PER_SM = 2  # the plan splits K until every SM has at least this many blocks


# --- launch plan (pure functions) --------------------------------------------------------------
def tile_config(n: int) -> tuple[int, int]:
    """``(tile_m, tile_n)`` of the block tile the kernel uses for ``n`` tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for max_n, tile_n, tile_m in TILE_CONFIGS:
        if n <= max_n:
            return tile_m, tile_n
    raise AssertionError("unreachable: the last tile config takes any n")


def tiled_csl_launch_plan(
    m: int,
    k: int,
    n: int,
    *,
    num_sms: int = 132,
    ctas_per_sm: int = CTAS_PER_SM,
    weight_bytes: int = 0,
) -> dict[str, int | bool]:
    """Launch plan of the CUDA Tiled-CSL kernel for ``y[n, m] = x[n, k] @ W[m, k]^T``.

    The block tile comes from :func:`tile_config`. Split-K: the smallest effective split that
    gives every SM at least ``MIN_CTAS_PER_SM`` blocks (or every k tile its own split, if K is
    too short for that); among the splits up to one full wave of ``num_sms * ctas_per_sm``
    blocks, it then takes the one with the best wave efficiency. For n > 32 (where the x and
    output tiles dominate) the fp32 partial sums may not cost more traffic than the weight
    (``8 * n * m * split <= weight_bytes``, when ``weight_bytes`` is given). The reduction runs
    inside the kernel, so the plan never adds a launch. Returns ``dict(ctas, split_k,
    persistent, tile_m, tile_n)``; ``persistent`` is always False (a split-K grid).
    """
    for name, value in (
        ("m", m),
        ("k", k),
        ("n", n),
        ("num_sms", num_sms),
        ("ctas_per_sm", ctas_per_sm),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if weight_bytes < 0:
        raise ValueError(f"weight_bytes must be >= 0, got {weight_bytes}")
    tile_m, tile_n = tile_config(n)
    blocks = -(-n // tile_n) * -(-m // tile_m)
    k_tiles = -(-k // TILE_K)
    target = MIN_CTAS_PER_SM * num_sms
    slots = num_sms * max(ctas_per_sm, MIN_CTAS_PER_SM)
    max_split = min(k_tiles, 65535)
    if n > 32 and weight_bytes > 0:
        max_split = max(1, min(max_split, weight_bytes // (8 * n * m)))
    candidates = sorted({effective_split(k_tiles, s) for s in range(1, max_split + 1)})
    enough = [s for s in candidates if blocks * s >= target]
    split = enough[0] if enough else candidates[-1]
    if enough:
        # A tail wave of a few blocks is as slow as a full one: prefer the best-filled split
        # among those that still fit in the first full wave.
        in_wave = [s for s in enough if blocks * s <= slots]
        if in_wave:
            split = max(in_wave, key=lambda s: (wave_efficiency(blocks * s, slots), -s))
    return {
        "ctas": blocks * split,
        "split_k": split,
        "persistent": False,
        "tile_m": tile_m,
        "tile_n": tile_n,
    }


def tiled_csl_workspace_elems(m: int, n: int, tile_n: int, split: int) -> int:
    """int32 elements of the split-K workspace: one arrival counter per output tile (rounded up
    to 16 bytes), then ``split * n * m`` fp32 partial sums; 0 without a split. Mirrors
    ``workspace_elems`` in ``csrc/bindings/tiled_csl_cuda.cpp``."""
    if split <= 1:
        return 0
    tile_m = 256 if tile_n <= 32 else 128
    counters = -(-n // tile_n) * -(-m // tile_m)
    return -(-counters // 4) * 4 + split * n * m


# (device index, stream handle) -> int32 workspace of eager calls. Zeroed once; the kernel leaves
# its counters at zero.
_workspaces: dict[tuple[int, int], torch.Tensor] = {}


def _workspace(device: torch.device, elems: int, counters: int) -> torch.Tensor:
    """The split-K workspace for a launch on ``device``'s current stream.

    Eager: the cached buffer of (device, stream), grown (not per call) when too small; kernels
    still using an old buffer ran on this stream, so the caching allocator only reuses its
    memory after them. Under CUDA-graph capture: a new buffer from the graph's private memory
    pool with its counters zeroed by a captured memset, owned by that graph alone -- a graph can
    be replayed at any later time, concurrently with eager calls or other graphs (also graphs
    captured on the same stream), so it never shares or caches its workspace.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    if extension.capturing(index):
        buf = torch.empty(elems, dtype=torch.int32, device=device)
        buf[: -(-counters // 4) * 4].zero_()
        return buf
    key = (index, torch.cuda.current_stream(index).cuda_stream)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < elems:
        size = max(elems, 2 * buf.numel() if buf is not None else 0)
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        _workspaces[key] = buf
    return buf


@functools.lru_cache(maxsize=64)
def _occupancy(device_index: int, bf16: bool) -> dict[int, int]:
    """Resident blocks per SM of every block tile on a device (0: does not fit), from the
    compiled kernel (this opts each configuration into its shared memory)."""
    with torch.cuda.device(device_index):
        return {
            tile_n: int(torch.ops.flashsparse._tiled_csl_cuda_occupancy(tile_n, bf16))
            for _, tile_n, _ in TILE_CONFIGS
        }


@functools.lru_cache(maxsize=4096)
def _plan(device_index: int, bf16: bool, n: int, m: int, k: int, num_words: int) -> tuple[int, int]:
    """``(split_k, tile_n)`` for one call shape on one device."""
    _, tile_n = tile_config(n)
    limits = device_limits(device_index)
    per_sm = _occupancy(device_index, bf16)[tile_n]
    if per_sm < 1:
        raise ValueError(
            f"the {KERNEL}'s {tile_n}-wide block tile does not fit {limits.name} "
            f"({limits.smem_per_block_optin} bytes of shared memory per block)"
        )
    plan = tiled_csl_launch_plan(
        m, k, n, num_sms=limits.sms, ctas_per_sm=per_sm, weight_bytes=4 * num_words
    )
    return int(plan["split_k"]), tile_n


# --- self-check ---------------------------------------------------------------------------------
def _register_fake() -> None:
    @torch.library.register_fake("flashsparse::_tiled_csl_spmm_cuda")
    def _(x, words, tile_offsets, m, k, bias=None, split_k=1, tile_n=0, workspace=None):
        return x.new_empty((x.shape[0], m))


extension.after_load(_register_fake)


def _self_check_cases() -> list[tuple[int, int, int, int, int]]:
    """(m, k, n, tile_n, split_k): every block config, both x paths (k % 8), split-K."""
    return [
        (130, 200, 3, 8, 1),  # 100 %-dense tile, empty tile, partial 256-row block
        (130, 200, 3, 8, 4),  # forced split-K
        (300, 77, 13, 16, 1),  # k % 8 != 0: scalar x path; three storage-tile rows
        (257, 136, 33, 32, 3),
        (129, 192, 40, 64, 2),
        (70, 64, 130, 128, 1),
    ]


def _self_check() -> str | None:
    from ...formats import TiledCSL

    index = torch.cuda.current_device()
    device = torch.device("cuda", index)
    # Occupancy of every block tile and dtype now, outside any capture: it opts each one into
    # its shared memory, so later plans never call into the driver.
    for bf16 in (False, True):
        too_big = [tn for tn, c in _occupancy(index, bf16).items() if c < 1]
        if too_big:
            return (
                f"the {KERNEL}'s block tiles {too_big} do not fit "
                f"{torch.cuda.get_device_name(device)} (shared memory per block)"
            )
    g = torch.Generator().manual_seed(0)
    for m, k, n, tile_n, split in _self_check_cases():
        w32 = extension.self_check_weight(m, k, g)
        x32 = torch.randn(n, k, generator=g)
        b32 = torch.randn(m, generator=g)
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
            w = w32.to(device=device, dtype=dtype)
            x = x32.to(device=device, dtype=dtype)
            bias = b32.to(device=device, dtype=dtype)
            words, offsets = TiledCSL.encode(w).tensors
            ref = x.double() @ w.double().T + bias.double()
            y = torch.ops.flashsparse._tiled_csl_spmm_cuda(
                x, words, offsets, m, k, bias, split, tile_n
            )
            err = float((y.double() - ref).norm() / ref.norm())
            if not err < tol:  # also catches NaN
                return (
                    f"the {KERNEL} failed its self-check on {torch.cuda.get_device_name(device)} "
                    f"({dtype}, m={m}, k={k}, n={n}, tile_n={tile_n}, split_k={split}: relative "
                    f"error {err:.3g} > {tol})"
                )
    torch.cuda.synchronize(device)
    return None


available = extension.SelfCheckedKernel(KERNEL, _self_check)


# --- provider interface ------------------------------------------------------------------------
def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    return extension.supports_reason(
        KERNEL,
        device,
        dtype,
        "fp32 Tiled-CSL words are 64-bit; the reference backend runs them",
    )


def tiled_csl_linear(
    x2d: torch.Tensor,
    words: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x2d @ W.T + bias`` for a contiguous ``[N, K]`` x in the weight's dtype (fp16/bf16)."""
    n = x2d.shape[0]
    index = x2d.device.index if x2d.device.index is not None else torch.cuda.current_device()
    split_k, tile_n = _plan(index, x2d.dtype == torch.bfloat16, n, m, k, words.numel())
    split_k = effective_split(-(-k // TILE_K), split_k)
    workspace = None
    if split_k > 1:
        tile_m = 256 if tile_n <= 32 else 128
        counters = -(-n // tile_n) * -(-m // tile_m)
        workspace = _workspace(
            x2d.device, tiled_csl_workspace_elems(m, n, tile_n, split_k), counters
        )
    return torch.ops.flashsparse._tiled_csl_spmm_cuda(
        x2d, words, tile_offsets, m, k, bias, split_k, tile_n, workspace
    )


backends.register_kernel(
    "tiled_csl", "cuda", tiled_csl_linear, supports=_supports, available=available
)
