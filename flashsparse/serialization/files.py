"""safetensors file access: complete-file checks, checksums and a checking tensor reader."""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path

import torch

# A safetensors header larger than this is not one we wrote (ours are a few hundred KiB even
# for 70B-parameter models): refuse it rather than read gigabytes of garbage as JSON.
_MAX_HEADER_BYTES = 256 << 20


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().reshape(-1).contiguous()
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def checksum(t: torch.Tensor) -> int:
    """crc32 of a CPU tensor's bytes (about 3.5 GB/s, so checking a 7B model costs seconds)."""
    return zlib.crc32(_tensor_bytes(t))


def read_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking that the file is complete.

    Raises ``ValueError`` for a file that is too short, whose header is not valid JSON, or
    whose size differs from what the header describes (a truncated or padded file).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        length = int.from_bytes(head, "little")
        if length > size - 8 or length > _MAX_HEADER_BYTES:
            raise ValueError(
                f"{path} is truncated or not a safetensors file: its header claims {length} "
                f"bytes but the file has {size}"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"{path} is corrupt: its safetensors header is not valid JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is corrupt: its safetensors header is not a JSON object")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError):
            raise ValueError(f"{path} is corrupt: bad header entry for tensor {name!r}") from None
    if 8 + length + end != size:
        raise ValueError(
            f"{path} is truncated or corrupt: its header describes {8 + length + end} bytes, "
            f"the file has {size}"
        )
    return header


class TensorReader:
    """Reads tensors from one or more safetensors files by name, on the CPU, checking each
    against its checksum (when known), then moves it to ``device``. Each name is read once."""

    def __init__(
        self,
        files: dict[str, Path],
        device: torch.device,
        checksums: dict[str, int] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> None:
        self.files, self.device = files, device
        self.checksums, self.aliases = checksums or {}, aliases or {}
        self.used: set[str] = set()
        self._cache: dict[str, torch.Tensor] = {}
        self._handles: dict[Path, object] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def key(self, name: str) -> str | None:
        name = self.aliases.get(name, name)
        return name if name in self.files else None

    def __contains__(self, name: str) -> bool:
        return self.key(name) is not None

    def get(self, name: str) -> torch.Tensor | None:
        key = self.key(name)
        if key is None:
            return None
        if key not in self._cache:
            from safetensors import SafetensorError

            path = self.files[key]
            try:
                tensor = self._handle(path).get_tensor(key)
            except SafetensorError as exc:
                raise ValueError(f"{path}: cannot read tensor {key!r}: {exc}") from None
            expected = self.checksums.get(key)
            if expected is not None and checksum(tensor) != expected:
                raise ValueError(f"{path} is corrupt: tensor {key!r} does not match its checksum")
            self._cache[key] = tensor.to(self.device)
        self.used.add(key)
        return self._cache[key]

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._handles[path]

    def get_slice(self, name: str):
        """Tensor ``name`` read lazily: indexing the result (``[a:b]`` on its first dimension)
        reads only those elements from the file, on the CPU. A part of a tensor cannot be checked
        against the tensor's checksum; the caller validates what it builds from it."""
        key = self.key(name)
        if key is None:
            return None
        self.used.add(key)
        return self._handle(self.files[key]).get_slice(key)
