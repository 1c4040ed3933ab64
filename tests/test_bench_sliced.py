"""The ``sliced`` baseline of ``flashsparse bench`` (issue 16): a dense layer that keeps (1 - s)
of the output rows or input columns, the structured alternative at the same number of stored
weights. Its rows must exist by default, be checked against float64, and report the bytes and
ceiling of the smaller problem."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

from flashsparse.cli import main
from flashsparse.microbench import report, runner
from flashsparse.microbench.bandwidth import Bandwidth
from flashsparse.microbench.baselines import (
    Prepared,
    kept,
    prepare_sliced,
    sliced_variants,
)
from flashsparse.microbench.shapes import Shape
from flashsparse.microbench.timing import CpuTimer, Rotation

FAST = ["--device", "cpu", "--threads", "1", "--warmup-ms", "1", "--rep-ms", "2", "--no-progress"]
ESIZE = {"fp32": 4, "fp16": 2}


def bench(*args: str) -> tuple[int, str]:
    buf_out, buf_err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(["bench", *args])
    return rc, buf_out.getvalue() + buf_err.getvalue()


# -- the shapes ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "sparsity", "expected"),
    [(200, 0.5, 100), (136, 0.9, 14), (135, 0.5, 68), (3, 0.9, 1), (1, 0.99, 1), (77, 0.0, 77)],
)
def test_kept_is_the_nearest_count_and_at_least_one(size, sparsity, expected):
    assert kept(size, sparsity) == expected


@pytest.mark.parametrize(
    ("args", "message"),
    [((100, 1.0), "sparsity must be in [0, 1)"), ((100, -0.1), "sparsity"), ((0, 0.5), "size")],
)
def test_kept_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        kept(*args)


def test_sliced_variants():
    assert sliced_variants(200, 136, 0.5) == [("sliced-out", 100, 136), ("sliced-in", 200, 68)]
    # A square layer sliced either way has transposed, different weights: both are timed.
    assert sliced_variants(64, 64, 0.75) == [("sliced-out", 16, 64), ("sliced-in", 64, 16)]
    # Nothing sliced away: the input-side weight would be the same as the output-side one.
    assert sliced_variants(64, 64, 0.0) == [("sliced-out", 64, 64)]
    assert sliced_variants(100, 100, 0.001) == [("sliced-out", 100, 100)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("method", "m", "k"), [("sliced-out", 23, 53), ("sliced-in", 37, 11)])
def test_prepare_sliced_matches_float64(dtype, method, m, k):
    gen = torch.Generator().manual_seed(m * k)
    w = torch.randn(37, 53, generator=gen).to(dtype)
    x = torch.randn(5, k, generator=gen).to(dtype)
    cache = 3 * m * k * w.element_size()  # forces several rotated copies
    prep = prepare_sliced(w, method, m, k, cache)
    assert prep.method == method and prep.backend == "torch-cpu"
    assert prep.weight_bytes == m * k * w.element_size()
    assert len(prep.rotation) == 6
    ptrs = {prep.rotation.next().data_ptr() for _ in range(6)}
    assert len(ptrs) == 6  # distinct copies, so no call finds the previous one's weight in cache
    ref = x.double() @ w[:m, :k].double().T
    for _ in range(3):
        y = prep(x)
        assert y.shape == (5, m) and y.dtype == dtype
        err = float((y.double() - ref).norm() / ref.norm())
        assert err <= runner.RTOL[dtype]


def test_prepare_sliced_rejects_bad_input():
    w = torch.zeros(8, 6)
    with pytest.raises(ValueError, match="method must be one of sliced-out, sliced-in"):
        prepare_sliced(w, "sliced", 4, 6, 1)
    with pytest.raises(ValueError, match="must fit in the 8x6 weight, got 9x6"):
        prepare_sliced(w, "sliced-out", 9, 6, 1)
    with pytest.raises(ValueError, match="got 8x0"):
        prepare_sliced(w, "sliced-in", 8, 0, 1)


# -- a run with the default baselines -----------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``--quick`` (tiny 200x136 shape, N 1,8, sparsity 0.5,0.9) in fp32 and fp16 without
    ``--baseline``: the sliced rows must be there by default."""
    out_dir = tmp_path_factory.mktemp("sliced")
    paths = {ext: out_dir / f"r.{ext}" for ext in ("json", "csv", "png")}
    legends: list[list[str]] = []
    from matplotlib.figure import Figure

    original = Figure.legend

    def recording_legend(self, handles, labels, *args, **kwargs):
        legends.append(list(labels))
        return original(self, handles, labels, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Figure, "legend", recording_legend)
        rc, out = bench(
            "--quick", *FAST, "--dtype", "fp32,fp16", "--json", str(paths["json"]),
            "--csv", str(paths["csv"]), "--plot", str(paths["png"]),
        )  # fmt: skip
    return rc, out, paths, legends


