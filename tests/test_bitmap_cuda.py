"""The CUDA bitmap kernel (csrc/kernels/bitmap_*): host emulation, launch plan, workspaces,
the self-check gate, GPU checks.

Without a GPU:
* csrc/kernels/bitmap_emulator.cu replays every CTA with the kernel's own index and decode
  functions (bitmap_layout.cuh) and PTX models of the mma.m16n8k16 fragments, on weights from
  the real encoder (fuzzed shapes, N = 1..300, odd M and K, empty/dense/skewed tiles, fp16 and
  bf16), against float64; stage buffers are NaN-poisoned so a wrong byte selection shows; Inf
  and NaN in x under split-K against F.linear's pattern; the glue's size checks
  (``bmp::problem_size_error``) on malformed problems;
* the pure-Python launch plan (``bitmap_launch_plan``) on the H100, A100 and A10 (99 KiB per
  block, like every sm_86/89/120 part) limits, and its mirror in the C++ layout;
* the workspace policy (eager: cached per stream; under capture: owned by the graph) and the
  self-check gate's behaviour inside a capture, with CUDA calls stubbed.
(The plain-nvcc sm_80/sm_86/sm_90a compile of bitmap_*.cu is .ci/compile_kernels.sh, run by
tests/test_tiled_csl_cuda.py.) The ``gpu`` tests run the compiled kernel.
"""

from __future__ import annotations

import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, reference_linear, rel_err
from helpers import check_exact, linear_problem, random_weight

