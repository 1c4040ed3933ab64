"""bench/gpu_check.sh and its helpers, rehearsed without a GPU: the dry runs, the scheduling of
the budget profile under a fake clock, a real run of every step against stub commands (time
limits, killed process groups, partial results, the summary), the rerun's selection, the sweep's
join of measurements to predictions, and the committed predictions."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SCRIPT = BENCH / "gpu_check.sh"
STEPS = ("env", "install", "build", "pytest", "sanitize", "sweep", "report", "e2e")
BUDGET = ("env", "install", "build", "pytest", "memcheck", "racecheck", "sweep", "e2e")
LLAMA3_8B = ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336))

if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import gpu_check as gc
import gpu_predictions as gp

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None,
    reason="needs bash and coreutils timeout",
)


def _run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def _listed(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines() if line.startswith("step ")]


# --- the full profile (unchanged interface) ------------------------------------------------------
@pytest.mark.slow
def test_dry_run_prints_every_step_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    res = _run("--dry-run", str(out))
    assert res.returncode == 0, res.stderr
    assert [s[1] for s in _listed(res.stdout)] == list(STEPS)
    text = res.stdout
    assert "pip install --no-deps --no-build-isolation -e ." in text
    assert "pytest -m gpu" in text
    assert "--tool memcheck" in text and "--tool racecheck" in text
    assert "--preset llama3-8b,opt-66b" in text and "--n 1,8,16,32,128,512" in text
    assert "--sparsity 0.5,0.7,0.8,0.9" in text and "--dtype fp16,bf16" in text
    assert f"{out}/kernel_report.json" in text and "bench/e2e.py" in text
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.slow
def test_dry_run_uses_out_env_and_step_selection(tmp_path):
    res = _run(
        "--dry-run",
        "--steps",
        "report,env",
        env={"OUT": str(tmp_path / "o"), "GPU_CHECK_TIMEOUT_REPORT": "7"},
    )
    assert res.returncode == 0, res.stderr
    steps = _listed(res.stdout)
    assert [s[1] for s in steps] == ["env", "report"]  # the usual order
    assert steps[1][3] == "7s"
    assert str(tmp_path / "o") in res.stdout


@pytest.mark.slow
def test_bad_arguments_exit_2(tmp_path):
    assert _run("--steps", "nope", "--dry-run").returncode == 2
    assert _run("--bogus").returncode == 2
    assert _run("--budget", "--rerun", "x.json", "--dry-run").returncode == 2
    assert _run("--rerun", str(tmp_path / "missing.json"), "--dry-run").returncode == 2
    assert _run("--budget", "--dry-run", env={"GPU_CHECK_TIME_SCALE": "fast"}).returncode == 2


@pytest.mark.slow
def test_failing_step_does_not_stop_the_others(tmp_path):
    out = tmp_path / "out"
    # PYTHON=fake: "install" (python -m pip ...) fails; the report step's stand-in succeeds.
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
    assert sorted(p.name for p in out.iterdir()) == ["logs.tar.gz", "summary.json", "summary.txt"]


# --- the budget profile: plan -------------------------------------------------------------------
@pytest.mark.slow
def test_budget_dry_run_plans_nine_minutes_most_important_first(tmp_path):
    res = _run("--budget", "--dry-run", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr
    steps = _listed(res.stdout)
    assert [s[1] for s in steps] == list(BUDGET)
    assert "deadline 525 s" in res.stdout
    text = res.stdout
    assert "FLASHSPARSE_CUDA=1" in text and "bench/gpu_selfcheck.py" in text
    assert "pytest -m gpu" in text and "--continue-on-collection-errors" in text
    assert "--junitxml" in text and " -x" not in text  # no fail-fast
    assert "--tool memcheck" in text and "--tool racecheck" in text and "--racecheck" in text
    assert "bench/gpu_sweep.py" in text and gc.PREDICTIONS in text
    assert "bench/e2e.py --sparsities 0.7" in text
    expected = re.search(r"expected total (\d+) s of 525 s", text)
    assert expected and int(expected.group(1)) <= 525
    assert not (tmp_path / "o").exists()


def _previous_summary(tmp_path: Path) -> Path:
    path = tmp_path / "summary.json"
    steps = [{"name": n, "status": "ok"} for n in BUDGET if n != "sweep"]
    path.write_text(
        json.dumps({"profile": "budget", "steps": [*steps, {"name": "sweep", "status": "FAILED"}]})
    )
    return path


def test_dry_run_in_process_lists_the_budget_plan(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("GPU_CHECK_TIME_SCALE", raising=False)
    assert gc.main(["--budget", "--dry-run", "/nowhere"]) == 0
    out = capsys.readouterr().out
    assert [s[1] for s in _listed(out)] == list(BUDGET)
    assert "expected total" in out and not Path("/nowhere").exists()
    # A session with less device time left: the same steps share a shorter deadline.
    assert (
        gc.main(["--rerun", str(_previous_summary(tmp_path)), "--deadline", "200", "--dry-run"])
        == 0
    )
    out = capsys.readouterr().out
    assert "deadline 185 s" in out
    assert gc.main(["--budget", "--deadline", "10", "--dry-run"]) == 2


def test_budget_profile_fits_its_deadline_and_the_device_limits():
    profile = gc.budget_profile("python3", "/out", "/logs")
    assert profile.deadline is not None and profile.deadline <= 9 * 60 - 10
    # Every non-optional step can run at least its floor even when all before it use theirs.
    floors = [s.floor for s in profile.steps if not s.optional]
    assert sum(floors) < profile.deadline
    assert all(s.expected is not None and s.why for s in profile.steps)
    assert sum(s.expected for s in profile.steps if not s.optional) < profile.deadline
    assert [s.name for s in profile.steps if s.optional] == ["e2e"]
    # At most 8 files come back: the summary pair, the logs and the steps' results.
    assert len(profile.outputs) + 3 <= 8
    assert gc.RERUN_DEADLINE_S <= 4 * 60 - 10
    # The machine builds for its own GPU only.
    assert "9.0a" in Path(gc.__file__).read_text()


# --- the budget profile: scheduling under a fake clock -------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fake_run(tmp_path, durations: dict, outcomes: dict | None = None, profile=None, seen=None):
    """Run ``profile`` (default: budget) with a fake clock: each step 'takes' ``durations[name]``
    seconds (capped at its limit: then it timed out) and exits with ``outcomes[name]``."""
    clock = FakeClock()
    dest, logs = tmp_path / "out", tmp_path / "logs"
    profile = profile or gc.budget_profile("python3", str(dest), str(logs))
    calls: list[tuple[str, float]] = []

    def execute(command, limit, log, env):
        name = log.stem
        calls.append((name, limit))
        if seen is not None:  # what the output folder held when this step started
            seen[name] = json.loads((dest / "summary.json").read_text())
        took = durations.get(name, 1.0)
        with open(log, "a") as f:
            f.write(f"fake {name}\n")
        if name == "pytest":
            (logs / "pytest.xml").write_text(
                '<testsuites><testsuite><testcase classname="tests.test_tiled_csl_cuda" '
                'name="test_gpu_opcheck"/><testcase classname="tests.test_bitmap_cuda" '
                'name="test_gpu_kernel_matches_float64[a-b]"><failure message="x"/></testcase>'
                "</testsuite></testsuites>"
            )
        if took >= limit:
            clock.now += limit
            return -15, True
        clock.now += took
        return (outcomes or {}).get(name, 0), False

    runner = gc.Runner(profile, dest, logs, {}, clock=clock, execute=execute, echo=lambda s: None)
    rc = runner.run()
    return rc, calls, json.loads((dest / "summary.json").read_text()), dest


def test_on_time_run_passes_and_keeps_the_optional_step(tmp_path):
    durations = {s.name: s.expected for s in gc.budget_profile("p", "o", "l").steps}
    rc, calls, summary, _ = _fake_run(tmp_path, durations)
    assert rc == 0
    assert [c[0] for c in calls] == list(BUDGET)
    assert [s["status"] for s in summary["steps"]] == ["ok"] * len(BUDGET)
    assert summary["total_s"] == pytest.approx(sum(durations.values()))
    assert summary["total_s"] <= summary["deadline_s"]
    assert summary["pytest"]["failed"] == [
        "tests/test_bitmap_cuda.py::test_gpu_kernel_matches_float64[a-b]"
    ]
    assert summary["pytest"]["passed"] == ["tests/test_tiled_csl_cuda.py::test_gpu_opcheck"]
    assert summary["not_reached"] == [] and summary["finished"]


def test_overrunning_steps_shrink_later_limits_and_skip_the_optional_step(tmp_path):
    # pytest and memcheck hang: each is cut at its limit; the later steps still get their floors.
    rc, calls, summary, _ = _fake_run(tmp_path, {"pytest": 1e9, "memcheck": 1e9, "sweep": 1e9})
    limits = dict(calls)
    by_name = {s["name"]: s for s in summary["steps"]}
    assert by_name["pytest"]["status"] == "TIMEOUT"
    assert by_name["memcheck"]["status"] == "TIMEOUT"
    assert by_name["racecheck"]["status"] == "ok"
    assert by_name["sweep"]["status"] == "TIMEOUT"
    assert limits["pytest"] == 180 and limits["memcheck"] == 100
    # sweep still gets its whole limit (the optional e2e reserves nothing) ...
    assert limits["sweep"] == 200
    # ... so e2e, with 41 s left of its 90 s floor, is skipped, and the run ends in time.
    assert by_name["e2e"]["status"] == "SKIPPED" and "no time" in by_name["e2e"]["note"]
    assert summary["total_s"] <= 525
    assert rc == 1


def test_a_step_is_skipped_when_its_floor_no_longer_fits(tmp_path):
    profile = gc.budget_profile("p", str(tmp_path / "out"), str(tmp_path / "logs"))
    # An env step that eats almost everything (its own limit raised to show the cap).
    profile.steps[0] = gc.replace(profile.steps[0], limit=10_000)
    rc, calls, summary, _ = _fake_run(tmp_path, {"env": 1e9}, profile=profile)
    # env was capped so that every later non-optional step keeps its floor.
    reserved = sum(s.floor for s in profile.steps[1:] if not s.optional)
    assert dict(calls)["env"] == pytest.approx(525 - reserved)
    assert [c[0] for c in calls][:2] == ["env", "build"]  # install never started
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert statuses["install"] == "SKIPPED"  # floor 0: nothing kept for it, nothing left
    assert statuses["build"] != "SKIPPED"  # its floor was kept
    assert rc == 1


def test_results_are_saved_after_every_step(tmp_path):
    seen: dict = {}
    durations = {s.name: 2.0 for s in gc.budget_profile("p", "o", "l").steps}
    _fake_run(tmp_path, durations, outcomes={"build": 3}, seen=seen)
    # When racecheck starts, summary.json already records every step before it, build's failure
    # included, and names the ones not reached yet.
    before = seen["racecheck"]
    assert [s["name"] for s in before["steps"]] == list(BUDGET[:5])
    assert before["steps"][2]["status"] == "FAILED" and before["steps"][2]["rc"] == 3
    assert before["not_reached"] == list(BUDGET[5:])
    assert before["finished"] is None
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as tar:
        assert {f"logs/{s}.log" for s in BUDGET} <= set(tar.getnames())


def test_allotted_and_skip_reason():
    steps = [
        gc.Step("a", "x", limit=100),
        gc.Step("b", "x", limit=100, floor=40),
        gc.Step("c", "x", limit=100, floor=30, optional=True),
    ]
    assert gc.allotted(steps, 0, 0.0, None) == 100
    assert gc.allotted(steps, 0, 0.0, 120) == 80  # b's floor kept, c's not (optional)
    assert gc.allotted(steps, 1, 80.0, 120) == 40
    assert gc.skip_reason(steps, 1, 80.0, 120) is None
    assert "no time" in gc.skip_reason(steps, 1, 90.0, 120)
    assert gc.allotted(steps, 2, 100.0, 120) == 20
    assert "needs 30" in gc.skip_reason(steps, 2, 100.0, 120)


# --- a real run against stub commands ------------------------------------------------------------
STUB = r"""#!/usr/bin/env bash
# Stands in for python on the GPU machine: behaves per script, as the real step would.
case "$1 $2" in
  "-c import pytest_timeout") exit 1 ;;
  "-m pip") echo "pip $*"; exit 0 ;;
  "-m pytest")
    while [ $# -gt 0 ]; do [ "$1" = --junitxml ] && xml=$2; shift; done
    cat > "$xml" <<'EOF'
<testsuites><testsuite>
<testcase classname="tests.test_tiled_csl_cuda" name="test_gpu_opcheck"/>
<testcase classname="tests.test_bitmap_cuda" name="test_gpu_kernel_matches_float64[fp16-1]"><failure message="wrong"/></testcase>
<testcase classname="tests.test_moe" name="test_gpu_grouped"><skipped/></testcase>
</testsuite></testsuites>
EOF
    echo "1 failed, 1 passed, 1 skipped"; exit 1 ;;
esac
case "$1" in
  bench/gpu_env.py) echo '{"python": "stub"}' > "$3"; echo env; exit 0 ;;
  bench/gpu_selfcheck.py) echo "gpu_selfcheck: 3/3 kernels passed"; exit 0 ;;
  bench/gpu_sanitize.py)
    if [ "$2" = --racecheck ]; then
      # hangs, with a child in its process group: both must go at the step's limit
      sleep 300 & echo $! > "$STUB_DIR/racecheck_child.pid"; wait; exit 0
    fi
    echo "sanitize_driver: 0 mismatches"; exit 0 ;;
  bench/gpu_sweep.py)
    printf '{"chunks": {"bitmap-cuda-bf16": {"status": "ok"}, "bitmap-cuda-fp16": {"status": "failed (exit 1)"}, "tiled_csl-cuda-bf16": {"status": "not run"}}, "rows": []}' > "$3/sweep.json"
    exit 1 ;;
  bench/e2e.py) sleep 300 ;;
