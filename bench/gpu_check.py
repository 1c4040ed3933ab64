"""The step runner behind ``bench/gpu_check.sh``: what one call on a lent GPU machine does.

    bash bench/gpu_check.sh [--budget | --rerun SUMMARY.json] [--deadline S] [--dry-run]
                            [--steps a,b] [OUTDIR]

Profiles (docs/gpu_runbook.md says which ``run`` call starts each one and how to read its result):

* ``full`` (default): every check at full size (the sweep over Llama-3-8B + OPT-66B, N 1..512,
  every method, the static report, the e2e matrix); about 25 minutes, so on a machine with a
  10-minute limit per command it is split with ``--steps``.
* ``--budget``: at most 9 minutes in one command, what matters most first: environment and
  package audit, install, build + self-check of every GPU kernel for sm_90a only,
  ``pytest -m gpu``, compute-sanitizer memcheck (odd shapes of each kernel) and racecheck
  (bitmap kernel), a reduced sweep (Llama-3-8B, N 1/16, 50/70/90 %, bf16 + fp16; CUDA bitmap,
  Triton bitmap, CUDA Tiled-CSL, cuBLAS) with the static model's predictions beside each
  measurement, and the decode e2e at 70 % if time remains.
* ``--rerun SUMMARY.json``: at most 4 minutes, after a fix: environment, install and build (the
  machine starts bare), then only what failed, timed out or was skipped in the run whose
  ``summary.json`` is given: the failed (or not yet run) GPU tests by node id, the failed
  sanitizer tools, the sweep chunks that did not finish, the e2e.

``--deadline S`` fits a profile into a call of S seconds (when the session has less device time
left than the profile assumes): the steps then share ``S - 15`` seconds by the same rules.

Every step runs under its own time limit in its own process group (killed whole when the limit
is reached) and a failing step does not stop the others. A profile with a deadline gives each
step ``min(its limit, time left - the floors of the later non-optional steps)``; a step whose
share is under its floor is SKIPPED, and an optional step runs only in what is left. After every
step the output folder is refreshed, so a run cut short still returns what it did:

    summary.txt   one line per step: status and seconds (human)
    summary.json  the same with limits, environment, GPU test ids that failed / passed, sweep
                  chunks (what ``--rerun`` reads)
    logs.tar.gz   every step's log (pytest's junit XML, the environment JSON beside them)

and the steps write their own results there (budget: sweep.json, sweep.md, e2e.json; full:
bench.json, bench.md, bench.csv, bench.png, kernel_report.json, e2e.json): at most 8 files,
as the device machine returns no more. Logs live in ``$GPU_CHECK_LOGS`` (default: a temporary
folder). Commands run from the repository root with ``$PYTHON`` (default ``python3``) and
``PYTHONPATH`` set to it; ``GPU_CHECK_TIMEOUT_<STEP>`` overrides one step's limit (seconds),
``GPU_CHECK_TIME_SCALE`` scales every limit, floor and deadline (tests), ``GPU_CHECK_COMMIT``
is recorded as the commit (the machine gets no .git).

Exit status: 0 every step that ran passed (an optional step skipped for time is no failure),
1 some step failed, timed out or was skipped, 2 bad arguments. Standard library only: this must
start even where torch is broken.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FULL_STEPS = ("env", "install", "build", "pytest", "sanitize", "sweep", "report", "e2e")
BUDGET_STEPS = ("env", "install", "build", "pytest", "memcheck", "racecheck", "sweep", "e2e")
WRAP_UP_S = 15.0  # kept after the last step: the final kill grace, packing the logs, a margin
BUDGET_DEADLINE_S = 9 * 60 - WRAP_UP_S
RERUN_DEADLINE_S = 4 * 60 - WRAP_UP_S
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL this much later
PREDICTIONS = "bench/results/gpu_predictions_h200.json"
ALWAYS_IN_RERUN = ("env", "install", "build")  # a fresh machine is bare


@dataclass(frozen=True)
class Step:
    """One bounded command. ``floor``: the seconds earlier steps must leave for it (a share
    below it is useless: the step is skipped); ``optional``: nothing is reserved for it, it runs
    in what is left. ``expected`` and ``why``: its expected duration on the H200 and the
    reasoning (docs/gpu_runbook.md), printed by --dry-run."""

    name: str
    command: str
    limit: float
    floor: float = 0.0
    optional: bool = False
    expected: float | None = None
    why: str = ""


@dataclass
class Result:
    name: str
    status: str  # ok | FAILED | TIMEOUT | SKIPPED
    rc: int | None
    seconds: float
    limit: float
    note: str = ""

    @property
    def label(self) -> str:
        if self.status == "FAILED":
            return f"FAILED (exit {self.rc})"
        return self.status

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "rc": self.rc,
            "seconds": round(self.seconds, 1),
            "limit_s": round(self.limit, 1),
            "note": self.note,
        }


@dataclass
class Profile:
    name: str
    steps: list[Step]
    deadline: float | None  # seconds from the start for all steps; None: no overall limit
    outputs: tuple[str, ...]  # result files the steps write into the output folder
    extra: dict = field(default_factory=dict)  # what a rerun selected, for the summary


# --- commands ------------------------------------------------------------------------------------
CS_FIND = (
    'cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer '
    "/usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer "
    '2>/dev/null | head -1); [ -n "$cs" ] || { echo "compute-sanitizer not found"; exit 1; }; '
    'echo "using $cs"'
)
# pytest-timeout (on the device image) stops one hung test instead of the whole step.
PYTEST_TIMEOUT = (
    'to=""; {py} -c "import pytest_timeout" 2>/dev/null && to="--timeout=90"; echo "per-test '
    'limit: ${{to:-none (no pytest-timeout)}}"'
)


def _q(path: str | Path) -> str:
    return shlex.quote(str(path))


def full_profile(py: str, dest: str, logs: str) -> Profile:
    """Every check at full size (about 25 minutes)."""
    d = _q(dest)
    steps = [
        Step(
            "env",
            f"nvidia-smi; nvcc --version; {py} bench/gpu_env.py --json {_q(logs)}/env.json",
            60,
        ),
        Step("install", f"{py} -m pip install --no-deps --no-build-isolation -e .", 180),
        Step("build", f"FLASHSPARSE_VERBOSE_BUILD=1 {py} bench/gpu_selfcheck.py", 300),
        Step("pytest", f"{py} -m pytest -m gpu -q -p no:cacheprovider", 300),
        Step(
            "sanitize",
            f"{CS_FIND}; $cs --tool memcheck --error-exitcode 3 {py} bench/sanitize_driver.py && "
            f"$cs --tool racecheck --error-exitcode 3 {py} bench/sanitize_driver.py",
            240,
        ),
        Step(
            "sweep",
            f"{py} -m flashsparse.cli bench --preset llama3-8b,opt-66b --n 1,8,16,32,128,512 "
            "--sparsity 0.5,0.7,0.8,0.9 --dtype fp16,bf16 --format all --backend all "
            f"--baseline csr,2:4 --warmup-ms 10 --rep-ms 40 --no-progress --json {d}/bench.json "
            f"--csv {d}/bench.csv --plot {d}/bench.png | tee {d}/bench.md",
            480,
        ),
        Step(
            "report",
            "gpu=h100; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -qi "
            f"h200 && gpu=h200; {py} bench/kernel_report.py --gpu $gpu --json {d}/kernel_report.json",
            120,
        ),
        Step(
            "e2e",
            f"{py} bench/e2e.py --sparsities 0.5,0.7 --batches 1,8,32 --modes eager --fresh "
            f"--out {d}/e2e.json",
            300,
        ),
    ]
    outputs = ("bench.json", "bench.md", "bench.csv", "bench.png", "kernel_report.json", "e2e.json")
    return Profile("full", steps, None, outputs)


def _pytest_command(py: str, logs: str, select: Sequence[str] = (), deselect: Sequence[str] = ()):
    args = [*map(_q, select)] + [f"--deselect {_q(d)}" for d in deselect]
    return (
        f"{PYTEST_TIMEOUT.format(py=py)}; {py} -m pytest -m gpu -v -rfE -p no:cacheprovider "
        f"--continue-on-collection-errors --junitxml {_q(logs)}/pytest.xml $to"
        + ("" if not args else " " + " ".join(args))
    )


def _sweep_command(py: str, dest: str, chunks: Sequence[str] = ()) -> str:
    pick = f" --chunks {','.join(chunks)}" if chunks else ""
    return f"{py} bench/gpu_sweep.py --out {_q(dest)} --predictions {PREDICTIONS}{pick}"


MEMCHECK = "{cs} --tool memcheck --error-exitcode 3 --print-limit 20 {py} bench/gpu_sanitize.py"
RACECHECK = (
    "{cs} --tool racecheck --error-exitcode 3 --print-limit 20 {py} bench/gpu_sanitize.py "
    "--racecheck"
)
E2E = (
    "{py} bench/e2e.py --sparsities 0.7 --batches 1,16 --modes eager --repeats 2 --new-tokens 32 "
    "--no-sliced --fresh --out {dest}/e2e.json"
)


def budget_steps(py: str, dest: str, logs: str) -> dict[str, Step]:
    """The budget profile's steps by name, with limits, floors and expected durations on the
    H200 (16 cores); docs/gpu_runbook.md gives the measurements behind each figure."""
    d = _q(dest)
    return {
        "env": Step(
            "env",
            "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm "
            "--format=csv; nvcc --version | tail -2; "
            f"{py} bench/gpu_env.py --json {_q(logs)}/env.json",
            30,
            expected=8,
            why="python start + import torch/triton/transformers (~5 s), nvidia-smi",
        ),
        "install": Step(
            "install",
            f"{py} -m pip install --no-deps --no-build-isolation -e .",
            60,
            expected=10,
            why="pure-Python editable install, no compile (7 s on the 2-core CPU machine)",
        ),
        "build": Step(
            "build",
            # The self-check runs even when pip fails: it then JIT-builds the same sources and
            # shows the compiler's error again, and checks the Triton kernel all the same.
            f"FLASHSPARSE_CUDA=1 {py} -m pip install --no-deps --no-build-isolation -v -e .; b=$?; "
            'echo "[build] flashsparse._C (sm_90a): pip exit $b after ${SECONDS} s"; '
            f"FLASHSPARSE_VERBOSE_BUILD=1 {py} bench/gpu_selfcheck.py; s=$?; exit $(( b ? b : s ))",
            180,
            floor=60,
            expected=50,
            why="8 translation units for sm_90a, all at once on 16 cores: the slowest takes 10 s "
            "(torch glue), the 8 take 38 s one after another (2-core CPU machine); setuptools "
            "(imports torch twice), link and install ~15 s; then each GPU kernel's load + "
            "self-check + two odd shapes per dtype, ~8 Triton compiles at ~2 s: ~20 s",
        ),
        "pytest": Step(
            "pytest",
            _pytest_command(py, logs),
            180,
            floor=60,
            expected=120,
            why="collection of the whole suite (~15 s), 252 GPU tests: ~200 small CUDA cases "
            "(ms each), ~40 Triton cases compiling ~10 configs (~2 s each), two torch.compile "
            "tests (~30 s each)",
        ),
        "memcheck": Step(
            "memcheck",
            f"{CS_FIND}; " + MEMCHECK.format(cs="$cs", py=py),
            100,
            floor=45,
            expected=50,
            why="sanitizer start + torch import (~15 s), each kernel module patched on first "
            "use, ~40 small launches at tens of ms each under memcheck",
        ),
        "racecheck": Step(
            "racecheck",
            f"{CS_FIND}; " + RACECHECK.format(cs="$cs", py=py),
            80,
            floor=30,
            expected=35,
            why="same start-up; 2 bitmap cases x 2 dtypes x 2 calls + the Tiled-CSL workspace "
            "case and one linear call per kernel, racecheck slower per launch than memcheck",
        ),
        "sweep": Step(
            "sweep",
            _sweep_command(py, dest),
            200,
            floor=90,
            expected=100,
            why="6 chunks x 32 measurements (4 shapes x (2 dense + 3 sparsities x 2 N)), "
            "60 ms each (10 ms warm-up + 50 ms timed) = 12 s; weight making + encoding + "
            "float64 reference per (shape, sparsity, chunk) ~0.5 s x 72 = 36 s; Triton "
            "compiles ~20 s; CUDA init + bandwidth ~10 s",
        ),
        "e2e": Step(
            "e2e",
            E2E.format(py=py, dest=d),
            240,
            floor=90,
            optional=True,
            expected=120,
            why="build + prune a random bf16 Llama-3-8B on the GPU (~20 s), sparsify_ (~20 s), "
            "eager generate of 32 tokens x 3 runs x 2 batches x 2 models at ~30 ms a step "
            "(~12 s), first-call overheads",
        ),
    }


def budget_profile(py: str, dest: str, logs: str) -> Profile:
    steps = budget_steps(py, dest, logs)
    return Profile(
        "budget",
        [steps[s] for s in BUDGET_STEPS],
        BUDGET_DEADLINE_S,
        ("sweep.json", "sweep.md", "e2e.json"),
    )


def rerun_profile(py: str, dest: str, logs: str, previous: dict) -> Profile:
    """Environment, install and build, then only what did not pass in ``previous`` (a
    ``summary.json`` of an earlier budget or rerun profile)."""
    steps = budget_steps(py, dest, logs)
    status = {s["name"]: s["status"] for s in previous.get("steps", [])}
    chosen = [steps[s] for s in ALWAYS_IN_RERUN]
    extra: dict = {"from": previous.get("started"), "from_profile": previous.get("profile")}

    def redo(name: str) -> bool:
        # A step the earlier run never reached (cut off) counts as not done.
        return status.get(name, "not run") != "ok"

    if redo("pytest"):
        tests = previous.get("pytest") or {}
        failed = list(dict.fromkeys([*tests.get("failed", []), *tests.get("errors", [])]))
        if tests.get("complete") and failed:
            cmd = _pytest_command(py, logs, select=failed)
            extra["pytest"] = f"{len(failed)} failed test(s) by node id"
        elif tests.get("passed"):
            cmd = _pytest_command(py, logs, deselect=tests["passed"])
            extra["pytest"] = f"every GPU test except the {len(tests['passed'])} that passed"
        else:
            cmd = _pytest_command(py, logs)
            extra["pytest"] = "every GPU test (nothing known passed)"
        chosen.append(replace(steps["pytest"], command=cmd))
    for name in ("memcheck", "racecheck"):
        if redo(name):
            chosen.append(steps[name])
    if redo("sweep"):
        chunks = (previous.get("sweep") or {}).get("chunks") or {}
        todo = [c for c, s in chunks.items() if s != "ok"]
        if chunks and not todo:
            todo = list(chunks)  # the step failed after its chunks: run them all again
        extra["sweep"] = todo or "all chunks"
        chosen.append(replace(steps["sweep"], command=_sweep_command(py, dest, todo)))
    if redo("e2e"):
        chosen.append(steps["e2e"])
    return Profile("rerun", chosen, RERUN_DEADLINE_S, ("sweep.json", "sweep.md", "e2e.json"), extra)


def scaled(profile: Profile, scale: float, overrides: dict[str, float]) -> Profile:
    """Limits from ``GPU_CHECK_TIMEOUT_<STEP>`` (seconds, as given), the rest times ``scale``."""
    steps = [
        replace(
            s,
            limit=overrides.get(s.name, s.limit * scale),
            floor=s.floor * scale,
        )
        for s in profile.steps
    ]
    deadline = None if profile.deadline is None else profile.deadline * scale
    return replace(profile, steps=steps, deadline=deadline)


# --- scheduling (pure) ---------------------------------------------------------------------------
def allotted(steps: Sequence[Step], index: int, elapsed: float, deadline: float | None) -> float:
    """Seconds step ``index`` may run after ``elapsed`` seconds: its own limit, capped by the
    time to the deadline less the floors of the later non-optional steps."""
    step = steps[index]
    if deadline is None:
        return step.limit
    reserve = sum(s.floor for s in steps[index + 1 :] if not s.optional)
    return min(step.limit, deadline - elapsed - reserve)


def skip_reason(
    steps: Sequence[Step], index: int, elapsed: float, deadline: float | None
) -> str | None:
    """Why step ``index`` cannot start now (None: it can)."""
    if deadline is None:
        return None
    share = allotted(steps, index, elapsed, deadline)
    need = max(steps[index].floor, 1e-3)
    if share < need:
        left = deadline - elapsed
        return f"no time: {max(left, 0):.0f} s left, {left - share:.0f} s kept for later steps, needs {need:.0f} s"
    return None


# --- running one command -------------------------------------------------------------------------
def run_command(command: str, limit: float, log: Path, env: dict[str, str]) -> tuple[int, bool]:
    """``bash -c command`` from the repository root, output appended to ``log``, in its own
    process group; after ``limit`` seconds the whole group gets SIGTERM, then SIGKILL.
    Returns ``(exit status, timed out)``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=max(limit, 0.01)), False
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=min(KILL_GRACE_S, max(limit, 0.5)))
            except subprocess.TimeoutExpired:
                _kill_group(proc, signal.SIGKILL)
                proc.wait()
            return (proc.returncode if proc.returncode is not None else -9), True
        finally:
            # Whatever the step left behind in its group (a sanitizer's child, a tee) goes too.
            _kill_group(proc, signal.SIGKILL)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


