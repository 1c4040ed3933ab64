"""Launch-plan helpers shared by the CUDA kernels: the GPU's limits, occupancy, split-K
arithmetic and wave efficiency.

Pure functions (no CUDA needed), unit-tested on CPU. Every CUDA kernel here splits K in units
of 64-wide k tiles, the same way as its C++ side (``effective_split`` in
``csrc/kernels/*_layout.cuh``): every split owns ``ceil(k_tiles / split)`` k tiles except the
last, and no split is empty. A plan is made for a :class:`DeviceLimits` -- the running GPU's
(:func:`device_limits`, from ``torch.cuda.get_device_properties``) or a named one
(:data:`H100`, :data:`A100`, :data:`A10`) for reports and tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

__all__ = [
    "A10",
    "A100",
    "H100",
    "LIMITS_BY_ARCH",
    "MAX_SPLIT_K",
    "MAX_WORKSPACE_TRAFFIC",
    "TILE_K",
    "WAVE_TARGET",
    "DeviceLimits",
    "choose_split_k",
    "device_limits",
    "effective_split",
    "k_tiles_of",
    "resident_blocks",
    "wave_efficiency",
]

TILE_K = 64
WAVE_TARGET = 0.8
# Split-K partial sums cost 8 bytes per output element and split (fp32 write + read); keep that
# below this fraction of the weight's bytes so splitting never costs more traffic than it saves.
MAX_WORKSPACE_TRAFFIC = 0.25
MAX_SPLIT_K = 65535


@dataclass(frozen=True)
class DeviceLimits:
    """What a launch plan needs to know about a GPU."""

    name: str
    sms: int
    smem_per_block_optin: int  # bytes one block may use, static + dynamic, after opting in
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the runtime's share of each block (sm_80 and newer)


# The shared-memory limits are the CUDA programming guide's per compute capability; the SM
# counts those of the named parts (an arch spans parts with other counts: the running GPU's
# own come from device_limits).
H100 = DeviceLimits("H100 SXM (sm_90)", 132, 227 * 1024, 228 * 1024)
A100 = DeviceLimits("A100 SXM (sm_80)", 108, 163 * 1024, 164 * 1024)
# sm_86 / sm_89 / sm_120 (A10, A40, L4, L40S, RTX 30/40/50): 99 KiB per block.
A10 = DeviceLimits(
    "A10 (sm_86)", 72, 99 * 1024, 100 * 1024, max_threads_per_sm=1536, max_blocks_per_sm=16
)
LIMITS_BY_ARCH = {"80": A100, "86": A10, "90": H100, "90a": H100}


@functools.lru_cache(maxsize=16)
def device_limits(index: int) -> DeviceLimits:
    """The limits of CUDA device ``index`` from ``torch.cuda.get_device_properties``."""
    import torch

    props = torch.cuda.get_device_properties(index)
    major = props.major
    return DeviceLimits(
        name=f"{props.name} (sm_{major}{props.minor})",
        sms=props.multi_processor_count,
        # Older torch builds lack the opt-in field: the sm_86-class limit is the safe floor.
        smem_per_block_optin=int(getattr(props, "shared_memory_per_block_optin", 99 * 1024)),
        smem_per_sm=int(getattr(props, "shared_memory_per_multiprocessor", 100 * 1024)),
        regs_per_sm=int(getattr(props, "regs_per_multiprocessor", 65536)),
        max_threads_per_sm=int(getattr(props, "max_threads_per_multi_processor", 1536)),
    )


def resident_blocks(device: DeviceLimits, *, threads: int, registers: int, smem_bytes: int) -> int:
    """Blocks of a kernel one SM holds (the CUDA occupancy calculator's rules): 0 when its
    shared memory per block (static + dynamic) exceeds the device's opt-in limit."""
    if threads < 1 or registers < 0 or smem_bytes < 0:
        raise ValueError(
            f"threads must be >= 1 and registers, smem_bytes >= 0, got {threads}, {registers}, "
            f"{smem_bytes}"
        )
    if smem_bytes > device.smem_per_block_optin:
        return 0
    warps = -(-threads // 32)
    limits = [device.max_blocks_per_sm, device.max_threads_per_sm // (32 * warps)]
    if registers > 0:
        per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
        limits.append((device.regs_per_sm // per_warp) // warps)
    limits.append(device.smem_per_sm // (smem_bytes + device.smem_reserved_per_block))
    return max(0, min(limits))


def k_tiles_of(k: int) -> int:
    """64-wide k tiles of a K extent."""
    return -(-k // TILE_K)


def effective_split(k_tiles: int, split: int) -> int:
    """Splits actually run for a request: every split owns ``ceil(k_tiles / split)`` k tiles
    except the last, and no split is empty (mirrors ``effective_split`` of the C++ layouts)."""
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
