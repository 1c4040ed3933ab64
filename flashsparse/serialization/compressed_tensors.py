"""Read compressed-tensors ``sparse-bitmask`` checkpoints (the format of Hugging Face sparse
checkpoints written by llm-compressor / SparseML) straight into flashsparse formats, with or
without int8 / fp8 quantized weights. The compressed-tensors package is not needed (it dropped
the sparse formats): ``config.json`` and the safetensors files are parsed here, and only the
format names below are accepted -- a name from a file never selects code to run.

The layout, as ``compressed_tensors.compressors.sparse_compressors.sparse_bitmask`` writes it
(``BitmaskTensor.dict``), for a compressed ``[M, K]`` weight of the layer ``<p>``:

* ``<p>.shape``: int64 ``[2]`` = ``(M, K)``;
* ``<p>.compressed``: the nonzeros (``w != 0``, so NaN is kept and -0.0 dropped) in row-major
  order, in the weight's dtype;
* ``<p>.bitmask``: uint8 ``[M, ceil(K / 8)]``, ``numpy.packbits(w != 0, axis=-1,
  bitorder="little")``: bit ``b`` of byte ``j`` of row ``r`` is column ``8 j + b``;
* ``<p>.row_offsets``: int64 ``[M]``, where row ``r``'s values start in ``compressed``.

``<p>`` is the layer's module path (compressed-tensors 0.9-0.14, which strip ``.weight``) or
``<module>.weight`` (0.8 and older); both are read. Everything else in the checkpoint (biases,
embeddings, norms, layers left dense) is stored as plain tensors under its state_dict name.
The model's ``config.json`` says so under ``quantization_config`` (or the older
``compression_config``): ``{"quant_method": "compressed-tensors", "sparsity_config":
{"format": "sparse-bitmask", ...}}``.

Quantized weights (``"config_groups"`` in that config, with ``"format"`` ``int-quantized``,
``float-quantized`` or ``naive-quantized``: the weights quantized first, then bitmask-compressed)
store 8-bit codes in ``<p>.compressed`` (int8, or float8_e4m3fn for fp8; their bitmask marks the
nonzero *codes*) and the scales as ``<module>.weight_scale``: ``[M, 1]`` per channel, ``[M,
K / g]`` per group of ``g`` columns, one value per tensor, or per ``[bh, bw]`` block (from the
config's ``block_structure``). They become :class:`~flashsparse.formats.QuantBitmap` layers
(``format`` bitmap or auto) with float32 scales, as exact as the file: the dequantized weight is
``code * scale`` as compressed-tensors defines it. A quantized layer that is not sparse-compressed
(``<module>.weight`` holding codes) becomes one too, its zero codes as zeros. Refused, with the
tensor named: zero points (asymmetric quantization), packed int4 (``weight_packed``),
activation-ordered groups (``weight_g_idx``), group sizes the kernels do not take (powers of two
>= 32, or one group per row), the 2:4 layouts (``sparse-24-bitmask``, ``marlin-24``) and any other
format name. Activations stay in the model's dtype (weight-only): a checkpoint that also
quantizes activations gets a warning saying so.

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

from ..formats import Bitmap, QuantBitmap, SparseWeight, check_format, encode
from ..formats.base import SUPPORTED_DTYPES
from ..formats.bitmap_quant import check_group_size, check_quant, quant_of
from ..nn import SparseLinear
from .files import TensorReader, read_header
from .fingerprint import join_name, unwrap_model
from .install import linear_modules, prepare_install, target_device

SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")
SUPPORTED_SPARSITY_FORMATS = ("sparse-bitmask", "dense")
#: compressed-tensors quantization formats whose weights are 8-bit codes flashsparse reads.
SUPPORTED_QUANT_FORMATS = ("int-quantized", "float-quantized", "naive-quantized")
SUPPORTED_STRATEGIES = ("tensor", "channel", "group", "block")
# Tensors of layouts that are not read, and why (checked by name suffix).
_UNSUPPORTED_TENSORS = {
    ".weight_zero_point": "zero points (asymmetric quantization)",
    ".weight_packed": "packed sub-byte codes (pack-quantized, e.g. int4)",
    ".weight_g_idx": "activation-ordered groups (g_idx)",
    ".weight_global_scale": "a global scale (nvfp4 / mxfp4 quantization)",
}
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
    if compressed.dtype not in SUPPORTED_DTYPES and quant_of(compressed) is None:
        raise TypeError(
            f"{name}.compressed holds {compressed.dtype} values; flashsparse reads float16, "
            "bfloat16 and float32 values and int8 / float8_e4m3fn codes"
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
    if quant_of(compressed) is not None:
        raise TypeError(
            f"{name}.compressed holds {compressed.dtype} codes: use bitmask_to_quant_bitmap"
        )
    masks, values, tile_offsets, nnz = _bitmap_components(
        shape, compressed, bitmask, row_offsets, name
    )
    return Bitmap(
        {"masks": masks, "values": values, "tile_offsets": tile_offsets},
        (int(shape[0]), int(shape[1])),
        compressed.dtype,
        nnz,
    )


def bitmask_to_quant_bitmap(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    name: str = "weight",
    block_structure: tuple[int, int] | None = None,
) -> QuantBitmap:
    """One compressed-tensors bitmask tensor of int8 / fp8 codes and its ``weight_scale`` as a
    :class:`~flashsparse.formats.QuantBitmap` whose activations are ``dtype`` (no dense weight is
    built; the codes move as they are)."""
    if quant_of(compressed) is None:
        raise TypeError(
            f"{name}.compressed holds {compressed.dtype} values, not int8 / float8_e4m3fn codes"
        )
    masks, values, tile_offsets, nnz = _bitmap_components(
        shape, compressed, bitmask, row_offsets, name
    )
    m, k = int(shape[0]), int(shape[1])
    scales, group_size = scales_from_checkpoint(weight_scale, m, k, name, block_structure)
    sw = QuantBitmap(
        {"masks": masks, "values": values, "tile_offsets": tile_offsets, "scales": scales},
        (m, k),
        dtype,
        nnz,
        group_size=group_size,
    )
    _validate_codes(sw, name)
    return sw


def dense_codes_to_quant_bitmap(
    codes: torch.Tensor,
    weight_scale: torch.Tensor,
    *,
    dtype: torch.dtype,
    name: str = "weight",
    block_structure: tuple[int, int] | None = None,
) -> QuantBitmap:
    """A quantized layer stored dense (``<module>.weight`` of int8 / fp8 codes, not
    bitmask-compressed) as a :class:`~flashsparse.formats.QuantBitmap`; its zero codes are zeros."""
    from ..formats.bitmap_quant import pack_codes

    if codes.dim() != 2 or quant_of(codes) is None:
        raise ValueError(
            f"{name} must be a 2-D int8 or float8_e4m3fn tensor, got {codes.dtype} "
            f"{tuple(codes.shape)}"
        )
    m, k = codes.shape
    scales, group_size = scales_from_checkpoint(weight_scale, m, k, name, block_structure)
    if codes.dtype == torch.int8:
        bits, nonzero = codes, codes != 0
    else:  # fp8: +0.0 and -0.0 (0x00, 0x80) are the zeros
        bits = codes.view(torch.uint8)
        nonzero = (bits & 0x7F) != 0
    masks, values, tile_offsets = pack_codes(bits, nonzero)
    sw = QuantBitmap(
        {
            "masks": masks,
            "values": values.view(codes.dtype),
            "tile_offsets": tile_offsets,
            "scales": scales,
        },
        (m, k),
        dtype,
        int(nonzero.sum()),
        group_size=group_size,
    )
    _validate_codes(sw, name)
    return sw


def _validate_codes(sw: QuantBitmap, name: str) -> None:
    try:
        sw.validate()
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def scales_from_checkpoint(
    weight_scale: torch.Tensor,
    m: int,
    k: int,
    name: str,
    block_structure: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, int | None]:
    """compressed-tensors' ``weight_scale`` of an ``[m, k]`` weight as our float32 ``[m, G]``
    scales and group size (None: one per row). Per tensor (one value) and per channel
    (``[m, 1]``) become one scale per row, per group ``[m, k / g]`` keeps its groups, and per
    ``[bh, bw]`` block (``block_structure``) repeats each block's scale over its ``bh`` rows.
    Every value is kept exactly (float32 holds any 16-bit scale)."""
    where = f"{name}.weight_scale" if not name.endswith(".weight") else f"{name}_scale"
    if not isinstance(weight_scale, torch.Tensor) or not weight_scale.is_floating_point():
        raise ValueError(f"{where} must be a floating-point tensor, got {weight_scale!r}")
    if weight_scale.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where} holds {weight_scale.dtype}; scales must be 16- or 32-bit floats")
    scale = weight_scale.float()
    if scale.numel() == 1:
        scales = scale.reshape(1, 1).expand(m, 1).contiguous()
    elif block_structure is not None:
        bh, bw = block_structure
        if scale.dim() != 2 or scale.shape != (-(-m // bh), -(-k // bw)):
            raise ValueError(
                f"{where} has shape {tuple(scale.shape)}; blocks of {bh}x{bw} over a {m}x{k} "
                f"weight need ({-(-m // bh)}, {-(-k // bw)})"
            )
        scales = scale.repeat_interleave(bh, dim=0)[:m].contiguous()
    elif scale.dim() == 2 and scale.shape[0] == m:
        scales = scale.contiguous()
    else:
        raise ValueError(
            f"{where} has shape {tuple(scale.shape)}; flashsparse reads one scale per tensor, "
            f"per row ({m}, 1) or per group ({m}, groups) for a {m}x{k} weight"
        )
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{where} holds non-finite scales")
    groups = scales.shape[1]
    if groups == 1:
        return scales, None
    # compressed-tensors groups are k / groups columns each (it requires k % group_size == 0);
    # the kernels take powers of two >= 32.
    g = k // groups
    if k % groups or g < 32 or g & (g - 1):
        raise ValueError(
            f"{where}: {groups} groups over {k} columns (group size {k / groups:g}) is not a layout "
            "flashsparse's kernels take: groups must be a power of two >= 32 columns, or one per row"
        )
    return scales, check_group_size(g)


def _bitmap_components(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(masks, values, tile_offsets, nnz)`` of the bitmap layout for one bitmask tensor."""
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
    return masks, values, tile_offsets, nnz


