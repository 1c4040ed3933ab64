"""The kernel cache (flashsparse.kernels.build) survives crashes, corruption, concurrency and
environment switches, each produced for real in subprocesses.

Most faults use a stand-in extension (two torch-free C++ files, 0.3 s to build) that goes
through the very code path of the CPU and CUDA extensions: the same key, lock, temporary
folder, manifest check, publish and load. Its C++ compiler is a wrapper script that logs every
compile and link (to count builds) and, when asked, stops inside the compile or the link, so a
process can be killed at exactly that point. One test builds the real CPU extension twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from flashsparse.cli import main
from flashsparse.kernels import build

ROOT = Path(__file__).resolve().parent.parent
BOUND_S = 90  # a fault must never cost a waiting or later process more than this

pytestmark = pytest.mark.skipif(
    build.find_cxx() is None or build.find_ninja() is None or not hasattr(os, "fork"),
    reason="needs a C++ compiler, ninja and POSIX processes",
)

RUNNER = textwrap.dedent(
    """
    import ctypes, json, os, sys, threading, time, warnings
    from pathlib import Path

    warnings.simplefilter("always")
    start = time.monotonic()
    import torch
    from flashsparse.kernels import build

    ext = build.Extension(
        device="cpu", kernel_dir="cpu", kernel_suffix=".cpp", name="standin",
        csrc=Path(sys.argv[1]),
    )

    def one():
        try:
            loaded = ext.load()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "origin": loaded.origin,
            "entry": str(loaded.entry),
            "answer": ctypes.CDLL(loaded.library).standin_answer(),
        }

    if sys.argv[2:] == ["threads"]:
        barrier = threading.Barrier(2)
        results = [None, None]

        def worker(i):
            barrier.wait()
            results[i] = one()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = {"threads": results}
    else:
        out = one()
    out["torch"] = os.path.dirname(torch.__file__)
    out["seconds"] = time.monotonic() - start
    print("RESULT " + json.dumps(out), flush=True)
    """
)

# Stands in for the C++ compiler: logs each compile (-c) and link (-shared) and, when
# STANDIN_PAUSE_AT names that step, writes the first 4 KiB of its output (as a linker killed
# midway leaves a truncated library), says so in STANDIN_MARK and sleeps instead of working.
WRAPPER = textwrap.dedent(
    """\
    #!/bin/sh
    case " $* " in
      *" -c "*) step=compile ;;
      *" -shared "*) step=link ;;
      *) step=other ;;
    esac
    if [ "$step" != other ] && [ -n "$STANDIN_LOG" ]; then echo "$step" >> "$STANDIN_LOG"; fi
    if [ "$step" = "$STANDIN_PAUSE_AT" ]; then
      prev=""
      for arg in "$@"; do
        if [ "$prev" = "-o" ]; then head -c 4096 /dev/urandom > "$arg"; fi
        prev=$arg
      done
      touch "$STANDIN_MARK"
      sleep 600
    fi
    exec {real} "$@"
    """
)


class Standin:
    """A stand-in extension, its compiler wrapper and a private cache, in one folder."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.csrc = base / "csrc"
        (self.csrc / "bindings").mkdir(parents=True)
        (self.csrc / "cpu").mkdir()
        (self.csrc / "bindings" / "standin_cpu.cpp").write_text(
            'extern "C" int standin_answer() { return 42; }\n'
        )
        (self.csrc / "cpu" / "standin.cpp").write_text(
            'extern "C" int standin_twice(int x) { return 2 * x; }\n'
        )
        self.cxx = base / "g++-standin"  # a name torch's compiler check accepts
        self.cxx.write_text(WRAPPER.format(real=build.find_cxx()))
        self.cxx.chmod(0o755)
        self.runner = base / "runner.py"
        self.runner.write_text(RUNNER)
        self.cache = base / "cache"
        self.log = base / "compiler.log"
        self.mark = base / "paused"

    @property
    def folder(self) -> Path:
        return self.cache / "extensions" / "cpu"

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSPARSE_")}
        env.update(
            PYTHONPATH=str(ROOT),
            CXX=str(self.cxx),
            FLASHSPARSE_CACHE_DIR=str(self.cache),
            STANDIN_LOG=str(self.log),
            STANDIN_MARK=str(self.mark),
        )
        env.update(extra)
        return env

    def start(self, *args: str, stderr=subprocess.PIPE, **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, str(self.runner), str(self.csrc), *args],
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,  # its compiler children can be killed as a group
        )

    def run(self, *args: str, timeout: float = BOUND_S, **extra: str) -> tuple[dict, str, float]:
        start = time.monotonic()
        proc = self.start(*args, **extra)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            _kill_group(proc)
        return _result(out, err), err, time.monotonic() - start

    def steps(self) -> list[str]:
        return self.log.read_text().split() if self.log.exists() else []

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.folder.glob(".*-*") if p.is_dir())


