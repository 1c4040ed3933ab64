"""The sweep: for every shape x dtype x sparsity x N, check each method against a float64
reference and then time it.

A method whose answer is off (relative error above ``RTOL`` for the dtype) is marked
``WRONG`` and not timed; a method that raises is marked ``error``; one that cannot run here
(a baseline the GPU or torch lacks, a backend that cannot take the input under ``--backend
all``) is ``skipped`` with the reason. Nothing is left out silently.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import backends
from ..formats import FORMATS, encode
from ..functional import linear
from .bandwidth import Bandwidth
from .baselines import (
    Prepared,
    Skipped,
    dense_backend,
    prepare_csr,
    prepare_dense,
    prepare_semi_structured,
    prepare_sliced,
    sliced_variants,
)
from .masks import make_weight, prune_2_4
from .shapes import Shape
from .timing import Rotation, Timer, rotation_count

RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BASELINES = ("csr", "2:4", "sliced")
KERNEL_BACKENDS = ("reference", "triton", "cuda", "cpu")

ROW_KEYS = (
    "layer",
    "m",
    "k",
    "n",
    "dtype",
    "mask",
    "sparsity",
    "actual_sparsity",
    "method",
    "requested_backend",
    "backend",
    "status",
    "reason",
    "rel_err",
    "tolerance",
    "median_ms",
    "p20_ms",
    "p80_ms",
    "samples",
    "dense_ms",
    "speedup",
    "weight_bytes",
    "dense_weight_bytes",
    "x_bytes",
    "y_bytes",
    "gbps",
    "bw_fraction",
    "ceiling",
    "rotation",
    "quant_err",
)


@dataclass
class BenchConfig:
    shapes: list[Shape]
    ns: list[int]
    sparsities: list[float]
    dtypes: list[torch.dtype]
    formats: list[str]  # flashsparse formats, or "auto" (the one fs.encode picks)
    backends: list[str]  # FLASHSPARSE_BACKEND values, or "all"
    baselines: list[str]
    mask: str
    device: torch.device
    timer: Timer
    cache: int  # last-level cache bytes: rotation makes working sets exceed 2x this
    bandwidth: Bandwidth
    seed: int = 0
    skip_reasons: dict[str, str] = field(default_factory=dict)
    # Rows of a format that FLASHSPARSE_BACKEND=auto would run on the reference path (decode +
    # dense: a correctness path, not a kernel) only when asked for; explicit --backend values
    # (reference, all) always run.
    include_reference: bool = False
    # Quantized bitmap rows ("int8", "fp8"; flashsparse bench --quant), next to the formats.
    quants: list[str] = field(default_factory=list)


@contextlib.contextmanager
def backend_env(name: str) -> Iterator[None]:
    """Set ``FLASHSPARSE_BACKEND`` (read per call) for the duration of the block."""
    old = os.environ.get(backends.ENV_VAR)
    os.environ[backends.ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(backends.ENV_VAR, None)
        else:
            os.environ[backends.ENV_VAR] = old


def kernel_backend(format: str, x: torch.Tensor) -> str:
    """Name of the backend whose kernel runs ``format`` for ``x`` under the current setting."""
    return backends.select(format, x.reshape(-1, x.shape[-1])).backend


def backend_combos(cfg: BenchConfig) -> list[str]:
    return list(KERNEL_BACKENDS) if "all" in cfg.backends else list(cfg.backends)


def reference_only(format: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``FLASHSPARSE_BACKEND=auto`` runs ``format`` (for ``"auto"``: every format) on
    the reference path for ``dtype`` inputs on ``device``, i.e. has no kernel for it there."""
    probe = torch.zeros(1, 64, dtype=dtype, device=device)
    names = list(FORMATS) if format == "auto" else [format]
    with backend_env("auto"):
        return all(kernel_backend(name, probe) == "reference" for name in names)


