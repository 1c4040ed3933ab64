"""Launch plans of each kernel for the benchmark shapes, from the providers' own planners."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from .analyse import KernelResult
from .model import H100, Gpu, weight_bytes


def _cta_slots(results: Sequence[KernelResult], kernel: str, n_tile: int | None) -> int:
    """CTAs per SM of the kernel's fp16 sm_90 instance for ``n_tile`` (1 if unknown)."""
    cands = [
        r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch.startswith("sm_90")
        and (r.instance is None or r.instance.primary)
    ]
    if n_tile is not None:
        exact = [r for r in cands if r.n_tile == n_tile]
        cands = exact or cands
    return max(1, min((r.ctas_per_sm_h100 for r in cands), default=1))


def plan_for(
    kernel: str, m: int, k: int, n: int, s: float, results: Sequence[KernelResult], gpu: Gpu = H100
) -> dict[str, Any]:
    """Launch plan of ``kernel`` for one shape: the provider's own planner when it exists,
    else an adapter around today's plan functions."""
    if kernel == "bitmap_triton":
        from flashsparse.kernels.triton import bitmap_spmm

        cfg = bitmap_spmm.choose_config(m, k, n, gpu.sms)
        ctas = -(-m // cfg.block_m) * -(-n // cfg.block_n) * cfg.split_k
        return {
            "ctas": ctas,
            "split_k": cfg.split_k,
            "persistent": False,
            "tile_m": cfg.block_m,
            "tile_n": cfg.block_n,
            "extra_launches": int(cfg.split_k > 1),
            "workspace": cfg.split_k > 1,
        }
    from flashsparse.kernels.cuda import bitmap, tiled_csl

    wbytes = weight_bytes(kernel, m, k, s)
    fn = {"tiled_csl_cuda": tiled_csl, "bitmap_cuda": bitmap}[kernel]
    fn = getattr(
        fn, {"tiled_csl_cuda": "tiled_csl_launch_plan", "bitmap_cuda": "bitmap_launch_plan"}[kernel]
    )
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"num_sms": gpu.sms}
    if "weight_bytes" in accepted:
        kwargs["weight_bytes"] = int(wbytes)
    first = fn(m, k, n, **kwargs)  # the planner's own occupancy, for its tile_n
    counted = [
        r
        for r in results
        if r.kernel == kernel
        and r.n_tile == first.get("tile_n")
        and (r.instance is None or r.instance.primary)
    ]
    if "ctas_per_sm" in accepted and counted:
        kwargs["ctas_per_sm"] = _cta_slots(results, kernel, first.get("tile_n"))
    plan = dict(fn(m, k, n, **kwargs))
    split = int(plan.get("split_k", 1))
    plan.setdefault("extra_launches", 0)  # the kernels reduce split-K in the kernel
    plan.setdefault("workspace", split > 1)  # ... but the partial sums still move
    return plan


def pick_instance(
    results: Sequence[KernelResult], kernel: str, tile_n: int | None
) -> KernelResult | None:
    """The fp16 sm_90 primary instance with this ``tile_n`` (else the nearest)."""
    cands = [
        r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch.startswith("sm_90")
        and (r.instance is None or r.instance.primary)
    ]
    if not cands:
        return None
    if tile_n is not None:
        for r in cands:
            if r.n_tile == tile_n:
                return r
    return min(cands, key=lambda r: abs(r.n_tile - (tile_n or 0)))