def _result(out: str, err: str) -> dict:
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(f"the runner printed no result\nstdout:\n{out}\nstderr:\n{err}")


def _kill_group(proc: subprocess.Popen) -> None:
    """End a runner and whatever it left running (ninja, a paused compiler). They share the
    runner's session, not its process group: ninja starts each command in a group of its own."""
    if proc.returncode is None:  # not reaped yet, so the pid is still the runner's
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat_file.parent.name)
        if int(fields[3]) == proc.pid and pid != proc.pid:  # session id (after state, ppid, pgrp)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _wait_for(predicate, what: str, timeout: float = BOUND_S) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@pytest.fixture
def standin(tmp_path):
    return Standin(tmp_path)


def _cli(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flashsparse.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- killed builds --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "sig"),
    [("compile", signal.SIGKILL), ("link", signal.SIGKILL), ("compile", signal.SIGINT)],
    ids=["kill-9-in-compile", "kill-9-in-link", "ctrl-c-in-compile"],
)
def test_a_build_killed_midway_blocks_no_one(standin, step, sig):
    """The first process dies inside the compile or the link; a process that was already
    waiting for it says whom it waits for, then builds as soon as the lock is gone, and a new
    process loads that build. Nothing the dead build left behind survives."""
    builder = standin.start(STANDIN_PAUSE_AT=step)
    waiter_err = standin.base / "waiter.err"
    try:
        _wait_for(standin.mark.exists, f"the first build to reach the {step}")
        partial = list(standin.folder.glob(".tmp-*/*.so"))
        assert len(partial) == (step == "link")  # a truncated library, where a link died
        with open(waiter_err, "w") as err:
            waiter = standin.start(stderr=err)
        try:
            _wait_for(
                lambda: f"another process (pid {builder.pid}" in waiter_err.read_text(),
                "the waiter to say whom it waits for",
            )
            assert builder.poll() is None  # still paused inside the build: the waiter waits
            killed = time.monotonic()
            os.kill(builder.pid, sig)  # the process only: its compiler children live on
            builder.wait(timeout=BOUND_S)
            out, _ = waiter.communicate(timeout=BOUND_S)
            recovered = time.monotonic() - killed
        finally:
            _kill_group(waiter)
    finally:
        _kill_group(builder)
    message = waiter_err.read_text()
    waited = _result(out, message)
    assert waited.get("answer") == 42 and waited["origin"] == "built", waited
    entry = waited["entry"]
    assert (
        f"another process (pid {builder.pid}, for " in message
        and f"is building the standin extension in {entry}; waiting up to 600 s" in message
    ), message
    assert recovered < BOUND_S
    later, _, seconds = standin.run()
    assert later == {**later, "origin": "cache", "entry": entry, "answer": 42}
    assert standin.leftovers() == []  # the dead build's folder went with the rebuild
    assert standin.steps().count("link") == 1 + (step == "link")  # one build after the death
    print(
        f"\n{step}/{signal.Signals(sig).name}: waiter done {recovered:.1f} s after the kill; "
        f"a new process then loaded the build in {seconds:.1f} s"
    )


