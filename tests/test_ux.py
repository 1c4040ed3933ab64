"""The first hour of a new user: every mistake gets one clear line (no traceback), nothing
happens silently, and nothing is written or changed when a command refuses.

Commands run as a user types them (``python -m flashsparse.cli ...`` in a subprocess with its
own environment) where the environment matters; in-process through ``main`` otherwise.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import flashsparse as fs
from flashsparse import backends, notices
from flashsparse.cli import main
from flashsparse.microbench import report, runner

pytestmark = pytest.mark.slow  # commands in subprocesses

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--device", "cpu", "--threads", "1", "--warmup-ms", "1", "--rep-ms", "2", "--no-progress"]


def cli(*args: str, env: dict[str, str | None] | None = None, cwd: Path | None = None):
    """``python -m flashsparse.cli ARGS`` with ``env`` changes (None removes a variable)."""
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    done = subprocess.run(
        [sys.executable, "-m", "flashsparse.cli", *args],
        capture_output=True,
        text=True,
        env=full,
        cwd=cwd or ROOT,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout, done.stderr


def error_lines(err: str) -> list[str]:
    """Lines of stderr that are not the argparse usage block or a transformers progress bar."""
    return [ln for ln in err.splitlines() if ln.startswith("flashsparse")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96,
        max_position_embeddings=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=32,
        intermediate_size=72,
        num_key_value_heads=1,
    )
    path = tmp_path_factory.mktemp("ux") / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture
def fresh_notices(monkeypatch):
    """Forget which once-per-process notices were given."""
    monkeypatch.setattr(notices, "_given", set())


def record(fn, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn(*args, **kwargs)
    return result, caught


def messages(caught, category=fs.FlashsparseWarning) -> list[str]:
    """The messages of ``category`` (the reference-path notice only when asked for)."""
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, category)
        and (
            category is fs.ReferencePathWarning
            or not issubclass(w.category, fs.ReferencePathWarning)
        )
    ]


# -- 1. sparsify --device -------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_sparsify_device_cuda_without_cuda_is_one_line(model_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = cli("sparsify", str(model_dir), str(out), "--device", "cuda")
    assert rc == 2 and stdout == ""
    assert error_lines(err) == [
        "flashsparse sparsify: error: --device: CUDA is not available to torch on this machine "
        f"(torch {torch.__version__}, CUDA build: none)"
    ]
    assert not out.exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "cpu:3", ""])
def test_sparsify_bad_device_is_one_line(model_dir, tmp_path, capsys, device):
    out = tmp_path / "out"
    assert main(["sparsify", str(model_dir), str(out), "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"flashsparse sparsify: error: --device: expected cpu, cuda or cuda:N, got {device!r}\n"
    )
    assert not out.exists()


# -- 2. a bogus FLASHSPARSE_BACKEND ----------------------------------------------------------------
def test_info_reports_a_bogus_backend_and_exits_1():
    rc, out, err = cli("info", env={"FLASHSPARSE_BACKEND": "bogus"})
    assert rc == 1
    assert "FLASHSPARSE_BACKEND: 'bogus'" in out and "reference  available" in out
    assert error_lines(err) == [
        "flashsparse info: error: FLASHSPARSE_BACKEND must be one of auto, reference, triton, "
        "cuda, cpu; got 'bogus'"
    ]
    rc, out, _ = cli("info", "--json", env={"FLASHSPARSE_BACKEND": "bogus"})
    report_ = json.loads(out)
    assert rc == 1 and report_["FLASHSPARSE_BACKEND"] == "bogus"
    assert report_["problems"] == [
        "FLASHSPARSE_BACKEND must be one of auto, reference, triton, cuda, cpu; got 'bogus'"
    ]


@pytest.mark.parametrize("command", ["bench", "sparsify"])
def test_other_commands_refuse_a_bogus_backend_in_one_line(model_dir, tmp_path, command):
    args = (
        ["bench", "--json", str(tmp_path / "b.json")]
        if command == "bench"
        else ["sparsify", str(model_dir), str(tmp_path / "out")]
    )
    rc, out, err = cli(*args, env={"FLASHSPARSE_BACKEND": "bogus"})
    assert rc == 2 and out == ""
    assert error_lines(err) == [
        f"flashsparse {command}: error: FLASHSPARSE_BACKEND must be one of auto, reference, "
        "triton, cuda, cpu; got 'bogus' (`flashsparse info` shows the setup)"
    ]
    assert list(tmp_path.iterdir()) == []


# -- 3. bench honours FLASHSPARSE_BACKEND ----------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_with_forced_cuda_backend_on_cpu_refuses(tmp_path):
    out = tmp_path / "b.json"
    rc, stdout, err = cli("bench", "--json", str(out), env={"FLASHSPARSE_BACKEND": "cuda"})
    assert rc == 2 and stdout == ""
    (line,) = error_lines(err)
    assert line.startswith("flashsparse bench: error: FLASHSPARSE_BACKEND=cuda cannot run here: ")
    assert "tiled_csl fp32: the CUDA Tiled-CSL kernel runs on CUDA tensors" in line
    assert "bitmap fp32: the CUDA bitmap kernel runs on CUDA tensors" in line
    assert "unset FLASHSPARSE_BACKEND" in line
    assert not out.exists()


def test_bench_runs_the_backend_the_environment_names(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "reference")
    out = tmp_path / "b.json"
    args = ["bench", *FAST, "--quick", "--n", "1", "--sparsity", "0.5", "--baseline", "none"]
    assert main([*args, "--json", str(out)]) == 0
    meta = json.loads(out.read_text())["meta"]
    assert meta["FLASHSPARSE_BACKEND"] == "reference"
    assert meta["settings"]["backend"] == ["reference"] and meta["backends_ran"] == ["reference"]
    rows = json.loads(out.read_text())["rows"]
    assert {r["requested_backend"] for r in rows if r["method"] != "dense"} == {"reference"}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*args, "--backend", "triton", "--json", str(tmp_path / "c.json")])
    assert exc.value.code == 2
    assert (
        "argument --backend: triton contradicts FLASHSPARSE_BACKEND=reference; drop one of the two"
    ) in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


# -- 7. every reason at once -----------------------------------------------------------------------
def test_bench_backend_triton_gives_every_reason_at_once():
    rc, out, err = cli("bench", "--backend", "triton", env={"TRITON_INTERPRET": None})
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Triton backend runs")
    assert rc == 2 and out == ""
    (line,) = error_lines(err)
    assert "tiled_csl fp32: the triton backend has no kernel for the 'tiled_csl' format" in line
    assert (
        "bitmap fp32: the Triton kernel runs on CPU tensors only under the interpreter: set "
        "TRITON_INTERPRET=1" in line
    )


def test_bench_backend_triton_under_the_interpreter_names_the_format_that_runs(capsys):
    from flashsparse.kernels.triton import INTERPRET

    if not INTERPRET:
        pytest.skip("the Triton provider was imported without TRITON_INTERPRET=1")
    with pytest.raises(SystemExit):
        main(["bench", *FAST, "--backend", "triton"])
    err = capsys.readouterr().err
    assert "tiled_csl fp32: the triton backend has no kernel" in err
    assert "(--format bitmap runs what it can)" in err


# -- 4, 5, 6. sparsify_ says what it did -------------------------------------------------------------
def readme_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_sparsify_warns_when_min_sparsity_leaves_everything_dense():
    model = readme_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    returned, caught = record(fs.sparsify_, model, lambda module, fqn: fqn != "2", min_sparsity=0.5)
    assert returned is model
    assert messages(caught) == [
        "sparsify_ converted nothing: left 2 projection(s) dense: 1 below min_sparsity=0.5: "
        "'0' (0.0%); 1 rejected by filter_fn: '2'. Prune them first (flashsparse.prune(weight, "
        "0.5)) or lower min_sparsity. fs.sparsify_summary(model) counts them."
    ]
    assert caught[0].filename == __file__  # points at the caller's line
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_sparsify_names_the_layers_it_leaves_dense_next_to_converted_ones():
    model = readme_model()
    with torch.no_grad():
        model[2].weight.copy_(fs.prune(model[2].weight, 0.8))
    _, caught = record(fs.sparsify_, model, min_sparsity=0.5)
    assert isinstance(model[2], fs.SparseLinear) and isinstance(model[0], nn.Linear)
    assert messages(caught) == [
        "sparsify_ converted 1 layer(s) but left 1 projection(s) dense: 1 below "
        "min_sparsity=0.5: '0' (0.0%). Prune them first (flashsparse.prune(weight, 0.5)) or "
        "lower min_sparsity. fs.sparsify_summary(model) counts them."
    ]


def test_sparsify_warns_when_the_result_is_larger_than_dense():
    model = readme_model()
    x = torch.randn(3, 64)
    expected = model(x)
    _, caught = record(fs.sparsify_, model)
    (message,) = [m for m in messages(caught) if "dense size" in m]
    ratio = float(re.search(r"take (\d\.\d\d)x their dense size", message).group(1))
    summary = fs.sparsify_summary(model)
    assert ratio == pytest.approx(summary.linear_nbytes / summary.linear_dense_nbytes, abs=0.006)
    assert ratio > 1 and "at 0.0% sparsity" in message
    torch.testing.assert_close(model(x), expected)  # still the same model, just not smaller
    assert "Prune the weights first" in message
    half = readme_model()
    with torch.no_grad():
        half[0].weight.copy_(fs.prune(half[0].weight, 0.5))
    _, caught = record(fs.sparsify_, half, lambda m, fqn: fqn == "0", format="tiled_csl")
    (message,) = [m for m in messages(caught) if "dense size" in m]
    assert "at 50.0% sparsity. tiled_csl is smaller than dense only above 50 % zeros" in message


def test_sparsify_of_a_pruned_model_warns_about_nothing_but_the_path(fresh_notices):
    model = readme_model()
    with torch.no_grad():
        model[0].weight.copy_(fs.prune(model[0].weight, 0.7))
        model[2].weight.copy_(fs.prune(model[2].weight, 0.7))
    _, caught = record(fs.sparsify_, model, min_sparsity=0.5)
    assert isinstance(model[0], fs.SparseLinear) and isinstance(model[2], fs.SparseLinear)
    assert messages(caught) == []


@pytest.mark.parametrize(
    ("model", "filter_fn", "expected"),
    [
        (
            nn.Sequential(nn.ReLU()),
            None,
            "sparsify_ converted nothing: model has no projection layer.",
        ),
        (
            nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)),
            lambda m, fqn: False,
            "sparsify_ converted nothing: filter_fn rejected all 2 projection layer(s).",
        ),
    ],
)
def test_sparsify_warns_when_nothing_matches(model, filter_fn, expected):
    _, caught = record(fs.sparsify_, model, filter_fn)
    assert messages(caught) == [expected]


def test_sparsify_twice_is_quiet_the_second_time(fresh_notices):
    model = readme_model()
    with torch.no_grad():
        for i in (0, 2):
            model[i].weight.copy_(fs.prune(model[i].weight, 0.7))
    fs.sparsify_(model)
    _, caught = record(fs.sparsify_, model)
    assert messages(caught) == []


def test_reference_path_notice_once_per_kind(fresh_notices, monkeypatch):
    monkeypatch.delenv("FLASHSPARSE_BACKEND", raising=False)

    def pruned(dtype=torch.float32):
        model = readme_model().to(dtype)
        with torch.no_grad():
            for i in (0, 2):
                model[i].weight.copy_(fs.prune(model[i].weight, 0.7))
        return model

    # tiled_csl has no CPU kernel (bitmap runs the C++ CPU backend where it builds).
    _, caught = record(fs.sparsify_, pruned(), format="tiled_csl")
    (message,) = messages(caught, fs.ReferencePathWarning)
    assert message.startswith(
        "flashsparse: 2 tiled_csl layer(s) with float32 weights on cpu will run the reference path"
    )
    assert "format='bitmap'" in message and "On a CUDA GPU" in message
    _, caught = record(fs.sparsify_, pruned(), format="tiled_csl")
    assert messages(caught, fs.ReferencePathWarning) == []  # said once per process
    _, caught = record(fs.sparsify_, pruned(torch.bfloat16), format="tiled_csl")
    assert len(messages(caught, fs.ReferencePathWarning)) == 1  # another dtype: said again
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "reference")  # asked for: nothing to tell
    _, caught = record(fs.sparsify_, pruned(torch.float16), format="tiled_csl")
    assert messages(caught, fs.ReferencePathWarning) == []


def test_reference_path_notice_follows_the_backend_selection(monkeypatch):
    """A kernel backend that the selection picks silences the notice."""
    ref = backends._KERNELS[("tiled_csl", "reference")]
    fake = backends.Kernel("some-kernel", ref.fn, ref.supports, ref.available)
    monkeypatch.delenv("FLASHSPARSE_BACKEND", raising=False)
    assert notices.reference_path_reason("tiled_csl", torch.device("cpu"), torch.float32)
    monkeypatch.setattr(backends, "_select", lambda *a, **k: fake)
    assert notices.reference_path_reason("tiled_csl", torch.device("cpu"), torch.float32) is None


def test_load_sparse_gives_the_reference_path_notice(fresh_notices, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96,
        max_position_embeddings=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        hidden_size=32,
        intermediate_size=72,
        num_key_value_heads=1,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for fqn, m in model.named_modules():
            if isinstance(m, nn.Linear) and fqn != "lm_head":
                m.weight.copy_(fs.prune(m.weight, 0.7))
    fs.sparsify_(model, format="tiled_csl")  # no CPU kernel for tiled_csl
    fs.save_sparse(model, tmp_path)
    notices._given.clear()
    loaded = transformers.AutoModelForCausalLM.from_config(config)
    _, caught = record(fs.load_sparse, loaded, tmp_path)
    (message,) = messages(caught, fs.ReferencePathWarning)
    assert "7 tiled_csl layer(s) with float32 weights on cpu" in message


# -- 9. sparsity ranges ------------------------------------------------------------------------------
def test_sparsity_one_is_refused_by_both_commands_with_the_same_range(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["sparsify", str(model_dir), str(out), "--sparsity", "1.0"]) == 2
    assert capsys.readouterr().err == (
        "flashsparse sparsify: error: --sparsity must be in [0, 1) (fraction of zeros, e.g. 0.5), "
        "got 1.0\n"
    )
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["bench", "--sparsity", "1.0"])
    assert "sparsity must be in [0, 1) (fraction of zeros, e.g. 0.7)" in capsys.readouterr().err


def test_prune_to_all_zeros_warns_and_out_of_range_raises():
    w = torch.randn(5, 7)
    zeros, caught = record(fs.prune, w, 1.0)
    assert not zeros.any()
    assert messages(caught) == [
        "prune(w, sparsity=1.0) zeroes every weight: the layer's output will be its bias alone"
    ]
    _, caught = record(fs.prune, w, 0.9)
    assert messages(caught) == []
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\], got 1.01"):
        fs.prune(w, 1.01)


# -- 11. outputs are never overwritten silently; progress --------------------------------------------
def test_sparsify_refuses_a_non_empty_output_dir(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["sparsify", str(model_dir), str(out)]) == 2
    assert capsys.readouterr().err == (
        f"flashsparse sparsify: error: OUT_DIR {out} is not empty; pass --overwrite to write into "
        "it anyway\n"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert main(["sparsify", str(model_dir), str(out), "--overwrite", "--sparsity", "0.5"]) == 0
    assert (out / "flashsparse.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_sparsify_cli_says_the_library_warnings_in_one_line_each(model_dir, tmp_path, capsys):
    assert main(["sparsify", str(model_dir), str(tmp_path / "a"), "--min-sparsity", "0.5"]) == 0
    err = capsys.readouterr().err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert warned == [
        ln for ln in err.splitlines() if ln.startswith("flashsparse sparsify: warning: ")
    ]
    assert len(warned) == 1 and "converted nothing" in warned[0]
    assert "(--sparsity 0.5) or lower --min-sparsity." in warned[0]
    assert main(["sparsify", str(model_dir), str(tmp_path / "b")]) == 0  # unpruned: larger
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if "warning" in ln]
    assert "their dense size" in line and "--sparsity 0.5" in line


@pytest.mark.parametrize("option", ["--json", "--csv", "--plot"])
def test_bench_output_that_cannot_be_written_fails_before_the_run(tmp_path, capsys, option):
    (tmp_path / "file").write_text("x")
    for target, why in [
        (tmp_path, "is a directory"),
        (tmp_path / "file" / "x.json", "not a directory"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["bench", *FAST, "--quick", option, str(target)])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing ran
        assert f"argument {option}: " in captured.err and why in captured.err


def test_bench_says_when_it_replaces_a_file(tmp_path, capsys):
    out = tmp_path / "b.csv"
    out.write_text("old")
    args = ["bench", *FAST, "--quick", "--n", "1", "--sparsity", "0.5", "--baseline", "none"]
    assert main([*args, "--csv", str(out)]) == 0
    assert f"wrote {out} (replaced the existing file)" in capsys.readouterr().out
    assert out.read_text() != "old"


def test_progress_labels_and_skipped_steps():
    from flashsparse.microbench.bandwidth import Bandwidth
    from flashsparse.microbench.shapes import Shape
    from flashsparse.microbench.timing import make_timer

    device = torch.device("cpu")
    cfg = runner.BenchConfig(
        shapes=[Shape("t:x", 70, 66)],
        ns=[1, 3],
        sparsities=[0.5],
        dtypes=[torch.float32],
        formats=["bitmap"],
        backends=["auto"],
        baselines=["2:4"],
        mask="uniform",
        device=device,
        timer=make_timer(device, 0.5, 1.0, "cpu"),
        cache=1 << 16,
        bandwidth=Bandwidth(10.0, 1 << 20, None),
    )
    labels: list[str] = []
    skips: list[None] = []
    rows = runner.Sweep(cfg, progress=labels.append, on_skip=lambda: skips.append(None)).run()
    assert len(labels) + len(skips) == runner.count_tasks(cfg)
    assert (
        len(skips)
        == sum(r["status"] == "skipped" for r in rows)
        == (0 if torch.cuda.is_available() else 2)
    )
    assert labels[:2] == ["t:x fp32 N=1 dense", "t:x fp32 N=3 dense"]
    assert "t:x fp32 N=1 sparsity 0.5 bitmap" in labels
    assert not any("dense dense" in label for label in labels)
    bar = report.Progress(4, enabled=False)
    bar.skip()
    bar.advance()
    assert (bar.done, bar.total) == (1, 3)


# -- 8. the plot -----------------------------------------------------------------------------------
def test_plot_uses_a_log_axis_distinct_markers_and_quiet_ceilings():
    pytest.importorskip("matplotlib")
    rows = []
    for n in (1, 16):
        for sp, slow, fast in ((0.5, 0.02, 1.2), (0.9, 0.05, 4.0)):
            for method, speedup, ceiling in (
                ("tiled_csl", slow, 2 / (4 * (1 - sp))),
                ("bitmap", slow * 1.01, 2 / (2 * (1 - sp) + 0.125)),
                ("csr", fast, None),
            ):
                rows.append(
                    dict(
                        n=n,
                        layer="a",
                        method=method,
                        backend="reference",
                        dtype="fp32",
                        sparsity=sp,
                        speedup=speedup,
                        ceiling=ceiling,
                    )
                )
        rows.append(
            dict(
                n=n,
                layer="a",
                method="dense",
                backend="torch-cpu",
                dtype="fp32",
                sparsity=None,
                speedup=1.0,
                ceiling=None,
            )
        )
    fig = report.plot_figure({"device": "test", "device_type": "cpu"}, rows)
    axes = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_yscale() == "log"
        lo, hi = ax.get_ylim()
        assert lo < 0.02 and hi < 20  # the smallest point is inside; the axis is not stretched
        measured = [ln for ln in ax.get_lines() if "(" in ln.get_label()]
        ceilings = [ln for ln in ax.get_lines() if ln.get_label().startswith("ceiling")]
        assert len(measured) == 3 and len(ceilings) == 2
        assert len({ln.get_marker() for ln in measured}) == 3
        assert max(ln.get_linewidth() for ln in ceilings) < min(
            ln.get_linewidth() for ln in measured
        )
        assert all(ln.get_marker() in ("None", "", None) for ln in ceilings)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sum(t.startswith("memory-bound ceiling") for t in legend) == 1


# -- more of the same kind: the environment ------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        (
            "FLASHSPARSE_BAKEND",
            "cuda",
            "FLASHSPARSE_BAKEND is not a flashsparse setting and is ignored; did you mean "
            "FLASHSPARSE_BACKEND?",
        ),
        (
            "FLASHSPARSE_CUDA_JIT",
            "y",
            "FLASHSPARSE_CUDA_JIT='y' is read as off (on: 1, true, yes, on; off: 0, false, no, off)",
        ),
    ],
)
def test_ignored_settings_get_a_warning_line(monkeypatch, capsys, name, value, expected):
    monkeypatch.setenv(name, value)
    assert main(["info"]) == 0
    assert f"flashsparse info: warning: {expected}\n" in capsys.readouterr().err
    assert main(["bench", "--list-presets"]) == 0
    assert f"flashsparse bench: warning: {expected}\n" in capsys.readouterr().err


def test_cache_dir_that_cannot_be_created_is_named(monkeypatch, capsys, tmp_path):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(tmp_path / "file" / "cache"))
    assert main(["info"]) == 0
    assert "FLASHSPARSE_CACHE_DIR=" in capsys.readouterr().err


def test_a_bad_cuda_arch_list_is_a_problem(monkeypatch, capsys, model_dir, tmp_path):
    monkeypatch.setenv("FLASHSPARSE_CUDA_ARCH_LIST", "7.0")
    assert main(["info"]) == 1
    assert (
        "flashsparse info: error: FLASHSPARSE_CUDA_ARCH_LIST='7.0': flashsparse's CUDA kernels "
        "need compute capability >= 8.0"
    ) in capsys.readouterr().err
    assert main(["sparsify", str(model_dir), str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


# -- 10. the documents stand on their own ----------------------------------------------------------------
def test_documents_reference_nothing_outside_the_repository():
    readme = (ROOT / "README.md").read_text()
    pages = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ROOT / "bench" / "README.md"]
    for page in pages:
        text = page.read_text()
        assert "DESIGN" not in text and "§" not in text, page
    # Every results file the README points at is in the repository.
    for ref in re.findall(r"bench/results/[\w.-]+\.\w+", readme):
        assert (ROOT / ref).is_file(), ref
    bench_cli = (ROOT / "docs" / "bench_cli.md").read_text()
    first_use = bench_cli.index("bench/results/h100")
    assert 0 <= bench_cli.index("mkdir -p bench/results") < first_use


def test_readme_python_example_does_what_its_comments_say(capsys, fresh_notices):
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python", readme.index("## Quickstart")) + len("```python\n")
    code = readme[start : readme.index("```", start)]
    _, caught = record(exec, compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    comment = re.search(
        r"print\(sw.format, sw.sparsity, sw.nbytes\)\s+# e.g. (\S+ \S+) (\d+)", code
    )
    assert lines[0].startswith(comment.group(1) + " ")
    assert abs(int(lines[0].split()[2]) - int(comment.group(2))) < 2000  # padding varies a little
    assert lines[1] == "SparseLinear"
    # Only the filtered-out layer is named (every projection left dense is);
    # on a CPU the reference-path notice is filtered by `messages` when it is given.
    assert messages(caught) == [
        "sparsify_ converted 1 layer(s) but left 1 projection(s) dense: 1 rejected by filter_fn: "
        "'2'. fs.sparsify_summary(model) counts them."
    ]


# -- more of the same kind: flags and functions ------------------------------------------------------
@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_bench_timing_must_be_finite_and_positive(capsys, value):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--warmup-ms", value])
    assert exc.value.code == 2
    assert f"argument --warmup-ms: expected milliseconds (a positive number), got '{value}'" in (
        capsys.readouterr().err
    )


def test_bench_more_threads_than_cores_is_said(capsys):
    threads = (os.cpu_count() or 1) + 1
    args = [
        "bench",
        *FAST[:2],
        "--threads",
        str(threads),
        *FAST[4:],
        "--quick",
        "--n",
        "1",
        "--sparsity",
        "0.5",
        "--baseline",
        "none",
        "--format",
        "bitmap",
    ]
    assert main(args) == 0
    assert f"warning: --threads {threads} is more than this machine's" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "device: CUDA is not available to torch on this machine"),
        ("tpu", "device: expected cpu, cuda or cuda:N, got 'tpu'"),
    ],
)
def test_load_sparse_to_a_device_that_is_not_there(tmp_path, device, message):
    model = readme_model()
    with torch.no_grad():
        model[0].weight.copy_(fs.prune(model[0].weight, 0.7))
    fs.sparsify_(model, lambda m, fqn: fqn == "0")
    path = fs.save_sparse(model, tmp_path / "m.safetensors")
    target = readme_model()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(message)):
        fs.load_sparse(target, path, device=device)
    assert [type(m) for m in target] == [nn.Linear, nn.ReLU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_sparsify_with_a_corrupt_weight_file_is_one_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(
            f.read_bytes()[:100] if f.suffix == ".safetensors" else f.read_bytes()
        )
    out = tmp_path / "out"
    assert main(["sparsify", str(bad), str(out)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"flashsparse sparsify: error: cannot load {bad}: ") and err.count("\n") == 1
    )
    assert not out.exists()


def test_backend_env_reads_follow_every_change(monkeypatch):
    # backends.getenv reads os.environ's encoded store (the per-call kernel choice): every way
    # of changing the environment from Python must show at the next read.
    from flashsparse import backends

    name = "FLASHSPARSE_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert backends.getenv(name, "dflt") == "dflt"
    monkeypatch.setenv(name, "avx2")
    assert backends.getenv(name, "dflt") == "avx2"
    os.environ[name] = "scalär"  # non-ASCII survives the encode / decode
    assert backends.getenv(name, "dflt") == "scalär" == os.environ.get(name)
    os.environ.update({name: "avx512"})
    assert backends.getenv(name, "dflt") == "avx512"
    del os.environ[name]
    assert backends.getenv(name, "dflt") == "dflt"
    os.environ.setdefault(name, "")
    assert backends.getenv(name, "dflt") == ""
    for i in range(100):  # many distinct values: the decoded-value cache stays bounded
        os.environ[name] = f"v{i}"
        assert backends.getenv(name, "dflt") == f"v{i}"
    assert len(backends._env_values) <= 65
    monkeypatch.delenv(name)
