"""``flashsparse info`` and the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashsparse.cli import main


def test_info_json_lists_every_backend(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"reference", "triton", "cuda", "cpu"}
    assert report["backends"]["reference"] is None
    assert report["torch"] and report["flashsparse"]
    for name, reason in report["backends"].items():
        assert reason is None or (isinstance(reason, str) and reason), name


def test_info_text_says_why_a_backend_is_unavailable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference  available" in out
    assert "cuda" in out


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_console_script_module_runs():
    out = subprocess.run(
        [sys.executable, "-m", "flashsparse.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.startswith("flashsparse ")


def test_info_shows_each_compiled_backends_cache(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["info", "--json"]) == 0
    compiled = json.loads(capsys.readouterr().out)["compiled"]
    assert set(compiled) == {"cpu", "cuda"}
    for device, status in compiled.items():
        assert status["folder"] == str(tmp_path / "cache" / "extensions" / device)
        assert status["writable"] is True and status["building"] == []
        assert status["last_error"] is None
    assert not (tmp_path / "cache").exists()  # looking creates nothing
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "compiled kernels:" in out
    assert f"cache folder: {tmp_path / 'cache' / 'extensions' / 'cpu'} (writable)" in out
    assert "build in progress: none" in out and "last build error: none" in out


def test_info_shows_the_last_build_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "extensions" / "cpu"
    folder.mkdir(parents=True)
    (folder / "last-error.json").write_text(
        json.dumps(
            {
                "entry": "flashsparse_cpu-x",
                "time": "2026-01-01 00:00:00 UTC",
                "pid": 7,
                "error": "RuntimeError: Error building extension\nbitmap.cpp:3: error: oops",
            }
        )
    )
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert (
        "last build error: 2026-01-01 00:00:00 UTC (pid 7, entry flashsparse_cpu-x): "
        "RuntimeError: Error building extension ... (1 more lines; --json shows them)"
    ) in out


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")
def test_an_unwritable_cache_names_the_kernels_it_stops(capsys, monkeypatch):
    """/proc cannot be written even by root (permission bits would say it can)."""
    import torch

    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", "/proc/flashsparse-cache")
    monkeypatch.setenv("FLASHSPARSE_JIT", "1")  # even where a prebuilt module is installed
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["compiled"]["cpu"]["writable"] is False
    assert "cannot create a file in /proc" in report["compiled"]["cpu"]["not_writable_because"]
    [warning] = [w for w in report["warnings"] if "FLASHSPARSE_CACHE_DIR" in w]
    assert warning.startswith("FLASHSPARSE_CACHE_DIR='/proc/flashsparse-cache' cannot be written")
    affected = "CPU" if torch.version.cuda is None else "CPU and CUDA"
    assert f"the {affected} kernels cannot be JIT-built there" in warning
    assert main(["info"]) == 0
    assert "NOT writable: cannot create a file in /proc" in capsys.readouterr().out


def test_build_and_cache_commands_are_there(capsys):
    for command in ("build", "cache"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        assert f"usage: flashsparse {command}" in capsys.readouterr().out


def test_build_cuda_without_a_cuda_torch_is_a_clear_error(capsys, monkeypatch, tmp_path):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("checks the error of a CPU-only torch")
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(tmp_path))
    assert main(["build", "--cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flashsparse build: error: cuda: torch ")
    assert "is a CPU-only build" in err and "install a CUDA build of torch" in err
    assert not any(tmp_path.iterdir())