@pytest.mark.slow
def test_waiting_is_bounded_and_clear_and_info_name_the_builder(standin):
    """While a build is in progress (here: stopped in its link), a waiter gives up after
    FLASHSPARSE_BUILD_TIMEOUT with the builder's pid and folder, `flashsparse info` shows the
    build in progress, and `flashsparse cache clear` keeps what that build holds."""
    builder = standin.start(STANDIN_PAUSE_AT="link")
    try:
        _wait_for(standin.mark.exists, "the build to reach the link")
        result, err, seconds = standin.run(FLASHSPARSE_BUILD_TIMEOUT="2")
        assert "error" in result, result
        assert (
            f"gave up after waiting 2 s for another process (pid {builder.pid}" in (result["error"])
        )
        assert "FLASHSPARSE_BUILD_TIMEOUT=2" in result["error"]
        assert f"another process (pid {builder.pid}" in err and "waiting up to 2 s" in err
        assert seconds < 2 + 30  # the wait itself plus starting Python and torch

        env = standin.env()
        info = _cli("info", "--json", env=env)
        assert info.returncode == 0, info.stderr
        building = json.loads(info.stdout)["compiled"]["cpu"]["building"]
        assert [b["pid"] for b in building] == [builder.pid], building
        assert building[0]["action"] == "building" and "standin" in building[0]["entry"]

        cleared = _cli("cache", "clear", env=env)
        assert cleared.returncode == 1
        assert f"in use: pid {builder.pid}" in cleared.stderr
        assert len(standin.leftovers()) == 1  # the live build's temporary folder is kept
        assert builder.poll() is None
    finally:
        _kill_group(builder)
    print(f"\nbounded wait: gave up in {seconds:.1f} s (timeout 2 s, process start included)")


# --- broken entries -------------------------------------------------------------------------
def _break(entry: Path, how: str) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    library = entry / manifest["library"]
    data = library.read_bytes()
    if how == "truncated":
        library.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        library.write_bytes(os.urandom(len(data)))
    elif how == "no-manifest":  # e.g. a copy of the cache interrupted before its last file
        (entry / "manifest.json").unlink()
    else:
        raise ValueError(how)


@pytest.mark.slow
def test_a_broken_entry_is_rebuilt_once_with_a_warning(standin):
    """Each fault in turn on the entry the previous step rebuilt: found before loading,
    rebuilt once with a warning that names the folder, then loaded as usual."""
    first, _, _ = standin.run()
    assert first["origin"] == "built"
    entry = Path(first["entry"])
    timings = []
    for i, how in enumerate(["truncated", "garbage", "no-manifest"]):
        _break(entry, how)
        again, err, seconds = standin.run()
        assert again == {**again, "origin": "built", "entry": str(entry), "answer": 42}, how
        assert f"the cached build of the standin extension in {entry} is broken" in err, how
        assert "rebuilding it" in err
        assert standin.steps().count("link") == 2 + i and standin.leftovers() == []
        timings.append(f"{how} {seconds:.1f} s")
    last, err, _ = standin.run()
    assert last["origin"] == "cache" and "broken" not in err
    print(f"\nbroken entries, found and rebuilt (process start included): {', '.join(timings)}")


# --- environments ---------------------------------------------------------------------------
def _second_torch(base: Path) -> Path:
    """Another install of the same torch: a folder of symlinks to its files, imported first
    through PYTHONPATH, so torch reports (and builds with) different include paths."""
    real = Path(torch.__file__).resolve().parent
    site = base / "second-env"
    (site / "torch").mkdir(parents=True)
    for child in real.iterdir():
        (site / "torch" / child.name).symlink_to(child)
    return site


@pytest.mark.slow
def test_two_environments_in_turn_do_not_rebuild(standin):
    """Two torch installs of one version, used in turn: one build each, then none."""
    second = _second_torch(standin.base)
    env_b = {"PYTHONPATH": f"{second}{os.pathsep}{ROOT}"}
    runs = []
    for env in ({}, env_b, {}, env_b):
        result, _, _ = standin.run(**env)
        runs.append(result)
    assert runs[1]["torch"] == str(second / "torch")
    assert runs[0]["torch"] != runs[1]["torch"]
    assert [r["origin"] for r in runs] == ["built", "built", "cache", "cache"]
    assert runs[0]["entry"] == runs[2]["entry"] != runs[1]["entry"] == runs[3]["entry"]
    assert standin.steps().count("link") == 2
    ninja_b = (Path(runs[1]["entry"]) / "build.ninja").read_text()
    assert str(second / "torch" / "include") in ninja_b  # really another include path
    assert [r["answer"] for r in runs] == [42] * 4