def convert_bitmask(
    shape: torch.Tensor,
    compressed: torch.Tensor,
    bitmask: torch.Tensor,
    row_offsets: torch.Tensor,
    format: str = "auto",
    name: str = "weight",
    *,
    weight_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    block_structure: tuple[int, int] | None = None,
    quant: str | None = None,
    group_size: int | None = None,
) -> SparseWeight:
    """One compressed-tensors bitmask tensor as a flashsparse weight in ``format`` (computed on
    ``compressed``'s device).

    Codes (int8 / float8_e4m3fn ``compressed``) need their ``weight_scale`` and become a
    :class:`~flashsparse.formats.QuantBitmap` (``format`` bitmap or auto) whose activations are
    ``dtype`` (default: the scale's dtype). Unquantized values are kept as they are, or
    quantized here with ``quant`` (and ``group_size``) as :func:`flashsparse.encode` does."""
    check_format(format)
    quant = check_quant(quant)
    group_size = check_group_size(group_size)
    if quant_of(compressed) is not None:
        if weight_scale is None:
            raise ValueError(
                f"{name}.compressed holds {compressed.dtype} codes but the checkpoint has no "
                "weight_scale for them"
            )
        if format == "tiled_csl":
            raise ValueError(
                f"{name} is quantized ({compressed.dtype} codes): it loads as format 'bitmap' "
                "(or 'auto'), not 'tiled_csl'"
            )
        if quant is not None:
            raise ValueError(
                f"{name} is already quantized ({compressed.dtype} codes); drop quant={quant!r}"
            )
        return bitmask_to_quant_bitmap(
            shape,
            compressed,
            bitmask,
            row_offsets,
            weight_scale,
            dtype=dtype or weight_scale.dtype,
            name=name,
            block_structure=block_structure,
        )
    if quant is not None:
        return encode(
            bitmask_to_dense(shape, compressed, bitmask, row_offsets, name),
            format,
            quant,
            group_size=group_size,
        )
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


