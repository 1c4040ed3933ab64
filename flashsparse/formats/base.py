"""What every tiled sparse weight format shares: metadata, validation and the common API."""

from __future__ import annotations

from typing import ClassVar

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_weight(w: object, name: str = "w") -> torch.Tensor:
    """Validate a dense weight handed to an encoder."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}"
        )
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"{name} must have at least one row and one column, got {tuple(w.shape)}")
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {w.dtype}")
    if w.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: there are no values to encode")
    return w


def tile_grid(m: int, k: int, tile_m: int, tile_k: int) -> tuple[int, int]:
    return -(-m // tile_m), -(-k // tile_k)


def pad_to_tiles(w: torch.Tensor, tile_m: int, tile_k: int) -> torch.Tensor:
    """``w`` zero-padded to whole tiles, as ``[tiles, tile_m * tile_k]`` in row-major tile order,
    each tile row-major."""
    m, k = w.shape
    mt, kt = tile_grid(m, k, tile_m, tile_k)
    if (mt * tile_m, kt * tile_k) != (m, k):
        padded = w.new_zeros(mt * tile_m, kt * tile_k)
        padded[:m, :k] = w
        w = padded
    return w.view(mt, tile_m, kt, tile_k).transpose(1, 2).reshape(mt * kt, tile_m * tile_k)


def unpad_tiles(tiles: torch.Tensor, m: int, k: int, tile_m: int, tile_k: int) -> torch.Tensor:
    """Inverse of :func:`pad_to_tiles`."""
    mt, kt = tile_grid(m, k, tile_m, tile_k)
    dense = tiles.view(mt, kt, tile_m, tile_k).transpose(1, 2).reshape(mt * tile_m, kt * tile_k)
    return dense[:m, :k].contiguous()


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}[
        dtype
    ]


class SparseWeight:
    """A 2-D ``[M, K]`` weight stored in a tiled sparse format.

    Subclasses name their component tensors in ``components`` (the order the ``flashsparse``
    op for the format takes them) and implement ``encode`` / ``decode``.
    """

    format: ClassVar[str]
    components: ClassVar[tuple[str, ...]]
    #: Quantized values ("int8", "fp8") and their scale layout; None for 16/32-bit values.
    quant: str | None = None
    group_size: int | None = None
    quant_error: float | None = None

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype,
        nnz: int | None = None,
    ) -> None:
        missing = [c for c in self.components if c not in tensors]
        if missing:
            raise ValueError(f"{self.format} weight needs tensors {missing}")
        self._tensors = {c: tensors[c] for c in self.components}
        self._shape = torch.Size((int(shape[0]), int(shape[1])))
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        self._dtype = dtype
        self._nnz = nnz

    # -- to be provided by each format --------------------------------------------------------
    @classmethod
    def encode(cls, w: torch.Tensor) -> SparseWeight:
        raise NotImplementedError

    @staticmethod
    def decode(*tensors: torch.Tensor, m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _count_nnz(self) -> int:
        raise NotImplementedError

    @classmethod
    def upgrade(
        cls, tensors: dict[str, torch.Tensor], file_version: int
    ) -> dict[str, torch.Tensor]:
        """Components as written by flashsparse file format ``file_version``, in today's layout."""
        return tensors

    def validate(self) -> None:
        """Raise ``ValueError`` if the component tensors do not form a valid weight."""
        raise NotImplementedError

    # -- shared API ---------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors.values())).device

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._tensors.values())

    def state(self) -> dict[str, torch.Tensor]:
        """The component tensors by name (plain tensors: safetensors can store them)."""
        return dict(self._tensors)

    @property
    def nnz(self) -> int:
        """Nonzeros of the dense weight (padding entries are not counted)."""
        if self._nnz is None:
            self._nnz = int(self._count_nnz())
        return self._nnz

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self._shape[0] * self._shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of all stored component tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())

    def to_dense(self) -> torch.Tensor:
        from ..backends import decode  # the registry (not a backend): fast decodes by device

        return decode(type(self), self.tensors, self._shape[0], self._shape[1], self._dtype)

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> SparseWeight:
        """A copy on ``device`` (every component moves); a new ``dtype`` re-encodes the values."""
        moved = type(self)(
            {c: t.to(device) for c, t in self._tensors.items()}, self._shape, self._dtype, self._nnz
        )
        if dtype is not None and dtype != self._dtype:
            if dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
            return type(self).encode(moved.to_dense().to(dtype))
        return moved

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={tuple(self._shape)}, dtype={self._dtype}, "
            f"device={self.device}, nnz={self.nnz}, sparsity={self.sparsity:.4f}, "
            f"nbytes={self.nbytes})"
        )
