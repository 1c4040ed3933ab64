"""bench/gpu_check.sh: the dry run lists every step; a real run continues after a failing step."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.sh"
STEPS = ("env", "install", "build", "pytest", "sanitize", "sweep", "report", "e2e")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils timeout",
)


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    res = _run("--dry-run", str(out))
    assert res.returncode == 0, res.stderr
    listed = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("step ")]
    assert listed == list(STEPS)
    text = res.stdout
    assert "pip install --no-deps --no-build-isolation -e ." in text
    assert "pytest -m gpu" in text
    assert "--tool memcheck" in text and "--tool racecheck" in text
    assert "--preset llama3-8b,opt-66b" in text and "--n 1,8,16,32,128,512" in text
    assert "--sparsity 0.5,0.7,0.8,0.9" in text and "--dtype fp16,bf16" in text
    assert f"{out}/kernel_report.json" in text and "bench/e2e.py" in text
    assert not out.exists()  # nothing ran, nothing was written


def test_dry_run_uses_out_env_and_step_selection(tmp_path):
    res = _run(
        "--dry-run",
        "--steps",
        "report,env",
        env={"OUT": str(tmp_path / "o"), "GPU_CHECK_TIMEOUT_REPORT": "7"},
    )
    assert res.returncode == 0, res.stderr
    steps = [line.split() for line in res.stdout.splitlines() if line.startswith("step ")]
    assert [s[1] for s in steps] == ["env", "report"]  # the usual order
    assert steps[1][3] == "7s"
    assert str(tmp_path / "o") in res.stdout


def test_bad_arguments_exit_2():
    assert _run("--steps", "nope", "--dry-run").returncode == 2
    assert _run("--bogus").returncode == 2


def test_failing_step_does_not_stop_the_others(tmp_path):
    out = tmp_path / "out"
    # PYTHON=false: "install" (python -m pip ...) fails; PYTHON=true would pass, so run the
    # report step with a stand-in that succeeds by pointing PYTHON at a tiny script.
    fake = tmp_path / "py"
    fake.write_text('#!/bin/sh\ncase "$1" in -m) exit 4 ;; esac\necho ran "$@"\n')
    fake.chmod(0o755)
    res = _run(
        "--steps",
        "install,report",
        str(out),
        env={"PYTHON": str(fake), "GPU_CHECK_LOGS": str(tmp_path / "logs")},
    )
    assert res.returncode == 1, res.stdout + res.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].split()[:3] == ["install", "FAILED", "(exit"]
    assert summary[1].split()[:2] == ["report", "ok"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/install.log" in names and "logs/report.log" in names
    assert re.search(
        r"ran bench/kernel_report.py --gpu h[12]00 --json \S+kernel_report.json",
        (tmp_path / "logs" / "report.log").read_text(),
    )
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.txt"]