from flashsparse.formats import Bitmap
from flashsparse.kernels.cuda import bitmap as bmp_cuda
from flashsparse.kernels.cuda import extension, launch

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def _specials_match(y: torch.Tensor, ref: torch.Tensor) -> None:
    """NaN where ref has NaN, +-Inf where ref has the same Inf, and the finite rest close."""
    assert torch.equal(torch.isnan(y), torch.isnan(ref)), (
        f"NaN: {int(torch.isnan(y).sum())} emulated, {int(torch.isnan(ref).sum())} in F.linear"
    )
    assert torch.equal(torch.isinf(y), torch.isinf(ref)), (
        f"Inf: {int(torch.isinf(y).sum())} emulated, {int(torch.isinf(ref).sum())} in F.linear"
    )
    inf = torch.isinf(ref)
    assert torch.equal(torch.sign(y[inf]), torch.sign(ref[inf]))
    finite = torch.isfinite(ref)
    assert torch.allclose(y[finite].double(), ref[finite].double(), rtol=1e-4, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
@pytest.mark.parametrize("misaligned", [False, True], ids=["cp.async_x", "scalar_x"])
@pytest.mark.parametrize("k", [640, 600])
def test_emulated_split_k_propagates_inf_and_nan_like_f_linear(
    emulator, tmp_path, split_k, misaligned, k
):
    """Each split stages x only up to its own columns: an Inf in the next split's columns
    never meets this split's all-zero masks of absent tiles (0 x Inf = NaN). The first row is
    the reproduction of the defect (m = 64, k = 640, x[0, 400] = Inf, split 2 gave 64 NaN and
    0 Inf where F.linear gives NaN only where w[:, 400] is zero)."""
    w, x, _ = linear_problem(64, k, 5, 0.6, "uniform", torch.float16, seed=k + split_k)
    x[0, 400] = float("inf")
    x[1, 130] = float("-inf")
    x[2, k - 40] = float("nan")
    x[3, 260] = float("inf")  # two specials of opposite sign in one row: Inf - Inf = NaN
    x[3, 330] = float("-inf")
    y = _emulate(emulator, tmp_path, w, x, split_k=split_k, misaligned_x=misaligned)
    ref = F.linear(x.float(), w.float())
    # F.linear's pattern is IEEE's: the same as the exact products summed in float64.
    exact = (x.double()[:, None, :] * w.double()[None, :, :]).sum(-1)
    assert torch.equal(torch.isnan(ref), torch.isnan(exact))
    assert torch.equal(torch.isinf(ref), torch.isinf(exact))
    assert 0 < int(torch.isinf(ref[0]).sum()) < 64 and int(torch.isnan(ref[0]).sum()) > 0
    _specials_match(y, ref)


def _patch_header(path: Path, field: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[4 * field : 4 * field + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_emulator_runs_the_glue_size_checks(emulator, tmp_path):
    """bmp::problem_size_error, which the torch glue runs before every launch, rejects
    malformed sizes with a message naming the tensor (the emulator exits 3 with it)."""
    w, x, _ = linear_problem(70, 130, 3, 0.5, "uniform", torch.float16, seed=3)
    masks, values, offsets = Bitmap.encode(w).tensors
    tiles = masks.numel() // 64
    cases = {
        "more than 6 dense 64x64 tiles": dict(
            values=torch.cat([values, torch.ones(tiles * 4096, dtype=values.dtype)])
        ),
        "tile_offsets must have 7 entries": dict(offsets=offsets[:-1]),
        "masks must have 384 entries": dict(masks=masks[:-64]),
        "tile_n must be 0 (by N), 8, 16 or 32, got 24": dict(tile_n=24),
        "split_k must be >= 1, got 0": dict(split_k=0),
    }
    for message, change in cases.items():
        args = {"masks": masks, "values": values, "offsets": offsets, **change}
        launch_args = {k: args.pop(k) for k in ("tile_n", "split_k") if k in args}
        path = tmp_path / "bad.bin"
        _write_problem(
            path, args["masks"], args["values"], args["offsets"], x, None, 70, 130, **launch_args
        )
        proc = _run(emulator, path)
        assert proc.returncode == 3 and message in proc.stderr, (message, proc.stderr)
    # N past what a block index plus a tile offset can address in int (grid-size overflow)
    path = tmp_path / "huge.bin"
    _write_problem(path, masks, values, offsets, x, None, 70, 130)
    _patch_header(path, 3, 2**31 - 1)
    proc = _run(emulator, path)
    assert proc.returncode == 3 and "rows; at most 2147483392" in proc.stderr, proc.stderr


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


DEVICES = (launch.H100, launch.A100, launch.A10)
OPT_IN_99KIB = 99 * 1024  # 101,376 B: sm_86, sm_89, sm_120


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name.split()[0])
@pytest.mark.parametrize("shape", LLAMA_8B + OPT_66B)
@pytest.mark.parametrize("n", [1, 8, 16, 32])
def test_plan_gives_every_sm_two_ctas(device, shape, n):
    m, k = shape
    plan = bmp_cuda.bitmap_launch_plan(m, k, n, device=device)
    assert plan["ctas"] >= 2 * device.sms or plan["persistent"]
    assert plan["tile_m"] == 64
    tiles = -(-m // 64) * -(-n // plan["tile_n"])
    assert plan["ctas"] == tiles * plan["split_k"]
    assert plan["split_k"] == launch.effective_split(-(-k // 64), plan["split_k"])


@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.name.split()[0])
@pytest.mark.parametrize("n", [1, 8, 9, 16, 17, 32, 33, 300])
def test_plan_tile_fits_the_device_shared_memory(device, n):
    """The widest tile N needs that fits: 32-wide tiles (~105 KiB per block) on the H100 and
    A100, 16-wide on the 99 KiB parts, whose plans never exceed 101,376 bytes."""
    plan = bmp_cuda.bitmap_launch_plan(4096, 4096, n, device=device)
    tile_n = plan["tile_n"]
    assert bmp_cuda.bitmap_block_smem(tile_n) <= device.smem_per_block_optin
    if device.smem_per_block_optin <= OPT_IN_99KIB:
        assert tile_n == min(bmp_cuda.bitmap_tile_n(n), 16)
        assert bmp_cuda.bitmap_block_smem(tile_n) <= 101_376
    else:
        assert tile_n == bmp_cuda.bitmap_tile_n(n)


def test_ctas_per_sm_from_the_device_limits():
    # H100: two CTAs of every width (registers); A100 (164 KiB per SM): two 8-wide CTAs, one of
    # 16 or 32; the 99 KiB parts: one CTA, and the 32-wide tile does not fit at all.
    expected = {
        launch.H100: {8: 2, 16: 2, 32: 2},
        launch.A100: {8: 2, 16: 1, 32: 1},
        launch.A10: {8: 1, 16: 1, 32: 0},
    }
    for device, per_tile in expected.items():
        got = {tn: bmp_cuda.bitmap_ctas_per_sm(tn, device) for tn in bmp_cuda.BITMAP_TILE_NS}
        assert got == per_tile, device.name
    # The static shared memory ptxas reports (4,112 B on sm_80/86, 4,128 B on sm_90a) plus the
    # dynamic part: 32-wide needs 107,568 B on sm_86, over its 101,376 B.
    assert bmp_cuda.bitmap_smem_bytes(32) + 4112 == 107_568 > OPT_IN_99KIB
    assert bmp_cuda.bitmap_smem_bytes(16) + 4128 <= OPT_IN_99KIB


def test_plan_follows_the_measured_occupancy():
    """On a GPU the occupancy calculator's CTAs per SM (0: does not fit) decide the width and
    the slots: here 32-wide does not fit and 16-wide holds three CTAs per SM."""
    plan = bmp_cuda.bitmap_launch_plan(
        4096, 4096, 32, device=launch.H100, ctas_per_sm={8: 4, 16: 3, 32: 0}
    )
    assert plan["tile_n"] == 16 and plan["ctas"] >= 264
    with pytest.raises(ValueError, match="tile_n=32 does not fit"):
        bmp_cuda.bitmap_launch_plan(
            4096, 4096, 32, device=launch.H100, ctas_per_sm={8: 4, 16: 3, 32: 0}, tile_n=32
        )
    with pytest.raises(ValueError, match="tile_n=32 does not fit A10"):
        bmp_cuda.bitmap_launch_plan(4096, 4096, 32, device=launch.A10, tile_n=32)
    with pytest.raises(ValueError, match="no bitmap tile width fits"):
        bmp_cuda.bitmap_launch_plan(64, 64, 1, ctas_per_sm={8: 0, 16: 0, 32: 0})


def test_plan_prefers_splits_of_whole_pipeline_stages():
    """4096 x 4096, N = 1 on an H100: 64 k tiles; 5 splits (13 tiles: the last of 4 stages has
    one tile, three warps decode nothing and x takes the checked copy) reach the wave target,
    and so do 8 splits of exactly two stages each: the plan takes those."""
    plan = bmp_cuda.bitmap_launch_plan(4096, 4096, 1)
    assert plan["split_k"] == 8 and plan["ctas"] == 512
    # ... but never more than twice the splits: the A100 keeps 6 (11 tiles each), as 8 misses
    # the wave target there and 16 is too many
    assert bmp_cuda.bitmap_launch_plan(4096, 4096, 1, device=launch.A100)["split_k"] == 6


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
    no_sms = launch.DeviceLimits("none", 0, 99 * 1024, 100 * 1024)
    with pytest.raises(ValueError, match=r"device\.sms"):
        bmp_cuda.bitmap_launch_plan(64, 64, 1, device=no_sms)
    with pytest.raises(ValueError, match="tile_n must be one of"):
        bmp_cuda.bitmap_launch_plan(64, 64, 1, tile_n=24)


def test_device_limits_come_from_the_device_properties(monkeypatch):
    class Props:  # an RTX 4090 as torch.cuda.get_device_properties reports it
        name = "NVIDIA GeForce RTX 4090"
        major, minor = 8, 9
        multi_processor_count = 128
        shared_memory_per_block_optin = 101_376
        shared_memory_per_multiprocessor = 102_400
        regs_per_multiprocessor = 65_536
        max_threads_per_multi_processor = 1536

    launch.device_limits.cache_clear()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    try:
        limits = launch.device_limits(0)
    finally:
        launch.device_limits.cache_clear()
    assert limits == launch.DeviceLimits(
        "NVIDIA GeForce RTX 4090 (sm_89)", 128, 101_376, 102_400, 65_536, 1536
    )
    plan = bmp_cuda.bitmap_launch_plan(4096, 4096, 32, device=limits)
    assert plan["tile_n"] == 16 and plan["ctas"] >= 2 * 128


def test_bitmap_kernel_is_registered_for_cuda():
    from flashsparse import backends

    kernel = backends._KERNELS[("bitmap", "cuda")]
    assert kernel.fn is bmp_cuda.bitmap_linear
    assert kernel.available is bmp_cuda.available
    assert "CUDA tensors" in kernel.supports(torch.device("cpu"), torch.float16)
    assert "float16 or bfloat16" in kernel.supports(torch.device("cuda"), torch.float32)


# --- workspaces and the self-check gate (CUDA stubbed) ---------------------------------------------
@pytest.fixture
def fake_streams(monkeypatch):
    """CPU tensors stand in for device memory; ``state["capturing"]`` and ``state["stream"]``
    play the current stream's capture status and handle."""
    state = {"capturing": False, "stream": 7}

    class Stream:
        @property
        def cuda_stream(self):
            return state["stream"]

    monkeypatch.setattr(extension, "capturing", lambda index: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: Stream())
    monkeypatch.setattr(bmp_cuda, "_bitmap_workspaces", {})
    return state


def test_workspaces_under_capture_belong_to_the_graph(fake_streams):
    dev = torch.device("cpu", 0)
    eager = bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 4)
    assert bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 4)[0] is eager[0]  # cached per stream
    fake_streams["capturing"] = True
    first = bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 4)
    second = bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 4)
    # every captured call gets its own pair (another graph captured on the same stream, or
    # an eager call, can run while this graph replays), counters zeroed by a captured memset
    assert first[0] is not eager[0] and first[1] is not eager[1]
    assert first[0].data_ptr() != second[0].data_ptr()
    assert first[0].numel() == 10 and int(first[0].abs().sum()) == 0
    assert first[1].numel() == 4 * 640
    # ... and nothing a capture allocated is cached: a later eager call that grows the eager
    # pair cannot free or reuse it
    assert list(bmp_cuda._bitmap_workspaces.values()) == [eager]
    fake_streams["capturing"] = False
    grown = bmp_cuda.bitmap_workspace(dev, 4096, 300, 32, 4)
    assert grown[1].numel() >= 4 * 300 * 4096 and grown[1] is not eager[1]
    assert first[1].numel() == 4 * 640  # the graph's own buffers are untouched
    # another stream, another pair (concurrent launches must not share counters)
    fake_streams["stream"] = 8
    assert bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 4)[0] is not grown[0]
    assert bmp_cuda.bitmap_workspace(dev, 640, 1, 8, 1) == (None, None)


