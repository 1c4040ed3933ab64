"""Timers that return the median and 20th/80th percentiles of one call, and rotating buffers.

* ``do_bench``: ``triton.testing.do_bench`` (CUDA, triton installed). It flushes the L2 before
  every timed call and times each call with CUDA events.
* ``events``: the same method without triton: a ``zero_()`` of an L2-sized buffer before each
  call (which also lets the CPU queue the call ahead of the GPU, so Python launch overhead is
  not in the time), then CUDA events around the call.
* ``cpu``: ``time.perf_counter`` around each call.

The callers also rotate several copies of every weight so the working set is at least twice
the last-level cache: a weight never sits in cache because the previous call read it.
"""

from __future__ import annotations

import glob
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

TIMERS = ("auto", "do_bench", "events", "cpu")
DEFAULT_CACHE_BYTES = 50 * 2**20  # H100's L2, used when the cache size cannot be read
MAX_ROTATION = 4096


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and 20th/80th percentiles over ``samples`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int | None = None


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (as ``numpy.quantile``'s default)."""
    if not values:
        raise ValueError("values must not be empty")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> Timing:
    return Timing(
        quantile(times_ms, 0.5), quantile(times_ms, 0.2), quantile(times_ms, 0.8), len(times_ms)
    )


def _cpu_cache_bytes() -> int | None:
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def cache_bytes(device: torch.device) -> int:
    """Size of the cache a weight could stay in between calls: the GPU's L2, or the CPU's
    last-level cache; 50 MB when it cannot be read."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        size = getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0)
        return int(size) or DEFAULT_CACHE_BYTES
    return _cpu_cache_bytes() or DEFAULT_CACHE_BYTES


def rotation_count(nbytes: int, cache: int) -> int:
    """Copies of an ``nbytes`` buffer whose total is at least twice ``cache`` (at least 1)."""
    if nbytes <= 0:
        return 1
    return max(1, min(MAX_ROTATION, math.ceil(2 * cache / nbytes)))


class Rotation:
    """Hands out ``items`` round-robin, so consecutive calls read different buffers."""

    def __init__(self, items: Sequence) -> None:
        if not items:
            raise ValueError("Rotation needs at least one item")
        self.items = list(items)
        self._i = 0

    def __len__(self) -> int:
        return len(self.items)

    def next(self):
        item = self.items[self._i]
        self._i = (self._i + 1) % len(self.items)
        return item


class Timer:
    name = "timer"

    def __call__(self, fn: Callable[[], object]) -> Timing:
        raise NotImplementedError


class CpuTimer(Timer):
    """Wall clock per call after ``warmup_ms`` of warm-up; at least ``min_samples`` calls."""

    name = "cpu perf_counter"

    def __init__(
        self, warmup_ms: float, rep_ms: float, min_samples: int = 5, max_samples: int = 10_000
    ):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.min_samples, self.max_samples = min_samples, max_samples

    def __call__(self, fn: Callable[[], object]) -> Timing:
        start = time.perf_counter()
        fn()
        while (time.perf_counter() - start) * 1e3 < self.warmup_ms:
            fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.max_samples and (
            len(times) < self.min_samples or (time.perf_counter() - start) * 1e3 < self.rep_ms
        ):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return summarize(times)


class CudaEventTimer(Timer):
    """``do_bench``'s method without triton: flush the cache, then time one call with events."""

    name = "cuda events"

    def __init__(self, device: torch.device, warmup_ms: float, rep_ms: float, flush_bytes: int):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.flush = torch.empty(max(flush_bytes, 2**20), dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> Timing:
        fn()
        torch.cuda.synchronize(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            self.flush.zero_()
            fn()
        end.record()
        torch.cuda.synchronize(self.device)
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        for _ in range(max(1, int(self.warmup_ms / estimate))):
            fn()
        n = max(5, int(self.rep_ms / estimate))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends, strict=True):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return summarize([s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)])


class DoBenchTimer(Timer):
    name = "triton do_bench"

    def __init__(self, warmup_ms: float, rep_ms: float):
        from triton.testing import do_bench

        self._do_bench = do_bench
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def __call__(self, fn: Callable[[], object]) -> Timing:
        median, p20, p80 = self._do_bench(
            fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8]
        )
        return Timing(float(median), float(p20), float(p80), None)


def do_bench_unavailable_reason() -> str | None:
    try:
        import triton.testing  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def make_timer(device: torch.device, warmup_ms: float, rep_ms: float, kind: str = "auto") -> Timer:
    """The timer ``kind`` names (``auto``: do_bench, else CUDA events on a GPU; perf_counter on
    the CPU). Raises ``ValueError`` for a kind that cannot time ``device``."""
    if kind not in TIMERS:
        raise ValueError(f"timer must be one of {', '.join(TIMERS)}; got {kind!r}")
    if device.type != "cuda":
        if kind in ("do_bench", "events"):
            raise ValueError(f"the {kind} timer needs a CUDA device, not {device}")
        return CpuTimer(warmup_ms, rep_ms)
    if kind == "cpu":
        raise ValueError("the cpu timer cannot time CUDA work (it returns before the GPU is done)")
    if kind in ("auto", "do_bench"):
        reason = do_bench_unavailable_reason()
        if reason is None:
            return DoBenchTimer(warmup_ms, rep_ms)
        if kind == "do_bench":
            raise ValueError(f"the do_bench timer is unavailable: {reason}")
    return CudaEventTimer(device, warmup_ms, rep_ms, 2 * cache_bytes(device))
