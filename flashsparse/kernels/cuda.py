"""The CUDA backend: Flash-LLM's Tiled-CSL SpMM (``csrc/``) as the ``("tiled_csl", "cuda")`` kernel.

Imported lazily by :mod:`flashsparse.backends`; importing it builds nothing. The compiled ops
come from :mod:`flashsparse.kernels.build` (a prebuilt ``flashsparse._C``, else a JIT build of
``csrc/bindings/*_cuda.cpp`` + ``csrc/kernels/*.cu`` for the running GPU's architecture only).
A new CUDA kernel adds its torch-free sources under ``csrc/kernels/``, its glue as
``csrc/bindings/<kernel>_cuda.cpp`` and one ``backends.register_kernel`` line here.

:func:`_available` (what :mod:`flashsparse.backends` calls before first use) loads or builds once
per process and then checks the kernel against the reference decode on small problems covering
every block-tile configuration, a 100 %-dense tile, an empty tile, odd M/K/N, unaligned x rows
and split-K. A build error or a failed check is cached and reported as the reason the backend
is unavailable, so ``FLASHSPARSE_BACKEND=auto`` falls back with one warning and
``FLASHSPARSE_BACKEND=cuda`` raises it.

Environment knobs: ``FLASHSPARSE_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0a"``; default: the current
GPU), plus the builder's (``FLASHSPARSE_VERBOSE_BUILD``, ``FLASHSPARSE_CACHE_DIR``,
``FLASHSPARSE_JIT``).

The launch plan is decided here, in Python (unit-tested on CPU): the block tile by N
(:func:`tile_config`, as in Flash-LLM plus 256x8 for N <= 8) and the split-K factor
(:func:`tiled_csl_launch_plan`): enough splits that every SM gets at least two blocks, reduced
inside the kernel in split order (deterministic) through a workspace cached per device and
stream (:func:`_workspace`; allocated only when it must grow).

CUDA graphs: the first call in a process builds/loads the extension and self-checks it (device
syncs), which must happen before a capture; a first call made during a capture raises a
RuntimeError saying so instead of breaking the capture. After that, calls capture normally
(a captured split-K call uses a workspace from the graph's memory pool).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path

import torch

from .. import backends
from . import build
from .build import gencode_flags

__all__ = [
    "CTAS_PER_SM",
    "KERNEL_DTYPES",
    "TILE_CONFIGS",
    "choose_split_k",
    "effective_split",
    "gencode_flags",
    "kernel_sources",
    "tile_config",
    "tiled_csl_launch_plan",
    "tiled_csl_workspace_elems",
    "unavailable_reason",
    "wave_efficiency",
]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = build.MIN_CUDA_CAPABILITY
TILE_K = 64
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
WAVE_TARGET = 0.8
# Split-K partial sums cost 8 bytes per output element and split (fp32 write + read); keep that
# below this fraction of the weight's bytes so splitting never costs more traffic than it saves.
MAX_WORKSPACE_TRAFFIC = 0.25
MAX_SPLIT_K = 65535
# Resident blocks per SM of each block tile on sm_90a (H100): ptxas gives every configuration
# 206-254 registers x 128 threads, so the register file (64 Ki) holds two blocks; shared memory
# (66-74 KiB per block) would allow three. The provider queries the real value at run time.
CTAS_PER_SM = 2
MIN_CTAS_PER_SM = 2  # the plan splits K until every SM has at least this many blocks


_bitmap_lock = threading.Lock()


# --- launch plan (pure functions) --------------------------------------------------------------
def tile_config(n: int) -> tuple[int, int]:
    """``(tile_m, tile_n)`` of the block tile the kernel uses for ``n`` tokens."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    for max_n, tile_n, tile_m in TILE_CONFIGS:
        if n <= max_n:
            return tile_m, tile_n
    raise AssertionError("unreachable: the last tile config takes any n")


