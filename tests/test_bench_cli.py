"""``flashsparse bench``: argument errors, a tiny CPU run and its JSON/CSV/PNG, and the pieces
(masks, timers, presets, the WRONG marking) that the numbers rely on."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import io
import json
import math
import os
import time

import pytest
import torch
import torch.nn.functional as F

from flashsparse.cli import main
from flashsparse.kernels.cpu import bitmap as cpu_kernels
from flashsparse.microbench import report, runner
from flashsparse.microbench.baselines import Prepared, semi_structured_bytes
from flashsparse.microbench.masks import OUTLIER_COLUMNS, make_weight, prune_2_4
from flashsparse.microbench.shapes import PRESETS, expand_presets, parse_shape
from flashsparse.microbench.timing import CpuTimer, Rotation, make_timer, quantile, rotation_count

# Whether bitmap rows run the C++ CPU kernel here (else the reference path).
CPU_KERNEL = not torch.cuda.is_available() and cpu_kernels._available() is None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Fast settings for a CPU run: one thread (steady on a shared machine), short timing.
FAST = ["--device", "cpu", "--threads", "1", "--warmup-ms", "1", "--rep-ms", "2", "--no-progress"]


def run_bench(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["bench", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- argument errors ------------------------------------------------------------------------------
BAD_ARGS = [
    (["--preset", "gpt5"], "argument --preset", "unknown preset 'gpt5'"),
    (["--preset", "llama3-8b,"], "argument --preset", "comma-separated list"),
    (["--shape", "0,5"], "argument --shape", "must be positive"),
    (["--shape", "4096"], "argument --shape", "expected M,K"),
    (["--shape", "a,b"], "argument --shape", "expected M,K"),
    (["--shape", "3,4,5"], "argument --shape", "expected M,K"),
    (["--sparsity", "1.0"], "argument --sparsity", "[0, 1)"),
    (["--sparsity", "-0.1"], "argument --sparsity", "[0, 1)"),
    (["--sparsity", "half"], "argument --sparsity", "a number in [0, 1)"),
    (["--dtype", "fp8"], "argument --dtype", "unknown dtype 'fp8'"),
    (["--format", "csc"], "argument --format", "unknown format 'csc'"),
    (["--backend", "magic"], "argument --backend", "unknown backend 'magic'"),
    (["--baseline", "cusparse"], "argument --baseline", "unknown baseline 'cusparse'"),
    (["--baseline", "none,csr"], "argument --baseline", "'none' cannot be combined"),
    (["--n", "0"], "argument --n", "positive integer"),
    (["--n", "1,x"], "argument --n", "positive integer"),
    (["--mask", "random"], "argument --mask", "invalid choice"),
    (["--threads", "0"], "argument --threads", "positive integer"),
    (["--rep-ms", "-1"], "argument --rep-ms", "positive number"),
    (["--device", "tpu"], "argument --device", "expected auto, cpu, cuda"),
    # CUDA kernels never take CPU tensors: a clear refusal, not a silent fallback.
    (["--device", "cpu", "--backend", "cuda"], "argument --backend", "cuda cannot run here"),
    (["--device", "cpu", "--timer", "events"], "argument --timer", "needs a CUDA device"),
]


@pytest.mark.parametrize(
    ("args", "option", "message"), BAD_ARGS, ids=[" ".join(a[0]) for a in BAD_ARGS]
)
def test_bad_arguments_exit_2_naming_the_option(capsys, args, option, message):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "flashsparse bench: error:" in err
    assert option in err
    assert message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--device", "cuda"])
    assert exc.value.code == 2
    assert "argument --device: CUDA is not available" in capsys.readouterr().err


def test_list_presets(capsys):
    rc, out, _ = run_bench(capsys, "--list-presets")
    assert rc == 0
    assert "llama3-8b: qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336" in out
    assert "opt-175b:" in out and "llama2-70b:" in out


# -- a tiny CPU run and its files -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One ``--quick`` run in fp32 and fp16 writing JSON, CSV and PNG (shared by the tests)."""
    out_dir = tmp_path_factory.mktemp("bench")
    paths = {ext: out_dir / "sub" / f"result.{ext}" for ext in ("json", "csv", "png")}
    buf_out, buf_err = io.StringIO(), io.StringIO()
    args = ["bench", "--quick", *FAST, "--dtype", "fp32,fp16"]
    args += ["--json", str(paths["json"]), "--csv", str(paths["csv"]), "--plot", str(paths["png"])]
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(args)
    return rc, buf_out.getvalue(), paths