def _check_compression_config(config: dict, where: str) -> dict:
    """Check a compressed-tensors config against what flashsparse reads; return what the reader
    needs from it: ``{"quantized": bool, "block_structure": (bh, bw) | None, "activations":
    bool}``. Every name is compared with the known ones; none selects code."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: the compressed-tensors config is not a JSON object")
    sparsity = config.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense") if isinstance(sparsity, dict) else sparsity
    if fmt not in SUPPORTED_SPARSITY_FORMATS:
        raise ValueError(
            f"{where}: compressed-tensors sparsity format {fmt!r} is not supported; flashsparse "
            f"reads {' and '.join(SUPPORTED_SPARSITY_FORMATS)} (not the 2:4 layouts "
            "sparse-24-bitmask / marlin-24)"
        )
    groups = config.get("config_groups") or {}
    info = {"quantized": bool(groups), "block_structure": None, "activations": False}
    if not groups:
        return info
    if not isinstance(groups, dict):
        raise ValueError(f"{where}: compressed-tensors config_groups is not a JSON object")
    formats = [config.get("format")] + [
        g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")
    ]
    for qfmt in formats:
        if qfmt not in SUPPORTED_QUANT_FORMATS:
            raise ValueError(
                f"{where}: compressed-tensors quantization format {qfmt!r} is not supported; "
                f"flashsparse reads 8-bit weights stored as "
                f"{', '.join(SUPPORTED_QUANT_FORMATS)} (not packed int4, nvfp4 or 2:4)"
            )
    blocks = set()
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise ValueError(f"{where}: config group {gname!r} has no weights scheme")
        label = f"{where}: config group {gname!r}"
        if weights.get("num_bits") != 8 or weights.get("type") not in ("int", "float"):
            raise ValueError(
                f"{label} quantizes weights to {weights.get('num_bits')}-bit "
                f"{weights.get('type')!r}; flashsparse reads 8-bit int (int8) and float (fp8 e4m3)"
            )
        if weights.get("symmetric") is False:
            raise ValueError(
                f"{label} is asymmetric (zero points); flashsparse reads symmetric quantization"
            )
        if weights.get("strategy") not in SUPPORTED_STRATEGIES:
            raise ValueError(
                f"{label}: weight strategy {weights.get('strategy')!r} is not supported; "
                f"flashsparse reads {', '.join(SUPPORTED_STRATEGIES)}"
            )
        if weights.get("actorder") == "group":
            raise ValueError(
                f"{label} uses activation-ordered groups (actorder 'group', g_idx); not supported"
            )
        if weights.get("strategy") == "block":
            bs = weights.get("block_structure")
            if (
                not isinstance(bs, list)
                or len(bs) != 2
                or not all(isinstance(v, int) and v > 0 for v in bs)
            ):
                raise ValueError(f"{label}: block strategy without a valid block_structure")
            blocks.add(tuple(bs))
        if group.get("input_activations") or group.get("output_activations"):
            info["activations"] = True
    if len(blocks) > 1:
        raise ValueError(f"{where}: several block structures {sorted(blocks)} are not supported")
    info["block_structure"] = blocks.pop() if blocks else None
    return info


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
    """``{module fqn: stored prefix}`` of the bitmask-compressed weights; tensors of layouts
    flashsparse does not read are refused here, by name."""
    for name in names:
        for suffix, what in _UNSUPPORTED_TENSORS.items():
            if name.endswith(suffix):
                raise ValueError(f"{where}: {name} holds {what}, which flashsparse does not read")
    groups = {}
    for name in names:
        if not name.endswith(".bitmask"):
            continue
        prefix = name[: -len(".bitmask")]
        absent = [s for s in SUFFIXES if f"{prefix}.{s}" not in names]
        if absent == ["row_offsets"]:
            raise ValueError(
                f"{where}: compressed weight {prefix} lacks row_offsets (an incomplete "
                "checkpoint, or the 2:4 layout sparse-24-bitmask, which flashsparse does not read)"
            )
        if absent:
            raise ValueError(f"{where}: compressed weight {prefix} lacks {', '.join(absent)}")
        groups[prefix.removesuffix(".weight")] = prefix
    return groups


def _model_dtype(path: Path) -> torch.dtype | None:
    """The ``torch_dtype`` / ``dtype`` a model directory's config.json names, if any."""
    config_path = path / "config.json" if path.is_dir() else path.parent / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for key in ("torch_dtype", "dtype"):
        value = config.get(key) if isinstance(config, dict) else None
        if value in ("float16", "bfloat16", "float32"):
            return getattr(torch, value)
    return None