# --- concurrency ----------------------------------------------------------------------------
@pytest.mark.slow
def test_four_processes_and_two_threads_first_call_at_once(standin):
    start = time.monotonic()
    procs = [standin.start() for _ in range(4)]
    try:
        outs = [p.communicate(timeout=BOUND_S) for p in procs]
    finally:
        for p in procs:
            _kill_group(p)
    seconds = time.monotonic() - start
    results = [_result(out, err) for out, err in outs]
    assert [r["answer"] for r in results] == [42] * 4, results
    assert sorted(r["origin"] for r in results) == ["built", "cache", "cache", "cache"]
    assert len({r["entry"] for r in results}) == 1
    assert standin.steps().count("link") == 1  # built once for all four

    shutil.rmtree(standin.cache)
    threads, _, _ = standin.run("threads")
    a, b = threads["threads"]
    assert a == b and a["answer"] == 42 and a["origin"] == "built"
    assert standin.steps().count("link") == 2  # once more, for the two threads together
    print(f"\nfour concurrent first calls: all done in {seconds:.1f} s")


# --- unwritable caches ----------------------------------------------------------------------
@pytest.mark.slow
def test_a_cache_that_cannot_be_written_is_a_clear_error(standin):
    (standin.base / "a-file").write_text("x")
    folder = standin.base / "a-file" / "cache"
    result, _, _ = standin.run(FLASHSPARSE_CACHE_DIR=str(folder))
    error = result["error"]
    assert f"the flashsparse cache folder {folder / 'extensions' / 'cpu'} cannot be written" in (
        error
    )
    assert "set FLASHSPARSE_CACHE_DIR to a writable folder" in error


def _as_nobody() -> list[str] | None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]


@pytest.mark.slow
@pytest.mark.skipif(_as_nobody() is None, reason="needs root and setpriv to run as another user")
def test_a_read_only_cache_built_ahead_is_used_and_an_unwritable_one_reported():
    """A cache built ahead and then owned by another user (an image's cache, run as a user
    who may not write it) is loaded without writing a byte; a cache folder the user may not
    write, with nothing in it, gets the clear error. (Built by the same user who then loads
    it, so that nothing in the key differs: the include folder Python reports, for one, can
    depend on the user.)"""
    base = Path(tempfile.mkdtemp(prefix="flashsparse-ro-"))
    try:
        base.chmod(0o755)
        standin = Standin(base / "s")
        for p in (standin.base, standin.csrc):
            p.chmod(0o755)
        os.chown(standin.base, 65534, 65534)  # nobody builds into it
        env = standin.env(HOME=str(base), STANDIN_LOG="")

        def as_nobody() -> dict:
            proc = subprocess.run(
                [*_as_nobody(), sys.executable, str(standin.runner), str(standin.csrc)],
                env=env,
                capture_output=True,
                text=True,
                timeout=BOUND_S,
            )
            return _result(proc.stdout, proc.stderr)

        built = as_nobody()
        assert built["origin"] == "built", built
        for p in [standin.base, *standin.base.rglob("*")]:
            os.chown(p, 0, 0, follow_symlinks=False)  # now root's: nobody may only read it
        before = {p: p.stat().st_mtime_ns for p in standin.cache.rglob("*")}
        loaded = as_nobody()
        assert loaded == {**loaded, "origin": "cache", "answer": 42}, loaded
        assert {p: p.stat().st_mtime_ns for p in standin.cache.rglob("*")} == before

        shutil.rmtree(standin.cache)
        standin.cache.mkdir(mode=0o755)  # root's, empty: nobody cannot build into it
        error = as_nobody()["error"]
        assert "cannot be written (cannot create a file in" in error
        assert "Permission denied" in error
    finally:
        shutil.rmtree(base, ignore_errors=True)


