"""Device memory bandwidth as this run sees it: a large device-to-device copy, counting the
bytes read plus the bytes written (the same way kernel traffic is counted)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .timing import Timer, Timing, cache_bytes


@dataclass(frozen=True)
class Bandwidth:
    gbps: float  # (read + write) bytes / median time, in 1e9 bytes per second
    buffer_bytes: int
    timing: Timing


def copy_buffer_bytes(device: torch.device) -> int:
    """Big enough that caches do not matter (>= 8x the last-level cache), small enough to fit."""
    cache = cache_bytes(device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return int(min(max(8 * cache, 2**30), total // 8))
    return int(max(8 * cache, 64 * 2**20))


def measure_copy_bandwidth(
    device: torch.device, timer: Timer, nbytes: int | None = None
) -> Bandwidth:
    nbytes = nbytes or copy_buffer_bytes(device)
    src = torch.full((nbytes,), 7, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = timer(lambda: dst.copy_(src))
    if not torch.equal(dst, src):
        raise RuntimeError("the copy used to measure bandwidth produced different bytes")
    gbps = 2 * nbytes / (timing.median_ms * 1e-3) / 1e9
    return Bandwidth(gbps, nbytes, timing)