def test_sliced_rows_are_there_by_default(default_run):
    rc, out, paths, _ = default_run
    assert rc == 0, out
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["settings"]["baseline"] == ["csr", "2:4", "sliced"]
    rows = data["rows"]
    by = {(r["dtype"], r["n"], r["sparsity"], r["method"]): r for r in rows}
    for dtype in ("fp32", "fp16"):
        for n in (1, 8):
            dense = by[(dtype, n, None, "dense")]
            for s in (0.5, 0.9):
                for method, m, k in sliced_variants(200, 136, s):
                    r = by[(dtype, n, s, method)]
                    assert r["status"] == "ok", r
                    assert r["backend"] == "torch-cpu" and r["requested_backend"] == "-"
                    assert r["m"] == 200 and r["k"] == 136 and r["layer"] == "tiny"
                    # Bytes: (1 - s) of dense, up to rounding to whole rows or columns.
                    assert r["weight_bytes"] == m * k * ESIZE[dtype]
                    frac = r["weight_bytes"] / r["dense_weight_bytes"]
                    side = 200 if method == "sliced-out" else 136
                    assert abs(frac - (1 - s)) <= 0.5 / side + 1e-12
                    assert math.isclose(r["actual_sparsity"], 1 - frac)
                    # The smaller problem's activations: x has k features, y has m.
                    assert r["x_bytes"] == n * k * ESIZE[dtype]
                    assert r["y_bytes"] == n * m * ESIZE[dtype]
                    dense_traffic = r["dense_weight_bytes"] + n * (200 + 136) * ESIZE[dtype]
                    own = r["weight_bytes"] + r["x_bytes"] + r["y_bytes"]
                    assert math.isclose(r["ceiling"], dense_traffic / own)
                    # Only one of x and y shrinks, so the limit lies between 1 and 1/frac.
                    assert 1 < r["ceiling"] <= 1 / frac
                    # Checked against float64 before it was timed.
                    assert r["rel_err"] is not None and r["rel_err"] <= r["tolerance"]
                    assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
                    assert math.isclose(r["speedup"], dense["median_ms"] / r["median_ms"])
                    assert math.isclose(r["gbps"], own / (r["median_ms"] * 1e-3) / 1e9)