def test_first_call_inside_a_capture_raises_and_caches_nothing(monkeypatch):
    calls, loads, capturing = [], [], [True]
    gate = extension.SelfCheckedKernel("test kernel", lambda: calls.append(1))
    monkeypatch.setattr(extension, "unavailable_reason", lambda: None)
    monkeypatch.setattr(extension, "_state", lambda: loads.append(1))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    for _ in range(2):  # the failure is not kept: a second capture says the same
        with pytest.raises(RuntimeError, match=r"inside a CUDA-graph capture.*warm-up call"):
            gate()
    assert calls == [] and loads == []  # nothing loaded, self-checked or synchronised
    capturing[0] = False
    assert gate() is None and calls == [1] and loads == [1]
    capturing[0] = True
    assert gate() is None and calls == [1]  # checked before: a capture may use the kernel
    failing = extension.SelfCheckedKernel("bad kernel", lambda: 1 / 0)
    capturing[0] = False
    assert "bad kernel failed to run its self-check (ZeroDivisionError" in failing()
    assert failing() == failing()  # a real failure is kept


# --- GPU ------------------------------------------------------------------------------------------
def _gpu_case(m, k, n, sparsity, kind, dtype, seed=0):
    w, x, bias = linear_problem(m, k, n, sparsity, kind, dtype, seed)
    return w.cuda(), x.cuda(), bias.cuda()


