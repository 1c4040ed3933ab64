"""Launch-plan helpers shared by the CUDA kernels: split-K arithmetic and wave efficiency.

Pure functions (no CUDA needed), unit-tested on CPU. Every CUDA kernel here splits K in units
of 64-wide k tiles, the same way as its C++ side (``effective_split`` in
``csrc/kernels/*_layout.cuh``): every split owns ``ceil(k_tiles / split)`` k tiles except the
last, and no split is empty.
"""

from __future__ import annotations

__all__ = [
    "MAX_SPLIT_K",
    "MAX_WORKSPACE_TRAFFIC",
    "TILE_K",
    "WAVE_TARGET",
    "choose_split_k",
    "effective_split",
    "k_tiles_of",
    "wave_efficiency",
]

TILE_K = 64
WAVE_TARGET = 0.8
# Split-K partial sums cost 8 bytes per output element and split (fp32 write + read); keep that
# below this fraction of the weight's bytes so splitting never costs more traffic than it saves.
MAX_WORKSPACE_TRAFFIC = 0.25
MAX_SPLIT_K = 65535


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