# --- the real CPU extension -------------------------------------------------------------------
@pytest.mark.slow
def test_the_cpu_extension_built_ahead_then_truncated_then_cleared(tmp_path):
    """`flashsparse build --cpu` builds the real extension; truncated, it is detected before
    it is loaded (a truncated library dies with SIGBUS when loaded) and rebuilt by the first
    call, which then computes right; `flashsparse cache clear` removes it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLASHSPARSE_")}
    env.update(PYTHONPATH=str(ROOT), FLASHSPARSE_CACHE_DIR=str(tmp_path / "cache"))
    env["FLASHSPARSE_JIT"] = "1"  # the cache, even where a prebuilt module is installed
    start = time.monotonic()
    made = _cli("build", "--cpu", env=env)
    build_s = time.monotonic() - start
    assert made.returncode == 0, made.stderr
    assert "cpu: built in" in made.stdout and "self-check passed" in made.stdout
    info = json.loads(_cli("info", "--json", env=env).stdout)["compiled"]["cpu"]
    assert info["entry_state"] == "ready" and info["writable"] and info["building"] == []
    entry = Path(info["entry"])

    again = _cli("build", "--cpu", env=env)
    assert again.returncode == 0 and "cpu: already built" in again.stdout

    _break(entry, "truncated")
    check = textwrap.dedent(
        """
        import torch, flashsparse as fs
        g = torch.Generator().manual_seed(3)
        w = torch.randn(70, 130, generator=g) * (torch.rand(70, 130, generator=g) > 0.7)
        x = torch.randn(5, 130, generator=g)
        y = fs.linear(x, fs.encode(w, "bitmap"))
        ref = x.double() @ w.double().T
        print("ERR", float((y.double() - ref).norm() / ref.norm()))
        """
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", check],
        env={**env, "FLASHSPARSE_BACKEND": "cpu"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    rebuild_s = time.monotonic() - start
    assert proc.returncode == 0, (proc.returncode, proc.stderr)  # 135 would be SIGBUS
    assert f"the cached build of the flashsparse CPU extension in {entry} is broken" in (
        proc.stderr
    )
    err = float(proc.stdout.split("ERR")[1])
    assert err < 1e-5

    cleared = _cli("cache", "clear", env=env)
    assert cleared.returncode == 0, cleared.stderr
    assert f"removed: {entry}" in cleared.stdout
    listed = json.loads(_cli("cache", "list", "--json", env=env).stdout)
    assert listed["items"] == []
    print(
        f"\nreal CPU extension: built ahead in {build_s:.1f} s; truncated, rebuilt and run in "
        f"{rebuild_s:.1f} s"
    )


# --- in-process checks (fast) -----------------------------------------------------------------
def test_the_key_changes_with_what_changes_the_binary(standin, monkeypatch):
    ext = build.Extension(
        device="cpu", kernel_dir="cpu", kernel_suffix=".cpp", name="standin", csrc=standin.csrc
    )
    base = ext.jit_key()
    assert base == ext.jit_key()
    assert base.entry_name.startswith(f"standin-torch{torch.__version__}-")
    variants = {
        "flags": build.Extension(
            device="cpu",
            kernel_dir="cpu",
            kernel_suffix=".cpp",
            name="standin",
            csrc=standin.csrc,
            cflags=("-O2",),
        ).jit_key(),
        "tag": ext.jit_key(tag="x"),
    }
    (standin.csrc / "cpu" / "standin.h").write_text("// a header\n")
    variants["header"] = ext.jit_key()
    monkeypatch.setenv("CXX", str(standin.cxx))
    variants["compiler"] = ext.jit_key()
    identity = build._torch_identity()
    monkeypatch.setattr(build, "_torch_identity", lambda: {**identity, "path": "/elsewhere"})
    variants["torch install"] = ext.jit_key()
    python = build._python_identity()
    monkeypatch.setattr(build, "_python_identity", lambda: {**python, "tag": "cpython-399"})
    variants["python"] = ext.jit_key()
    digests = [base.digest] + [k.digest for k in variants.values()]
    assert len(set(digests)) == len(digests), variants


def test_verify_entry_reads_the_manifest_and_never_loads(tmp_path):
    entry = tmp_path / "e"
    assert build.verify_entry(entry) == (None, None)
    entry.mkdir()
    assert "no manifest.json" in build.verify_entry(entry)[1]
    library = entry / "x.so"
    library.write_bytes(b"\x7fELF" + os.urandom(100))
    good = {"library": "x.so", "size": 104, "sha256": build._sha256(library)}
    (entry / "manifest.json").write_text(json.dumps(good))
    assert build.verify_entry(entry) == (library, None)
    (entry / "manifest.json").write_text(json.dumps({**good, "library": "../x.so"}))
    assert "cannot be read" in build.verify_entry(entry)[1]
    (entry / "manifest.json").write_text(json.dumps({**good, "size": 200}))
    assert "is 104 bytes, its manifest says 200" in build.verify_entry(entry)[1]
    (entry / "manifest.json").write_text(json.dumps({**good, "sha256": "0" * 64}))
    assert "checksum" in build.verify_entry(entry)[1]


def test_writability_is_tested_by_creating_a_file(tmp_path):
    assert build.writable_problem(tmp_path / "not" / "yet") is None
    assert not list(tmp_path.iterdir())  # the probe leaves nothing
    (tmp_path / "f").write_text("x")
    assert "is not a folder" in build.writable_problem(tmp_path / "f" / "cache")
    if Path("/proc/self").exists():  # root may write anywhere, except here
        assert "cannot create a file in /proc" in build.writable_problem(Path("/proc/fs-cache"))


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_a_bad_build_timeout_is_named(monkeypatch, value):
    monkeypatch.setenv("FLASHSPARSE_BUILD_TIMEOUT", value)
    with pytest.raises(ValueError, match=rf"FLASHSPARSE_BUILD_TIMEOUT must be .*{value!r}"):
        build.build_timeout()
    assert main(["info"]) == 1


def test_clear_touches_nothing_outside_its_own_folders(tmp_path, monkeypatch, capsys):
    root = tmp_path / "cache"
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(root))
    folder = root / "extensions" / "cpu"
    folder.mkdir(parents=True)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    link = folder / f"flashsparse_cpu-torch1-cp311-{'a' * 16}"
    link.symlink_to(outside, target_is_directory=True)
    real = folder / f"flashsparse_cpu-torch1-cp311-{'b' * 16}"
    real.mkdir()
    (real / "manifest.json").write_text("{}")
    (folder / "notes.txt").write_text("not ours")
    other_tool = root / "kernel_report" / "x"
    other_tool.mkdir(parents=True)
    legacy = root / "2.13.0+cpu" / "cpu" / ("c" * 16)
    legacy.mkdir(parents=True)
    (legacy / "build.ninja").write_text("")
    (legacy / "lock").write_text("")  # a stale FileBaton of the old layout
    os.utime(legacy / "lock", (0, 0))
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    # The link (named like an entry), the entry and the old-layout build.
    assert "removed 3 cached build(s)" in out
    assert (outside / "keep.txt").exists() and not link.exists()  # the link only, unfollowed
    assert not real.exists() and not (root / "2.13.0+cpu").exists()
    assert (folder / "notes.txt").exists() and other_tool.exists()


def test_cache_list_shows_entries_and_leftovers(standin, monkeypatch, capsys):
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(standin.cache))
    monkeypatch.setenv("CXX", str(standin.cxx))
    assert main(["cache"]) == 0
    assert "(empty)" in capsys.readouterr().out
    ext = build.Extension(
        device="cpu", kernel_dir="cpu", kernel_suffix=".cpp", name="standin", csrc=standin.csrc
    )
    key = ext.jit_key()
    entry = ext.entry(key)
    entry.mkdir(parents=True)
    library = entry / "x.so"
    library.write_bytes(b"abc")
    (entry / "manifest.json").write_text(
        json.dumps({"library": "x.so", "size": 3, "sha256": build._sha256(library)})
    )
    (entry.parent / f".tmp-{entry.name}-999999-0123abcd").mkdir()
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert entry.name in out and "ready" in out and "left by a build that died" in out
    assert main(["cache", "clear", "--cuda"]) == 0  # another device: nothing to do
    assert entry.exists()
    assert main(["cache", "clear", "--cpu", "--dry-run"]) == 0
    assert entry.exists() and "would remove" in capsys.readouterr().out
    assert main(["cache", "clear", "--cpu"]) == 0
    assert not any(standin.folder.iterdir())


def test_the_lock_names_its_holder_and_lets_other_users_read_it(standin, monkeypatch):
    """The lock file says who holds it (for the waiters' message and `info`) and is readable
    by everyone (a shared lock needs only read access: a read-only cache still locks)."""
    monkeypatch.setenv("FLASHSPARSE_CACHE_DIR", str(standin.cache))
    standin.folder.mkdir(parents=True)
    lock = build.EntryLock(standin.folder / "x")
    lock.acquire(1.0, "a test")
    try:
        assert lock.path.stat().st_mode & stat.S_IROTH
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
        assert lock.busy()  # another open file description conflicts, even in this process
        [now] = build.building_now("cpu")
        assert now["pid"] == os.getpid() and now["entry"] == str(standin.folder / "x")
        with pytest.raises(TimeoutError, match=rf"another process \(pid {os.getpid()}"):
            build.EntryLock(standin.folder / "x").acquire(0.3, "a test", announce=print)
    finally:
        lock.release()
    assert not lock.busy() and lock.path.read_text() == ""
    assert build.building_now("cpu") == []
