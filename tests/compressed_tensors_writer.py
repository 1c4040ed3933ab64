"""A writer of compressed-tensors checkpoints for the tests, without the compressed-tensors
package (0.15 dropped the sparse formats, so it may not be installable).

It follows the layout compressed-tensors 0.9-0.14 write (``ModelCompressor.compress`` then
``update_config``), step by step:

* quantization first (``naive/int/float-quantized``), symmetric: per group of columns
  ``scale = max|w| / (bit_range / 2)`` -- int8: ``255 / 2 = 127.5``, fp8 e4m3: ``896 / 2 =
  448`` -- in the weight's dtype, ``code = clamp(round(w / scale), -128, 127)`` as int8, or
  ``clamp(w / scale, -448, 448)`` rounded to float8_e4m3fn; ``<module>.weight_scale`` is
  ``[M, 1]`` (channel), ``[M, K / g]`` (group), ``[1]`` (tensor) or ``[ceil(M / bh),
  ceil(K / bw)]`` (block); the division ``w / scale`` is in the weight's dtype; symmetric
  schemes store no zero point;
* then the sparse-bitmask compression of the (quantized) weight: ``bytemask = weight != 0``,
  ``<p>.compressed = weight[bytemask]`` (row-major), ``<p>.bitmask = numpy.packbits(bytemask,
  axis=-1, bitorder="little")`` (uint8 ``[M, ceil(K / 8)]``), ``<p>.shape = tensor([M, K])``
  (int64), ``<p>.row_offsets = cumsum(row counts) - row counts`` (int64);
* ``<p>`` is the module path (0.9-0.14) or ``<module>.weight`` (the 0.8 layout);
* ``config.json`` gets ``quantization_config = {"quant_method": "compressed-tensors", "format":
  ..., "config_groups": {"group_0": {"targets": ["Linear"], "weights": {...},
  "input_activations": null, "output_activations": null}}, "sparsity_config": {"format":
  "sparse-bitmask", ...}, "version": ...}``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def quantize(
    w: torch.Tensor, kind: str, strategy: str, group_size: int | None = None, block=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, weight_scale)`` of a 2-D weight, as compressed-tensors' symmetric
    quantization computes them."""
    m, k = w.shape
    half_range = 127.5 if kind == "int" else 448.0
    x = w.float()
    if strategy == "tensor":
        scale = x.abs().amax().reshape(1) / half_range
        full = scale.expand(m, k)
    elif strategy == "channel":
        scale = x.abs().amax(1, keepdim=True) / half_range
        full = scale.expand(m, k)
    elif strategy == "group":
        assert k % group_size == 0
        scale = x.view(m, k // group_size, group_size).abs().amax(-1) / half_range
        full = scale.repeat_interleave(group_size, 1)
    elif strategy == "block":
        bh, bw = block
        mb, kb = -(-m // bh), -(-k // bw)
        padded = torch.zeros(mb * bh, kb * bw)
        padded[:m, :k] = x.abs()
        scale = padded.view(mb, bh, kb, bw).amax((1, 3)) / half_range
        full = scale.repeat_interleave(bh, 0)[:m].repeat_interleave(bw, 1)[:, :k]
    else:
        raise ValueError(strategy)
    scale = scale.to(w.dtype)  # stored in the weight's dtype
    full = full.to(w.dtype)
    safe = torch.where(full == 0, torch.full_like(full, torch.finfo(w.dtype).eps), full)
    # In the weight's dtype, as the package divides; it then adds its zero point (0), which
    # turns -0.0 into +0.0.
    scaled = w / safe + 0.0
    if kind == "int":
        codes = torch.round(torch.clamp(scaled, -128, 127)).to(torch.int8)
    else:
        codes = torch.clamp(scaled, -448, 448).to(torch.float8_e4m3fn)
    return codes, scale


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{shape, compressed, bitmask, row_offsets}`` of one (possibly quantized) weight."""
    bytemask = weight != 0
    counts = bytemask.sum(-1)
    if weight.dtype == torch.float8_e4m3fn:  # indexed through its bytes, as the package does
        compressed = weight.view(torch.int8)[bytemask].view(torch.float8_e4m3fn)
    else:
        compressed = weight[bytemask]
    return {
        "shape": torch.tensor(list(weight.shape)),
        "compressed": compressed,
        "bitmask": torch.from_numpy(np.packbits(bytemask.numpy(), axis=-1, bitorder="little")),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def compress_state(
    state: dict[str, torch.Tensor],
    sparse: set[str],
    quantized: set[str] = frozenset(),
    *,
    kind: str = "int",
    strategy: str = "channel",
    group_size: int | None = None,
    block=None,
    legacy: bool = False,
) -> dict[str, torch.Tensor]:
    """A model state dict as the package compresses it: the ``quantized`` modules' weights
    quantized, then the ``sparse`` modules' weights bitmask-compressed (keys ``<module>.<s>``,
    or ``<module>.weight.<s>`` with ``legacy``)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module not in sparse | quantized:
            out[name] = value
            continue
        weight = value
        if module in quantized:
            weight, scale = quantize(value, kind, strategy, group_size, block)
            out[f"{module}.weight_scale"] = scale
        if module in sparse:
            prefix = f"{module}.weight" if legacy else module
            for suffix, tensor in bitmask_compress(weight).items():
                out[f"{prefix}.{suffix}"] = tensor
        else:
            out[name] = weight
    return out


def write_checkpoint(
    directory: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    *,
    quant_format: str | None = None,
    weights: dict | None = None,
    sparsity_format: str = "sparse-bitmask",
    version: str = "0.9.1",
    ignore: tuple[str, ...] = ("lm_head",),
) -> None:
    """``model.safetensors`` and ``config.json`` (a Hugging Face config dict) with the
    compressed-tensors ``quantization_config``."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    qconfig: dict = {
        "quant_method": "compressed-tensors",
        "version": version,
        "sparsity_config": {
            "format": sparsity_format,
            "global_sparsity": 0.5,
            "ignore": list(ignore),
            "registry_requires_subclass": False,
            "sparsity_structure": "unstructured",
            "targets": ["Linear"],
        },
    }
    if quant_format is not None:
        qconfig.update(
            format=quant_format,
            quantization_status="compressed",
            ignore=list(ignore),
            kv_cache_scheme=None,
            config_groups={
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
        )
    (directory / "config.json").write_text(
        json.dumps({**config, "quantization_config": qconfig}, indent=2, sort_keys=True)
    )


def weights_scheme(
    kind: str, strategy: str, group_size: int | None = None, block=None, symmetric: bool = True
) -> dict:
    """The ``weights`` entry of a config group (QuantizationArgs as the package dumps it)."""
    return {
        "num_bits": 8,
        "type": kind,
        "symmetric": symmetric,
        "strategy": strategy,
        "group_size": group_size,
        "block_structure": list(block) if block else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
