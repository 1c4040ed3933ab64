"""Spec of the Triton bitmap kernel (``flashsparse/kernels/triton/bitmap_spmm.py``).

One instance per dtype and ``BLOCK_N`` bucket, with the block sizes and warps
:func:`~flashsparse.kernels.triton.bitmap_spmm.choose_config` uses for that bucket (fp16/bf16;
no bias, no split-K, 32-bit offsets: the epilogue differs, the main loop does not). The loop
over k tiles gathers under a predicate, so every instruction issues whatever the sparsity:
no hooks.
"""

from __future__ import annotations

from . import Instance, TritonSpec

_SIGNATURE_PTRS = (
    "x_ptr",
    "mask_bytes_ptr",
    "values_ptr",
    "tile_offsets_ptr",
    "bias_ptr",
    "out_ptr",
)
_SCALARS = ("n", "m", "k", "stride_xn", "k_tiles", "tiles_per_split")


def _instances() -> list[tuple[Instance, dict, dict, dict]]:
    from flashsparse.kernels.triton.bitmap_spmm import choose_config, row_parts

    out = []
    for dtype, ty in (("fp16", "fp16"), ("bf16", "bf16")):
        for n in (16, 32, 64, 128):
            # A shape large enough that choose_config needs no split; only the block sizes matter.
            cfg = choose_config(8192, 4096, n, 132)
            sig = {p: f"*{ty}" for p in _SIGNATURE_PTRS}
            sig["mask_bytes_ptr"] = "*u8"
            sig["tile_offsets_ptr"] = "*i32"
            sig["ws_ptr"] = "*fp32"
            sig.update(dict.fromkeys(_SCALARS, "i32"))
            constexprs = {
                "BLOCK_M": cfg.block_m,
                "BLOCK_N": cfg.block_n,
                "HAS_BIAS": False,
                "SPLIT": False,
                "UPCAST": False,
                "DOT_PRECISION": "tf32",
                "OFFSETS_64": False,
                "ROW_PARTS": row_parts(cfg.block_m, cfg.num_warps),
            }
            sig.update(dict.fromkeys(constexprs, "constexpr"))
            inst = Instance(
                dtype=dtype,
                n_tile=cfg.block_n,
                threads=32 * cfg.num_warps,
                elements=cfg.block_m * 64,
                params={"block_m": cfg.block_m, "num_warps": cfg.num_warps},
            )
            out.append(
                (inst, sig, constexprs, {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            )
    return out


SPEC = TritonSpec(
    name="bitmap_triton",
    instances=_instances,
    fn="flashsparse.kernels.triton.bitmap_spmm:_bitmap_linear_kernel",
)