# --- what the steps leave behind -----------------------------------------------------------------
def pytest_outcomes(junit: Path, log: Path) -> dict:
    """GPU test node ids by outcome, from pytest's junit XML (written at the end of a run), else
    from the ``-v`` lines of the log (a run killed at its limit writes no XML)."""
    out: dict = {"passed": [], "failed": [], "errors": [], "skipped": 0, "complete": False}
    if junit.is_file():
        try:
            root = ET.parse(junit).getroot()
        except ET.ParseError:
            root = None
        if root is not None:
            for case in root.iter("testcase"):
                nodeid = _nodeid(case.get("classname", ""), case.get("name", ""))
                kinds = {child.tag for child in case}
                if "failure" in kinds:
                    out["failed"].append(nodeid)
                elif "error" in kinds:
                    out["errors"].append(nodeid)
                elif "skipped" in kinds:
                    out["skipped"] += 1
                else:
                    out["passed"].append(nodeid)
            out["complete"] = True
            return out
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) >= 2 and "::" in parts[0]:
                word = parts[1]
                if word == "PASSED":
                    out["passed"].append(parts[0])
                elif word == "FAILED":
                    out["failed"].append(parts[0])
                elif word == "ERROR":
                    out["errors"].append(parts[0])
                elif word == "SKIPPED":
                    out["skipped"] += 1
    return out