def hidden_formats(cfg: BenchConfig, dtype: torch.dtype) -> list[str]:
    """Formats whose ``auto`` rows the sweep leaves out for ``dtype`` (see BenchConfig)."""
    if cfg.include_reference or "auto" not in backend_combos(cfg):
        return []
    return [f for f in cfg.formats if reference_only(f, dtype, cfg.device)]


def method_combos(cfg: BenchConfig, dtype: torch.dtype) -> list[tuple[str, str]]:
    """``(format, requested backend)`` of every flashsparse row the sweep runs for ``dtype``."""
    hidden = hidden_formats(cfg, dtype)
    return [
        (fmt, backend)
        for fmt in cfg.formats
        for backend in backend_combos(cfg)
        if not (backend == "auto" and fmt in hidden)
    ]


def count_tasks(cfg: BenchConfig) -> int:
    """Number of (method, N) measurements the sweep makes, for the progress bar."""
    semi = "2:4" in cfg.baselines and any(s == 0.5 for s in cfg.sparsities)
    per_shape = 0
    for dtype in cfg.dtypes:
        per_sparsity = (
            len(method_combos(cfg, dtype))
            + len(cfg.quants) * len(backend_combos(cfg))
            + ("csr" in cfg.baselines)
        )
        per_shape += len(cfg.ns) * (1 + semi + len(cfg.sparsities) * per_sparsity)
    sliced = 0
    if "sliced" in cfg.baselines:
        sliced = sum(
            len(sliced_variants(s.m, s.k, sp)) for s in cfg.shapes for sp in cfg.sparsities
        )
    return len(cfg.shapes) * per_shape + len(cfg.dtypes) * len(cfg.ns) * sliced


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach().double(), ref.detach().double()
    denom = float(ref.norm())
    diff = float((y - ref).norm())
    return diff / denom if denom else diff


def copy_sparse_weight(sw):
    return type(sw)({n: t.clone() for n, t in sw.state().items()}, sw.shape, sw.dtype, sw.nnz)


def prepare_format(
    w: torch.Tensor, format: str, backend: str, x: torch.Tensor, cache: int
) -> Prepared | Skipped:
    """Encode ``w`` in ``format`` and find which kernel ``backend`` runs for inputs like ``x``."""
    with backend_env(backend):
        sw = encode(w, format)
        method = sw.format if format != "auto" else f"auto:{sw.format}"
        try:
            ran = kernel_backend(sw.format, x)
        except backends.BackendUnavailableError as exc:
            return Skipped(method, backend, str(exc))
    copies = [sw] + [copy_sparse_weight(sw) for _ in range(rotation_count(sw.nbytes, cache) - 1)]

    def call(x: torch.Tensor, weight) -> torch.Tensor:
        with backend_env(backend):
            return linear(x, weight)

    return Prepared(method, ran, sw.nbytes, w, Rotation(copies), call)


def prepare_quant(
    w: torch.Tensor, quant: str, backend: str, x: torch.Tensor, cache: int
) -> Prepared | Skipped:
    """``w`` quantized to ``quant`` in the bitmap format (method ``bitmap+<quant>``): checked
    against its dequantized weight; ``quant_error`` is the weight error quantizing added."""
    from ..formats import QuantBitmap

    method = f"bitmap+{quant}"
    with backend_env(backend):
        sw = encode(w, "bitmap", quant)
        try:
            ran = kernel_backend(QuantBitmap.op_format, x)
        except backends.BackendUnavailableError as exc:
            return Skipped(method, backend, str(exc))

    def copy(sw: QuantBitmap) -> QuantBitmap:
        return QuantBitmap(
            {n: t.clone() for n, t in sw.state().items()}, sw.shape, sw.dtype, sw.nnz
        )

    copies = [sw] + [copy(sw) for _ in range(rotation_count(sw.nbytes, cache) - 1)]

    def call(x: torch.Tensor, weight) -> torch.Tensor:
        with backend_env(backend):
            return linear(x, weight)

    m, k = sw.shape
    dequantized = QuantBitmap.decode(*sw.tensors, m=m, k=k, dtype=torch.float32)
    prep = Prepared(method, ran, sw.nbytes, dequantized, Rotation(copies), call)
    prep.quant_error = sw.quant_error
    return prep


