"""The C++ CPU bitmap kernel (flashsparse.kernels.cpu) against a float64 reference.

Every SIMD path this CPU has (FLASHSPARSE_CPU_ISA) x every dtype, on odd shapes and skewed
masks, every kernel the glue picks by n and dtype (fused for few rows of x; on AVX-512 the
column and blocked paths for fp32/fp16 and the row-lanes path for bf16), plus the C++ decode
behind ``to_dense``. If the extension cannot be built here, the tests that need it are
replaced by checks of the warning / error a user then gets.
"""

from __future__ import annotations

import os
import platform
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, reference_linear, rel_err
from helpers import MASK_KINDS, random_weight

import flashsparse as fs
from flashsparse import backends
from flashsparse.formats import Bitmap
from flashsparse.kernels import build
from flashsparse.kernels.cpu import bitmap as cpu_kernels

REASON = cpu_kernels._available()
needs_ext = pytest.mark.skipif(REASON is not None, reason=f"CPU extension unavailable: {REASON}")
ISAS = cpu_kernels.available_isas() if REASON is None else []
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _op(x, sw, bias=None, isa="scalar"):
    m, k = sw.shape
    return torch.ops.flashsparse._bitmap_spmm_cpu(x, *sw.tensors, m, k, bias, cpu_kernels.ISAS[isa])