esac
echo "stub: unexpected $*"; exit 9
"""


def _stub_env(tmp_path: Path, scale: float) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    py = bin_dir / "python-stub"
    py.write_text(STUB)
    py.chmod(0o755)
    cs = bin_dir / "compute-sanitizer"  # drops its own flags, runs the program
    cs.write_text('#!/usr/bin/env bash\nwhile [ "$1" != "$PYTHON" ]; do shift; done\nexec "$@"\n')
    cs.chmod(0o755)
    for tool in ("nvidia-smi", "nvcc"):
        (bin_dir / tool).write_text("#!/bin/sh\necho stub\n")
        (bin_dir / tool).chmod(0o755)
    return {
        "PYTHON": str(py),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "STUB_DIR": str(tmp_path),
        "GPU_CHECK_LOGS": str(tmp_path / "logs"),
        "GPU_CHECK_TIME_SCALE": str(scale),
        "GPU_CHECK_COMMIT": "abc1234",
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (killed, not yet reaped by its parent) is gone for our purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_budget_run_with_stub_commands(tmp_path):
    scale = 0.02  # deadline 10.5 s; racecheck's limit 1.6 s
    out = tmp_path / "out"
    env = _stub_env(tmp_path, scale)
    start = time.monotonic()
    res = _run("--budget", str(out), env=env, timeout=120)
    took = time.monotonic() - start
    assert res.returncode == 1, res.stdout + res.stderr
    assert took < gc.BUDGET_DEADLINE_S * scale + 5  # the deadline holds (plus start and packing)
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status["env"] == status["install"] == status["build"] == "ok", res.stdout
    assert status["pytest"] == "FAILED" and status["memcheck"] == "ok"
    assert status["racecheck"] == "TIMEOUT" and status["sweep"] == "FAILED"
    assert status["e2e"] in ("SKIPPED", "TIMEOUT")  # optional: whatever time was left
    assert summary["commit"] == "abc1234" and summary["environment"] == {"python": "stub"}
    assert summary["pytest"]["complete"] and summary["pytest"]["skipped"] == 1
    assert summary["pytest"]["failed"] == [
        "tests/test_bitmap_cuda.py::test_gpu_kernel_matches_float64[fp16-1]"
    ]
    assert summary["sweep"]["chunks"]["bitmap-cuda-bf16"] == "ok"
    # The hung racecheck's child was killed with its process group.
    pid = int((tmp_path / "racecheck_child.pid").read_text())
    assert not _alive(pid)
    # What comes back: within the device's 8-file limit.
    names = sorted(p.name for p in out.iterdir())
    assert names == ["logs.tar.gz", "summary.json", "summary.txt", "sweep.json"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        got = set(tar.getnames())
    assert {"logs/pytest.xml", "logs/env.json", "logs/racecheck.log"} <= got
    text = (out / "summary.txt").read_text()
    assert re.search(r"^racecheck +TIMEOUT", text, re.M) and text.rstrip().splitlines()[
        -1
    ].startswith("total ")

    # The rerun picks exactly what did not pass, and runs it within its own deadline.
    plan = _run("--rerun", str(out / "summary.json"), "--dry-run", env=env)
    assert plan.returncode == 0, plan.stderr
    steps = [s[1] for s in _listed(plan.stdout)]
    expected = ["env", "install", "build", "pytest", "racecheck", "sweep", "e2e"]
    assert steps == expected  # memcheck passed: not again
    assert "test_gpu_kernel_matches_float64[fp16-1]" in plan.stdout
    assert "test_gpu_opcheck" not in plan.stdout
    assert "--chunks bitmap-cuda-fp16,tiled_csl-cuda-bf16" in plan.stdout
    out2 = tmp_path / "out2"
    (tmp_path / "racecheck_child.pid").unlink()
    res2 = _run("--rerun", str(out / "summary.json"), str(out2), env=env, timeout=120)
    assert res2.returncode == 1
    again = json.loads((out2 / "summary.json").read_text())
    assert again["profile"] == "rerun"
    assert [s["name"] for s in again["steps"]] == expected
    assert again["total_s"] <= gc.RERUN_DEADLINE_S * scale + 2


def test_rerun_after_a_pytest_timeout_deselects_what_passed():
    previous = {
        "profile": "budget",
        "steps": [
            {"name": n, "status": "ok"}
            for n in ("env", "install", "build", "memcheck", "racecheck")
        ]
        + [{"name": "pytest", "status": "TIMEOUT"}, {"name": "sweep", "status": "ok"}],
        "pytest": {
            "passed": ["tests/a.py::t[x-1]"],
            "failed": ["tests/b.py::u"],
            "errors": [],
            "complete": False,
        },
    }
    profile = gc.rerun_profile("py", "/o", "/l", previous)
    names = [s.name for s in profile.steps]
    # e2e never ran (cut off) and counts as not done; sweep passed.
    assert names == ["env", "install", "build", "pytest", "e2e"]
    cmd = profile.steps[3].command
    assert "--deselect 'tests/a.py::t[x-1]'" in cmd and "tests/b.py::u" not in cmd
    assert profile.deadline == gc.RERUN_DEADLINE_S


def test_pytest_outcomes_from_junit_with_collection_problems(tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="" name="tests.test_compressed_tensors">'
        '<skipped message="collection skipped"/></testcase>'
        '<testcase classname="" name="tests.test_moe"><error message="ImportError"/></testcase>'
        '<testcase classname="tests.test_tiled_csl_cuda" name="test_gpu_opcheck"/>'
        "</testsuite></testsuites>"
    )
    got = gc.pytest_outcomes(xml, tmp_path / "pytest.log")
    # A module that failed to import is rerun whole (its path is a valid pytest argument).
    assert got["errors"] == ["tests/test_moe.py"] and got["skipped"] == 1
    assert got["passed"] == ["tests/test_tiled_csl_cuda.py::test_gpu_opcheck"] and got["complete"]


def test_pytest_outcomes_from_the_log_when_no_xml(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text(
        "tests/test_a.py::test_x[fp16] PASSED [ 10%]\n"
        "tests/test_a.py::test_y FAILED [ 20%]\n"
        "tests/test_b.py::test_z SKIPPED (needs) [ 30%]\n"
        "some other line\n"
    )
    got = gc.pytest_outcomes(tmp_path / "missing.xml", log)
    assert got["passed"] == ["tests/test_a.py::test_x[fp16]"]
    assert got["failed"] == ["tests/test_a.py::test_y"]
    assert got["skipped"] == 1 and not got["complete"]


# --- the sweep: measurements joined to predictions -----------------------------------------------
def _cpu_predictions(path: Path) -> None:
    base = {"gpu": "H200", "dtype": "fp16", "counted": True, "bound": "issue"}
    preds = [
        {**base, "kernel": "bitmap_cpu", "m": 200, "k": 136, "n": n, "sparsity": s}
        | {"time_us": 10.0, "dense_us": 20.0, "speedup": 2.0}
        for n in (1, 16)
        for s in (0.5, 0.9)
    ]
    meta = {"source": "test", "triton": None, "gpu_model": {"name": "H200"}, "sources_sha256": ""}
    path.write_text(json.dumps({"meta": meta, "predictions": preds}))


@pytest.mark.slow
def test_sweep_rehearsal_on_cpu_joins_predictions_and_saves_each_chunk(tmp_path, monkeypatch):
    import gpu_sweep

    preds = tmp_path / "pred.json"
    _cpu_predictions(preds)
    out, work = tmp_path / "out", tmp_path / "work"
    common = (
        "--preset tiny --n 1,16 --sparsity 0.5,0.9 --baseline none --warmup-ms 1 --rep-ms 2 "
        "--no-progress --device cpu"
    )
    monkeypatch.delenv("GPU_CHECK_STEP_LIMIT", raising=False)
    rc = gpu_sweep.main(
        [
            "--out",
            str(out),
            "--work",
            str(work),
            "--predictions",
            str(preds),
            "--common",
            common,
            "--chunk",
            "bitmap-cpu=--format bitmap --backend cpu --dtype fp32",
            "--chunk",
            "cannot=--format bitmap --backend cuda --dtype fp32",
        ]
    )
    assert rc == 1  # the second chunk cannot run here
    data = json.loads((out / "sweep.json").read_text())
    assert data["chunks"]["bitmap-cpu"]["status"] == "ok"
    assert data["chunks"]["cannot"]["status"] == "failed (exit 2)"
    sparse = [r for r in data["rows"] if r["method"] == "bitmap"]
    assert len(sparse) == 4 and all(r["status"] == "ok" for r in sparse)
    for r in sparse:
        assert r["predicted_us"] == 10.0 and r["predicted_speedup"] == 2.0
        assert r["measured_over_predicted"] == pytest.approx(r["median_ms"] * 1e3 / 10.0, rel=1e-2)
    dense = [r for r in data["rows"] if r["method"] == "dense"]
    assert dense and all(r["predicted_us"] == 20.0 for r in dense)
    md = (out / "sweep.md").read_text()
    assert "| bitmap/cpu | fp32 | 50% | 2 |" in md and "2.00x" in md
    assert (work / "bitmap-cpu.json").is_file()


@pytest.mark.slow
def test_sweep_leaves_out_chunks_that_cannot_finish(tmp_path, monkeypatch):
    import gpu_sweep

    monkeypatch.setenv("GPU_CHECK_STEP_LIMIT", "0.001")
    common = "--preset tiny --n 1 --sparsity 0.5 --baseline none --warmup-ms 1 --rep-ms 1 --no-progress --device cpu"
    rc = gpu_sweep.main(
        [
            "--out",
            str(tmp_path / "o"),
            "--work",
            str(tmp_path / "w"),
            "--predictions",
            str(tmp_path / "none.json"),
            "--common",
            common,
            "--chunk",
            "a=--format bitmap --backend reference --dtype fp32",
            "--chunk",
            "b=--format bitmap --backend reference --dtype fp32",
        ]
    )
    data = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert data["chunks"]["a"]["status"] == "ok"
    assert data["chunks"]["b"]["status"] == "not run (no time)"
    assert rc == 1 and any("no predictions" in n for n in data["notes"])


def test_prediction_lookup():
    preds = [
        {"kernel": "bitmap_cuda", "m": 6144, "k": 4096, "n": 1, "sparsity": 0.7}
        | {"time_us": 5.0, "dense_us": 12.0, "speedup": 2.4, "bound": "memory"}
    ]
    idx = gp.index(preds)
    row = {"method": "bitmap", "backend": "cuda", "m": 6144, "k": 4096, "n": 1, "sparsity": 0.7}
    assert gp.lookup(idx, row)["predicted_us"] == 5.0
    assert gp.lookup(idx, {**row, "method": "dense", "sparsity": None})["predicted_us"] == 12.0
    assert gp.lookup(idx, {**row, "backend": "triton"})["predicted_us"] is None
    assert gp.lookup(idx, {**row, "sparsity": 0.5})["predicted_us"] is None


def test_committed_predictions_cover_the_budget_sweep():
    data = json.loads((ROOT / gc.PREDICTIONS).read_text())
    meta = data["meta"]
    # Made with the GPU machine's Triton (3.6 compiles the same source differently from 3.9).
    assert meta["triton"].startswith("3.6") and meta["gpu"] == "h200"
    assert meta["gpu_model"]["bandwidth"] == 4.8e12 and meta["sources_sha256"]
    idx = gp.index(data["predictions"])
    for kernel in ("bitmap_cuda", "bitmap_triton", "tiled_csl_cuda"):
        for m, k in LLAMA3_8B:
            for n in (1, 16):
                for s in (0.5, 0.7, 0.9):
                    p = idx[(kernel, m, k, n, s)]
                    assert p["counted"] and p["time_us"] > 0 and p["dense_us"] > 0
    assert {e["kernel"] for e in data["kernels"]} >= {
        "bitmap_cuda",
        "tiled_csl_cuda",
        "bitmap_triton",
    }


# --- helpers of the other steps, without a GPU ---------------------------------------------------
def test_sanitizer_subsets_are_odd_shapes_of_each_kernel():
    import gpu_sanitize
    import sanitize_driver

    tiled = [sanitize_driver.CASES[i] for i in gpu_sanitize.MEMCHECK_TILED_CSL]
    bitmap = [sanitize_driver.BITMAP_CASES[i] for i in gpu_sanitize.MEMCHECK_BITMAP]
    for cases in (tiled, bitmap):
        assert any(n == 1 for _, _, n, *_ in cases)  # decode
        assert any(split > 1 for *_, split, _ in cases)  # split-K
        assert any(unaligned for *_, unaligned in cases)  # unaligned x
        assert any(k % 8 for _, k, *_ in cases)  # the scalar x path
        assert all(m % 64 or k % 64 or n % 8 for m, k, n, *_ in cases)  # no tile multiples
    race = [sanitize_driver.BITMAP_CASES[i] for i in gpu_sanitize.RACECHECK_BITMAP]
    assert race and all(split > 1 for *_, split, _ in race)
    assert gpu_sanitize.RACECHECK_TILED_CSL == ()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "code", "says"),
    [
        ("gpu_sanitize.py", 2, "the CUDA backend is unavailable"),
        ("gpu_selfcheck.py", 1, "no CUDA device"),
    ],
)
def test_gpu_helpers_say_why_without_a_gpu(script, code, says):
    res = subprocess.run(
        [sys.executable, str(BENCH / script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""},
        check=False,
    )
    assert res.returncode == code, res.stdout + res.stderr
    assert says in res.stdout


def test_selfcheck_finds_every_registered_gpu_kernel():
    import gpu_selfcheck

    found = {(fmt, backend) for fmt, backend, _ in gpu_selfcheck.gpu_kernels(("cuda", "triton"))}
    assert {("bitmap", "cuda"), ("tiled_csl", "cuda"), ("bitmap", "triton")} <= found


@pytest.mark.slow
def test_env_reports_missing_packages(monkeypatch):
    import gpu_env

    monkeypatch.setattr(
        gpu_env, "REQUIRED", (*gpu_env.REQUIRED, ("no_such_module_xyz", "no-such-dist", "a test"))
    )
    env, problems = gpu_env.collect()
    assert env["packages"]["torch"]["ok"] and env["torch"]
    assert any("no-such-dist" in p and "a test" in p for p in problems)
    assert "compressed-tensors" in env["optional"]
