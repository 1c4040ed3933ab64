"""Read compressed-tensors ``sparse-bitmask`` checkpoints (the format of Hugging Face sparse
checkpoints written by llm-compressor / SparseML) straight into flashsparse formats.

The layout, as ``compressed_tensors.compressors.sparse_compressors.sparse_bitmask`` writes it
(``BitmaskTensor.dict``), for a compressed ``[M, K]`` weight of the layer ``<p>``:

* ``<p>.shape``: int64 ``[2]`` = ``(M, K)``;
* ``<p>.compressed``: the nonzeros (``w != 0``, so NaN is kept and -0.0 dropped) in row-major
  order, in the weight's dtype;
* ``<p>.bitmask``: uint8 ``[M, ceil(K / 8)]``, ``numpy.packbits(w != 0, axis=-1,
  bitorder="little")``: bit ``b`` of byte ``j`` of row ``r`` is column ``8 j + b``;
* ``<p>.row_offsets``: int64 ``[M]``, where row ``r``'s values start in ``compressed``.

``<p>`` is the layer's module path (compressed-tensors >= 0.7, which strips ``.weight``) or
``<module>.weight`` (older releases); both are read. Everything else in the checkpoint (biases,
embeddings, norms, layers left dense) is stored as plain tensors under its state_dict name.
The model's ``config.json`` says so under ``quantization_config`` (or the older
``compression_config``): ``{"quant_method": "compressed-tensors", "sparsity_config":
{"format": "sparse-bitmask", ...}}``.

A byte of that bitmask is exactly a byte of our bitmap format's masks (eight columns of one
row, LSB first), so ``format="bitmap"`` converts with byte moves and one scatter of the
values, never building the dense weight; ``tiled_csl`` and ``auto`` decode one layer at a time
to dense (on the target device) and encode it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..formats import Bitmap, SparseWeight, check_format, encode
from ..formats.base import SUPPORTED_DTYPES
from ..nn import SparseLinear
from .files import TensorReader, read_header
from .fingerprint import join_name, unwrap_model
from .install import linear_modules, prepare_install, target_device

SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
SUPPORTED_SPARSITY_FORMATS = ("sparse-bitmask", "dense")
_POPCOUNT = [bin(i).count("1") for i in range(256)]


# -- one weight ------------------------------------------------------------------------------------
def _check_bitmask(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    name: str,
) -> tuple[int, int, torch.Tensor]:
    """Validate one compressed weight; return ``(M, K, per-byte popcounts [M, ceil(K/8)])``."""
    if (
        not isinstance(shape, torch.Tensor)
        or shape.dim() != 1
        or shape.numel() != 2
        or shape.is_floating_point()
    ):
        raise ValueError(f"{name}.shape must be an integer tensor [2], got {shape!r}")
    m, k = (int(v) for v in shape.tolist())
    if m < 1 or k < 1:
        raise ValueError(f"{name}.shape must be positive, got {(m, k)}")
    if compressed.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name}.compressed holds {compressed.dtype} values; flashsparse reads float16, "
            "bfloat16 and float32 sparse weights (not quantized ones)"
        )
    if compressed.dim() != 1:
        raise ValueError(f"{name}.compressed must be 1-D, got shape {tuple(compressed.shape)}")
    if bitmask.dtype != torch.uint8 or bitmask.shape != (m, -(-k // 8)):
        raise ValueError(
            f"{name}.bitmask must be uint8 of shape ({m}, {-(-k // 8)}) for a {m}x{k} weight, "
            f"got {bitmask.dtype} {tuple(bitmask.shape)}"
        )
    if row_offsets.shape != (m,) or row_offsets.is_floating_point():
        raise ValueError(f"{name}.row_offsets must be an integer tensor of shape ({m},)")
    if k % 8 and bool((bitmask[:, -1] >> (k % 8)).any()):
        raise ValueError(f"{name}.bitmask has bits set past column {k}")
    lut = torch.tensor(_POPCOUNT, dtype=torch.uint8, device=bitmask.device)
    popcounts = lut[bitmask.long()]
    row_counts = popcounts.sum(1)
    if int(row_counts.sum()) != compressed.numel():
        raise ValueError(
            f"{name}: the bitmask marks {int(row_counts.sum())} nonzeros but compressed holds "
            f"{compressed.numel()} values"
        )
    if not torch.equal(
        row_offsets.to(row_counts.device).long(), torch.cumsum(row_counts, 0) - row_counts
    ):
        raise ValueError(f"{name}.row_offsets do not match the bitmask")
    return m, k, popcounts


def bitmask_to_dense(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    name: str = "weight",
) -> torch.Tensor:
    """The dense ``[M, K]`` weight of one compressed-tensors bitmask-compressed tensor (on
    ``compressed``'s device). Raises ``ValueError`` if the four tensors are inconsistent."""
    m, k, _ = _check_bitmask(shape, compressed, bitmask, row_offsets, name)
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    mask = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(m, -1)[:, :k].bool()
    dense = torch.zeros(m, k, dtype=compressed.dtype, device=compressed.device)
    dense[mask.to(compressed.device)] = compressed
    return dense


def bitmask_to_bitmap(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    name: str = "weight",
) -> Bitmap:
    """Convert one compressed-tensors bitmask tensor to our :class:`~flashsparse.Bitmap` without
    building the dense weight: identical to ``Bitmap.encode(bitmask_to_dense(...))``."""
    m, k, popcounts = _check_bitmask(shape, compressed, bitmask, row_offsets, name)
    device = compressed.device
    mt, kt = -(-m // 64), -(-k // 64)
    padded = torch.zeros(mt * 64, kt * 8, dtype=torch.uint8, device=device)
    padded[:m, : bitmask.shape[1]] = bitmask.to(device)
    # Row r, byte j of the padded bitmask = byte j % 8 of the row mask of in-tile row r % 64 of
    # tile (r // 64, j // 8): permute to [tile row, tile col, row, byte].
    masks = (
        padded.view(mt, 64, kt, 8).permute(0, 2, 1, 3).contiguous().view(torch.int64).reshape(-1)
    )
    # Nonzeros per (row, tile column): a "segment"; compressed holds segments row-major.
    seg = torch.zeros(mt * 64, kt * 8, dtype=torch.int64, device=device)
    seg[:m, : bitmask.shape[1]] = popcounts.to(device)
    seg = seg.view(mt, 64, kt, 8).sum(-1)  # [mt, 64 rows, kt]
    counts = seg.sum(1).reshape(-1)  # per tile, row-major over the tile grid
    tile_offsets = torch.zeros(mt * kt + 1, dtype=torch.int32, device=device)
    tile_offsets[1:] = torch.cumsum((counts + 7) // 8, 0)
    # A segment's values go after the earlier rows' values of the same tile.
    within = torch.cumsum(seg, 1) - seg
    tile_start = tile_offsets[:-1].long().view(mt, 1, kt) * 8
    seg_dst = (tile_start + within).reshape(-1)
    seg_len = seg.reshape(-1)
    seg_src = torch.cumsum(seg_len, 0) - seg_len
    nnz = compressed.numel()
    seg_id = torch.repeat_interleave(
        torch.arange(seg_len.numel(), device=device), seg_len, output_size=nnz
    )
    dest = seg_dst[seg_id] + torch.arange(nnz, device=device) - seg_src[seg_id]
    values = torch.zeros(int(tile_offsets[-1]) * 8, dtype=compressed.dtype, device=device)
    values[dest] = compressed
    return Bitmap(
        {"masks": masks, "values": values, "tile_offsets": tile_offsets},
        (m, k),
        compressed.dtype,
        nnz,
    )


def convert_bitmask(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    format: str = "auto",
    name: str = "weight",
) -> SparseWeight:
    """One compressed-tensors bitmask tensor as a flashsparse weight in ``format`` (computed on
    ``compressed``'s device)."""
    check_format(format)
    if format == "bitmap":
        return bitmask_to_bitmap(shape, compressed, bitmask, row_offsets, name)
    return encode(bitmask_to_dense(shape, compressed, bitmask, row_offsets, name), format)


# -- checkpoints -----------------------------------------------------------------------------------
def has_bitmask_tensors(header: dict) -> bool:
    """Whether a safetensors header holds compressed-tensors bitmask groups."""
    return any(name.endswith(".bitmask") and f"{name[:-8]}.compressed" in header for name in header)


def compression_config(model_dir: str | os.PathLike) -> dict | None:
    """The compressed-tensors config of a Hugging Face model directory (``quantization_config``
    or the older ``compression_config`` of its ``config.json``), or None."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    for key in ("quantization_config", "compression_config"):
        value = config.get(key)
        if (
            isinstance(value, dict)
            and value.get("quant_method", "compressed-tensors") == "compressed-tensors"
        ):
            return value
    return None


def _check_compression_config(config: dict, where: str) -> None:
    sparsity = config.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense")
    if fmt not in SUPPORTED_SPARSITY_FORMATS:
        raise ValueError(
            f"{where}: compressed-tensors sparsity format {fmt!r} is not supported; flashsparse "
            f"reads {' and '.join(SUPPORTED_SPARSITY_FORMATS)}"
        )
    if config.get("config_groups"):
        raise ValueError(
            f"{where} is quantized (compressed-tensors config_groups); flashsparse reads "
            "unquantized fp16/bf16/fp32 sparse checkpoints only"
        )


def checkpoint_files(path: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: file}`` of a safetensors checkpoint: one file, or a directory with
    ``model.safetensors`` or a sharded ``model.safetensors.index.json``. Every file is checked
    to be complete."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted({path / name for name in index.get("weight_map", {}).values()})
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise ValueError(
                f"{path}: the index names shards that are missing: {', '.join(absent)}"
            )
    else:
        raise ValueError(f"{path} holds no model.safetensors or model.safetensors.index.json")
    names: dict[str, Path] = {}
    for file in files:
        for name in read_header(file):
            if name != "__metadata__":
                names[name] = file
    return names


def is_compressed_tensors_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a model directory or a safetensors file) is a compressed-tensors
    sparse checkpoint that :func:`load_compressed_tensors` reads."""
    path = Path(path)
    if path.is_dir():
        config = compression_config(path)
        if config is not None:
            return (config.get("sparsity_config") or {}).get("format") == "sparse-bitmask"
    try:
        names = checkpoint_files(path)
    except (ValueError, OSError):
        return False
    return has_bitmask_tensors(dict.fromkeys(names))


def _bitmask_groups(names: dict[str, Path], where: str) -> dict[str, str]:
    """``{module fqn: stored prefix}`` of the bitmask-compressed weights."""
    groups = {}
    for name in names:
        if not name.endswith(".bitmask"):
            continue
        prefix = name[: -len(".bitmask")]
        absent = [s for s in SUFFIXES if f"{prefix}.{s}" not in names]
        if absent:
            raise ValueError(f"{where}: compressed weight {prefix} lacks {', '.join(absent)}")
        groups[prefix.removesuffix(".weight")] = prefix
    return groups


def load_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "auto",
    device: torch.device | str | None = None,
) -> nn.Module:
    """Fill ``model`` from a compressed-tensors checkpoint: every bitmask-compressed weight
    becomes a :class:`SparseLinear` in ``format``, everything else is loaded dense. Returns
    ``model``.

    ``model`` has the checkpoint's architecture; build it without weights, e.g.
    ``with flashsparse.serialization.empty_weights(): model = AutoModelForCausalLM.from_config(config)``
    (a Hugging Face checkpoint holds no non-persistent buffers such as rotary ``inv_freq``, so
    those must be computed at construction, which ``torch.device("meta")`` would not do).
    Everything is read and checked before the model changes; on error the model is untouched.
    """
    check_format(format)
    model = unwrap_model(model)
    target = target_device(model, device)
    path = Path(path)
    where = str(path)
    config = compression_config(path) if path.is_dir() else None
    if config is not None:
        _check_compression_config(config, where)
    names = checkpoint_files(path)
    groups = _bitmask_groups(names, where)
    linears = linear_modules(model)
    for fqn, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            full = join_name(fqn, name)
            if buf is not None and buf.device.type == "meta" and full not in names:
                raise ValueError(
                    f"model buffer {full} is on the meta device and {where} does not store it: "
                    "build the model under flashsparse.serialization.empty_weights() (parameters "
                    "on meta, buffers computed) instead of torch.device('meta')"
                )
    with TensorReader(names, target) as reader:
        new_modules: dict[str, nn.Module] = {}
        for fqn, prefix in groups.items():
            module = linears.get(fqn)
            if module is None:
                raise ValueError(
                    f"{where}: compressed weight {prefix} is not a linear layer of the model"
                )
            parts = [reader.get(f"{prefix}.{s}") for s in SUFFIXES]
            sw = convert_bitmask(*parts, format=format, name=prefix)
            if tuple(sw.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"{where}: {prefix} is {tuple(sw.shape)} but the model's {fqn} is "
                    f"{(module.out_features, module.in_features)}"
                )
            bias = reader.get(join_name(fqn, "bias"))
            if (bias is None) != (module.bias is None):
                raise ValueError(
                    f"{where}: {fqn} has {'no ' if bias is None else ''}bias in the checkpoint "
                    f"but {'no ' if module.bias is None else ''}bias in the model"
                )
            new_modules[fqn] = SparseLinear(sw, bias)
        commit = prepare_install(model, new_modules, reader.get, where, target)
        unused = sorted(set(names) - reader.used)
    commit()
    if unused:
        warnings.warn(
            f"{where}: ignored {len(unused)} tensor(s) the model has no place for: "
            f"{', '.join(unused[:5])}",
            RuntimeWarning,
            stacklevel=2,
        )
    return model
