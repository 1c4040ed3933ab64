"""Saving and loading sparse models: :func:`save_sparse` writes the flashsparse file format
(:mod:`.file_format`, specified in docs/serialization.md); :func:`load_sparse` reads it and
compressed-tensors ``sparse-bitmask`` checkpoints (:mod:`.compressed_tensors`).

Modules: :mod:`.files` (safetensors access, checksums), :mod:`.fingerprint` (architecture
identity), :mod:`.install` (checked, all-or-nothing installation into a model),
:mod:`.empty_weights` (building a model without weights).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .compressed_tensors import (
    _check_compression_config,
    compression_config,
    has_bitmask_tensors,
    is_compressed_tensors_checkpoint,
    load_compressed_tensors,
)
from .empty_weights import empty_weights
from .file_format import FILE_NAME, FORMAT_NAME, FORMAT_VERSION, load_flashsparse, save_sparse
from .files import checksum, read_header
from .fingerprint import architecture, structure, unwrap_model
from .install import target_device
from .sharded import is_parallel_model

__all__ = [
    "FILE_NAME",
    "FORMAT_VERSION",
    "architecture",
    "checksum",
    "empty_weights",
    "load_sparse",
    "read_header",
    "save_sparse",
    "structure",
]


def load_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    format: str = "auto",
    verify: bool = True,
) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (same architecture, for example
    built from its config under ``torch.device("meta")``) and return ``model``.

    ``path``: the ``.safetensors`` file or a directory holding ``flashsparse.safetensors``. A
    compressed-tensors ``sparse-bitmask`` checkpoint (a Hugging Face model directory or one of
    its safetensors files) is converted on the fly by
    :func:`flashsparse.compressed_tensors.load_compressed_tensors` (``format`` picks the format
    its layers are converted to; a flashsparse file keeps the formats it was saved with).
    ``device``: where the tensors go (default: where the model's tensors are, ``cpu`` for a
    meta model). ``verify``: check each tensor's checksum (about 3.5 GB/s on one core).

    Into a tensor-parallel model (DTensor weights, possibly on the ``meta`` device) each rank
    reads only its block of every layer and builds
    :class:`~flashsparse.nn.parallel.ShardedSparseLinear` layers (see
    :mod:`flashsparse.serialization.sharded`; tensors read in part are validated, not
    checksummed).

    Raises ``ValueError`` for a file of another architecture, a newer format version, or a
    corrupt or truncated file -- and then the model is left exactly as it was. Warns once
    (:class:`flashsparse.notices.ReferencePathWarning`) if no kernel runs the loaded layers here.
    """
    from ..commands.common import parse_device
    from ..nn import notice_reference_path

    if device is not None:
        try:  # before anything is read: torch's own error for "cuda" here is an AssertionError
            parse_device(str(device))
        except ValueError as exc:
            raise ValueError(f"device: {exc}") from None
    model = _load_sparse(model, path, device=device, format=format, verify=verify)
    notice_reference_path(model, stacklevel=3)
    return model


def _load_sparse(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str | None,
    format: str,
    verify: bool,
) -> nn.Module:
    model = unwrap_model(model)
    target = target_device(model, device)
    path = Path(path)
    if path.is_dir():
        if (path / FILE_NAME).is_file():
            path = path / FILE_NAME
        else:
            if is_compressed_tensors_checkpoint(path):
                _single_device_only(model, path)
                return load_compressed_tensors(model, path, format=format, device=target)
            config = compression_config(path)
            if config is not None:  # names a format flashsparse does not read, if it does
                _check_compression_config(config, str(path))
            raise ValueError(
                f"{path} holds neither {FILE_NAME} nor a compressed-tensors sparse-bitmask checkpoint"
            )
    if not path.is_file():
        raise ValueError(f"path {str(path)!r} does not exist")
    header = read_header(path)
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT_NAME:
        if has_bitmask_tensors(header):
            _single_device_only(model, path)
            return load_compressed_tensors(model, path, format=format, device=target)
        raise ValueError(
            f"{path} is not a flashsparse file (no 'format: flashsparse' in its metadata) and "
            "holds no compressed-tensors bitmask tensors"
        )
    load_flashsparse(model, path, header, target, verify)
    return model


def _single_device_only(model: nn.Module, path: Path) -> None:
    if is_parallel_model(model):
        raise ValueError(
            f"{path} is a compressed-tensors checkpoint: a tensor-parallel model loads flashsparse "
            "files only (convert it on one process with load_sparse, then save_sparse it)"
        )