class Sweep:
    """Runs ``cfg``; ``progress(label)`` is called after each measurement, ``on_skip()`` instead
    for each of the :func:`count_tasks` steps that turned out to be skipped (nothing measured),
    and ``on_block(rows)`` with each finished (shape, dtype) block."""

    def __init__(
        self,
        cfg: BenchConfig,
        progress: Callable[[str], None] = lambda label: None,
        on_block: Callable[[list[dict]], None] = lambda rows: None,
        on_skip: Callable[[], None] = lambda: None,
    ) -> None:
        self.cfg, self.progress, self.on_block = cfg, progress, on_block
        self.on_skip = on_skip

    def _step(self, row: dict, label: str) -> None:
        if row["status"] == "skipped":
            self.on_skip()
        else:
            self.progress(label)

    # -- one row --------------------------------------------------------------------------
    def _row(self, shape: Shape, n: int, dtype: torch.dtype, sparsity: float | None, **kw) -> dict:
        esize = torch.empty((), dtype=dtype).element_size()
        row = dict.fromkeys(ROW_KEYS)
        row.update(
            layer=shape.label,
            m=shape.m,
            k=shape.k,
            n=n,
            dtype=DTYPE_NAMES[dtype],
            mask=self.cfg.mask,
            sparsity=sparsity,
            tolerance=RTOL[dtype],
            dense_weight_bytes=shape.m * shape.k * esize,
            x_bytes=n * shape.k * esize,
            y_bytes=n * shape.m * esize,
        )
        row.update(kw)
        return row

    def _measure(
        self, prep: Prepared | Skipped, x: torch.Tensor, ref: torch.Tensor, row: dict
    ) -> dict:
        if isinstance(prep, Skipped):
            row.update(
                method=prep.method, backend=prep.backend, status=prep.status, reason=prep.reason
            )
            return row
        row.update(method=prep.method, backend=prep.backend, weight_bytes=prep.weight_bytes)
        row["rotation"] = len(prep.rotation)
        row["quant_err"] = prep.quant_error
        # Sliced rows read a narrower x or write a narrower y than the dense layer: the ceiling
        # compares each method's own traffic with the dense layer's.
        io = row["x_bytes"] + row["y_bytes"]
        esize = row["dense_weight_bytes"] // (row["m"] * row["k"])
        dense_io = row["n"] * (row["m"] + row["k"]) * esize
        row["ceiling"] = (row["dense_weight_bytes"] + dense_io) / (prep.weight_bytes + io)
        try:
            err = rel_err(prep(x), ref)
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
            self._free_after_error(exc)
            return row
        row["rel_err"] = err
        if not err <= row["tolerance"]:  # NaN fails too
            row.update(
                status="WRONG",
                reason=f"relative error {err:.3g} > {row['tolerance']:g} vs float64 reference; not timed",
            )
            return row
        try:
            t = self.cfg.timer(lambda: prep(x))
        except Exception as exc:
            row.update(status="error", reason=f"timing failed: {type(exc).__name__}: {exc}")
            self._free_after_error(exc)
            return row
        total = prep.weight_bytes + io
        gbps = total / (t.median_ms * 1e-3) / 1e9
        row.update(
            status="ok",
            median_ms=t.median_ms,
            p20_ms=t.p20_ms,
            p80_ms=t.p80_ms,
            samples=t.samples,
            gbps=gbps,
            bw_fraction=gbps / self.cfg.bandwidth.gbps,
        )
        return row

    def _free_after_error(self, exc: Exception) -> None:
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()

    def _speedups(self, rows: list[dict], dense_ms: dict[int, float | None]) -> None:
        for row in rows:
            base = dense_ms.get(row["n"])
            row["dense_ms"] = base
            if row["status"] == "ok" and base:
                row["speedup"] = base / row["median_ms"]

    # -- the sweep ----------------------------------------------------------------------------
    def run(self) -> list[dict]:
        rows: list[dict] = []
        for shape in self.cfg.shapes:
            for dtype in self.cfg.dtypes:
                block = self._block(shape, dtype)
                rows.extend(block)
                self.on_block(block)
        return rows

    def _inputs(self, shape: Shape, dtype: torch.dtype) -> dict[int, torch.Tensor]:
        gen = torch.Generator(device=self.cfg.device).manual_seed(self.cfg.seed + 1)
        return {
            n: torch.randn(n, shape.k, generator=gen, device=self.cfg.device).to(dtype)
            for n in self.cfg.ns
        }

    def _refs(self, w: torch.Tensor, xs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        wd = w.double()
        refs = {n: x.double() @ wd.T for n, x in xs.items()}
        del wd
        return refs

    def _methods(
        self, w: torch.Tensor, probe: torch.Tensor
    ) -> list[tuple[str, str, Callable[[], Prepared | Skipped]]]:
        """``(method, requested backend, prepare)`` for each sparse method run on ``w``."""
        cfg = self.cfg
        out: list[tuple[str, str, Callable[[], Prepared | Skipped]]] = [
            (fmt, backend, functools.partial(prepare_format, w, fmt, backend, probe, cfg.cache))
            for fmt, backend in method_combos(cfg, w.dtype)
        ]
        out += [
            (
                f"bitmap+{q}",
                backend,
                functools.partial(prepare_quant, w, q, backend, probe, cfg.cache),
            )
            for q in cfg.quants
            for backend in backend_combos(cfg)
        ]
        if "csr" in cfg.baselines:
            out.append(("csr", "-", functools.partial(prepare_csr, w, cfg.cache)))
        return out

    def _label(self, shape: Shape, dtype: torch.dtype, n: int, sparsity, method: str) -> str:
        sp = "" if sparsity is None else f" sparsity {sparsity:g}"
        return f"{shape.label} {DTYPE_NAMES[dtype]} N={n}{sp} {method}"

    def _sliced(
        self, shape: Shape, dtype: torch.dtype, w_dense: torch.Tensor, xs: dict[int, torch.Tensor]
    ) -> list[dict]:
        """Structured slicing at each sparsity: dense ``F.linear`` on a weight that keeps
        (1 - s) of the output rows (``sliced-out``) or of the input columns (``sliced-in``),
        checked against a float64 reference of that smaller problem."""
        esize = w_dense.element_size()
        rows: list[dict] = []
        for sparsity in self.cfg.sparsities:
            for method, m, k in sliced_variants(shape.m, shape.k, sparsity):
                try:
                    prep: Prepared | Skipped = prepare_sliced(w_dense, method, m, k, self.cfg.cache)
                except Exception as exc:  # e.g. out of memory for the copies
                    reason = f"could not prepare: {type(exc).__name__}: {exc}"
                    prep = Skipped(method, dense_backend(w_dense.device), reason, status="error")
                    self._free_after_error(exc)
                # The sliced model's activations are narrower: x keeps the first k features. The
                # reference slices w here, independently of prepare_sliced.
                xk = {n: x[:, :k].contiguous() for n, x in xs.items()}
                refs = (
                    self._refs(w_dense[:m, :k], xk)
                    if isinstance(prep, Prepared)
                    else dict.fromkeys(xs)
                )
                for n, x in xk.items():
                    row = self._row(
                        shape,
                        n,
                        dtype,
                        sparsity,
                        requested_backend="-",
                        actual_sparsity=1.0 - (m * k) / (shape.m * shape.k),
                        x_bytes=n * k * esize,
                        y_bytes=n * m * esize,
                    )
                    rows.append(self._measure(prep, x, refs[n], row))
                    self._step(rows[-1], self._label(shape, dtype, n, sparsity, method))
                del prep, refs, xk
        return rows

    def _block(self, shape: Shape, dtype: torch.dtype) -> list[dict]:
        cfg, dev = self.cfg, self.cfg.device
        xs = self._inputs(shape, dtype)
        block: list[dict] = []
        dense_ms: dict[int, float | None] = {}

        # Dense F.linear: its time does not depend on the values, so once per N.
        w_dense = make_weight(shape.m, shape.k, 0.0, dtype, dev, "uniform", seed=cfg.seed)
        dense_zeros = float((w_dense == 0).sum()) / w_dense.numel()
        refs = self._refs(w_dense, xs)
        prep = prepare_dense(w_dense, cfg.cache)
        for n, x in xs.items():
            row = self._row(
                shape, n, dtype, None, requested_backend="-", actual_sparsity=dense_zeros
            )
            row = self._measure(prep, x, refs[n], row)
            dense_ms[n] = row["median_ms"]
            block.append(row)
            self._step(row, self._label(shape, dtype, n, None, "dense"))
        del prep, refs

        # torch 2:4 at 50 %: its own weight (the dense one, 2:4-pruned by magnitude).
        if "2:4" in cfg.baselines and any(s == 0.5 for s in cfg.sparsities):
            try:
                w24 = prune_2_4(w_dense)
            except ValueError as exc:
                prep24: Prepared | Skipped = Skipped("2:4", "torch-2:4", str(exc))
                w24 = w_dense
            else:
                prep24 = prepare_semi_structured(w24, cfg.cache)
            refs = self._refs(w24, xs) if isinstance(prep24, Prepared) else dict.fromkeys(xs)
            for n, x in xs.items():
                row = self._row(shape, n, dtype, 0.5, requested_backend="-", actual_sparsity=0.5)
                block.append(self._measure(prep24, x, refs[n], row))
                self._step(row, self._label(shape, dtype, n, 0.5, "2:4"))
            del prep24, refs, w24
        if "sliced" in cfg.baselines:
            block.extend(self._sliced(shape, dtype, w_dense, xs))
        del w_dense

        for sparsity in cfg.sparsities:
            w = make_weight(shape.m, shape.k, sparsity, dtype, dev, cfg.mask, seed=cfg.seed)
            actual = float((w == 0).sum()) / w.numel()
            refs = self._refs(w, xs)
            for method, requested, make in self._methods(w, xs[cfg.ns[0]]):
                try:
                    prep = make()
                except Exception as exc:  # an encoder or provider failing: report, go on
                    reason = f"could not prepare: {type(exc).__name__}: {exc}"
                    prep = Skipped(method, requested, reason, status="error")
                    self._free_after_error(exc)
                for n, x in xs.items():
                    row = self._row(
                        shape,
                        n,
                        dtype,
                        sparsity,
                        requested_backend=requested,
                        actual_sparsity=actual,
                    )
                    ref = refs[n]
                    if isinstance(prep, Prepared) and prep.reference_weight is not w:
                        ref = self._refs(prep.reference_weight, {n: x})[n]  # dequantized
                    block.append(self._measure(prep, x, ref, row))
                    self._step(row, self._label(shape, dtype, n, sparsity, row["method"]))
                del prep
            del w, refs
        self._speedups(block, dense_ms)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return block


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


__all__ = [
    "BASELINES",
    "DTYPE_NAMES",
    "FORMATS",
    "KERNEL_BACKENDS",
    "ROW_KEYS",
    "RTOL",
    "BenchConfig",
    "Sweep",
    "backend_env",
    "count_tasks",
    "dense_backend",
    "geomean",
    "hidden_formats",
    "kernel_backend",
    "method_combos",
    "reference_only",
]