def effective_split(k_tiles: int, split: int) -> int:
    """Splits actually run for a request: every split owns ``ceil(k_tiles / split)`` k tiles
    except the last, and no split is empty (mirrors ``tcsl::effective_split``)."""
    if k_tiles < 1:
        raise ValueError(f"k_tiles must be >= 1, got {k_tiles}")
    split = min(max(1, split), k_tiles, MAX_SPLIT_K)
    per = -(-k_tiles // split)
    return -(-k_tiles // per)


def wave_efficiency(blocks: int, slots: int) -> float:
    """Fraction of the resident-block slots busy over the waves ``blocks`` need."""
    if blocks < 1 or slots < 1:
        raise ValueError(f"blocks and slots must be >= 1, got {blocks}, {slots}")
    waves = -(-blocks // slots)
    return blocks / (waves * slots)


def choose_split_k(
    blocks: int,
    k_tiles: int,
    slots: int,
    *,
    workspace_bytes_per_split: int = 0,
    weight_bytes: int = 0,
    target: float = WAVE_TARGET,
) -> int:
    """Split-K factor for a launch of ``blocks`` output tiles over ``k_tiles`` k steps on a GPU
    with ``slots`` resident-block slots (SMs x blocks per SM).

    The smallest effective split whose wave efficiency reaches ``target``; if none does, the
    most efficient one (the smallest among equals). Bounded by the number of k tiles and, when
    ``weight_bytes`` is given, by the fp32 workspace traffic it adds
    (``split * workspace_bytes_per_split <= MAX_WORKSPACE_TRAFFIC * weight_bytes``).
    """
    if blocks < 1 or k_tiles < 1 or slots < 1:
        raise ValueError(
            f"blocks, k_tiles and slots must be >= 1, got {blocks}, {k_tiles}, {slots}"
        )
    best, best_eff = 1, wave_efficiency(blocks, slots)
    if best_eff >= target:
        return 1
    max_split = min(k_tiles, MAX_SPLIT_K)
    if weight_bytes > 0 and workspace_bytes_per_split > 0:
        max_split = min(
            max_split, int(MAX_WORKSPACE_TRAFFIC * weight_bytes // workspace_bytes_per_split)
        )
    previous = 1
    for requested in range(2, max_split + 1):
        split = effective_split(k_tiles, requested)
        if split == previous:
            continue
        previous = split
        eff = wave_efficiency(blocks * split, slots)
        if eff >= target:
            return split
        if eff > best_eff:
            best, best_eff = split, eff
    return best


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
    max_split = min(k_tiles, MAX_SPLIT_K)
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


# (device index, stream, capturing) -> int32 workspace. Eager buffers are zeroed once; the kernel
# leaves its counters at zero.
_workspaces: dict[tuple[int, int, bool], torch.Tensor] = {}


def _workspace(device: torch.device, elems: int, counters: int) -> torch.Tensor:
    """The split-K workspace of the current stream, grown (not per call) when too small.

    Under CUDA-graph capture a separate buffer comes from the graph's private memory pool, and
    its counters are zeroed by a captured memset before each use: nothing runs during capture,
    so the buffer is only valid inside the graph, and a buffer shared by several graphs must
    not depend on which of them ran last.
    """
    stream = torch.cuda.current_stream(device)
    capturing = torch.cuda.is_current_stream_capturing()
    key = (device.index, stream.cuda_stream, capturing)
    buf = _workspaces.get(key)
    if buf is None or buf.numel() < elems:
        size = max(elems, 2 * buf.numel() if buf is not None else 0)
        # Kernels still using an old buffer ran on this stream: the caching allocator only
        # reuses its memory after them.
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        _workspaces[key] = buf
    elif capturing:
        buf[:counters].zero_()
    return buf


@functools.lru_cache(maxsize=64)
def _slots(device_index: int, tile_n: int, bf16: bool) -> int:
    props = torch.cuda.get_device_properties(device_index)
    with torch.cuda.device(device_index):
        per_sm = int(torch.ops.flashsparse._tiled_csl_cuda_occupancy(tile_n, bf16))
    return props.multi_processor_count * max(1, per_sm)


@functools.lru_cache(maxsize=64)
def _device_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _plan(device_index: int, bf16: bool, n: int, m: int, k: int, num_words: int) -> tuple[int, int]:
    """``(split_k, tile_n)`` for one call shape."""
    _, tile_n = tile_config(n)
    sms = _device_sms(device_index)
    per_sm = max(1, _slots(device_index, tile_n, bf16) // sms)
    plan = tiled_csl_launch_plan(
        m, k, n, num_sms=sms, ctas_per_sm=per_sm, weight_bytes=4 * num_words
    )
    return int(plan["split_k"]), tile_n


# --- build ---------------------------------------------------------------------------------------
EXTENSION = build.Extension(
    device="cuda", kernel_dir="kernels", kernel_suffix=".cu", prebuilt="flashsparse._C"
)


def kernel_sources(csrc: Path = build.CSRC) -> list[Path]:
    """The extension's sources: the torch glue (``csrc/bindings/*_cuda.cpp``) and every kernel
    translation unit."""
    return EXTENSION.sources(csrc)


def _jit_arch_list() -> str:
    env = os.environ.get("FLASHSPARSE_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    major, minor = torch.cuda.get_device_capability()
    # sm_90a lets a future wgmma path exist; the mma.sync kernel runs the same either way.
    return f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")


def _register_fake() -> None:
    @torch.library.register_fake("flashsparse::_tiled_csl_spmm_cuda")
    def _(x, words, tile_offsets, m, k, bias=None, split_k=1, tile_n=0, workspace=None):
        return x.new_empty((x.shape[0], m))


def jit_options() -> dict:
    """The builder's arguments for a JIT build (the running GPU's arch, or
    ``FLASHSPARSE_CUDA_ARCH_LIST``); also used by ``flashsparse build`` and ``info``."""
    flags = gencode_flags(_jit_arch_list())
    tag = f"cu{torch.version.cuda}-" + "_".join(f.rsplit("=", 1)[-1] for f in flags)
    return {"extra_cuda_cflags": flags, "tag": tag}


def _load() -> None:
    """Make the compiled CUDA ops exist (prebuilt, else JIT for the running GPU)."""
    EXTENSION.load(**jit_options())
    _register_fake()


# --- self-check -----------------------------------------------------------------------------
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


def _self_check_weight(m: int, k: int, g: torch.Generator) -> torch.Tensor:
    w = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) > 0.7)
    w[: min(m, 128), : min(k, 64)] = torch.randn(min(m, 128), min(k, 64), generator=g)  # dense tile
    if k > 64:
        w[: min(m, 128), 64 : min(k, 128)] = 0  # empty tile
    w[:, k // 2] = torch.randn(m, generator=g)  # a dense column
    return w


def _run_self_check() -> str | None:
    from ..formats import TiledCSL

    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator().manual_seed(0)
    for m, k, n, tile_n, split in _self_check_cases():
        w32 = _self_check_weight(m, k, g)
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
                    f"the CUDA Tiled-CSL kernel failed its self-check on {torch.cuda.get_device_name(device)} "
                    f"({dtype}, m={m}, k={k}, n={n}, tile_n={tile_n}, split_k={split}: relative "
                    f"error {err:.3g} > {tol})"
                )
    torch.cuda.synchronize(device)
    return None


_state = build.LoadOnce(
    "flashsparse CUDA extension", "CUDA Tiled-CSL kernel", _load, _run_self_check
)


# --- provider interface ------------------------------------------------------------------------
def unavailable_reason() -> str | None:
    """Why the CUDA backend cannot run in this process (None: it can). Builds nothing."""
    if _state.error is not None:
        return _state.error
    if torch.version.cuda is None:
        return (
            "torch is a CPU-only build (torch.version.cuda is None); install a CUDA build of torch"
        )
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        return (
            f"the CUDA Tiled-CSL kernel needs compute capability 8.0 or newer (sm_80); "
            f"{torch.cuda.get_device_name()} is sm_{capability[0]}{capability[1]}"
        )
    if _state.loaded or EXTENSION.prebuilt_available():
        return None
    missing = EXTENSION.missing_sources()
    if missing:
        return (
            f"{missing}, and no prebuilt flashsparse._C exists "
            "(FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e . builds one)"
        )
    if build.find_nvcc() is None:
        return (
            "nvcc was not found (set CUDA_HOME or put nvcc on PATH) and no prebuilt flashsparse._C "
            "exists (FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e . builds one)"
        )
    if build.find_ninja() is None:
        return "ninja was not found (pip install ninja); it is needed to JIT-build the CUDA kernels"
    return None


def _available() -> str | None:
    """Load or JIT-build the extension and self-check it, once per process."""
    reason = unavailable_reason()
    if reason or _state.loaded:
        return reason
    if torch.cuda.is_current_stream_capturing():
        # Building, self-checking (device syncs) and allocating would invalidate the capture.
        raise RuntimeError(
            "the first call of the CUDA Tiled-CSL kernel in this process happened inside a "
            "CUDA-graph capture; it must build/load the extension and self-check it first, "
            "which cannot be captured. Run the model once before capturing (a warm-up call)."
        )
    return _state()


def _supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"the CUDA Tiled-CSL kernel runs on CUDA tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return (
            f"the CUDA Tiled-CSL kernel takes float16 or bfloat16 weights, not {dtype} "
            "(fp32 Tiled-CSL words are 64-bit; the reference backend runs them)"
        )
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"the CUDA Tiled-CSL kernel needs compute capability 8.0 or newer; {device} is older"
    return None


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
    split_k, tile_n = _plan(x2d.device.index, x2d.dtype == torch.bfloat16, n, m, k, words.numel())
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
    "tiled_csl", "cuda", tiled_csl_linear, supports=_supports, available=_available
)


# === bitmap (csrc/kernels/bitmap_*): decode-in-registers SpMM ====================================
# Block tile: a 64-row tile row x 8/16/32 tokens, 4 warps; split-K reduced inside the one launch
# by the last CTA per output tile (deterministic order) through a cached per-(device, stream)
# workspace. Mirrors csrc/kernels/bitmap_layout.cuh (tests/test_cuda_bitmap.py checks it).
BITMAP_TILE_M = 64
BITMAP_THREADS = 128
BITMAP_STAGES = 2  # each stage: 4 consecutive k tiles, one per warp
BITMAP_TABLE_BYTES = (
    4096 + 32
)  # static: the two nibble decode tables, the split-K flag, 2 mbarriers
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


_bitmap_checked: str | bool | None = False  # False: not yet; None: passed; str: why not


def _bitmap_self_check() -> str | None:
    from ..formats import Bitmap

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
        w32 = _self_check_weight(m, k, g)
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
                    f"the CUDA bitmap kernel failed its self-check on {torch.cuda.get_device_name(device)} "
                    f"({dtype}, m={m}, k={k}, n={n}, split_k={split}: relative error {err:.3g} > {tol})"
                )
    torch.cuda.synchronize(device)
    return None


def _bitmap_available() -> str | None:
    global _bitmap_checked
    reason = _available()
    if reason:
        return reason
    if _bitmap_checked is False:
        with _bitmap_lock:
            if _bitmap_checked is False:
                try:
                    _bitmap_checked = _bitmap_self_check()
                except Exception as exc:
                    _bitmap_checked = f"the CUDA bitmap kernel failed to run its self-check ({type(exc).__name__}: {exc})"
    return _bitmap_checked or None


def _bitmap_supports(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"the CUDA bitmap kernel runs on CUDA tensors, not {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the CUDA bitmap kernel takes float16 or bfloat16 weights, not {dtype} (Triton runs fp32)"
    if torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        return f"the CUDA bitmap kernel needs compute capability 8.0 or newer; {device} is older"
    return None


backends.register_kernel(
    "bitmap", "cuda", bitmap_linear, supports=_bitmap_supports, available=_bitmap_available
)