def _tile(x: torch.Tensor, tile_n: int = 0) -> int:
    """``tile_n`` if this GPU's shared memory takes it, else the widest width N needs that it
    takes (what the op picks for tile_n = 0)."""
    fits = bmp_cuda._occupancy(x.device.index, x.dtype == torch.bfloat16)
    if tile_n and fits[tile_n] > 0:
        return tile_n
    widest = bmp_cuda.bitmap_tile_n(x.shape[0])
    return max(t for t in bmp_cuda.BITMAP_TILE_NS if fits[t] > 0 and t <= widest)


def _op(x, w, bias, split_k=1, tile_n=0):
    t = Bitmap.encode(w).tensors
    tn = _tile(x, tile_n)
    split = launch.effective_split(-(-w.shape[1] // 64), split_k)
    counters, partials = bmp_cuda.bitmap_workspace(x.device, w.shape[0], x.shape[0], tn, split)
    return torch.ops.flashsparse._bitmap_spmm_cuda(
        x, *t, w.shape[0], w.shape[1], bias, split_k, tn, counters, partials
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
    assert bmp_cuda._plan(x.device.index, dtype == torch.bfloat16, n, m, k)[0] > 1
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


@pytest.mark.gpu
def test_gpu_tile_widths_follow_the_device_shared_memory():
    """The occupancy calculator's verdict per width (0: does not fit) agrees with the limit
    from the device properties, and the plan never picks a width that does not fit."""
    assert bmp_cuda.available() is None
    index = torch.cuda.current_device()
    limits = launch.device_limits(index)
    for bf16 in (False, True):
        fits = bmp_cuda._occupancy(index, bf16)
        for tn in bmp_cuda.BITMAP_TILE_NS:
            # the static part is 4,112 or 4,128 B by arch: the verdict is the same for both
            assert (fits[tn] > 0) == (bmp_cuda.bitmap_block_smem(tn) <= limits.smem_per_block_optin)
        for n in (1, 9, 17, 32, 300):
            assert fits[bmp_cuda._plan(index, bf16, n, 4096, 4096)[1]] > 0


@pytest.mark.gpu
def test_gpu_99kib_device_runs_32_tokens_on_16_wide_tiles(monkeypatch):
    """On an sm_86/89/120 part (101,376 B per block) the 32-wide tile does not fit: N = 32 runs
    16-wide tiles, and forcing 32 is a clear error, not a failed self-check."""
    import flashsparse as fs

    index = torch.cuda.current_device()
    if launch.device_limits(index).smem_per_block_optin > OPT_IN_99KIB:
        pytest.skip("this GPU allows more than 99 KiB of shared memory per block")
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cuda")
    assert bmp_cuda.available() is None
    w, x, bias = _gpu_case(4096, 4096, 32, 0.7, "row_skewed", torch.float16)
    assert bmp_cuda._plan(index, False, 32, 4096, 4096)[1] == 16
    assert rel_err(fs.linear(x, Bitmap.encode(w), bias), reference_linear(x, w, bias)) < 2e-3
    t = Bitmap.encode(w).tensors
    with pytest.raises(RuntimeError, match=r"tile_n=32 needs \d+ bytes of shared memory"):
        torch.ops.flashsparse._bitmap_spmm_cuda(x, *t, 4096, 4096, bias, 1, 32)
    y = torch.ops.flashsparse._bitmap_spmm_cuda(x, *t, 4096, 4096, bias, 1, 0)  # 0: it chooses
    assert rel_err(y, reference_linear(x, w, bias)) < 2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 2, 3, 4])
def test_gpu_split_k_propagates_inf_and_nan_like_f_linear(split_k):
    w, x, _ = _gpu_case(64, 640, 5, 0.6, "uniform", torch.float16, seed=split_k)
    x[0, 400] = float("inf")
    x[1, 130] = float("-inf")
    x[2, 600] = float("nan")
    x[3, 260], x[3, 330] = float("inf"), float("-inf")
    y = _op(x, w, None, split_k)
    ref = F.linear(x.float().cpu(), w.float().cpu())
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(ref))
    assert torch.equal(torch.isinf(y.cpu()), torch.isinf(ref))
    inf = torch.isinf(ref)
    assert torch.equal(torch.sign(y.cpu().float()[inf]), torch.sign(ref[inf]))


