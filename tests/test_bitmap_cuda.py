"""The CUDA bitmap kernel (csrc/kernels/bitmap_*): host emulation, launch plan, GPU checks.

Without a GPU:
* csrc/kernels/bitmap_emulator.cu replays every CTA with the kernel's own index and decode
  functions (bitmap_layout.cuh) and PTX models of the mma.m16n8k16 fragments, on weights from
  the real encoder (fuzzed shapes, N = 1..300, odd M and K, empty/dense/skewed tiles, fp16 and
  bf16), against float64; stage buffers are NaN-poisoned so a wrong byte selection shows;
* the pure-Python launch plan (``bitmap_launch_plan``) and its mirror in the C++ layout.
(The plain-nvcc sm_80/sm_90a compile of bitmap_*.cu is .ci/compile_kernels.sh, run by
tests/test_tiled_csl_cuda.py.) The ``gpu`` tests run the compiled kernel.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import RTOL, reference_linear, rel_err
from helpers import check_exact, linear_problem

from flashsparse.formats import Bitmap
from flashsparse.kernels.cuda import bitmap as bmp_cuda
from flashsparse.kernels.cuda import launch

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
CXX = shutil.which("g++") or shutil.which("c++")
HALF = (torch.float16, torch.bfloat16)
LLAMA_8B = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))
OPT_66B = ((27648, 9216), (9216, 9216), (36864, 9216), (9216, 36864))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++) to build the host emulator")
    exe = tmp_path_factory.mktemp("bitmap_emulator") / "bitmap_emulator"
    proc = subprocess.run(
        [
            CXX,
            "-std=c++17",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-x",
            "c++",
            str(KERNELS / "bitmap_emulator.cu"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


def _write_problem(
    path: Path, masks, values, offsets, x, bias, m, k, *, tile_n=0, split_k=1, misaligned_x=False
) -> None:
    tiles = masks.numel() // 64
    assert values.numel() % 8 == 0
    header = struct.pack(
        "<12i",
        0x32504D42,
        m,
        k,
        x.shape[0],
        tile_n,
        split_k,
        int(misaligned_x),
        int(x.dtype == torch.bfloat16),
        int(bias is not None),
        tiles,
        offsets.numel(),
        values.numel() // 8,
    )
    with open(path, "wb") as f:
        f.write(header)
        f.write(offsets.to(torch.int32).numpy().tobytes())
        f.write(masks.numpy().tobytes())
        f.write(values.view(torch.int16).numpy().tobytes())
        f.write(x.contiguous().view(torch.int16).numpy().tobytes())
        if bias is not None:
            f.write(bias.view(torch.int16).numpy().tobytes())


def _run(exe: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(path)], capture_output=True, text=True)


def _emulate(exe: Path, tmp_path: Path, w, x, bias=None, **launch) -> torch.Tensor:
    t = Bitmap.encode(w).tensors
    path = tmp_path / "problem.bin"
    _write_problem(path, *t, x, bias, *w.shape, **launch)
    proc = _run(exe, path)
    assert proc.returncode == 0, proc.stderr
    y = torch.frombuffer(
        bytearray((tmp_path / "problem.bin.out").read_bytes()), dtype=torch.float32
    )
    return y.view(x.shape[0], w.shape[0])


# (m, k, n, sparsity, kind, tile_n (0: by N), split_k, misaligned x, bias)
_EMULATED = [
    (130, 200, 1, 0.5, "dense_tiles", 0, 1, False, True),  # N=1, a 100 %-dense tile
    (130, 200, 7, 0.7, "empty_tiles", 0, 4, False, False),  # split-K, one k tile per split
    (300, 77, 8, 0.5, "dense_column", 0, 1, False, True),  # k % 8 != 0: scalar x path
    (257, 136, 16, 0.9, "row_skewed", 0, 3, True, True),  # unaligned x, odd M
    (129, 192, 33, 0.0, "uniform", 0, 2, False, False),  # 100 % dense
    (64, 72, 20, 1.0, "uniform", 0, 1, False, True),  # all-zero weight: bias only
    (200, 130, 40, 0.6, "dense_rows", 0, 2, False, True),
    (70, 64, 300, 0.8, "dense_tiles", 0, 2, False, True),  # N=300, one k tile (split -> 1)
    (1, 1, 1, 0.0, "uniform", 0, 1, False, True),
    (150, 100, 21, 0.6, "dense_tiles", 8, 2, False, True),  # every tile width on one shape
    (150, 100, 21, 0.6, "row_skewed", 16, 1, True, False),
    (150, 333, 21, 0.7, "empty_tiles", 32, 5, False, True),
    # K % 8 == 0 and >= 256: unchecked x stages (rows past N read x row 0), then a stage past K
    (100, 520, 9, 0.7, "row_skewed", 0, 1, False, True),
    # split-K with a partial last stage inside K: absent tiles see the next split's x
    (70, 1024, 5, 0.6, "dense_tiles", 0, 3, False, False),
]


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "kind", "tile_n", "split_k", "misaligned", "with_bias"), _EMULATED
)
def test_emulated_kernel_matches_float64(
    emulator, tmp_path, m, k, n, sparsity, kind, tile_n, split_k, misaligned, with_bias, dtype
):
    w, x, bias = linear_problem(m, k, n, sparsity, kind, dtype, seed=m + 3 * k + n)
    bias = bias if with_bias else None
    y = _emulate(
        emulator, tmp_path, w, x, bias, tile_n=tile_n, split_k=split_k, misaligned_x=misaligned
    )
    check_exact(y, x, w, bias)


def test_emulated_kernel_every_nibble_and_row_density(emulator, tmp_path):
    """Rows of every density 0..64 in one tile, every nibble pattern in every chunk position."""
    g = torch.Generator().manual_seed(7)
    m, k = 128, 128
    keep = torch.zeros(m, k, dtype=torch.bool)
    for r in range(m):
        d = r % 65
        keep[r, torch.randperm(k, generator=g)[: 2 * d]] = True
    for r in range(16):  # nibble r in every nibble position of two rows
        for c in range(0, k, 4):
            keep[64 + r, c : c + 4] = torch.tensor(
                [(r >> b) & 1 for b in range(4)], dtype=torch.bool
            )
    for dtype in HALF:
        w = (torch.randn(m, k, generator=g) * keep).to(dtype)
        x = torch.randn(9, k, generator=g).to(dtype)
        check_exact(_emulate(emulator, tmp_path, w, x, split_k=2), x, w)


def test_emulated_kernel_random_shapes(emulator, tmp_path):
    rng = random.Random(1234)
    kinds = ("uniform", "dense_rows", "dense_tiles", "dense_column", "empty_tiles", "row_skewed")
    for case in range(10):
        m, k, n = (
            rng.randint(1, 200),
            rng.randint(1, 300),
            rng.choice([1, 2, 5, 8, 13, 16, 31, 64, 300]),
        )
        dtype = HALF[case % 2]
        w, x, bias = linear_problem(m, k, n, rng.random(), rng.choice(kinds), dtype, seed=case)
        y = _emulate(
            emulator,
            tmp_path,
            w,
            x,
            bias if case % 3 else None,
            split_k=rng.randint(1, 6),
            misaligned_x=bool(case % 4 == 1),
        )
        check_exact(y, x, w, bias if case % 3 else None)


def test_emulator_catches_a_wrong_value_count(emulator, tmp_path):
    """A truncated values array (offsets promise more) must fail, not read past the end."""
    w, x, _ = linear_problem(70, 130, 3, 0.5, "uniform", torch.float16, seed=3)
    t = Bitmap.encode(w).tensors
    path = tmp_path / "bad.bin"
    _write_problem(path, t[0], t[1][:-8], t[2], x, None, 70, 130)
    proc = _run(emulator, path)
    # The kernel clamps the copy to the values it has; the missing chunk's slots stay poisoned.
    assert (
        proc.returncode != 0
        or not torch.isfinite(
            torch.frombuffer(
                bytearray((tmp_path / "bad.bin.out").read_bytes()), dtype=torch.float32
            )
        ).all()
    )


# --- launch plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 8, 9, 16, 17, 32, 33, 300])
@pytest.mark.parametrize(
    ("k", "split"), [(1, 1), (64, 3), (200, 2), (4096, 5), (14336, 40), (333, 5)]
)
def test_python_split_mirrors_the_cuda_layout(emulator, n, k, split):
    out = subprocess.run(
        [str(emulator), "--plan", str(n), str(k), str(split)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    tile_n, eff, per = (int(v) for v in out)
    assert tile_n == bmp_cuda.bitmap_tile_n(n)
    assert eff == launch.effective_split(-(-k // 64), split)
    k_tiles = -(-k // 64)
    assert per == -(-k_tiles // eff)


@pytest.mark.parametrize("shape", LLAMA_8B + OPT_66B)
@pytest.mark.parametrize("n", [1, 8, 16, 32])
def test_plan_gives_every_h100_sm_two_ctas(shape, n):
    m, k = shape
    plan = bmp_cuda.bitmap_launch_plan(m, k, n)
    assert plan["ctas"] >= 2 * 132 or plan["persistent"]
    assert plan["tile_m"] == 64 and plan["tile_n"] == bmp_cuda.bitmap_tile_n(n)
    tiles = -(-m // 64) * -(-n // plan["tile_n"])
    assert plan["ctas"] == tiles * plan["split_k"]
    assert plan["split_k"] == launch.effective_split(-(-k // 64), plan["split_k"])


def test_plan_does_not_split_when_the_grid_is_full():
    plan = bmp_cuda.bitmap_launch_plan(64 * 600, 4096, 8)
    assert plan["split_k"] == 1 and plan["ctas"] == 600


def test_workspace_sizes():
    assert bmp_cuda.bitmap_workspace_sizes(130, 9, 16, 1) == (0, 0)
    assert bmp_cuda.bitmap_workspace_sizes(130, 9, 16, 3) == (3 * 1, 3 * 9 * 130)
    assert bmp_cuda.bitmap_workspace_sizes(4096, 32, 32, 5) == (64, 5 * 32 * 4096)


def test_plan_rejects_bad_sizes():
    for bad in ((0, 64, 1), (64, 0, 1), (64, 64, 0)):
        with pytest.raises(ValueError, match="must be >= 1"):
            bmp_cuda.bitmap_launch_plan(*bad)
    with pytest.raises(ValueError, match="num_sms"):
        bmp_cuda.bitmap_launch_plan(64, 64, 1, num_sms=0)


def test_bitmap_kernel_is_registered_for_cuda():
    from flashsparse import backends

    kernel = backends._KERNELS[("bitmap", "cuda")]
    assert kernel.fn is bmp_cuda.bitmap_linear
    assert "CUDA tensors" in kernel.supports(torch.device("cpu"), torch.float16)
    assert "float16 or bfloat16" in kernel.supports(torch.device("cuda"), torch.float32)


# --- GPU ------------------------------------------------------------------------------------------
def _gpu_case(m, k, n, sparsity, kind, dtype, seed=0):
    w, x, bias = linear_problem(m, k, n, sparsity, kind, dtype, seed)
    return w.cuda(), x.cuda(), bias.cuda()


def _op(x, w, bias, split_k=1, tile_n=0):
    t = Bitmap.encode(w).tensors
    tn = tile_n or bmp_cuda.bitmap_tile_n(x.shape[0])
    split = launch.effective_split(-(-w.shape[1] // 64), split_k)
    counters, partials = bmp_cuda.bitmap_workspace(x.device, w.shape[0], x.shape[0], tn, split)
    return torch.ops.flashsparse._bitmap_spmm_cuda(
        x, *t, w.shape[0], w.shape[1], bias, split_k, tile_n, counters, partials
    )


def _poison_allocator(numel: int, dtype: torch.dtype) -> None:
    """Leave NaN in the caching allocator's next block of this size, so an output element the
    kernel fails to write shows up as NaN."""
    junk = torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "kind", "tile_n", "split_k", "misaligned", "with_bias"), _EMULATED
)
def test_gpu_kernel_matches_float64(
    m, k, n, sparsity, kind, tile_n, split_k, misaligned, with_bias, dtype
):
    assert bmp_cuda.available() is None
    w, x, bias = _gpu_case(m, k, n, sparsity, kind, dtype, seed=m + k)
    if misaligned:
        x = torch.empty(n * k + 1, dtype=dtype, device="cuda")[1:].view(n, k).copy_(x)
    bias = bias if with_bias else None
    ref = reference_linear(x, w, bias)
    _poison_allocator(n * m, dtype)
    y = _op(x, w, bias, split_k, tile_n)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < RTOL[dtype]
    _poison_allocator(n * m, dtype)
    y2 = _op(x, w, bias, split_k, tile_n)
    assert torch.equal(y, y2), (
        "split-K reduction is not deterministic (or the counters were not reset)"
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(("m", "k"), [(4096, 4096), (4096, 14336), (6144, 4096)])
@pytest.mark.parametrize("n", [1, 16, 32])
def test_gpu_benchmark_shapes_use_split_k_and_match(m, k, n, dtype, monkeypatch):
    import flashsparse as fs

    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cuda")
    w, x, bias = _gpu_case(m, k, n, 0.7, "row_skewed", dtype)
    assert bmp_cuda.bitmap_launch_plan(m, k, n)["split_k"] > 1
    y = fs.linear(x, Bitmap.encode(w), bias)
    assert rel_err(y, reference_linear(x, w, bias)) < RTOL[dtype]


@pytest.mark.gpu
def test_gpu_workspace_reuse_across_shapes():
    """Small split, large split, small again on one stream: the cached counters stay zero
    between calls whatever shapes used the partial sums."""
    for m, k, n, split in (
        (70, 200, 3, 3),
        (4096, 4096, 16, 5),
        (130, 333, 9, 5),
        (4096, 4096, 16, 5),
    ):
        w, x, bias = _gpu_case(m, k, n, 0.6, "row_skewed", torch.float16, seed=m + n)
        y = _op(x, w, bias, split)
        assert rel_err(y, reference_linear(x, w, bias)) < RTOL[torch.float16]
    counters, _ = bmp_cuda.bitmap_workspace(
        torch.device("cuda", torch.cuda.current_device()), 64, 8, 8, 2
    )
    assert int(counters.abs().sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_gpu_backend_dispatch_and_cuda_graph(dtype, monkeypatch):
    import flashsparse as fs

    monkeypatch.setenv("FLASHSPARSE_BACKEND", "auto")
    from flashsparse import backends

    w, x, bias = _gpu_case(4096, 4096, 8, 0.7, "uniform", dtype)
    assert backends.select("bitmap", x).backend == "cuda"
    sw = Bitmap.encode(w)
    y = fs.linear(x, sw, bias)
    assert rel_err(y, reference_linear(x, w, bias)) < RTOL[dtype]
    out = torch.full_like(y, float("nan"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fs.linear(x, sw, bias)  # warm-up on the capture stream: its workspace exists before capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        out.copy_(fs.linear(x, sw, bias))
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, y)