# By default a CPU run shows what auto runs: bitmap on the C++ kernel; tiled_csl (and bitmap too
# where the kernel cannot build) would run the reference path, so it is left out with a note.
SHOWN = ["bitmap"] if CPU_KERNEL else []
HIDDEN = ["tiled_csl"] if CPU_KERNEL else ["tiled_csl", "bitmap"]


def test_tiny_run_succeeds_and_says_cpu_numbers(tiny_run):
    rc, out, _ = tiny_run
    assert rc == 0
    hidden = ", ".join(HIDDEN)
    assert f"not shown: {hidden} (fp32); {hidden} (fp16): no kernel for this device" in out
    assert "--include-reference shows those rows" in out
    if CPU_KERNEL:  # the notice names what ran: the C++ kernel only
        assert "CPU numbers: C++ CPU kernel, not representative of GPU kernels" in out
        assert "reference path, not" not in out
    else:
        assert report.CPU_NOTICE_BASELINES in out
    assert "tiny  M=200 K=136  fp32  mask=uniform" in out
    assert "median ms" in out and "vs dense" in out and "ceiling" in out
    assert "skipped: 2:4 (torch-2:4): torch's 2:4 semi-structured kernels need a CUDA GPU" in out
    assert "Speed-up vs dense F.linear, geometric mean over 1 shape(s)" in out


def test_header_names_the_cpu_kernel_path(tiny_run, monkeypatch, capsys):
    _, out, _ = tiny_run
    header = out.splitlines()[0]
    if not CPU_KERNEL:
        assert "C++ CPU kernels unavailable: " in header
        return
    if os.environ.get(cpu_kernels.ISA_ENV, "auto").strip().lower() in ("", "auto"):
        best = cpu_kernels.available_isas()[-1]
        assert f"1 thread; C++ kernel path {best}, auto: the best this CPU runs)" in header
    monkeypatch.setenv(cpu_kernels.ISA_ENV, "scalar")
    rc, out, _ = run_bench(
        capsys, "--quick", *FAST, "--dtype", "fp32", "--n", "1", "--sparsity", "0.5"
    )
    assert rc == 0
    assert "C++ kernel path scalar, forced by FLASHSPARSE_CPU_ISA)" in out.splitlines()[0]
    # no row can run the kernel: the header does not load (or build) the extension to say
    args = ("--format", "tiled_csl", "--include-reference", "--baseline", "none")
    rc, out, _ = run_bench(
        capsys, "--quick", *FAST, "--dtype", "fp32", "--n", "1", "--sparsity", "0.5", *args
    )
    assert rc == 0
    assert "kernel path" not in out.splitlines()[0] and "(1 thread)" in out.splitlines()[0]