@pytest.fixture
def cpu_backend(monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cpu")
    backends._selected.clear()
    yield
    backends._selected.clear()


def test_extension_is_there_wherever_it_can_be_built():
    """A kernel that fails its self-check makes the extension unavailable (the reference path
    runs, with a warning), and every test above that needs it is skipped: this one fails then,
    so a broken kernel cannot pass as skips on a machine with a compiler (CI has one)."""
    ext = cpu_kernels.EXTENSION
    tools = ext.prebuilt_available() or (
        build.find_cxx() is not None and build.find_ninja() is not None
    )
    if ext.missing_sources() or not tools:
        pytest.skip(
            "no compiler, ninja or sources here (test_no_compiler_warns_once... covers that)"
        )
    assert REASON is None, REASON


@needs_ext
def test_every_path_this_machine_should_have_is_there():
    assert ISAS[0] == "scalar"
    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    if " avx2 " in flags and " f16c " in flags and " fma " in flags:
        assert "avx2" in ISAS
    if all(
        f" {f} " in flags
        for f in ("avx512f", "avx512bw", "avx512vl", "avx512_vbmi2", "avx512_bf16")
    ):
        assert "avx512" in ISAS
    if platform.machine().lower() in ("aarch64", "arm64"):
        assert "neon" in ISAS


# Run under qemu-x86_64 as a CPU without AVX-512: torch, the extension's ISA choice and every
# kernel the choice leads to (plain and quantized values) as they run on that CPU, against
# float64 on the decoded weight. Prints "paths ... auto ..." then one "case" line per check.
_ON_ANOTHER_CPU = """
import torch, flashsparse as fs
from flashsparse.kernels.cpu import bitmap as cpu
assert cpu._available() is None, cpu._available()
print("torch", torch.backends.cpu.get_cpu_capability())
print("paths", ",".join(cpu.available_isas()), "auto", [n for n, c in cpu.ISAS.items() if c == cpu.isa()][0])
torch.manual_seed(0)
tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
for dtype in tol:
    for quant in (None, "int8", "fp8"):
        for m, k, n, s in ((67, 131, 1, 0.7), (130, 260, 3, 0.9), (129, 200, 9, 0.5), (64, 640, 1, 0.95)):
            w = torch.randn(m, k)
            w[torch.rand(m, k) < s] = 0
            w[: m // 3, : k // 2] = torch.randn(m // 3, k // 2)  # a dense corner: both forms
            layer = fs.SparseLinear.from_dense(w.to(dtype), quant=quant)
            x = torch.randn(n, k).to(dtype)
            y = layer(x)
            ref = x.double() @ layer.weight.to_dense().double().T
            err = float((y.double() - ref).norm() / ref.norm())
            print("case", dtype, quant, m, k, n, s, "ok" if err <= tol[dtype] else "FAIL", f"{err:.1e}")
"""

QEMU_X86_AVX2_ONLY = ("EPYC-Milan", "Haswell-noTSX")  # Zen 3; Intel client / Xeon E5 v3


@needs_ext
@pytest.mark.slow
@pytest.mark.parametrize("model", QEMU_X86_AVX2_ONLY)
def test_auto_runs_avx2_on_an_avx2_only_cpu(model, tmp_path):
    """What a user of an AVX2-only CPU gets: auto picks the AVX2 path (not scalar, not
    AVX-512) and its results hold, emulated by qemu-x86_64 (TCG has AVX2/FMA/F16C/BMI2, not
    AVX-512), so that an AVX-512 machine checks it too."""
    import shutil
    import subprocess
    import sys

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("x86 CPU models: this host is not x86_64")
    if shutil.which("qemu-x86_64") is None:
        pytest.skip("qemu-x86_64 is not installed (Debian package qemu-user)")
    # Nothing here compiles with inductor, but its on-disk cache is not keyed on the CPU it
    # compiled for: a cache shared with an emulated CPU corrupts native runs, so keep it apart.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run(
        ["qemu-x86_64", "-cpu", model, sys.executable, "-c", _ON_ANOTHER_CPU],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "torch AVX2" in out, out
    assert "paths scalar,avx2 auto avx2" in out, out
    cases = [ln for ln in out.splitlines() if ln.startswith("case")]
    assert len(cases) == 3 * 3 * 4, out
    assert all(ln.split()[-2] == "ok" for ln in cases), out


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,k,n,sparsity,kind",
    [
        (1, 1, 1, 0.0, "uniform"),
        (77, 1, 3, 0.3, "uniform"),
        (1, 77, 2, 0.3, "uniform"),
        (70, 130, 1, 0.5, "uniform"),
        (130, 200, 3, 0.7, "dense_tiles"),
        (129, 67, 4, 0.9, "row_skewed"),
        (65, 129, 5, 0.6, "dense_column"),  # first size past the fused path (fp32/fp16)
        (200, 2100, 9, 0.7, "empty_tiles"),  # several K blocks, odd n tail
        (70, 300, 16, 0.8, "row_skewed"),  # widest batch of the fp32/fp16 column path
        (150, 260, 1, 0.7, "row_skewed"),  # bf16 n = 1: sparse tiles with some rows over 32
        (64, 64, 17, 0.0, "uniform"),  # one fully dense tile
        (96, 4, 33, 0.8, "dense_rows"),
        (150, 520, 35, 0.7, "row_skewed"),  # bf16 row-lanes: three groups of x rows, a tail of 3
        (33, 64, 12, 0.5, "empty_tiles"),  # bf16 row-lanes: one step per tile row, 12 x rows
    ],
)
def test_matches_float64(isa, dtype, m, k, n, sparsity, kind):
    assert kind in MASK_KINDS
    w = random_weight(m, k, sparsity, dtype, kind, seed=m * 7 + k + n)
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(m, generator=g).to(dtype)
    sw = fs.encode(w, "bitmap")
    for bias in (None, b):
        y = _op(x, sw, bias, isa)
        assert y.shape == (n, m) and y.dtype == dtype
        ref = reference_linear(x, w, bias)
        assert rel_err(y, ref) < RTOL[dtype], (isa, dtype, bias is not None)