def _nodeid(classname: str, name: str) -> str:
    """junit ``classname="tests.test_x"`` + ``name`` -> ``tests/test_x.py::name`` (a test in a
    class: ``tests/test_x.py::Class::name``)."""
    if not classname:  # a module skipped or broken at collection: name is its dotted path
        classname, name = name, ""
    parts = classname.split(".")
    for cut in range(len(parts), 0, -1):
        path = Path(*parts[:cut]).with_suffix(".py")
        if (ROOT / path).is_file():
            return "::".join([path.as_posix(), *parts[cut:], *([name] if name else [])])
    return f"{classname.replace('.', '/')}.py" + (f"::{name}" if name else "")


def sweep_chunks(dest: Path) -> dict[str, str]:
    """``{chunk: status}`` from the sweep's own ``sweep.json`` (empty if it wrote none)."""
    try:
        data = json.loads((dest / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {name: c.get("status", "?") for name, c in (data.get("chunks") or {}).items()}


# --- the run -------------------------------------------------------------------------------------
class Runner:
    """Runs a profile's steps in order. ``clock`` and ``execute`` are injectable so that the
    scheduling, the partial results and the summary can be tested without real waiting."""

    def __init__(
        self,
        profile: Profile,
        dest: Path,
        logs: Path,
        env: dict[str, str],
        *,
        clock: Callable[[], float] = time.monotonic,
        execute: Callable[[str, float, Path, dict[str, str]], tuple[int, bool]] = run_command,
        echo: Callable[[str], None] = print,
    ) -> None:
        self.profile, self.dest, self.logs, self.env = profile, dest, logs, env
        self.clock, self.execute, self.echo = clock, execute, echo
        self.results: list[Result] = []
        self.extra: dict = {}
        self.started = dt.datetime.now(dt.timezone.utc)

    def run(self) -> int:
        self.dest.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        t0 = self.clock()
        steps = self.profile.steps
        deadline = self.profile.deadline
        self.echo(
            f"gpu_check: profile {self.profile.name}, {len(steps)} steps"
            + (f", deadline {deadline:.0f} s" if deadline is not None else "")
            + f"; output {self.dest}"
        )
        self._write(self.clock() - t0)
        for i, step in enumerate(steps):
            elapsed = self.clock() - t0
            reason = skip_reason(steps, i, elapsed, deadline)
            if reason:
                self.results.append(Result(step.name, "SKIPPED", None, 0.0, 0.0, reason))
                self.echo(f"-- {step.name}: SKIPPED ({reason})")
                self._write(self.clock() - t0)
                continue
            limit = allotted(steps, i, elapsed, deadline)
            log = self.logs / f"{step.name}.log"
            with open(log, "a") as f:
                f.write(f"== {step.name} (limit {limit:.0f} s): {step.command}\n")
            self.echo(f"== {step.name} (limit {limit:.0f} s)")
            env = {**self.env, "GPU_CHECK_STEP_LIMIT": f"{limit:.1f}"}
            start = self.clock()
            rc, timed_out = self.execute(step.command, limit, log, env)
            seconds = self.clock() - start
            status = "TIMEOUT" if timed_out else "ok" if rc == 0 else "FAILED"
            result = Result(step.name, status, rc, seconds, limit)
            self.results.append(result)
            try:
                self._collect(step.name)
            except Exception as exc:  # a malformed artefact must not cost the rest of the run
                self.extra.setdefault("collect_errors", []).append(
                    f"{step.name}: {type(exc).__name__}: {exc}"
                )
            with open(log, "a") as f:
                f.write(f"-- {step.name}: {result.label} in {seconds:.0f}s\n")
            self.echo(f"-- {step.name}: {result.label} in {seconds:.0f}s")
            for line in _tail(log, 6)[:-1]:
                self.echo(f"   | {line}")
            self._write(self.clock() - t0)
        total = self.clock() - t0
        self._write(total, final=True)
        self.echo(f"== summary ({self.dest / 'summary.txt'})")
        self.echo((self.dest / "summary.txt").read_text().rstrip())
        return self.exit_status()

    def exit_status(self) -> int:
        optional = {s.name for s in self.profile.steps if s.optional}
        bad = [
            r
            for r in self.results
            if r.status in ("FAILED", "TIMEOUT")
            or (r.status == "SKIPPED" and r.name not in optional)
        ]
        return 1 if bad else 0

    def _collect(self, name: str) -> None:
        if name == "pytest":
            self.extra["pytest"] = pytest_outcomes(
                self.logs / "pytest.xml", self.logs / "pytest.log"
            )
        elif name == "sweep":
            self.extra["sweep"] = {"chunks": sweep_chunks(self.dest)}
        elif name == "env":
            try:
                self.extra["environment"] = json.loads((self.logs / "env.json").read_text())
            except (OSError, json.JSONDecodeError):
                self.extra["environment"] = None

    def summary(self, total: float, final: bool) -> dict:
        return {
            "profile": self.profile.name,
            "started": self.started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            if final
            else None,
            "total_s": round(total, 1),
            "deadline_s": self.profile.deadline,
            "commit": self.env.get("GPU_CHECK_COMMIT") or None,
            "selected": self.profile.extra,
            "steps": [r.as_dict() for r in self.results],
            "not_reached": [s.name for s in self.profile.steps[len(self.results) :]],
            **self.extra,
        }

    def _write(self, total: float, final: bool = False) -> None:
        lines = [
            f"{r.name:<9} {r.label:<18} {r.seconds:5.0f}s  {r.note}".rstrip() for r in self.results
        ]
        lines += [
            f"{s.name:<9} {'not reached':<18}" for s in self.profile.steps[len(self.results) :]
        ]
        if final:
            lines.append(
                f"total {total:.0f}s on {dt.datetime.now(dt.timezone.utc):%Y-%m-%dT%H:%M:%SZ}"
            )
        _atomic(self.dest / "summary.txt", "\n".join(lines) + "\n")
        _atomic(self.dest / "summary.json", json.dumps(self.summary(total, final), indent=1) + "\n")
        for name in ("summary.txt", "summary.json"):
            _atomic(self.logs / name, (self.dest / name).read_text())
        tmp = self.dest / ".logs.tar.gz.tmp"
        try:
            with tarfile.open(tmp, "w:gz") as tar:
                tar.add(self.logs, arcname="logs")
            os.replace(tmp, self.dest / "logs.tar.gz")
        except OSError as exc:
            self.echo(f"gpu_check: could not pack the logs: {exc}")


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


# --- command line --------------------------------------------------------------------------------
def build_profile(args: argparse.Namespace, py: str, dest: str, logs: str) -> Profile:
    if args.rerun:
        previous = json.loads(Path(args.rerun).read_text())
        return rerun_profile(py, dest, logs, previous)
    if args.budget:
        return budget_profile(py, dest, logs)
    return full_profile(py, dest, logs)


def select_steps(profile: Profile, names: str) -> Profile:
    known = [s.name for s in profile.steps]
    wanted = [n for n in names.split(",") if n]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"unknown step {unknown[0]!r} (steps: {' '.join(known)})")
    return replace(profile, steps=[s for s in profile.steps if s.name in wanted])


def dry_run(profile: Profile, dest: str) -> str:
    lines = [
        f"gpu_check (dry run): profile {profile.name}, output folder {dest}"
        + (f", deadline {profile.deadline:.0f} s" if profile.deadline is not None else "")
    ]
    if profile.extra:
        lines.append(f"selected from the earlier run: {json.dumps(profile.extra)}")
    expected = 0.0
    for i, s in enumerate(profile.steps):
        extra = []
        if s.floor:
            extra.append(f"floor {s.floor:.0f}s")
        if s.optional:
            extra.append("optional")
        if s.expected is not None:
            expected += s.expected
            extra.append(f"expected {s.expected:.0f}s")
        cap = allotted(profile.steps, i, 0.0, profile.deadline)
        lines.append(
            f"step {s.name:<9} limit {min(s.limit, cap):4.0f}s  log {s.name}.log"
            + (f"  ({', '.join(extra)})" if extra else "")
        )
        lines.append(f"    {s.command}")
        if s.why:
            lines.append(f"    expected: {s.why}")
    if expected:
        lines.append(
            f"expected total {expected:.0f} s"
            + (f" of {profile.deadline:.0f} s" if profile.deadline else "")
        )
    lines.append(f"then: {dest}/summary.txt, {dest}/summary.json and {dest}/logs.tar.gz")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="gpu_check.sh", add_help=False)
    ap.add_argument("-h", "--help", action="store_true")
    group = ap.add_mutually_exclusive_group()
    group.add_argument(
        "--budget", action="store_true", help="at most 9 minutes, most important first"
    )
    group.add_argument(
        "--rerun", metavar="SUMMARY_JSON", help="at most 4 minutes: what failed there"
    )
    ap.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="seconds the whole call may take (the profile's deadline becomes this less 15 s)",
    )
    ap.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    ap.add_argument("--steps", default="", help="only these steps (comma-separated), usual order")
    ap.add_argument("outdir", nargs="?", help="output folder (default $OUT, else ./gpu_check_out)")
    try:
        args = ap.parse_args(argv)
    except SystemExit:
        return 2
    if args.help:
        print(__doc__)
        return 0
    dest = args.outdir or os.environ.get("OUT") or "gpu_check_out"
    dest = os.path.abspath(dest)
    logs = os.environ.get("GPU_CHECK_LOGS") or ""
    if not logs:
        logs = (
            "<temporary folder>/logs" if args.dry_run else os.path.join(tempfile.mkdtemp(), "logs")
        )
    logs = logs if logs.startswith("<") else os.path.abspath(logs)
    py = os.environ.get("PYTHON") or "python3"
    try:
        profile = build_profile(args, py, dest, logs)
    except (OSError, json.JSONDecodeError) as exc:
        print(f"gpu_check: cannot read --rerun {args.rerun}: {exc}", file=sys.stderr)
        return 2
    if args.steps:
        try:
            profile = select_steps(profile, args.steps)
        except ValueError as exc:
            print(f"gpu_check: {exc}", file=sys.stderr)
            return 2
    try:
        scale = float(os.environ.get("GPU_CHECK_TIME_SCALE") or 1.0)
        overrides = {
            s.name: float(os.environ[f"GPU_CHECK_TIMEOUT_{s.name.upper()}"])
            for s in profile.steps
            if os.environ.get(f"GPU_CHECK_TIMEOUT_{s.name.upper()}")
        }
    except ValueError as exc:
        print(f"gpu_check: bad GPU_CHECK_TIME_SCALE / GPU_CHECK_TIMEOUT_*: {exc}", file=sys.stderr)
        return 2
    if args.deadline is not None:
        if args.deadline <= WRAP_UP_S:
            print(f"gpu_check: --deadline must exceed {WRAP_UP_S:.0f} s", file=sys.stderr)
            return 2
        profile = replace(profile, deadline=args.deadline - WRAP_UP_S)
    profile = scaled(profile, scale, overrides)
    if args.dry_run:
        print(dry_run(profile, dest))
        return 0
    env = dict(os.environ)
    env.update(
        PYTHON=py,
        GPU_CHECK_OUT=dest,
        GPU_CHECK_LOGS=logs,
        PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
        PYTHONUNBUFFERED="1",
    )
    # No network there: fail at once instead of waiting on the hub or an index.
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("PIP_NO_INDEX", "1"),
        ("PIP_DISABLE_PIP_VERSION_CHECK", "1"),
        ("TRITON_DEFAULT_FP_FUSION", "1"),
    ):
        env.setdefault(key, value)
    if profile.name in ("budget", "rerun"):
        env.setdefault("FLASHSPARSE_CUDA_ARCH_LIST", "9.0a")
    runner = Runner(profile, Path(dest), Path(logs), env, echo=lambda s: print(s, flush=True))
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