def _capture(fn, stream=None):
    """``(graph, output)`` of ``fn()`` captured (on ``stream``, else torch's capture stream)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_gpu_graph_keeps_its_workspace_while_eager_calls_grow_theirs(monkeypatch):
    """Eager call on stream s, capture on s, then eager calls with growing N on s (the eager
    workspace is regrown, its old buffers freed and reused by other tensors): the graph's
    split-K buffers are its own, so its replays stay correct."""
    import flashsparse as fs

    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cuda")
    m, k = 4096, 4096
    w = random_weight(m, k, 0.7, torch.float16, "row_skewed", seed=1, device="cuda")
    sw = Bitmap.encode(w)
    assert bmp_cuda._plan(torch.cuda.current_device(), False, 1, m, k)[0] > 1
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fs.linear(x, sw)  # the eager workspace of s exists before the capture
    torch.cuda.synchronize()
    graph, y = _capture(lambda: fs.linear(x, sw), stream=s)
    with torch.cuda.stream(s):
        for n in (8, 16, 32, 64, 128, 300):
            fs.linear(torch.randn(n, k, device="cuda", dtype=torch.float16), sw)
        junk = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    del junk
    for seed in range(3):
        x.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, reference_linear(x, w)) < RTOL[torch.float16]


@pytest.mark.gpu
def test_gpu_two_graphs_replayed_concurrently_do_not_share_a_workspace(monkeypatch):
    """Two graphs captured on torch's default capture stream, replayed on two streams at once,
    many times: each has its own split-K counters and partial sums."""
    import flashsparse as fs

    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cuda")
    m, k = 4096, 4096
    w = random_weight(m, k, 0.7, torch.bfloat16, "uniform", seed=2, device="cuda")
    sw = Bitmap.encode(w)
    xs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n in (1, 8)]
    for x in xs:
        fs.linear(x, sw)  # warm-up (build, self-check)
    torch.cuda.synchronize()
    graphs = [_capture(lambda x=x: fs.linear(x, sw)) for x in xs]
    refs = [reference_linear(x, w) for x in xs]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(50):
        for (graph, _), stream in zip(graphs, streams, strict=True):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for (_, y), ref in zip(graphs, refs, strict=True):
        assert rel_err(y, ref) < RTOL[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_first_bitmap_call_inside_a_capture_raises_clearly_and_recovers():
    """With the extension loaded (a Tiled-CSL call ran), the first bitmap call inside a capture
    raises before any self-check, sync or allocation; the bitmap backend is not switched off,
    and after a warm-up call it captures and replays."""
    code = (
        "import torch, flashsparse as fs\n"
        "from flashsparse import backends\n"
        "w = (torch.randn(256, 512) * (torch.rand(256, 512) > 0.7)).half().cuda()\n"
        "x = torch.randn(1, 512, device='cuda', dtype=torch.float16)\n"
        "fs.linear(x, fs.encode(w, 'tiled_csl'))\n"
        "sw = fs.encode(w, 'bitmap')\n"
        "g = torch.cuda.CUDAGraph()\n"
        "try:\n"
        "    with torch.cuda.graph(g):\n"
        "        fs.linear(x, sw)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
        "ref = x.double() @ w.double().T\n"
        "y = fs.linear(x, sw)\n"
        "assert backends.select('bitmap', x).backend == 'cuda'\n"
        "assert float((y.double() - ref).norm() / ref.norm()) < 2e-3\n"
        "g = torch.cuda.CUDAGraph()\n"
        "with torch.cuda.graph(g):\n"
        "    out = fs.linear(x, sw)\n"
        "g.replay(); torch.cuda.synchronize()\n"
        "assert torch.equal(out, y)\n"
        "print('RECOVERED')\n"
    )
    env = {**os.environ, "FLASHSPARSE_BACKEND": "cuda"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    out = proc.stdout + proc.stderr
    assert "RAISED" in out and "CUDA-graph capture" in out and "RECOVERED" in out, out