def test_sliced_rows_in_the_table_csv_and_plot(default_run):
    _, out, paths, legends = default_run
    table_lines = [ln.split() for ln in out.splitlines()]
    for method in ("sliced-out", "sliced-in"):
        # N, sparsity, method, backend ... check: one table line per (dtype, N, sparsity)
        hits = [ln for ln in table_lines if len(ln) > 3 and ln[2] == method and ln[-1] == "ok"]
        assert len(hits) == 2 * 2 * 2
        assert f"  {method}: dense F.linear keeping round((1-s)*" in out
    assert "says nothing of accuracy" in out
    summary = out.split("Speed-up vs dense F.linear, geometric mean")[1]
    assert "sliced-out" in summary and "sliced-in" in summary

    with paths["csv"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    sliced = [r for r in rows if r["method"].startswith("sliced")]
    assert {r["method"] for r in sliced} == {"sliced-out", "sliced-in"}
    assert len(sliced) == 2 * 2 * 2 * 2
    for r in sliced:
        assert int(r["weight_bytes"]) < int(r["dense_weight_bytes"])
        assert float(r["ceiling"]) > 1 and r["status"] == "ok"

    assert len(legends) == 1
    labels = legends[0]
    for method in ("sliced-out", "sliced-in"):
        for dtype in ("fp32", "fp16"):
            assert f"{method} (torch-cpu) {dtype}" in labels
    # Ceilings share one legend entry (each is drawn in its method's colour).
    assert "memory-bound ceiling (its format's colour)" in labels
    assert paths["png"].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_baseline_sliced_alone(tmp_path):
    path = tmp_path / "r.json"
    rc, out = bench(
        "--quick", *FAST, "--n", "3", "--sparsity", "0.7", "--format", "bitmap",
        "--baseline", "sliced", "--json", str(path),
    )  # fmt: skip
    assert rc == 0, out
    rows = json.loads(path.read_text())["rows"]
    assert [(r["method"], r["sparsity"]) for r in rows if r["method"] != "bitmap"] == [
        ("dense", None),
        ("sliced-out", 0.7),
        ("sliced-in", 0.7),
    ]
    assert "csr" not in out and "2:4" not in out
    assert all(r["status"] == "ok" for r in rows)


def test_a_wrong_sliced_layer_is_marked_and_not_timed(tmp_path, monkeypatch):
    """The reference slices the weight itself: a baseline that keeps the wrong rows (the last
    ones instead of the first) is WRONG, not timed, and the command exits 1."""

    def last_rows(w, method, rows, cols, cache):
        ws = w[-rows:, -cols:].contiguous()
        return Prepared(method, "fake", ws.numel() * 4, ws, Rotation([ws]), F.linear)

    monkeypatch.setattr(runner, "prepare_sliced", last_rows)
    path = tmp_path / "r.json"
    rc, out = bench(
        "--quick", *FAST, "--n", "2", "--sparsity", "0.5", "--format", "tiled_csl",
        "--include-reference", "--baseline", "sliced", "--json", str(path),
    )  # fmt: skip
    assert rc == 1
    assert "WRONG" in out and "not timed" in out
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    for method in ("sliced-out", "sliced-in"):
        assert rows[method]["status"] == "WRONG"
        assert rows[method]["rel_err"] > 0.5
        assert rows[method]["median_ms"] is None and rows[method]["speedup"] is None
    assert rows["tiled_csl"]["status"] == "ok"


def test_a_sliced_layer_that_fails_to_prepare_is_an_error(monkeypatch):
    def broken(w, method, rows, cols, cache):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "prepare_sliced", broken)
    rc, out = bench("--quick", *FAST, "--n", "1", "--sparsity", "0.9", "--baseline", "sliced")
    assert rc == 1
    assert (
        "error: sliced-out (torch-cpu) N=1: could not prepare: RuntimeError: out of memory" in out
    )


def test_sweep_counts_sliced_tasks():
    """The progress total matches the rows, also where sliced-in is left out (s=0)."""
    cfg = runner.BenchConfig(
        shapes=[Shape("sq", 48, 48), Shape("odd", 37, 53)], ns=[1, 3], sparsities=[0.0, 0.6],
        dtypes=[torch.float32], formats=[], backends=["auto"], baselines=["sliced"],
        mask="uniform", device=torch.device("cpu"), timer=CpuTimer(0.1, 0.1, min_samples=1),
        cache=1, bandwidth=Bandwidth(10.0, 1, None),
    )  # fmt: skip
    labels: list[str] = []
    rows = runner.Sweep(cfg, progress=labels.append).run()
    assert runner.count_tasks(cfg) == len(rows) == len(labels)
    methods = [(r["layer"], r["sparsity"], r["method"]) for r in rows if r["n"] == 1]
    assert methods == [
        ("sq", None, "dense"),
        ("sq", 0.0, "sliced-out"),
        ("sq", 0.6, "sliced-out"),
        ("sq", 0.6, "sliced-in"),
        ("odd", None, "dense"),
        ("odd", 0.0, "sliced-out"),
        ("odd", 0.6, "sliced-out"),
        ("odd", 0.6, "sliced-in"),
    ]
    assert all(r["status"] == "ok" for r in rows)
    text = report.format_block([r for r in rows if r["layer"] == "sq"])
    assert "sq  M=48 K=48" in text and "sliced-in: dense F.linear keeping round((1-s)*K)" in text