def test_tiny_run_json(tiny_run):
    _, _, paths = tiny_run
    data = json.loads(paths["json"].read_text())
    meta, rows = data["meta"], data["rows"]
    for key in (
        "device",
        "torch",
        "triton",
        "flashsparse",
        "git_commit",
        "date",
        "timer",
        "backends",
    ):
        assert key in meta, key
    assert meta["torch"] == torch.__version__
    assert meta["device_type"] == "cpu" and meta["device"].startswith("CPU")
    assert meta["settings"]["include_reference"] is False
    assert meta["settings"]["not_shown"] == {"fp32": HIDDEN, "fp16": HIDDEN}
    if CPU_KERNEL:
        assert meta["backends_ran"] == ["cpu"]
        assert meta["notice"] == "CPU numbers: C++ CPU kernel, not representative of GPU kernels"
    else:
        assert meta["backends_ran"] == []
    assert dt.datetime.fromisoformat(meta["date"]).tzinfo is not None
    assert meta["copy_bandwidth_gbps"] > 0
    assert meta["settings"]["dtype"] == ["fp32", "fp16"]
    assert meta["settings"]["shapes"] == [["tiny", 200, 136]]

    # fp32 and fp16 x N {1, 8} x (dense, 2:4 skipped, sparsity {0.5, 0.9} x (the formats shown,
    # csr, sliced-out, sliced-in))
    assert len(rows) == 2 * 2 * (1 + 1 + 2 * (len(SHOWN) + 3))
    assert not {r["method"] for r in rows} & set(HIDDEN)
    assert all(set(r) == set(runner.ROW_KEYS) for r in rows)
    by = {(r["dtype"], r["n"], r["sparsity"], r["method"]): r for r in rows}
    for dtype in ("fp32", "fp16"):
        for n in (1, 8):
            dense = by[(dtype, n, None, "dense")]
            assert dense["status"] == "ok" and dense["speedup"] == 1.0
            assert by[(dtype, n, 0.5, "2:4")]["status"] == "skipped"
            for sp in (0.5, 0.9):
                for fmt in SHOWN:
                    r = by[(dtype, n, sp, fmt)]
                    assert r["status"] == "ok", r
                    assert r["backend"] == "cpu" and r["requested_backend"] == "auto"
                    assert math.isclose(r["speedup"], dense["median_ms"] / r["median_ms"])
                    assert abs(r["actual_sparsity"] - sp) < 0.05
    csr16 = by[("fp16", 1, 0.5, "csr")]
    assert csr16["status"] in ("ok", "skipped")  # torch has no CPU Half CSR kernel today
    if csr16["status"] == "skipped":
        assert "torch.sparse CSR cannot run torch.float16 on cpu" in csr16["reason"]
    assert by[("fp32", 1, 0.9, "csr")]["status"] == "ok"

    for r in rows:
        if r["status"] != "ok":
            assert r["median_ms"] is None and r["reason"]
            continue
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["rel_err"] <= r["tolerance"]
        traffic = r["weight_bytes"] + r["x_bytes"] + r["y_bytes"]
        assert math.isclose(r["gbps"], traffic / (r["median_ms"] * 1e-3) / 1e9)
        assert math.isclose(r["bw_fraction"], r["gbps"] / meta["copy_bandwidth_gbps"])
        # Each method's own traffic against the dense layer's (a sliced layer's x or y is
        # narrower; for every other method the activations are the dense layer's).
        esize = 4 if r["dtype"] == "fp32" else 2
        dense_io = r["n"] * (r["m"] + r["k"]) * esize
        io_bytes = r["x_bytes"] + r["y_bytes"]
        if not r["method"].startswith("sliced"):
            assert io_bytes == dense_io
        ceiling = (r["dense_weight_bytes"] + dense_io) / (r["weight_bytes"] + io_bytes)
        assert math.isclose(r["ceiling"], ceiling)
        assert r["rotation"] >= 1
    # 90 % sparse bitmap is ~3x smaller than the dense fp16 weight here.
    if CPU_KERNEL:
        assert by[("fp16", 1, 0.9, "bitmap")]["ceiling"] > 2.5


def test_include_reference_shows_the_reference_rows(capsys, tmp_path):
    """--include-reference adds the rows auto runs on the reference path (tiled_csl on a CPU),
    next to the kernel rows, and the notice names both."""
    path = tmp_path / "r.json"
    rc, out, _ = run_bench(
        capsys, "--quick", *FAST, "--dtype", "fp16", "--n", "1", "--sparsity", "0.5",
        "--baseline", "none", "--include-reference", "--json", str(path),
    )  # fmt: skip
    assert rc == 0
    assert "not shown" not in out
    data = json.loads(path.read_text())
    by = {r["method"]: r for r in data["rows"]}
    assert set(by) == {"dense", "tiled_csl", "bitmap"}
    ref = by["tiled_csl"]
    assert ref["status"] == "ok" and ref["backend"] == "reference"
    assert ref["requested_backend"] == "auto"
    assert ref["ceiling"] < 1.05  # 50 % Tiled-CSL is not smaller than the dense fp16 weight
    assert by["bitmap"]["backend"] == ("cpu" if CPU_KERNEL else "reference")
    assert data["meta"]["settings"]["include_reference"] is True
    if CPU_KERNEL:
        assert data["meta"]["backends_ran"] == ["cpu", "reference"]
        assert (
            "CPU numbers: C++ CPU kernel and reference path, not representative of GPU kernels"
            in out
        )