def test_extension_builds_with_openmp_where_torch_uses_it():
    """Without -fopenmp, at::parallel_for (inline under torch's OpenMP backend) runs on one
    thread: the kernel silently ignored torch.set_num_threads before this was set."""
    import sys

    uses_openmp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    assert ("-fopenmp" in cpu_kernels.EXTENSION.cflags) == uses_openmp
    assert ("-fopenmp" in cpu_kernels.EXTENSION.ldflags) == uses_openmp


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_same_result_on_one_and_two_threads(isa, n):
    """Tile rows are split across torch's threads (at::parallel_for, built with OpenMP); every
    row is still summed by one thread in one order, so the thread count changes nothing."""
    w = random_weight(300, 190, 0.7, torch.bfloat16, "row_skewed", seed=n)
    x = torch.randn(n, 190, generator=torch.Generator().manual_seed(n)).to(torch.bfloat16)
    sw = fs.encode(w, "bitmap")
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(_op(x, sw, isa=isa))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    assert rel_err(outs[1], reference_linear(x, w)) < RTOL[torch.bfloat16]


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_is_bit_exact(isa, dtype, monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_CPU_ISA", isa)
    w = random_weight(131, 197, 0.6, dtype, "empty_tiles", seed=5)
    w[0, 0], w[70, 130], w[130, 196] = float("nan"), float("inf"), -float("inf")
    w[1, 1] = -0.0
    sw = fs.encode(w, "bitmap")
    ours = torch.ops.flashsparse._bitmap_decode_cpu(*sw.tensors, 131, 197, cpu_kernels.ISAS[isa])
    ref = Bitmap.decode_reference(*sw.tensors, m=131, k=197, dtype=dtype)
    assert torch.equal(ours.view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(sw.to_dense().view(torch.uint8), ref.view(torch.uint8))  # to_dense uses it


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
def test_empty_and_dense_tiles(isa):
    m, k = 130, 200
    w = torch.randn(m, k)
    w[:64, 64:128] = 0  # empty tile
    w[64:128, :] = 0  # empty tile row
    w[:, 150] = 0
    sw = fs.encode(w, "bitmap")
    for n in (1, 7):
        x = torch.randn(n, k)
        assert rel_err(_op(x, sw, isa=isa), reference_linear(x, w)) < RTOL[torch.float32]
    zero = fs.encode(torch.zeros(m, k), "bitmap")
    b = torch.randn(m)
    assert torch.equal(_op(torch.randn(3, k), zero, b, isa), b.expand(3, m))


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_of_x_on_sparse_tiles(isa, dtype):
    """n = 1 on tiles of few values: AVX-512 multiplies a row of <= 16 nonzeros (32 for bf16)
    with x gathered at their columns and rebuilds denser rows. Rows of 0, 1, 15, 16, 17, 32,
    33 and 64 nonzeros in one such tile (first and last column, all four 16-column quarters),
    the tail tiles of M and K, checked element by element; then NaN and Inf weights on both
    kinds of row."""
    g = torch.Generator().manual_seed(5)
    m, k = 131, 197
    keep = torch.rand(m, k, generator=g) >= 0.92
    for row, count in {
        0: 0,
        1: 1,
        2: 15,
        3: 16,
        4: 17,
        5: 33,
        6: 64,
        8: 32,
        70: 16,
        129: 33,
    }.items():
        keep[row, :64] = False
        keep[row, torch.randperm(64, generator=g)[:count]] = True
    keep[1, :64] = False
    keep[1, 63] = True
    keep[7, :64] = False
    keep[7, [0, 15, 16, 31, 32, 47, 48, 63]] = True
    assert keep[:64, :64].sum() <= 64 * 15 and keep[3, :64].sum() == 16 and keep[4, :64].sum() == 17
    w = (torch.randn(m, k, generator=g) * keep).to(dtype)
    x = torch.randn(1, k, generator=g).to(dtype)
    y = _op(x, fs.encode(w, "bitmap"), isa=isa)
    ref = reference_linear(x, w)
    scale = x.double().abs() @ w.double().abs().T + 1e-30
    worst = ((y.double() - ref).abs() / scale).max().item()
    assert worst < RTOL[dtype], worst

    w = w.float()
    w[3, keep[3].nonzero()[0, 0]] = float("nan")  # a gathered row
    w[6, 10] = float("inf")  # a rebuilt row; x[10] = 0 makes it NaN
    w[2, keep[2].nonzero()[-1, 0]] = float("-inf")
    x = x.float()
    x[0, 10] = 0.0
    w, x = w.to(dtype), x.to(dtype)
    y = _op(x, fs.encode(w, "bitmap"), isa=isa).float()
    expected = F.linear(x.float(), w.float())
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    assert y.isnan().sum() == 2 and y.isinf().sum() == 1
    finite = expected.isfinite()
    assert rel_err(y[finite], expected[finite]) < RTOL[dtype]


@needs_ext
@pytest.mark.parametrize("isa", ISAS or ["scalar"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,x_finite", [(1, True), (6, False), (7, True), (17, True)])
def test_nan_and_inf_propagate_like_f_linear(isa, dtype, n, x_finite):
    """Non-finite weights with finite x run the kernels themselves (fused, column, blocked and
    row-lanes paths by n and dtype); a non-finite x takes the decode + F.linear path."""
    w = random_weight(70, 130, 0.5, torch.float32, seed=3)
    w[3, 5] = float("nan")
    w[10, 7] = float("inf")
    x = torch.randn(n, 130)
    x[0, 7] = 0.0  # inf * 0 = nan in row 0, column 10
    if not x_finite:
        x[1, 20] = float("nan")
        x[n - 1, 100] = float("-inf")  # meets zero weights: NaN, as in F.linear
    w, x = w.to(dtype), x.to(dtype)
    y = _op(x, fs.encode(w, "bitmap"), isa=isa).float()
    expected = F.linear(x.float(), w.float())
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert rel_err(y[finite], expected[finite]) < RTOL[dtype]


@needs_ext
def test_linear_dispatches_to_the_cpu_kernel(cpu_backend):
    w = random_weight(70, 66, 0.7, torch.bfloat16, seed=1)
    sw = fs.encode(w, "bitmap")
    kernel = backends.select("bitmap", torch.empty(1, 66, dtype=torch.bfloat16))
    assert kernel.backend == "cpu"
    x = torch.randn(2, 3, 66, dtype=torch.bfloat16)  # 3-D x
    b = torch.randn(70, dtype=torch.bfloat16)
    y = fs.linear(x, sw, b)
    assert y.shape == (2, 3, 70)
    assert (
        rel_err(y, reference_linear(x.reshape(6, 66), w, b).view(2, 3, 70)) < RTOL[torch.bfloat16]
    )
    assert fs.linear(torch.randn(0, 66, dtype=torch.bfloat16), sw).shape == (0, 70)
    wide = torch.randn(4, 100, dtype=torch.bfloat16)[:, 10:76]  # strided rows
    assert rel_err(fs.linear(wide, sw), reference_linear(wide, w)) < RTOL[torch.bfloat16]


@needs_ext
def test_auto_uses_the_cpu_kernel_and_chooses_bitmap(monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "auto")
    backends._selected.clear()
    for dtype in DTYPES:
        assert backends.select("bitmap", torch.empty(1, 8, dtype=dtype)).backend == "cpu"
        w = random_weight(128, 128, 0.5, dtype, seed=2)
        assert fs.encode(w).format == "bitmap"
    backends._selected.clear()


@needs_ext
def test_isa_env_var(monkeypatch):
    for name in ISAS:
        monkeypatch.setenv("FLASHSPARSE_CPU_ISA", name)
        assert cpu_kernels.isa() == cpu_kernels.ISAS[name]
    monkeypatch.setenv("FLASHSPARSE_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="FLASHSPARSE_CPU_ISA must be one of"):
        cpu_kernels.isa()
    missing = [name for name in cpu_kernels.ISAS if name not in ISAS]
    if missing:
        monkeypatch.setenv("FLASHSPARSE_CPU_ISA", missing[0])
        with pytest.raises(ValueError, match="lacks"):
            cpu_kernels.isa()


@needs_ext
def test_autograd_and_backward_decode(cpu_backend):
    w = random_weight(70, 66, 0.6, torch.float32, seed=4)
    sw = fs.encode(w, "bitmap")
    x = torch.randn(5, 66, requires_grad=True)
    b = torch.randn(70, requires_grad=True)
    fs.linear(x, sw, b).sum().backward()
    xr = x.detach().clone().requires_grad_()
    br = b.detach().clone().requires_grad_()
    F.linear(xr, w, br).sum().backward()
    assert torch.allclose(x.grad, xr.grad, atol=1e-5) and torch.allclose(b.grad, br.grad, atol=1e-5)


@needs_ext
def test_bad_input_is_a_clear_error():
    sw = fs.encode(random_weight(70, 66, 0.5, seed=1), "bitmap")
    with pytest.raises(RuntimeError, match="x must have the weight's dtype"):
        _op(torch.randn(2, 66, dtype=torch.float16), sw)
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[N, k=66\]"):
        _op(torch.randn(2, 65), sw)
    with pytest.raises(RuntimeError, match=r"isa must be"):
        torch.ops.flashsparse._bitmap_spmm_cpu(torch.randn(2, 66), *sw.tensors, 70, 66, None, 7)


@needs_ext
def test_opcheck():
    from torch.library import opcheck

    sw = fs.encode(random_weight(70, 66, 0.5, torch.bfloat16, seed=1), "bitmap")
    x = torch.randn(3, 66, dtype=torch.bfloat16)
    b = torch.randn(70, dtype=torch.bfloat16)
    isa = cpu_kernels.isa()
    opcheck(torch.ops.flashsparse._bitmap_spmm_cpu.default, (x, *sw.tensors, 70, 66, b, isa))
    opcheck(torch.ops.flashsparse._bitmap_decode_cpu.default, (*sw.tensors, 70, 66, isa))


def test_no_compiler_warns_once_and_forced_backend_raises(monkeypatch):
    """Without a compiler: auto runs the reference path after one clear warning; cpu raises."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("FLASHSPARSE_JIT", "1")  # ignore a prebuilt flashsparse._C_cpu
    monkeypatch.setattr(cpu_kernels._state, "loaded", False)
    monkeypatch.setattr(cpu_kernels._state, "error", None)
    monkeypatch.setattr(backends, "_warned", set())
    backends._selected.clear()
    assert build.find_cxx() is None
    reason = cpu_kernels.unavailable_reason()
    assert reason and "no C++ compiler" in reason
    w = random_weight(70, 66, 0.5, seed=1)
    sw = fs.encode(w, "bitmap")
    x = torch.randn(3, 66)
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "auto")
    with pytest.warns(RuntimeWarning, match=r"no C\+\+ compiler.*reference path") as record:
        y = fs.linear(x, sw)
        fs.linear(x, sw)
    assert len([r for r in record if "compiler" in str(r.message)]) == 1
    assert rel_err(y, reference_linear(x, w)) < RTOL[torch.float32]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(sw.to_dense(), w)  # the torch decode, silently
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cpu")
    backends._selected.clear()
    with pytest.raises(
        backends.BackendUnavailableError, match=r"FLASHSPARSE_BACKEND=cpu.*no C\+\+ compiler"
    ):
        fs.linear(x, sw)
    backends._selected.clear()


def test_benchmark_summary_of_several_runs(tmp_path):
    """bench/cpu_kernel.py --summary: each cell's median, min and max over the runs."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "bench_cpu_kernel", Path(__file__).parents[1] / "bench" / "cpu_kernel.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def run(started, speedups, e2e):
        meta = dict(
            device="cpu", threads=2, isa="avx512", torch="x", date="2026-11-23", started=started
        )
        linear = [
            dict(m=64, k=128, dtype="bfloat16", n=n, sparsity=0.7, speedup=s) for n, s in speedups
        ]
        return dict(meta=meta, linear=linear, e2e=dict(speedup=e2e))

    files = []
    for i, (a, b, e) in enumerate([(3.0, 1.1, 2.0), (5.0, 0.9, 1.5), (4.0, 1.3, 2.5)]):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(run(f"18:0{i} UTC", [(1, a), (16, b)], e)))
    out = tmp_path / "summary.md"
    bench.main(["--summary", str(out), *map(str, files)])
    text = out.read_text()
    assert "| 64x128 | bfloat16 | 1 | 70% | 4.00x | 3.00x | 5.00x |" in text
    assert "| 64x128 | bfloat16 | 16 | 70% | 1.10x | 0.90x | 1.30x |" in text
    assert "median 2.00x, min 1.50x, max 2.50x over 3 runs" in text
    assert text.count("18:0") == 3
    with pytest.raises(SystemExit):
        bench.main(["--summary", str(out)])


def test_benchmark_summary_fastest_calls_column(tmp_path):
    """Runs that record their fastest calls get a column with the median of those ratios."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "bench_cpu_kernel", Path(__file__).parents[1] / "bench" / "cpu_kernel.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = []
    for i, (med, best) in enumerate([(1.5, 2.5), (1.1, 2.0), (1.3, 3.5)]):
        meta = dict(device="cpu", threads=2, isa="avx2", torch="x", date="d", started=f"{i}")
        meta.update(load_start=3.0, load_end=4.5, dense_baseline=dict(torch_capability="AVX2"))
        row = dict(m=64, k=128, dtype="float32", n=1, sparsity=0.9, speedup=med)
        row["speedup_best"] = best
        e2e = dict(speedup=med, speedup_best=best)
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(dict(meta=meta, linear=[row], e2e=e2e)))
    out = tmp_path / "summary.md"
    bench.main(["--summary", str(out), *map(str, files)])
    text = out.read_text()
    assert "| 64x128 | float32 | 1 | 90% | 1.30x | 1.10x | 1.50x | 2.50x |" in text
    assert "dense baseline torch AVX2" in text and "load 3.0-4.5" in text
    assert "Fastest rounds' tokens/s ratio: median 2.50x [2.00-3.50]" in text
