"""The CUDA Tiled-CSL kernel (csrc/): compile checks, a host emulation of its addressing, the
launch plan, the backend's behaviour without a GPU, and float64-reference checks on a GPU.

Without a GPU:
* every csrc/kernels/*.cu is compiled with plain nvcc for sm_80, sm_86 and sm_90a through
  .ci/compile_kernels.sh (no warnings, zero spill bytes);
* csrc/kernels/tiled_csl_emulator.cu replays the kernel block by block with the kernel's own
  index functions (tiled_csl_layout.cuh) and PTX models of ldmatrix/mma, on weights from the
  real encoder, checking bounds, alignment and shared-memory races on the way: per-tile word
  staging, the aligned-vector x path for any K, the in-kernel split-K reduction (blocks in a
  shuffled order), clamped malformed TileOffsets, word locations masked to their tile, the
  glue's size checks (``tcsl::problem_size_error``), and the scatter's bank conflicts (the
  encoder's word order against row-major);
* the launch plan (block tile by N, split-K until every SM has two blocks) for the benchmark
  shapes, the workspace policy (eager: cached per stream; under capture: owned by the graph),
  and the provider's reasons.
The ``gpu`` tests run the compiled kernel (FLASHSPARSE_BACKEND=cuda and the internal op).
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

import flashsparse as fs
from flashsparse import backends
from flashsparse.formats import TiledCSL
from flashsparse.kernels.cuda import extension, launch
from flashsparse.kernels.cuda import tiled_csl as tcsl

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "csrc" / "kernels"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")
HALF = (torch.float16, torch.bfloat16)
TILE_NS = (8, 16, 32, 64, 128)


# --- (a) plain-nvcc compile of every kernel for sm_80, sm_86 and sm_90a ------------------------
@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernel compile check needs the CUDA toolkit")
    out = tmp_path_factory.mktemp("kernels")
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "compile_kernels.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, out


@pytest.mark.slow
def test_kernels_compile_for_every_arch_without_warnings_or_spills(compile_report):
    proc, out = compile_report
    assert proc.returncode == 0, f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    rows = [line.split("\t") for line in (out / "report.tsv").read_text().splitlines() if line]
    for arch in ("sm_80", "sm_86", "sm_90a"):
        kernels = {row[1]: row for row in rows if row[0] == arch}
        spmm = sorted(name for name in kernels if name.startswith("tiled_csl_spmm_kernel<"))
        for _, tile_n, tile_m in tcsl.TILE_CONFIGS:
            for bf16 in ("false", "true"):
                assert (
                    sum(
                        f"TileConfig<{tile_m}, {tile_n}," in s and s.endswith(f"{bf16}>")
                        for s in spmm
                    )
                    == 1
                )
        assert len(spmm) == 2 * len(tcsl.TILE_CONFIGS)
        # split-K reduces inside the SpMM kernel: no second kernel exists
        assert not any("reduce" in name for name in kernels)
        for name, (_, _, regs, stores, loads, _) in kernels.items():
            assert (stores, loads) == ("0", "0"), f"{name} spills on {arch}"
            assert 0 < int(regs) <= 255, name


# --- (b) the host emulator: the kernel's addressing on real encoder output -----------------------
@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    if CXX is None:
        pytest.skip("no C++ compiler (g++/c++) to build the host emulator")
    exe = tmp_path_factory.mktemp("emulator") / "tiled_csl_emulator"
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
            str(KERNELS / "tiled_csl_emulator.cu"),
            "-o",
            str(exe),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return exe


def _write_problem(
    path: Path, words, offsets, x, bias, m, k, *, tile_n=0, split_k=1, misaligned_x=False
):
    n = x.shape[0]
    header = struct.pack(
        "<11i",
        0x4C534354,
        m,
        k,
        n,
        tile_n,
        split_k,
        int(misaligned_x),
        int(x.dtype == torch.bfloat16),
        int(bias is not None),
        offsets.numel(),
        words.numel(),
    )
    with open(path, "wb") as f:
        f.write(header)
        f.write(offsets.to(torch.int32).numpy().tobytes())
        f.write(words.to(torch.int32).numpy().tobytes())
        f.write(x.contiguous().view(torch.int16).numpy().tobytes())
        if bias is not None:
            f.write(bias.view(torch.int16).numpy().tobytes())


def _emulate(exe: Path, tmp_path: Path, w, x, bias=None, **launch) -> torch.Tensor:
    words, offsets = TiledCSL.encode(w).tensors
    path = tmp_path / "problem.bin"
    _write_problem(path, words, offsets, x, bias, *w.shape, **launch)
    proc = subprocess.run([str(exe), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    y = torch.frombuffer(
        bytearray((tmp_path / "problem.bin.out").read_bytes()), dtype=torch.float32
    )
    return y.view(x.shape[0], w.shape[0])


# (m, k, n, sparsity, mask kind, tile_n (0: by N), split_k, misaligned x rows, bias)
_EMULATED = [
    (130, 200, 1, 0.5, "dense_tiles", 0, 1, False, True),  # N=1, 100 %-dense tile, half-empty block
    (130, 200, 7, 0.7, "empty_tiles", 0, 4, False, False),  # split-K: one k tile per split
    (300, 77, 8, 0.5, "dense_column", 0, 1, False, True),  # k % 8 != 0: scalar x path
    (257, 136, 16, 0.9, "row_skewed", 0, 3, True, True),  # unaligned x pointer, 3 storage rows
    (129, 192, 33, 0.0, "uniform", 0, 2, False, False),  # 100 % dense: several chunks per tile
    (256, 128, 5, 0.0, "uniform", 0, 1, False, True),  # two dense tiles in a 256-row block
    (64, 72, 64, 1.0, "uniform", 0, 1, False, True),  # all-zero weight: bias only
    (200, 130, 128, 0.6, "dense_rows", 0, 2, False, True),
    (70, 64, 300, 0.8, "dense_tiles", 0, 2, False, True),  # N=300, one k tile (split -> 1)
    (513, 65, 1, 0.95, "uniform", 0, 2, True, False),
    (1, 1, 1, 0.0, "uniform", 0, 1, False, True),
    (150, 100, 21, 0.6, "dense_tiles", 8, 2, False, True),  # every tile width on one shape
    (150, 100, 21, 0.6, "empty_tiles", 16, 1, True, False),
    (150, 100, 21, 0.6, "dense_column", 32, 2, False, True),
    (150, 100, 21, 0.6, "row_skewed", 64, 1, True, True),
    (150, 100, 21, 0.6, "dense_rows", 128, 2, False, False),
]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    ("m", "k", "n", "sparsity", "kind", "tile_n", "split_k", "misaligned", "with_bias"), _EMULATED
)
def test_emulated_kernel_matches_float64(
    emulator, tmp_path, m, k, n, sparsity, kind, tile_n, split_k, misaligned, with_bias, dtype
):
    w, x, bias = linear_problem(m, k, n, sparsity, kind, dtype, seed=m + k + n)
    bias = bias if with_bias else None
    y = _emulate(
        emulator, tmp_path, w, x, bias, tile_n=tile_n, split_k=split_k, misaligned_x=misaligned
    )
    check_exact(y, x, w, bias)


@pytest.mark.slow
def test_emulated_kernel_every_tile_density(emulator, tmp_path):
    """Storage tiles from 0 % to 100 % dense in one weight, through both block heights."""
    m, k = 384, 320  # 3 x 5 storage tiles
    g = torch.Generator().manual_seed(7)
    w = torch.randn(m, k, generator=g)
    densities = torch.linspace(0, 1, 15).view(3, 5)
    for i in range(3):
        for j in range(5):
            keep = torch.rand(128, 64, generator=g) < densities[i, j]
            w[i * 128 : (i + 1) * 128, j * 64 : (j + 1) * 64] *= keep
    w = w.to(torch.bfloat16)
    x = torch.randn(9, k, generator=g).to(torch.bfloat16)
    for tile_n, split_k in ((16, 1), (64, 2)):
        check_exact(_emulate(emulator, tmp_path, w, x, tile_n=tile_n, split_k=split_k), x, w)


@pytest.mark.slow
def test_emulated_kernel_random_shapes(emulator, tmp_path):
    rng = random.Random(1234)
    for case in range(6):
        m, k, n = rng.randint(1, 300), rng.randint(1, 260), rng.randint(1, 140)
        w, x, bias = linear_problem(
            m,
            k,
            n,
            rng.choice([0.0, 0.5, 0.9, 1.0]),
            rng.choice(["uniform", "dense_tiles", "empty_tiles"]),
            torch.float16,
            seed=case,
        )
        y = _emulate(
            emulator,
            tmp_path,
            w,
            x,
            bias,
            tile_n=rng.choice((0, *TILE_NS)),
            split_k=rng.randint(1, 5),
            misaligned_x=rng.random() < 0.5,
        )
        check_exact(y, x, w, bias)


@pytest.mark.slow
def test_emulator_bounds_checks_are_live(emulator, tmp_path):
    """A problem whose words array is shorter than a well-formed TileOffsets claims: the kernel
    clamps every tile range to the words it is given (no read past them), and the emulator's
    checks would report a read past them (checked by truncating the words' vector count in
    the file header only, so the clamp sees the full count)."""
    w, x, _ = linear_problem(130, 70, 3, 0.5, "uniform", torch.float16, seed=3)
    words, offsets = TiledCSL.encode(w).tensors
    path = tmp_path / "short.bin"
    _write_problem(path, words[:-4], offsets, x, None, 130, 70)
    proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True)
    # The last tile loses its last vector: clamped, so no out-of-bounds read and exit 0 ...
    assert proc.returncode == 0, proc.stderr
    y = torch.frombuffer(bytearray((tmp_path / "short.bin.out").read_bytes()), dtype=torch.float32)
    # ... but the result differs from the full weight's (the clamp really dropped words).
    full = _emulate(emulator, tmp_path, w, x)
    assert not torch.equal(y.view(3, 130), full)


@pytest.mark.slow
def test_emulator_clamps_malformed_tile_offsets(emulator, tmp_path):
    """Offsets past the words, negative, decreasing or huge read nothing outside the words."""
    w, x, _ = linear_problem(300, 200, 5, 0.6, "uniform", torch.bfloat16, seed=4)
    words, offsets = TiledCSL.encode(w).tensors
    for case, bad in enumerate(
        [
            offsets + 1,
            offsets - 3,
            torch.full_like(offsets, 2**30),
            offsets.flip(0),
            torch.where(torch.arange(offsets.numel()) % 2 == 0, offsets, -offsets),
        ]
    ):
        path = tmp_path / f"bad{case}.bin"
        _write_problem(path, words, bad, x, None, 300, 200, split_k=2, misaligned_x=True)
        # overlapping ranges scatter to the same element twice: wrong data, not a memory error
        env = {**os.environ, "TCSL_EMU_ALLOW_RACES": "1"}
        proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, (case, proc.stderr)


@pytest.mark.slow
def test_emulator_masks_malformed_word_locations(emulator, tmp_path):
    """Words whose location is past the 128 x 64 tile (the encoder never writes one; foreign or
    corrupted words can) scatter to location & 8191, inside their own tile's buffer: wrong data,
    never a write into other shared memory (the emulator checks every access's bounds)."""
    import numpy as np

    w, x, _ = linear_problem(300, 200, 5, 0.6, "uniform", torch.float16, seed=6)
    words, offsets = TiledCSL.encode(w).tensors
    raw = words.numpy().view(np.uint32)
    g = np.random.default_rng(0)
    picked = g.choice(raw.size, size=raw.size // 7, replace=False)
    # (1) the location plus a multiple of 8192: masked back to itself, so the result is exact
    high = raw.copy()
    high[picked] |= np.uint32(0xE000) << np.uint32(16)
    # (2) any 16-bit location: a wrong element of the same tile (overlapping writes: a race in
    # the data, not a memory error)
    garbage = raw.copy()
    garbage[picked] = (raw[picked] & np.uint32(0xFFFF)) | (
        g.integers(0, 1 << 16, picked.size).astype(np.uint32) << np.uint32(16)
    )
    env = {**os.environ, "TCSL_EMU_ALLOW_RACES": "1"}
    results = []
    for name, bad in (("high", high), ("garbage", garbage)):
        path = tmp_path / f"{name}.bin"
        _write_problem(
            path, torch.from_numpy(bad.view(np.int32)), offsets, x, None, 300, 200, split_k=2
        )
        proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        fields = Path(f"{path}.stats").read_text().split()
        stats = {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
        out_of_tile = int(((bad[picked] >> np.uint32(16)) >= 8192).sum())
        assert stats["bad_locations"] == out_of_tile > 0
        y = torch.frombuffer(bytearray(Path(f"{path}.out").read_bytes()), dtype=torch.float32)
        results.append(y.view(5, 300))
    check_exact(results[0], x, w)
    assert not torch.allclose(results[1], results[0], equal_nan=True)


def _patch_header(path: Path, field: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[4 * field : 4 * field + 4] = struct.pack("<i", value)
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_emulator_runs_the_glue_size_checks(emulator, tmp_path):
    """tcsl::problem_size_error, which the torch glue runs before every launch (it cannot read
    the words' locations without a sync: the kernel masks those), rejects malformed sizes with a
    message naming the tensor; the emulator exits 3 with it."""
    w, x, _ = linear_problem(300, 200, 5, 0.6, "uniform", torch.float16, seed=6)
    words, offsets = TiledCSL.encode(w).tensors
    tiles = offsets.numel() - 2  # 3 x 4 storage tiles
    cases = {
        "more than 12 dense 128x64 tiles hold": dict(
            words=torch.cat([words, torch.zeros(tiles * 8192, dtype=words.dtype)])
        ),
        "tile_offsets must have 14 entries": dict(offsets=offsets[:-1]),
        "words must hold whole 4-word vectors": dict(words=words[:-1]),
        "tile_n must be 0 (by N), 8, 16, 32, 64 or 128, got 24": dict(tile_n=24),
        "split_k must be >= 1, got 0": dict(split_k=0),
    }
    for message, change in cases.items():
        args = {"words": words, "offsets": offsets, **change}
        launch_args = {k: args.pop(k) for k in ("tile_n", "split_k") if k in args}
        path = tmp_path / "bad.bin"
        _write_problem(path, args["words"], args["offsets"], x, None, 300, 200, **launch_args)
        proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True)
        assert proc.returncode == 3 and message in proc.stderr, (message, proc.stderr)
    # N past what a block index plus a tile offset can address in int (grid-size overflow)
    path = tmp_path / "huge.bin"
    _write_problem(path, words, offsets, x, None, 300, 200)
    _patch_header(path, 3, 2**31 - 1)
    proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True)
    assert proc.returncode == 3 and "rows; at most 2147483392" in proc.stderr, proc.stderr


def _emulate_many(exe: Path, tmp_path: Path, cases) -> list[tuple[torch.Tensor, dict[str, int]]]:
    """Run several problems in one emulator process: [(y, scatter stats)]."""
    paths = []
    for i, (w, x, bias, launch_args) in enumerate(cases):
        words, offsets = TiledCSL.encode(w).tensors
        path = tmp_path / f"p{i}.bin"
        _write_problem(path, words, offsets, x, bias, *w.shape, **launch_args)
        paths.append(path)
    proc = subprocess.run([str(exe), *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = []
    for (w, x, _, _), path in zip(cases, paths, strict=True):
        y = torch.frombuffer(bytearray(Path(f"{path}.out").read_bytes()), dtype=torch.float32)
        fields = Path(f"{path}.stats").read_text().split()
        stats = {fields[i]: int(fields[i + 1]) for i in range(0, len(fields), 2)}
        out.append((y.view(x.shape[0], w.shape[0]), stats))
    return out


@pytest.mark.slow
def test_emulated_kernel_fuzz(emulator, tmp_path):
    """Random tile densities 0-100 %, N 1-300, odd M/K, fp16/bf16, split-K, both x paths."""
    rng = random.Random(20261123)
    cases = []
    for case in range(10):
        m, k = rng.randint(1, 400), rng.randint(1, 300)
        n = rng.choice([1, 2, 7, 8, 9, 16, 17, 31, 32, 33, 64, 65, 128, 129, 300])
        dtype = rng.choice(HALF)
        g = torch.Generator().manual_seed(case)
        w = torch.randn(m, k, generator=g)
        # every 128 x 64 storage tile gets its own density in [0, 1]
        tiles_m, tiles_k = -(-m // 128), -(-k // 64)
        density = torch.rand(tiles_m, tiles_k, generator=g)
        density[torch.rand(tiles_m, tiles_k, generator=g) < 0.2] = 1.0
        per_elem = density.repeat_interleave(128, 0).repeat_interleave(64, 1)[:m, :k]
        w = (w * (torch.rand(m, k, generator=g) < per_elem)).to(dtype)
        x = torch.randn(n, k, generator=g).to(dtype)
        bias = torch.randn(m, generator=g).to(dtype) if rng.random() < 0.5 else None
        launch = {
            "tile_n": rng.choice((0, *TILE_NS)),
            "split_k": rng.choice([1, 1, 2, 3, 5, 1000]),
            "misaligned_x": rng.random() < 0.4,
        }
        cases.append((w, x, bias, launch))
    for (w, x, bias, _), (y, _) in zip(
        cases, _emulate_many(emulator, tmp_path, cases), strict=True
    ):
        check_exact(y, x, w, bias)


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_encoder_word_order_makes_the_scatter_conflict_free(emulator, tmp_path, sparsity):
    """Shared-memory wavefronts per warp-wide 16-bit scatter store, as the emulator counts them
    for the encoder's word order, against the same words in row-major order (the old layout,
    which the kernel still reads correctly)."""
    w, x, _ = linear_problem(512, 256, 8, sparsity, "uniform", torch.float16, seed=11)
    sw = TiledCSL.encode(w)
    words, offsets = sw.tensors
    # row-major order within each tile: sort each tile's words by unswizzled location
    loc = (words >> 16) & 0xFFFF
    row = loc >> 6
    natural = (loc & ~63) | ((loc & 63) ^ ((row & 7) << 3))
    tile = torch.repeat_interleave(
        torch.arange(offsets.numel() - 2), (offsets[1:-1] - offsets[:-2]).long() * 4
    )
    row_major = words[torch.argsort(tile * 8192 + natural, stable=True)]
    results = []
    for i, wd in enumerate((words, row_major)):
        path = tmp_path / f"order{i}.bin"
        _write_problem(path, wd, offsets, x, None, 512, 256)
        proc = subprocess.run([str(emulator), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        y = torch.frombuffer(bytearray(Path(f"{path}.out").read_bytes()), dtype=torch.float32)
        check_exact(y.view(8, 512), x, w)
        fields = Path(f"{path}.stats").read_text().split()
        results.append(int(fields[3]) / int(fields[1]))
    ordered, natural_order = results
    print(
        f"sparsity {sparsity}: {ordered:.2f} wavefronts per scatter store (row-major: {natural_order:.2f})"
    )
    assert ordered < 0.45 * natural_order
    # Bounds a little above the emulated figures in
    # bench/results/tiled-csl-scatter-wavefronts-emulated-2026-12-03.md: a regression of the
    # encoder's word order fails here.
    assert ordered <= {0.5: 1.10, 0.7: 1.18, 0.9: 1.45}[sparsity]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("n", "k", "split"),
    [
        (1, 64, 1),
        (8, 200, 4),
        (9, 4096, 14),
        (33, 4096, 100),
        (64, 77, 2),
        (65, 10**5, 70000),
        (300, 1, 3),
    ],
)
def test_python_plan_mirrors_the_cuda_layout(emulator, n, k, split):
    out = subprocess.run(
        [str(emulator), "--plan", str(n), str(k), str(split)],
        capture_output=True,
        text=True,
        check=True,
    )
    tile_n, tile_m, eff = map(int, out.stdout.split())
    assert tcsl.tile_config(n) == (tile_m, tile_n)
    assert launch.effective_split(-(-k // 64), split) == eff


# --- (c) the launch plan -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, (256, 8)),
        (8, (256, 8)),
        (9, (256, 16)),
        (16, (256, 16)),
        (17, (256, 32)),
        (32, (256, 32)),
        (33, (128, 64)),
        (64, (128, 64)),
        (65, (128, 128)),
        (300, (128, 128)),
        (10**7, (128, 128)),
    ],
)
def test_tile_config_by_n(n, expected):
    assert tcsl.tile_config(n) == expected


_PLAN_SHAPES = [  # (m = out_features, k = in_features)
    (6144, 4096),
    (4096, 4096),
    (28672, 4096),
    (4096, 14336),  # Llama-3-8B
    (27648, 9216),
    (9216, 9216),
    (36864, 9216),
    (9216, 36864),  # OPT-66B
]


@pytest.mark.parametrize(("m", "k"), _PLAN_SHAPES)
def test_launch_plan_gives_every_sm_two_blocks(m, k):
    for n in (1, 2, 8, 9, 16, 17, 32):
        for sparsity in (0.5, 0.7, 0.9):
            weight_bytes = int(m * k * (1 - sparsity)) * 4
            plan = tcsl.tiled_csl_launch_plan(m, k, n, num_sms=132, weight_bytes=weight_bytes)
            tile_m, tile_n = tcsl.tile_config(n)
            assert (plan["tile_m"], plan["tile_n"]) == (tile_m, tile_n)
            blocks = -(-n // tile_n) * -(-m // tile_m)
            k_tiles = -(-k // 64)
            split = plan["split_k"]
            assert plan["ctas"] == blocks * split >= 2 * 132
            assert plan["persistent"] is False
            assert launch.effective_split(k_tiles, split) == split  # what the kernel runs
            # the smallest split reaching two blocks per SM is at most 1.5x smaller
            smallest = min(
                s
                for s in range(1, k_tiles + 1)
                if blocks * launch.effective_split(k_tiles, s) >= 264
            )
            assert launch.effective_split(k_tiles, smallest) <= split <= 2 * smallest


def test_launch_plan_edge_cases():
    # enough blocks already: no split
    assert tcsl.tiled_csl_launch_plan(36864, 9216, 128)["split_k"] == 1
    # k shorter than the splits wanted: one k tile per split
    assert tcsl.tiled_csl_launch_plan(256, 200, 1)["split_k"] == 4
    assert tcsl.tiled_csl_launch_plan(1, 1, 1) == {
        "ctas": 1,
        "split_k": 1,
        "persistent": False,
        "tile_m": 256,
        "tile_n": 8,
    }
    # n > 32: the partial sums may not cost more traffic than the weight
    plan = tcsl.tiled_csl_launch_plan(4096, 4096, 128, weight_bytes=4 * 4096 * 4096 // 10)
    assert 8 * 128 * 4096 * plan["split_k"] <= 4 * 4096 * 4096 // 10
    for bad in ({"m": 0}, {"k": -1}, {"n": 0}, {"num_sms": 0}, {"ctas_per_sm": 0}):
        args = {"m": 64, "k": 64, "n": 1, **bad}
        with pytest.raises(ValueError, match=next(iter(bad))):
            tcsl.tiled_csl_launch_plan(args.pop("m"), args.pop("k"), args.pop("n"), **args)
    with pytest.raises(ValueError, match="weight_bytes"):
        tcsl.tiled_csl_launch_plan(64, 64, 1, weight_bytes=-1)


def test_workspace_elems():
    assert tcsl.tiled_csl_workspace_elems(4096, 1, 8, 1) == 0
    # 16 counters (one per 256-row block), then 22 x 1 x 4096 floats
    assert tcsl.tiled_csl_workspace_elems(4096, 1, 8, 22) == 16 + 22 * 4096
    # 3 x 3 output tiles (130 / 64, 300 / 128) -> 9 counters, rounded up to 12
    assert tcsl.tiled_csl_workspace_elems(300, 130, 64, 2) == 12 + 2 * 130 * 300


def test_workspaces_under_capture_belong_to_the_graph(monkeypatch):
    """Eager calls share one workspace per (device, stream), grown when too small; every call
    under CUDA-graph capture gets its own from the graph's pool (counters zeroed by a captured
    memset), never cached: another graph captured on the same stream, or an eager call, may
    run while this graph replays. (CUDA stubbed: CPU tensors stand in for device memory.)"""
    state = {"capturing": False, "stream": 7}

    class Stream:
        @property
        def cuda_stream(self):
            return state["stream"]

    monkeypatch.setattr(extension, "capturing", lambda index: state["capturing"])
    monkeypatch.setattr(torch.cuda, "current_stream", lambda index=None: Stream())
    monkeypatch.setattr(tcsl, "_workspaces", {})
    dev = torch.device("cpu", 0)
    eager = tcsl._workspace(dev, 1000, 5)
    assert tcsl._workspace(dev, 1000, 5) is eager and int(eager.abs().sum()) == 0
    state["capturing"] = True
    first, second = tcsl._workspace(dev, 1000, 5), tcsl._workspace(dev, 1000, 5)
    assert first is not eager and first.data_ptr() != second.data_ptr()
    assert first.numel() == 1000 and int(first[:8].abs().sum()) == 0  # counters, rounded to 16 B
    assert list(tcsl._workspaces.values()) == [eager]
    state["capturing"] = False
    grown = tcsl._workspace(dev, 5000, 5)
    assert grown.numel() >= 5000 and grown is not eager and first.numel() == 1000
    state["stream"] = 8
    assert tcsl._workspace(dev, 1000, 5) is not grown


def test_tile_config_rejects_n_below_one():
    with pytest.raises(ValueError, match="n must be >= 1"):
        tcsl.tile_config(0)


def test_effective_split_never_leaves_a_split_empty():
    for k_tiles in range(1, 70):
        for split in range(1, 80):
            eff = launch.effective_split(k_tiles, split)
            per = -(-k_tiles // eff)
            assert 1 <= eff <= min(split, k_tiles)
            assert (eff - 1) * per < k_tiles <= eff * per  # the last split owns >= 1 k tile
            assert launch.effective_split(k_tiles, eff) == eff  # what the op receives is stable


def test_wave_efficiency():
    assert launch.wave_efficiency(264, 264) == 1.0
    assert launch.wave_efficiency(265, 264) == pytest.approx(265 / 528)
    assert launch.wave_efficiency(1, 132) == pytest.approx(1 / 132)
    with pytest.raises(ValueError):
        launch.wave_efficiency(0, 132)


def test_split_k_examples():
    # Enough blocks already: no split.
    assert launch.choose_split_k(blocks=448, k_tiles=64, slots=264) == 1
    # 16 blocks on 264 slots: split 13 reaches 0.79, split 16 (4 k tiles each) 0.97.
    assert launch.choose_split_k(blocks=16, k_tiles=64, slots=264) == 16
    # One block, three k tiles: as many splits as k tiles.
    assert launch.choose_split_k(blocks=1, k_tiles=3, slots=264) == 3
    # Tail effect: 300 blocks on 264 slots (0.57) -> 3 splits (0.85).
    assert launch.choose_split_k(blocks=300, k_tiles=144, slots=264) == 3
    # ... unless the fp32 workspace traffic would exceed a quarter of the weight's bytes.
    assert (
        launch.choose_split_k(
            blocks=300,
            k_tiles=144,
            slots=264,
            workspace_bytes_per_split=8 * 128 * 38400,
            weight_bytes=4 * 38400 * 9216 // 5,
        )
        == 1
    )


def test_split_k_is_the_smallest_efficient_effective_split():
    rng = random.Random(0)
    for _ in range(300):
        blocks, k_tiles, slots = (
            rng.randint(1, 600),
            rng.randint(1, 200),
            rng.choice([108, 132, 216, 264, 396]),
        )
        split = launch.choose_split_k(blocks, k_tiles, slots)
        candidates = sorted({launch.effective_split(k_tiles, s) for s in range(1, k_tiles + 1)})
        assert split in candidates
        effs = {s: launch.wave_efficiency(blocks * s, slots) for s in candidates}
        good = [s for s in candidates if effs[s] >= launch.WAVE_TARGET]
        if good:
            assert split == good[0]
        else:
            assert effs[split] == max(effs.values())


# --- (d) the provider on this machine -----------------------------------------------------------
def test_kernel_sources_are_the_extension_translation_units():
    names = [p.name for p in extension.kernel_sources()]
    assert "tiled_csl_cuda.cpp" in names  # glue (csrc/bindings/*_cuda.cpp) comes first
    assert all(n.endswith(".cpp") for n in names[: names.index("tiled_csl_cuda.cpp") + 1])
    assert {"tiled_csl_f16.cu", "tiled_csl_bf16.cu", "tiled_csl_api.cu"} <= set(names)
    assert not any(name.endswith("_emulator.cu") for name in names)
    assert all(p.is_file() for p in extension.kernel_sources())


def test_gencode_flags():
    assert extension.gencode_flags("8.0;9.0a") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
    ]
    assert extension.gencode_flags("8.6+PTX") == [
        "-gencode=arch=compute_86,code=sm_86",
        "-gencode=arch=compute_86,code=compute_86",
    ]
    with pytest.raises(ValueError, match=r"compute capability >= 8.0"):
        extension.gencode_flags("7.5")
    with pytest.raises(ValueError, match="must look like"):
        extension.gencode_flags("sm_80")
    with pytest.raises(ValueError, match="empty"):
        extension.gencode_flags(" ; ")


def test_supports_refuses_fp32_and_cpu_tensors():
    assert "float16 or bfloat16" in tcsl._supports(torch.device("cuda", 0), torch.float32)
    assert "CUDA tensors" in tcsl._supports(torch.device("cpu"), torch.float16)


def test_forced_cuda_backend_on_cpu_tensors_raises_a_clear_error(backend):
    backend("cuda")
    w = random_weight(70, 40, 0.5, torch.float16)
    sw = fs.encode(w, "tiled_csl")
    with pytest.raises(
        backends.BackendUnavailableError, match=r"FLASHSPARSE_BACKEND=cuda .*runs on CUDA tensors"
    ):
        fs.linear(torch.randn(3, 40, dtype=torch.float16), sw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons given without a GPU")
def test_unavailable_reason_without_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(tmp_path))
    reason = extension.unavailable_reason()
    if torch.version.cuda is None:
        assert reason.startswith("torch is a CPU-only build")
    else:
        assert reason.startswith("no CUDA device")
    assert tcsl.available() == reason  # nothing is built ...
    assert not any(tmp_path.iterdir())  # ... and nothing is written to the cache
    assert backends.backend_report()["cuda"] == reason
    assert "cuda" not in fs.available_backends()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the error of a CPU-only torch")
def test_setup_py_refuses_a_cpu_only_torch_clearly():
    env = {**os.environ, "FLASHSPARSE_CUDA": "1"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "CPU-only build" in proc.stderr


# --- (e) on a GPU -------------------------------------------------------------------------------
gpu = pytest.mark.gpu
_N_VALUES = (1, 7, 8, 16, 33, 64, 128, 300)


def _gpulinear_problem(m, k, n, sparsity, kind, dtype, seed=0, bias=True):
    w = random_weight(m, k, sparsity, dtype, kind, seed=seed, device="cuda")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, k, generator=g).to(device="cuda", dtype=dtype)
    b = torch.randn(m, generator=g).to(device="cuda", dtype=dtype) if bias else None
    return w, x, b


def _assert_close(y, x, w, b=None):
    ref = reference_linear(x, w, b)
    assert y.shape == ref.shape and y.dtype == x.dtype and y.device == x.device
    assert not torch.isnan(y).any()
    assert rel_err(y, ref) < RTOL[x.dtype]


@gpu
def test_gpu_backend_is_available_and_self_checked():
    assert tcsl.available() is None
    assert "cuda" in fs.available_backends()
    for tile_n in TILE_NS:
        for bf16 in (False, True):
            assert torch.ops.flashsparse._tiled_csl_cuda_occupancy(tile_n, bf16) >= 1


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("n", _N_VALUES)
@pytest.mark.parametrize(("m", "k"), [(300, 200), (257, 77)])  # aligned / unaligned x rows
@pytest.mark.parametrize("kind", ["dense_tiles", "empty_tiles", "dense_column"])
def test_gpu_flashsparse_linear_matches_float64(backend, kind, m, k, n, dtype):
    backend("cuda")
    w, x, b = _gpulinear_problem(m, k, n, 0.7, kind, dtype, seed=n)
    _assert_close(fs.linear(x, fs.encode(w, "tiled_csl"), b), x, w, b)


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("tile_n", TILE_NS)
@pytest.mark.parametrize("split_k", [1, 2, 3, 7, 1000])
def test_gpu_forced_tile_and_split_are_correct_and_deterministic(tile_n, split_k, dtype):
    m, k, n = 333, 1000, 45
    w, x, b = _gpulinear_problem(m, k, n, 0.8, "row_skewed", dtype, seed=tile_n + split_k)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    op = torch.ops.flashsparse._tiled_csl_spmm_cuda
    y = op(x, words, offsets, m, k, b, split_k, tile_n)
    _assert_close(y, x, w, b)
    assert torch.equal(y, op(x, words, offsets, m, k, b, split_k, tile_n))


@gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_gpu_every_tile_density(dtype):
    m, k = 640, 448  # 5 x 7 storage tiles, densities 0 .. 100 %
    g = torch.Generator().manual_seed(5)
    w = torch.randn(m, k, generator=g)
    densities = torch.linspace(0, 1, 35).view(5, 7)
    for i in range(5):
        for j in range(7):
            w[i * 128 : (i + 1) * 128, j * 64 : (j + 1) * 64] *= (
                torch.rand(128, 64, generator=g) < densities[i, j]
            )
    w = w.to(device="cuda", dtype=dtype)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    for n in (1, 16, 100):
        x = torch.randn(n, k, generator=g).to(device="cuda", dtype=dtype)
        for tile_n in TILE_NS:
            for split in (1, 3):
                y = torch.ops.flashsparse._tiled_csl_spmm_cuda(
                    x, words, offsets, m, k, None, split, tile_n
                )
                _assert_close(y, x, w)


@gpu
def test_gpu_unaligned_x_pointer():
    m, k, n = 200, 96, 5  # k % 8 == 0, but x starts 2 bytes into its storage
    w, _, b = _gpulinear_problem(m, k, n, 0.5, "dense_tiles", torch.float16)
    x = torch.randn(n * k + 1, device="cuda", dtype=torch.float16)[1:].view(n, k)
    assert x.data_ptr() % 16 != 0
    words, offsets = fs.encode(w, "tiled_csl").tensors
    y = torch.ops.flashsparse._tiled_csl_spmm_cuda(x, words, offsets, m, k, b, 2, 0)
    _assert_close(y, x, w, b)


@gpu
@pytest.mark.parametrize("n", [1, 16])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_gpu_llama_shape_uses_split_k(backend, n, dtype):
    backend("cuda")
    m = k = 4096
    w, x, b = _gpulinear_problem(m, k, n, 0.7, "row_skewed", dtype)
    sw = fs.encode(w, "tiled_csl")
    split, tile_n = tcsl._plan(
        torch.cuda.current_device(), dtype == torch.bfloat16, n, m, k, sw.tensors[0].numel()
    )
    assert split > 1 and tile_n == tcsl.tile_config(n)[1]
    _assert_close(fs.linear(x, sw, b), x, w, b)


@gpu
def test_gpu_nan_and_inf_propagate_like_f_linear(backend):
    backend("cuda")
    w, x, _ = _gpulinear_problem(150, 100, 6, 0.5, "uniform", torch.float16, bias=False)
    w[3, 10] = float("nan")
    x[2, 50] = float("inf")
    y = fs.linear(x, fs.encode(w, "tiled_csl"))
    ref = F.linear(x.float(), w.float())
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


@gpu
def test_gpu_three_d_and_strided_x(backend):
    backend("cuda")
    w, _, b = _gpulinear_problem(130, 72, 1, 0.6, "dense_rows", torch.bfloat16)
    x = torch.randn(2, 5, 144, device="cuda", dtype=torch.bfloat16)[..., ::2]
    y = fs.linear(x, fs.encode(w, "tiled_csl"), b)
    assert y.shape == (2, 5, 130)
    _assert_close(y.reshape(10, 130), x.reshape(10, 72), w, b)


@gpu
def test_gpu_opcheck():
    w, x, b = _gpulinear_problem(130, 200, 3, 0.6, "dense_tiles", torch.float16)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    torch.library.opcheck(
        torch.ops.flashsparse._tiled_csl_spmm_cuda.default, (x, words, offsets, 130, 200, b, 2, 0)
    )


@gpu
def test_gpu_cuda_graph_capture_with_split_k(backend):
    backend("cuda")
    m, k, n = 1024, 4096, 1
    w, x, b = _gpulinear_problem(m, k, n, 0.8, "uniform", torch.float16)
    sw = fs.encode(w, "tiled_csl")
    assert tcsl._plan(torch.cuda.current_device(), False, n, m, k, sw.tensors[0].numel())[0] > 1
    static_x = x.clone()
    fs.linear(static_x, sw, b)  # warm-up outside the capture (build, self-check, attributes)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fs.linear(static_x, sw, b)
    for seed in range(3):
        static_x.copy_(
            torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(
                "cuda", torch.float16
            )
        )
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(static_y, static_x, w, b)


@gpu
def test_gpu_torch_compile_fullgraph(backend):
    backend("cuda")
    torch._dynamo.reset()
    w1 = random_weight(256, 192, 0.7, torch.bfloat16, device="cuda")
    w2 = random_weight(64, 256, 0.7, torch.bfloat16, "dense_tiles", device="cuda")
    b2 = torch.randn(64, device="cuda", dtype=torch.bfloat16)
    model = torch.nn.Sequential(
        fs.SparseLinear.from_dense(w1, format="tiled_csl"),
        torch.nn.GELU(),
        fs.SparseLinear.from_dense(w2, b2, format="tiled_csl"),
    )
    x = torch.randn(3, 7, 192, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(F.gelu(F.linear(x.float(), w1.float())), w2.float(), b2.float())
    y = torch.compile(model, fullgraph=True)(x)
    assert y.shape == (3, 7, 64) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < RTOL[torch.bfloat16]


@gpu
def test_gpu_raw_op_validates_every_tensor():
    m, k, n = 200, 130, 3
    w, x, b = _gpulinear_problem(m, k, n, 0.6, "uniform", torch.float16)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    op = torch.ops.flashsparse._tiled_csl_spmm_cuda
    words64 = fs.encode(w.float(), "tiled_csl").tensors[0]
    with pytest.raises(RuntimeError, match="words are int64"):
        op(x, words64, offsets, m, k, b)
    with pytest.raises(RuntimeError, match="tile_offsets must have"):
        op(x, words, offsets[:-1].contiguous(), m, k, b)
    with pytest.raises(RuntimeError, match="words must be contiguous"):
        op(x, torch.stack([words, words], 1).view(-1)[::2], offsets, m, k, b)
    shifted = torch.empty(words.numel() + 4, dtype=torch.int32, device="cuda")[
        1 : 1 + words.numel()
    ]
    shifted.copy_(words)
    with pytest.raises(RuntimeError, match="16 bytes aligned"):
        op(x, shifted, offsets, m, k, b)
    with pytest.raises(RuntimeError, match="whole 4-word vectors"):
        op(x, words[:-1], offsets, m, k, b)
    with pytest.raises(RuntimeError, match="bias must be"):
        op(x, words, offsets, m, k, b.float())
    with pytest.raises(RuntimeError, match="tile_offsets must be Int"):
        op(x, words, offsets.long(), m, k, b)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        op(x.cpu(), words, offsets, m, k, b)
    with pytest.raises(RuntimeError, match="words is on cpu"):
        op(x, words.cpu(), offsets, m, k, b)
    small = torch.zeros(8, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="workspace must hold at least"):
        op(x, words, offsets, m, k, b, 2, 0, small)


@gpu
def test_gpu_split_k_workspace_is_cached_and_left_zeroed(backend):
    backend("cuda")
    m, k, n = 4096, 4096, 8
    w, x, b = _gpulinear_problem(m, k, n, 0.7, "uniform", torch.float16)
    sw = fs.encode(w, "tiled_csl")
    ys = [fs.linear(x, sw, b) for _ in range(3)]
    torch.cuda.synchronize()
    assert all(torch.equal(ys[0], y) for y in ys[1:])  # deterministic split-K
    _assert_close(ys[0], x, w, b)
    key = (x.device.index, torch.cuda.current_stream().cuda_stream)
    ws = tcsl._workspaces[key]
    ptr = ws.data_ptr()
    fs.linear(x, sw, b)
    assert tcsl._workspaces[key].data_ptr() == ptr  # reused, not reallocated
    torch.cuda.synchronize()
    counters = -(-n // 8) * -(-m // 256)
    assert int(ws[:counters].abs().sum()) == 0  # every counter back at zero


@gpu
def test_gpu_malformed_word_locations_stay_inside_the_tile():
    """Words with locations past the tile (foreign or corrupted words) give wrong numbers, not
    an illegal-address fault or a write into another buffer: the kernel masks each location."""
    m, k, n = 300, 256, 9
    w, x, b = _gpulinear_problem(m, k, n, 0.6, "uniform", torch.float16)
    words, offsets = fs.encode(w, "tiled_csl").tensors
    bad = words.clone()
    bad[::3] |= 0x7FFF0000  # every third word: location 32767 (and the sign bit stays clear)
    canary = torch.full((1 << 20,), 7.0, device="cuda")
    op = torch.ops.flashsparse._tiled_csl_spmm_cuda
    for split_k, tile_n in ((1, 0), (3, 8), (2, 64)):
        op(x, bad, offsets, m, k, b, split_k, tile_n)
    torch.cuda.synchronize()  # an illegal address would surface here
    assert bool((canary == 7.0).all())
    _assert_close(op(x, words, offsets, m, k, b), x, w, b)  # the context is healthy


@gpu
def test_gpu_graph_keeps_its_workspace_while_eager_calls_grow_theirs(backend):
    """Eager call on stream s, capture on s, then eager calls with growing N on s (the eager
    workspace is regrown, its old buffer freed and reused by other tensors): the graph's
    split-K workspace is its own, so its replays stay correct."""
    backend("cuda")
    m, k = 4096, 4096
    w, _, b = _gpulinear_problem(m, k, 1, 0.7, "row_skewed", torch.float16)
    sw = fs.encode(w, "tiled_csl")
    assert tcsl._plan(torch.cuda.current_device(), False, 1, m, k, sw.tensors[0].numel())[0] > 1
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fs.linear(x, sw, b)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        y = fs.linear(x, sw, b)
    with torch.cuda.stream(s):
        for n in (8, 16, 32, 64, 128, 300):
            fs.linear(torch.randn(n, k, device="cuda", dtype=torch.float16), sw, b)
        junk = [torch.full((1 << 22,), float("nan"), device="cuda") for _ in range(8)]
    torch.cuda.synchronize()
    del junk
    for seed in range(3):
        x.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close(y, x, w, b)


@gpu
def test_gpu_two_graphs_replayed_concurrently_do_not_share_a_workspace(backend):
    """Two graphs captured on torch's default capture stream, replayed on two streams at once,
    many times: each has its own split-K workspace."""
    backend("cuda")
    m, k = 4096, 4096
    w, _, _ = _gpulinear_problem(m, k, 1, 0.7, "uniform", torch.bfloat16, bias=False)
    sw = fs.encode(w, "tiled_csl")
    xs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n in (1, 8)]
    for x in xs:
        fs.linear(x, sw)
    torch.cuda.synchronize()
    graphs, outs = [], []
    for x in xs:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(fs.linear(x, sw))
        graphs.append(g)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for _ in range(50):
        for g, stream in zip(graphs, streams, strict=True):
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                g.replay()
        for stream in streams:
            torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for y, x in zip(outs, xs, strict=True):
        _assert_close(y, x, w)


@gpu
def test_gpu_first_call_inside_a_capture_raises_clearly():
    code = (
        "import torch, flashsparse as fs\n"
        "w = (torch.randn(256, 512) * (torch.rand(256, 512) > 0.7)).half().cuda()\n"
        "sw = fs.encode(w, 'tiled_csl')\n"
        "x = torch.randn(1, 512, device='cuda', dtype=torch.float16)\n"
        "g = torch.cuda.CUDAGraph()\n"
        "try:\n"
        "    with torch.cuda.graph(g):\n"
        "        fs.linear(x, sw)\n"
        "except RuntimeError as e:\n"
        "    print('RAISED', e)\n"
        "y = fs.linear(x, sw)\n"  # the backend was not switched off: warm-up, then capture
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
    assert "RAISED" in proc.stdout and "CUDA-graph capture" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    assert "RECOVERED" in proc.stdout, proc.stdout + proc.stderr


@gpu
def test_gpu_capture_of_a_new_split_k_shape_after_the_backend_is_loaded(backend):
    """Only the build/self-check needs a warm-up: a shape never run eagerly captures too (its
    workspace comes from the graph's pool, counters zeroed inside the graph)."""
    backend("cuda")
    assert tcsl.available() is None
    m, k = 1536, 3072
    w, x, b = _gpulinear_problem(m, k, 2, 0.8, "uniform", torch.bfloat16)
    sw = fs.encode(w, "tiled_csl")
    graphs, outs = [], []
    for _ in range(2):  # two graphs sharing the capture stream's workspace
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs.append(fs.linear(x, sw, b))
        graphs.append(g)
    for g in (graphs[1], graphs[0], graphs[1]):
        g.replay()
    torch.cuda.synchronize()
    for y in outs:
        _assert_close(y, x, w, b)


@pytest.mark.slow
def test_kernel_report_spec_follows_the_random_mask():
    """bench/sass_report/specs/tiled_csl_cuda.py (for bench/kernel_report.py): instantiation names,
    no nested loop, and slot probabilities from the real encoder's tile sizes."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import sass_report.specs.tiled_csl_cuda as mod
    finally:
        sys.path.remove(str(ROOT / "bench"))
    inst = mod.SPEC.match(
        "_ZN11flashsparse4tcsl21tiled_csl_spmm_kernelINS0_10TileConfigILi256ELi8ELi4ELi1ELi32EEELb0EEEvNS0_12KernelParamsE"
    )
    assert inst is not None and (inst.n_tile, inst.elements, inst.threads) == (8, 256 * 64, 128)
    assert inst.params == {"tile_m": 256, "vectors_per_thread": 32}
    for sparsity in (0.5, 0.7, 0.9):
        counts = mod.tile_vector_counts(sparsity)
        mean = sum(counts) / len(counts)
        assert abs(mean - (1 - sparsity) * 2048) < 0.02 * 2048 + 2  # padding adds < 1 vector
        assert mod.SPEC.trip_counts(sparsity, inst) == []
        probs = [mod.slot_probability(sparsity, inst, i) for i in range(32)]
        assert probs[0] == 1.0 and probs == sorted(probs, reverse=True)
        # expected issued slots per warp ~ vectors per tile / 64 threads per tile
        assert abs(sum(probs) - mean / 64) < 1.0