def test_default_rows_leave_out_only_reference_formats():
    """What the sweep runs by default: per dtype, the (format, backend) pairs whose auto kernel
    is not the reference path; explicit backends always run."""
    cfg = runner.BenchConfig(
        shapes=[PRESETS["tiny"][0]], ns=[1], sparsities=[0.5], dtypes=[torch.float32],
        formats=["tiled_csl", "bitmap", "auto"], backends=["auto"], baselines=[],
        mask="uniform", device=torch.device("cpu"), timer=CpuTimer(1, 1), cache=1,
        bandwidth=None,
    )  # fmt: skip
    shown = [f for f in ("tiled_csl", "bitmap", "auto") if f not in HIDDEN + (
        [] if CPU_KERNEL else ["auto"])]  # fmt: skip
    assert runner.method_combos(cfg, torch.float32) == [(f, "auto") for f in shown]
    cfg.include_reference = True
    assert len(runner.method_combos(cfg, torch.float32)) == 3
    cfg.include_reference = False
    cfg.backends = ["reference", "auto"]
    combos = runner.method_combos(cfg, torch.float32)
    assert [c for c in combos if c[1] == "reference"] == [
        ("tiled_csl", "reference"),
        ("bitmap", "reference"),
        ("auto", "reference"),
    ]


def test_tiny_run_csv(tiny_run):
    _, _, paths = tiny_run
    meta = json.loads(paths["json"].read_text())["meta"]
    json_rows = json.loads(paths["json"].read_text())["rows"]
    with paths["csv"].open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [*runner.ROW_KEYS, *report.CSV_META_KEYS]
        rows = list(reader)
    assert len(rows) == len(json_rows)
    for row, jrow in zip(rows, json_rows, strict=True):
        assert row["method"] == jrow["method"] and row["status"] == jrow["status"]
        assert row["device"] == meta["device"] and row["date"] == meta["date"]
        assert row["torch"] == torch.__version__
        if jrow["median_ms"] is not None:
            assert math.isclose(float(row["median_ms"]), jrow["median_ms"])
        else:
            assert row["median_ms"] == ""


def test_tiny_run_png(tiny_run):
    _, _, paths = tiny_run
    data = paths["png"].read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert b"Matplotlib" in data[:512]  # the Software tEXt chunk matplotlib writes
    import matplotlib.image

    img = matplotlib.image.imread(paths["png"])
    assert img.shape[0] > 200 and img.shape[1] > 400


def test_sweep_counts_every_task(tiny_run):
    """The progress total is exactly the number of rows (skips included)."""
    _, _, paths = tiny_run
    rows = json.loads(paths["json"].read_text())["rows"]
    cfg = runner.BenchConfig(
        shapes=[PRESETS["tiny"][0]], ns=[1, 8], sparsities=[0.5, 0.9],
        dtypes=[torch.float32, torch.float16], formats=["tiled_csl", "bitmap"],
        backends=["auto"], baselines=["csr", "2:4", "sliced"], mask="uniform",
        device=torch.device("cpu"),
        timer=CpuTimer(1, 1), cache=1, bandwidth=None,
    )  # fmt: skip
    assert runner.count_tasks(cfg) == len(rows)


