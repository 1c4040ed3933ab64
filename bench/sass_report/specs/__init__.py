"""Kernel specs for the static SASS report (``bench/kernel_report.py``, package ``bench/sass_report``).

One module per kernel, named after it (``bitmap_cuda.py``, ``tiled_csl_cuda.py``,
``bitmap_triton.py``), owned by that kernel's engineer. Each defines a module-level ``SPEC``:

* :class:`CudaSpec` for a torch-free CUDA kernel: ``sources`` (``.cu`` files relative to the
  repository root, compiled with ``nvcc -cubin`` and the flags of ``.ci/compile_kernels.sh``
  for every arch in ``archs``) and ``match(mangled_name) -> Instance | None``, which says which
  ``__global__`` functions of the cubins are instantiations of the main kernel (anything it
  returns ``None`` for, e.g. a split-K reduce kernel, is ignored).
* :class:`TritonSpec` for a Triton kernel: ``instances()`` returns ``(Instance, signature,
  constexprs, options)`` tuples, each compiled with ``triton.compile(ASTSource(fn, signature,
  constexprs), target=GPUTarget("cuda", 90, 32), options=options)`` (no GPU needed).

An :class:`Instance` carries what the counter cannot see in the machine code: ``dtype``
(``"fp16"``/``"bf16"``), ``n_tile`` (the CTA's N extent), ``threads`` per CTA, ``elements``
(dense weight elements one main-loop iteration consumes, e.g. ``tile_m * 64``),
``dynamic_smem`` bytes (static shared memory comes from ptxas), free-form ``params`` (copied
into the report's ``detail``; name variants there, e.g. ``{"x_aligned": False}``) and
``primary`` (False: a variant the benchmark shapes never launch; reported, but not used for
plans and predictions) and ``arch`` (filled in by the report: the arch of the cubin).

The *main loop* is the natural loop of the SASS control-flow graph holding the most MMA
instructions (HMMA/HGMMA; ties: the innermost). By default every basic block of its body
runs once per iteration and a loop nested in it runs once per iteration. Two optional hooks
(plain functions on the spec) describe data-dependent control flow, both for a uniform random
mask at ``sparsity`` (derive them from an encoded random weight, not from constants):

* ``trip_counts(sparsity, inst) -> Sequence[float]``: average trip count per main-loop
  iteration of each loop nested directly in the main loop, in address order of their headers
  (blocks of a nested loop get that weight, times their own nested loops' counts if given);
* ``block_weights(loop, sparsity, inst) -> Mapping[int, float] | None``: the execution
  frequency per iteration of chosen blocks, by start address (``loop.blocks`` lists the body's
  :class:`sass_report.cfg.Block` objects with ``.addr``, ``.instrs`` (``.opcode``, ``.pred``,
  ``.operands``) and ``.depth``); blocks not named keep their default weight. Blocks are
  issued per warp, so a block runs if any lane of the warp takes it.

A missing spec for one of the three kernel names is reported as an error line, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

KERNEL_NAMES = ("bitmap_cuda", "tiled_csl_cuda", "bitmap_triton")


@dataclass(frozen=True)
class Instance:
    """One compiled instantiation of a kernel (see the module docstring)."""

    dtype: str
    n_tile: int
    threads: int
    elements: int
    dynamic_smem: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)
    # False for variants the benchmark shapes do not launch (e.g. an unaligned-x fallback):
    # reported, but not used for launch plans and predictions.
    primary: bool = True
    # The arch this instance was compiled for ("90a", "86", "80"); set by the report before the
    # hooks run, so they can follow that arch's launch plans.
    arch: str = ""


TripCounts = Callable[[float, Instance], Sequence[float]]
BlockWeights = Callable[[Any, float, Instance], "Mapping[int, float] | None"]


@dataclass(frozen=True)
class CudaSpec:
    name: str
    sources: Sequence[str]
    match: Callable[[str], Instance | None]
    # sm_86 stands for the 99 KiB-per-block parts (sm_86, sm_89, sm_120).
    archs: Sequence[str] = ("90a", "86", "80")
    trip_counts: TripCounts | None = None
    block_weights: BlockWeights | None = None


@dataclass(frozen=True)
class TritonSpec:
    name: str
    instances: Callable[[], Sequence[tuple[Instance, dict, dict, dict]]]
    fn: str  # "module:attribute" of the @triton.jit function
    arch: int = 90
    trip_counts: TripCounts | None = None
    block_weights: BlockWeights | None = None