def load_compressed_tensors(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    format: str = "auto",
    device: torch.device | str | None = None,
    quant: str | None = None,
    group_size: int | None = None,
) -> nn.Module:
    """Fill ``model`` from a compressed-tensors checkpoint: every bitmask-compressed weight
    becomes a :class:`SparseLinear` in ``format`` (int8 / fp8 codes: a quantized bitmap layer),
    every quantized weight stored dense too, everything else is loaded dense. Returns ``model``.

    ``quant`` (with ``group_size``) quantizes an unquantized checkpoint's sparse layers on the
    way in (as :func:`flashsparse.sparsify_` would); for an already quantized one it is an error.
    The activations of quantized layers take the dtype of the layer's bias in the checkpoint,
    else the ``torch_dtype`` of its config.json, else the dtype of its scales.

    ``model`` has the checkpoint's architecture; build it without weights, e.g.
    ``with flashsparse.serialization.empty_weights(): model = AutoModelForCausalLM.from_config(config)``
    (a Hugging Face checkpoint holds no non-persistent buffers such as rotary ``inv_freq``, so
    those must be computed at construction, which ``torch.device("meta")`` would not do).
    Everything is read and checked before the model changes; on error the model is untouched.
    """
    check_format(format)
    quant = check_quant(quant)
    group_size = check_group_size(group_size)
    if quant is not None and format == "tiled_csl":
        raise ValueError(f"quant={quant!r} needs format 'bitmap' (or 'auto'), not 'tiled_csl'")
    model = unwrap_model(model)
    target = target_device(model, device)
    path = Path(path)
    where = str(path)
    config = compression_config(path) if path.is_dir() else None
    info = _check_compression_config(config, where) if config is not None else {}
    if info.get("quantized") and quant is not None:
        raise ValueError(f"{where} is already quantized (compressed-tensors); drop quant={quant!r}")
    if info.get("activations"):
        warnings.warn(
            f"{where} also quantizes activations; flashsparse runs its quantized layers "
            "weight-only (activations stay in the model's dtype, W8A16), so the activation "
            "scales are not used",
            RuntimeWarning,
            stacklevel=2,
        )
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
    # Quantized layers stored dense: <module>.weight codes next to <module>.weight_scale.
    dense_quantized = [
        name[: -len(".weight_scale")]
        for name in names
        if name.endswith(".weight_scale")
        and name[: -len(".weight_scale")] not in groups
        and f"{name[: -len('.weight_scale')]}.weight" in names
    ]
    config_dtype = _model_dtype(path)
    block_structure = info.get("block_structure")
    with TensorReader(names, target) as reader:

        def layer_bias(fqn: str, module: nn.Module, stored: str) -> torch.Tensor | None:
            bias = reader.get(join_name(fqn, "bias"))
            if (bias is None) != (module.bias is None):
                raise ValueError(
                    f"{where}: {fqn} has {'no ' if bias is None else ''}bias in the checkpoint "
                    f"but {'no ' if module.bias is None else ''}bias in the model"
                )
            return bias

        def activation_dtype(bias, scale) -> torch.dtype:
            return bias.dtype if bias is not None else config_dtype or scale.dtype

        new_modules: dict[str, nn.Module] = {}
        for fqn, prefix in groups.items():
            module = linears.get(fqn)
            if module is None:
                raise ValueError(
                    f"{where}: compressed weight {prefix} is not a linear layer of the model"
                )
            parts = [reader.get(f"{prefix}.{s}") for s in SUFFIXES]
            bias = layer_bias(fqn, module, prefix)
            scale = reader.get(f"{fqn}.weight_scale") if quant_of(parts[1]) is not None else None
            sw = convert_bitmask(
                *parts,
                format=format,
                name=prefix,
                weight_scale=scale,
                dtype=activation_dtype(bias, scale) if scale is not None else None,
                block_structure=block_structure,
                quant=quant,
                group_size=group_size,
            )
            if tuple(sw.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"{where}: {prefix} is {tuple(sw.shape)} but the model's {fqn} is "
                    f"{(module.out_features, module.in_features)}"
                )
            new_modules[fqn] = SparseLinear(sw, bias)
        for fqn in dense_quantized:
            module = linears.get(fqn)
            codes = reader.get(f"{fqn}.weight")
            if module is None or quant_of(codes) is None:
                continue  # not a linear, or float weights: the scale is reported as unused
            if format == "tiled_csl":
                raise ValueError(
                    f"{where}: {fqn}.weight is quantized ({codes.dtype} codes): it loads as "
                    "format 'bitmap' (or 'auto'), not 'tiled_csl'"
                )
            scale = reader.get(f"{fqn}.weight_scale")
            bias = layer_bias(fqn, module, fqn)
            sw = dense_codes_to_quant_bitmap(
                codes,
                scale,
                dtype=activation_dtype(bias, scale),
                name=f"{fqn}.weight",
                block_structure=block_structure,
            )
            if tuple(sw.shape) != (module.out_features, module.in_features):
                raise ValueError(
                    f"{where}: {fqn}.weight is {tuple(sw.shape)} but the model's {fqn} is "
                    f"{(module.out_features, module.in_features)}"
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
