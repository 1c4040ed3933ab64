"""Launch plans of each kernel for the benchmark shapes, from the providers' own planners, per
compiled architecture (each on its :func:`~.model.gpu_for_arch` GPU)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .analyse import KernelResult
from .model import H100, Gpu, ctas_per_sm, gpu_for_arch, weight_bytes


def _arch_instances(
    results: Sequence[KernelResult], kernel: str, arch: str
) -> dict[int, KernelResult]:
    """The kernel's fp16 primary instances compiled for ``arch``, by n_tile."""
    tag = "sm_" + arch.removeprefix("sm_")
    return {
        r.n_tile: r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch == tag
        and (r.instance is None or r.instance.primary)
    }


def _device_limits(gpu: Gpu) -> Any:
    from flashsparse.kernels.cuda.launch import DeviceLimits

    return DeviceLimits(
        name=gpu.name,
        sms=gpu.sms,
        smem_per_block_optin=gpu.max_smem_per_cta,
        smem_per_sm=gpu.smem,
        regs_per_sm=gpu.regs,
        max_threads_per_sm=32 * gpu.max_warps,
        max_blocks_per_sm=gpu.max_ctas,
        smem_reserved_per_block=gpu.smem_reserved,
    )


def _counted_ctas(r: KernelResult, gpu: Gpu) -> int:
    threads = r.instance.threads if r.instance is not None else 128
    return ctas_per_sm(r.registers, r.smem_bytes, threads, gpu)


def plan_for(
    kernel: str,
    m: int,
    k: int,
    n: int,
    s: float,
    results: Sequence[KernelResult],
    gpu: Gpu = H100,
    arch: str = "90a",
) -> dict[str, Any]:
    """Launch plan of ``kernel`` for one shape, made by its provider for the GPU ``arch``
    targets (``gpu`` for sm_90, else :func:`gpu_for_arch`), with the CTAs per SM of the
    instances compiled for ``arch`` when they were counted. ``smem_bytes``: static + dynamic
    shared memory per CTA of the instance the plan launches (None when it was not compiled)."""
    target = gpu_for_arch(arch, gpu)
    if kernel == "bitmap_triton":
        from flashsparse.kernels.triton import bitmap_spmm

        cfg = bitmap_spmm.choose_config(m, k, n, target.sms)
        ctas = -(-m // cfg.block_m) * -(-n // cfg.block_n) * cfg.split_k
        counted = _arch_instances(results, kernel, arch).get(cfg.block_n)
        return {
            "ctas": ctas,
            "split_k": cfg.split_k,
            "persistent": False,
            "tile_m": cfg.block_m,
            "tile_n": cfg.block_n,
            "extra_launches": int(cfg.split_k > 1),
            "workspace": cfg.split_k > 1,
            "smem_bytes": counted.smem_bytes if counted is not None else None,
        }
    from flashsparse.kernels.cuda import bitmap, tiled_csl

    counted = _arch_instances(results, kernel, arch)
    if kernel == "bitmap_cuda":
        per_sm = None
        if all(tn in counted for tn in bitmap.BITMAP_TILE_NS):
            per_sm = {tn: _counted_ctas(counted[tn], target) for tn in bitmap.BITMAP_TILE_NS}
        plan = dict(
            bitmap.bitmap_launch_plan(m, k, n, device=_device_limits(target), ctas_per_sm=per_sm)
        )
    elif kernel == "tiled_csl_cuda":
        _, tile_n = tiled_csl.tile_config(n)
        per_sm = tiled_csl.CTAS_PER_SM
        if tile_n in counted:
            per_sm = _counted_ctas(counted[tile_n], target)
            if per_sm < 1:
                raise ValueError(
                    f"the {tile_n}-wide Tiled-CSL block tile ({counted[tile_n].smem_bytes} B of "
                    f"shared memory) does not fit {target.name}"
                )
        plan = dict(
            tiled_csl.tiled_csl_launch_plan(
                m,
                k,
                n,
                num_sms=target.sms,
                ctas_per_sm=per_sm,
                weight_bytes=int(weight_bytes(kernel, m, k, s)),
            )
        )
    else:
        raise LookupError(f"no launch planner for {kernel!r}")
    split = int(plan.get("split_k", 1))
    plan.setdefault("extra_launches", 0)  # the kernels reduce split-K in the kernel
    plan.setdefault("workspace", split > 1)  # ... but the partial sums still move
    inst = counted.get(plan.get("tile_n"))
    plan["smem_bytes"] = inst.smem_bytes if inst is not None else None
    return plan


def pick_instance(
    results: Sequence[KernelResult], kernel: str, tile_n: int | None, arch: str = "90"
) -> KernelResult | None:
    """The fp16 primary instance of an ``arch`` (prefix) with this ``tile_n`` (else the
    nearest)."""
    tag = "sm_" + arch.removeprefix("sm_")
    cands = [
        r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch.startswith(tag)
        and (r.instance is None or r.instance.primary)
    ]
    if not cands:
        return None
    if tile_n is not None:
        for r in cands:
            if r.n_tile == tile_n:
                return r
    return min(cands, key=lambda r: abs(r.n_tile - (tile_n or 0)))