def test_wrong_answers_are_marked_and_not_timed(capsys, tmp_path, monkeypatch):
    """A baseline that is 1 % off is reported WRONG, not timed, and the command exits 1."""

    def off_by_one_percent(w, cache):
        return Prepared("csr", "fake", 1, w, Rotation([w]), lambda x, wc: F.linear(x, wc) * 1.01)

    monkeypatch.setattr(runner, "prepare_csr", off_by_one_percent)
    path = tmp_path / "r.json"
    rc, out, err = run_bench(
        capsys, "--quick", *FAST, "--n", "1", "--sparsity", "0.5", "--format", "bitmap",
        "--baseline", "csr", "--json", str(path),
    )  # fmt: skip
    assert rc == 1
    assert "WRONG" in out and "not timed" in out
    assert "WRONG or failed" in err
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["csr"]["status"] == "WRONG"
    assert rows["csr"]["median_ms"] is None and rows["csr"]["speedup"] is None
    assert 5e-3 < rows["csr"]["rel_err"] < 2e-2
    assert rows["bitmap"]["status"] == "ok"


def test_a_baseline_that_fails_to_prepare_is_an_error(capsys, monkeypatch):
    def broken(w, cache):
        raise RuntimeError("cuSPARSE exploded")

    monkeypatch.setattr(runner, "prepare_csr", broken)
    rc, out, _ = run_bench(
        capsys, "--quick", *FAST, "--n", "1", "--sparsity", "0.9", "--format", "tiled_csl",
        "--baseline", "csr",
    )  # fmt: skip
    assert rc == 1
    assert "error: csr (-) N=1: could not prepare: RuntimeError: cuSPARSE exploded" in out


def test_backend_all_reports_each_backend(capsys, tmp_path):
    path = tmp_path / "r.json"
    rc, out, _ = run_bench(
        capsys, "--shape", "64,96", *FAST, "--n", "1", "--sparsity", "0.7", "--format", "bitmap",
        "--backend", "all", "--baseline", "none", "--json", str(path),
    )  # fmt: skip
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    sparse = {r["requested_backend"]: r for r in rows if r["method"] == "bitmap"}
    assert set(sparse) == {"reference", "triton", "cuda", "cpu"}
    assert sparse["reference"]["status"] == "ok" and sparse["reference"]["backend"] == "reference"
    if CPU_KERNEL:
        assert sparse["cpu"]["status"] == "ok" and sparse["cpu"]["backend"] == "cpu"
    for name in ("triton", "cuda", "cpu"):
        r = sparse[name]
        # The triton row may run in the interpreter (TRITON_INTERPRET=1); otherwise it says why not.
        assert (r["status"] == "ok" and r["backend"] == name) or (
            r["status"] == "skipped" and name in r["reason"]
        ), r
    assert "skipped: bitmap (cuda)" in out


def test_row_skewed_run(capsys, tmp_path):
    path = tmp_path / "r.json"
    rc, _, _ = run_bench(
        capsys, "--shape", "128,256", *FAST, "--n", "3", "--sparsity", "0.7", "--mask",
        "row-skewed", "--baseline", "none", "--format", "auto,tiled_csl", "--include-reference",
        "--json", str(path),
    )  # fmt: skip
    assert rc == 0
    rows = json.loads(path.read_text())["rows"]
    methods = {r["method"] for r in rows}
    assert methods - {"auto:bitmap", "auto:tiled_csl"} == {"dense", "tiled_csl"}
    assert len(methods) == 3
    assert all(r["status"] == "ok" and r["mask"] == "row-skewed" for r in rows)


# -- pieces -------------------------------------------------------------------------------------
def test_presets_and_shapes():
    assert [(s.m, s.k) for s in PRESETS["llama2-7b"]] == [
        (12288, 4096),
        (4096, 4096),
        (22016, 4096),
        (4096, 11008),
    ]
    assert [(s.m, s.k) for s in PRESETS["opt-30b"]] == [
        (21504, 7168),
        (7168, 7168),
        (28672, 7168),
        (7168, 28672),
    ]
    assert [(s.m, s.k) for s in PRESETS["llama2-70b"]][2:] == [(57344, 8192), (8192, 28672)]
    assert len(expand_presets(["all"])) == 24
    assert len(expand_presets(["llama3-8b", "llama3-8b"])) == 4
    assert parse_shape("4096x11008").m == 4096 and parse_shape(" 7, 9").k == 9
    with pytest.raises(ValueError, match="positive"):
        parse_shape("-1,4")


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_uniform_mask_hits_target(sparsity):
    w = make_weight(300, 500, sparsity, torch.float16, "cpu", "uniform", seed=3)
    assert w.dtype == torch.float16 and w.shape == (300, 500)
    assert abs(float((w == 0).float().mean()) - sparsity) < 0.01
    assert not torch.signbit(w[w == 0]).any()  # zeros are +0.0


