"""The CPU backend: C++ kernels built from ``csrc/cpu/`` (torch-free, one file per instruction
set) and ``csrc/bindings/*_cpu.cpp`` (torch glue) by :mod:`flashsparse.kernels.build`.

One module per kernel registers it with :mod:`flashsparse.backends` when imported
(:mod:`.bitmap`: the bitmap SpMM and the fast CPU decode; :mod:`.bitmap_quant`: the same for
int8 / fp8 values). Importing builds nothing.
"""

from __future__ import annotations

from . import bitmap, bitmap_quant  # noqa: F401  (bitmap_quant: int8 / fp8 values)
from .bitmap import unavailable_reason
from .bitmap_sddmm import bitmap_sddmm as _bitmap_sddmm  # noqa: F401  (registers the weight gradient)

__all__ = ["bitmap", "unavailable_reason"]