def test_row_skewed_mask_looks_like_a_pruned_llm():
    m, k, target = 400, 1000, 0.7
    w = make_weight(m, k, target, torch.float32, "cpu", "row-skewed", seed=1)
    zero = w == 0
    assert abs(float(zero.float().mean()) - target) < 0.02
    dense_cols = (~zero).all(0)
    assert int(dense_cols.sum()) >= round(OUTLIER_COLUMNS * k)
    row_rates = zero.float().mean(1)
    assert float(row_rates.std()) > 0.04  # rows differ, unlike a uniform mask (~0.015)
    # Each row prunes its smallest magnitudes: what is kept of N(0, 1) lies above the row's
    # |z| quantile (a random mask would keep values near 0).
    for r in range(0, m, 50):
        cols = ~dense_cols
        rate = float(zero[r, cols].float().mean())
        threshold = math.sqrt(2) * float(torch.erfinv(torch.tensor(rate)))
        kept = w[r, cols & ~zero[r]].abs()
        assert float(kept.min()) > 0.8 * threshold - 0.05, (r, rate)


def test_prune_2_4_keeps_two_largest_of_every_four():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 2.0, 2.5, -3.0, 1.0]])
    assert prune_2_4(w).tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 2.5, -3.0, 0.0]]
    big = prune_2_4(torch.randn(64, 128))
    assert ((big.view(64, 32, 4) != 0).sum(-1) == 2).all()
    with pytest.raises(ValueError, match="divisible by 4"):
        prune_2_4(torch.randn(4, 6))
    assert semi_structured_bytes(128, 256, 2) == 128 * 256 * 2 // 2 + 128 * 256 // 8


def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0.0, 0.2, 0.5, 0.8, 1.0):
        assert math.isclose(quantile(values, q), float(np.quantile(values, q)))


def test_cpu_timer_measures_wall_time():
    t = CpuTimer(warmup_ms=1, rep_ms=20)(lambda: time.sleep(0.002))
    assert 1.9 <= t.median_ms < 50
    assert t.p20_ms <= t.median_ms <= t.p80_ms
    assert t.samples >= 5


def test_timer_choice_and_rotation():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_timer(torch.device("cpu"), 1, 1, "do_bench")
    with pytest.raises(ValueError, match="timer must be one of"):
        make_timer(torch.device("cpu"), 1, 1, "stopwatch")
    assert isinstance(make_timer(torch.device("cpu"), 1, 1), CpuTimer)
    assert rotation_count(100 * 2**20, 50 * 2**20) == 1
    assert rotation_count(10 * 2**20, 50 * 2**20) == 10
    rot = Rotation(["a", "b", "c"])
    assert [rot.next() for _ in range(4)] == ["a", "b", "c", "a"]


def test_progress_bar_draws_and_clears():
    stream = io.StringIO()
    bar = report.Progress(4, stream, enabled=True, width=8)
    bar.advance("first")
    bar.advance("second")
    assert "[####....] 2/4" in stream.getvalue() and "second" in stream.getvalue()
    bar.clear()
    assert stream.getvalue().endswith("\r\033[K")
    quiet = io.StringIO()
    report.Progress(2, quiet, enabled=False).advance("x")
    assert quiet.getvalue() == ""


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(report, "plot_unavailable_reason", lambda: "--plot needs matplotlib")
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", *FAST, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "argument --plot: --plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_git_commit_is_recorded_for_a_checkout():
    import re
    from pathlib import Path

    commit = report.git_commit()
    if (Path(report.__file__).resolve().parents[2] / ".git").exists():
        assert commit is not None and re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit)
    else:
        assert commit is None
