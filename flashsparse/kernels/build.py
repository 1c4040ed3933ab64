"""The one builder for every compiled flashsparse extension (CUDA and CPU C++).

An extension is a set of torch-glue sources (``csrc/bindings/<kernel>_<device>.cpp``) plus
torch-free kernel sources (``csrc/kernels/*.cu`` for CUDA, ``csrc/cpu/*.cpp`` for CPUs). It
comes from, in order:

1. a prebuilt module inside the package (``flashsparse._C`` for CUDA, ``flashsparse._C_cpu`` for
   the CPU kernels with ``FLASHSPARSE_CPU=1``; CUDA built by
   ``FLASHSPARSE_CUDA=1 pip install --no-build-isolation -e .``), unless
   ``FLASHSPARSE_JIT=1`` (or the older ``FLASHSPARSE_CUDA_JIT=1``) asks to ignore it;
2. the JIT cache: ``$FLASHSPARSE_CACHE_DIR/extensions/<device>/<entry>`` (default root
   ``~/.cache/flashsparse``), one entry per cache key. The key covers everything that changes the
   binary: the sources and headers, the flags, torch (version, git revision, CUDA version and the
   real path of its install, so two environments never share or evict an entry), the Python ABI
   and include folder, the compiler (path and ``--version``) and for CUDA nvcc and the toolkit;
3. a JIT build with :func:`torch.utils.cpp_extension.load` (ninja + the system compiler, and nvcc
   for CUDA) into a private temporary folder next to the entry, published by one ``rename``.

What makes the cache safe to share between processes and survive crashes:

- An entry is never written in place. A build runs in ``.tmp-<entry>-<pid>-<random>``; after
  ninja succeeded and the library loaded, ``manifest.json`` records the library's size and
  SHA-256, the files are synced and the folder is renamed into place. torch's own lock file
  (a ``FileBaton``, which nobody removes when its holder dies) lives only inside that private
  folder, so no other process ever waits on it.
- Before loading an entry its library is checked against the manifest (a truncated or corrupt
  ``.so`` is never ``dlopen``-ed: a truncated one dies with SIGBUS). An entry that fails the
  check, or does not load, is rebuilt once, with a warning naming its folder.
- Builders of one entry take ``fcntl.flock`` on ``<entry>.lock``: the kernel releases it when
  the holder dies (``kill -9``, the OOM killer), so a later process rebuilds at once. A waiter
  says who it waits for and gives up after ``FLASHSPARSE_BUILD_TIMEOUT`` seconds (default 600).
  Loading takes the same lock shared for a moment, so ``flashsparse cache clear`` never removes
  an entry that is being built or loaded.
- The last failed build of each device is kept in ``<device>/last-error.json`` for
  ``flashsparse info``.

Environment knobs shared by every extension: ``FLASHSPARSE_CACHE_DIR``,
``FLASHSPARSE_BUILD_TIMEOUT``, ``FLASHSPARSE_VERBOSE_BUILD=1`` (show the compiler),
``FLASHSPARSE_JIT=1``; for CUDA also ``FLASHSPARSE_CUDA_ARCH_LIST`` and ``CUDA_HOME``.
docs/building.md describes the cache for users.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock; the atomic rename alone keeps entries whole
    fcntl = None  # type: ignore[assignment]

CSRC = Path(__file__).resolve().parent.parent.parent / "csrc"
MIN_CUDA_CAPABILITY = (8, 0)  # cp.async, ldmatrix, mma.sync m16n8k16 with bf16

# Bumped when the layout of an entry or the meaning of the key changes.
CACHE_FORMAT = 2
EXTENSIONS_DIR = "extensions"
MANIFEST = "manifest.json"
LAST_ERROR = "last-error.json"
TIMEOUT_ENV = "FLASHSPARSE_BUILD_TIMEOUT"
DEFAULT_BUILD_TIMEOUT = 600.0
# Entry folders are "<extension>-<readable tag>-<16 hex digits>"; nothing else is ever removed.
_ENTRY_RE = re.compile(r"^[A-Za-z0-9_]+-[A-Za-z0-9_.+-]*-[0-9a-f]{16}$")
_LEFTOVER_RE = re.compile(r"^\.(tmp|trash)-(?P<entry>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    env = os.environ.get("FLASHSPARSE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "flashsparse"


def extensions_root() -> Path:
    """Where the JIT builds live (other tools keep their own folders beside it)."""
    return cache_root() / EXTENSIONS_DIR


def device_folder(device: str) -> Path:
    return extensions_root() / device


def build_timeout() -> float:
    """Seconds a process waits for another one building the same entry
    (``FLASHSPARSE_BUILD_TIMEOUT``; a ValueError names a bad value)."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_BUILD_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(
            f"{TIMEOUT_ENV} must be a positive number of seconds (default "
            f"{DEFAULT_BUILD_TIMEOUT:g}), got {raw!r}"
        )
    return value


def tail(text: str, limit: int = 4000) -> str:
    """The end of a long compiler log (where the error usually is)."""
    text = text.strip()
    return text if len(text) <= limit else "...\n" + text[-limit:]


def find_ninja() -> str | None:
    found = shutil.which("ninja")
    if found:
        return found
    # pip's ninja lives next to the interpreter of an un-activated virtual environment.
    beside = os.path.join(os.path.dirname(sys.executable), "ninja")
    return beside if os.path.isfile(beside) else None


def find_cxx() -> str | None:
    """The C++ compiler torch's extension builder will use (``$CXX``, else ``c++``)."""
    return shutil.which(os.environ.get("CXX", "c++"))


def cuda_home() -> str | None:
    """The CUDA toolkit root: the first candidate with both nvcc and the runtime headers (an
    ``nvcc`` on PATH may be a wrapper script outside the toolkit, e.g. /usr/local/bin/nvcc)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if (
            root
            and os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and os.path.isfile(os.path.join(root, "include", "cuda_runtime_api.h"))
        ):
            return root
    return None


def find_nvcc() -> str | None:
    home = cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _parse_arch(arch: str) -> tuple[str, bool]:
    """``"9.0a+PTX"`` -> (``"90a"``, True)."""
    arch = arch.strip()
    ptx = arch.upper().endswith("+PTX")
    if ptx:
        arch = arch[:-4]
    major, dot, minor = arch.partition(".")
    if not dot or not major.isdigit() or not minor[:1].isdigit():
        raise ValueError(f"CUDA arch must look like '8.0', '9.0a' or '8.6+PTX', got {arch!r}")
    if (int(major), int(minor[0])) < MIN_CUDA_CAPABILITY:
        raise ValueError(
            f"flashsparse's CUDA kernels need compute capability >= 8.0, got arch {arch!r}"
        )
    return major + minor, ptx


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc ``-gencode`` flags for an arch list such as ``"8.0;9.0a"`` (``;``, ``,`` or spaces)."""
    archs = [a for a in arch_list.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
    if not archs:
        raise ValueError("the CUDA arch list is empty")
    flags = []
    for arch in archs:
        code, ptx = _parse_arch(arch)
        flags.append(f"-gencode=arch=compute_{code},code=sm_{code}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{code},code=compute_{code}")
    return flags


# Kernel sources named for an instruction set (``<kernel>_<isa>.<ext>``) compile only on the
# architectures that have it; setup.py applies the same rule to its copy of the list.
ISA_ARCHS = {
    "avx2": ("x86_64", "amd64", "i386", "i686"),
    "avx512": ("x86_64", "amd64"),
    "neon": ("aarch64", "arm64"),
}


def builds_on(path: Path, machine: str | None = None) -> bool:
    """Whether the kernel source ``path`` is compiled for ``machine`` (default: this one)."""
    archs = ISA_ARCHS.get(path.stem.rsplit("_", 1)[-1])
    return archs is None or (machine or platform.machine()).lower() in archs


# --- what goes into the cache key ---------------------------------------------------------------
_tool_ids: dict[tuple, dict] = {}


def tool_identity(command: str | None) -> dict:
    """``{"command", "path", "version"}`` of a compiler (its real path and the version lines of
    ``--version``), remembered per (path, mtime, size) for this process."""
    path = shutil.which(command) if command else None
    if path is None:
        return {"command": command, "path": None, "version": None}
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        stamp = (real, st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = (real, 0, 0)
    if stamp not in _tool_ids:
        try:
            out = subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=60, check=False
            )
            lines = (out.stdout or out.stderr).strip().splitlines()
            version = "\n".join(
                ln for ln in lines if any(c.isdigit() for c in ln) and "Copyright" not in ln
            )
        except (OSError, subprocess.SubprocessError) as exc:
            version = f"unknown ({type(exc).__name__})"
        _tool_ids[stamp] = {"command": command, "path": real, "version": version}
    return _tool_ids[stamp]


def _torch_identity() -> dict:
    return {
        "version": torch.__version__,
        "git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "path": os.path.realpath(os.path.dirname(torch.__file__)),
    }


def _python_identity() -> dict:
    return {
        "tag": f"{sys.implementation.cache_tag}{getattr(sys, 'abiflags', '')}",
        "include": sysconfig.get_path("include"),
    }


@dataclass(frozen=True)
class JitKey:
    """An extension's cache key: every input (``inputs``, kept in the manifest) and its digest."""

    inputs: dict
    digest: str  # 16 hex digits
    entry_name: str
    library_name: str  # the extension name torch builds (``<library_name>.so``)


@dataclass(frozen=True)
class Loaded:
    """Where an extension came from in this process."""

    origin: str  # "prebuilt" | "cache" | "built"
    library: str | None  # the shared library (or module file) loaded
    entry: Path | None  # the cache entry (JIT only)
    seconds: float  # spent in load(), building and waiting included


# --- the lock -----------------------------------------------------------------------------------
class EntryLock:
    """``fcntl.flock`` on ``<entry>.lock``, beside the entry.

    The kernel drops the lock when its holder dies, however it dies, so a crash can never leave
    it held. An exclusive holder (a builder, ``cache clear``) writes who it is into the file so
    a waiter can say what it waits for. The file may be removed by ``cache clear`` while held:
    an acquirer checks that the file it locked is still the one at the path, else it retries,
    so two processes never both believe they hold it.
    """

    def __init__(self, entry: Path) -> None:
        self.entry = entry
        self.path = entry.parent / f"{entry.name}.lock"
        self.fd: int | None = None
        self.writable = False

    def _open(self) -> int | None:
        try:
            self.writable = True
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError:
            self.writable = False
        try:  # a cache someone else wrote (a read-only image): a shared lock still works
            return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _try(self, fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # a file system without flock (some network mounts)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return True
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except OSError:
            same = False
        if not same:  # removed (or replaced) while we waited: lock the file now there
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise _Replaced
        return True

    def holder(self) -> dict:
        """What the exclusive holder wrote (``{}`` when unknown)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def busy(self) -> bool:
        """Whether a builder or ``cache clear`` holds the lock now."""
        if fcntl is None or not self.path.exists():
            return False
        fd = self._open()
        if fd is None:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
        return False

    @contextlib.contextmanager
    def shared(self) -> Iterator[bool]:
        """A moment's shared lock (while an entry is checked and loaded); yields False when an
        exclusive holder has it (the caller then waits the slow way)."""
        if fcntl is None:
            yield True
            return
        while True:
            fd = self._open()
            if fd is None:  # no lock file and no right to create one: nothing to lock
                yield True
                return
            try:
                ok = self._try(fd, fcntl.LOCK_SH)
            except _Replaced:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        try:
            yield ok
        finally:
            os.close(fd)

    def acquire(
        self,
        timeout: float,
        what: str,
        action: str = "building",
        announce: Callable[[str], None] | None = None,
    ) -> float:
        """Take the lock exclusively, waiting at most ``timeout`` seconds; returns the seconds
        waited. Says once (``announce``, default stderr) whom it waits for."""
        if fcntl is None:
            return 0.0
        announce = announce or _to_stderr
        start = time.monotonic()
        announced = False
        while True:
            fd = self._open()
            if fd is None:
                raise OSError(errno.EACCES, f"cannot open or create the lock file {self.path}")
            try:
                while True:
                    if self._try(fd, fcntl.LOCK_EX):
                        break
                    waited = time.monotonic() - start
                    holder = self.holder()
                    if not announced and (holder or waited > 1.0):
                        announce(
                            f"flashsparse: another process ({_describe(holder)}) is "
                            f"{holder.get('action', 'building')} {holder.get('what', what)} in "
                            f"{self.entry}; waiting up to {timeout:g} s ({TIMEOUT_ENV})"
                        )
                        announced = True
                    if waited > timeout:
                        raise TimeoutError(
                            f"gave up after waiting {waited:.0f} s for another process "
                            f"({_describe(holder)}) {holder.get('action', 'building')} "
                            f"{holder.get('what', what)} in {self.entry} ({TIMEOUT_ENV}="
                            f"{timeout:g}); if that process hangs, end it and run again (its "
                            "lock goes with it)"
                        )
                    time.sleep(0.2)
            except _Replaced:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        self.fd = fd
        if self.writable:
            record = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.time(),
                "action": action,
                "what": what,
            }
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(record).encode(), 0)
        if announced:
            announce(f"flashsparse: done waiting ({time.monotonic() - start:.1f} s)")
        return time.monotonic() - start

    def release(self, *, remove: bool = False) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if remove:
                os.unlink(self.path)  # others re-check the path after locking: safe while held
            elif self.writable:
                os.ftruncate(self.fd, 0)
        os.close(self.fd)  # drops the lock
        self.fd = None


class _Replaced(Exception):
    """The lock file was removed or replaced between open and flock."""


def _describe(holder: dict) -> str:
    pid = holder.get("pid")
    if pid is None:
        return "pid unknown"
    host = holder.get("host")
    where = f" on {host}" if host and host != socket.gethostname() else ""
    started = holder.get("started")
    since = (
        f", for {max(0.0, time.time() - started):.0f} s"
        if isinstance(started, (int, float))
        else ""
    )
    return f"pid {pid}{where}{since}"


def _to_stderr(message: str) -> None:
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


# --- entries ------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(entry: Path) -> dict | None:
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def verify_entry(entry: Path) -> tuple[Path | None, str | None]:
    """``(library, None)`` for an entry whose library matches its manifest (size and SHA-256),
    ``(None, None)`` when there is no entry, ``(None, what is wrong)`` otherwise. Reads the
    library as a file only: it is never loaded here."""
    if not entry.is_dir():
        if entry.exists() or entry.is_symlink():
            return None, "it is not a folder"
        return None, None
    if not (entry / MANIFEST).is_file():
        return None, f"it has no {MANIFEST} (an interrupted or foreign build)"
    manifest = read_manifest(entry)
    name = manifest.get("library") if manifest else None
    if not isinstance(name, str) or not name or os.path.basename(name) != name:
        return None, f"its {MANIFEST} cannot be read"
    library = entry / name
    try:
        size = library.stat().st_size
    except OSError:
        return None, f"{name} is missing"
    if size != manifest.get("size"):
        return None, (
            f"{name} is {size} bytes, its manifest says {manifest.get('size')} (truncated or "
            "partly copied?)"
        )
    try:
        digest = _sha256(library)
    except OSError as exc:
        return None, f"{name} cannot be read ({exc.strerror or exc})"
    if digest != manifest.get("sha256"):
        return None, f"{name} does not match its SHA-256 checksum (corrupt)"
    return library, None


def writable_problem(folder: Path) -> str | None:
    """Why files cannot be created in ``folder`` (or in the first existing folder above it, which
    mkdir would create it in); None if they can. Tested by creating a file, since permission
    bits say nothing about read-only mounts, /proc or root."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a folder"
    try:
        fd, name = tempfile.mkstemp(prefix=".flashsparse-write-test-", dir=probe)
    except OSError as exc:
        return f"cannot create a file in {probe}: {exc.strerror or exc}"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)
    return None


def _fsync(path: Path, directory: bool = False) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    _fsync(tmp)
    os.replace(tmp, path)


def _inside(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == str(
            Path(os.path.abspath(root))
        )
    except ValueError:
        return False


def _remove_tree(path: Path, root: Path) -> None:
    """Remove a folder of the cache (a symlink is unlinked, never followed), refusing anything
    that is not strictly inside ``root``."""
    if not _inside(path, root) or os.path.abspath(path) == os.path.abspath(root):
        raise RuntimeError(f"refusing to remove {path}: it is not inside the cache {root}")
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    # First out of the entry's name, so no process ever sees a half-removed entry.
    trash = path.parent / f".trash-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.rename(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(folder: Path, entry_name: str) -> None:
    """Remove the temporary and trash folders of ``entry_name`` (call with its lock held: only
    the holder creates them, so any present are left by a process that died)."""
    with contextlib.suppress(OSError):
        for child in folder.iterdir():
            match = _LEFTOVER_RE.match(child.name)
            if match and match.group("entry") == entry_name:
                shutil.rmtree(child, ignore_errors=True)


def last_error(device: str) -> dict | None:
    """The last failed JIT build of ``device``'s extension (``None``: none recorded)."""
    try:
        data = json.loads((device_folder(device) / LAST_ERROR).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _record_error(folder: Path, entry_name: str, what: str, exc: BaseException) -> None:
    with contextlib.suppress(OSError):
        _write_json_atomically(
            folder / LAST_ERROR,
            {
                "entry": entry_name,
                "what": what,
                "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "pid": os.getpid(),
                "error": f"{type(exc).__name__}: {tail(str(exc))}",
            },
        )


def _clear_error(folder: Path, entry_name: str) -> None:
    record = folder / LAST_ERROR
    with contextlib.suppress(OSError, ValueError):
        if json.loads(record.read_text()).get("entry") == entry_name:
            record.unlink()


# --- extensions ---------------------------------------------------------------------------------
# One lock per cache key in this process: threads must not both dlopen the same ops.
_process_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_loaded: dict[str, Loaded] = {}  # JIT loads, by key digest
_last_by_name: dict[str, Loaded] = {}  # any load, by extension name (for `flashsparse build`)


def last_load(extension: Extension) -> Loaded | None:
    """How ``extension`` was loaded in this process (None: not yet)."""
    return _last_by_name.get(extension.library_prefix)


@dataclass(frozen=True)
class Extension:
    """What to compile for one device: glue sources matching ``bindings/*_<device>.cpp`` and
    kernel sources ``<kernel_dir>/*<kernel_suffix>`` under ``csrc`` (emulators,
    ``*_emulator.*``, are test tools with their own ``main`` and never part of an extension)."""

    device: str  # "cuda" | "cpu"
    kernel_dir: str  # under csrc/
    kernel_suffix: str  # ".cu" | ".cpp"
    prebuilt: str | None = None  # importable module name of a prebuilt build, if any
    cflags: tuple[str, ...] = ("-O3",)
    ldflags: tuple[str, ...] = ()
    headers: tuple[str, ...] = field(default=(".cuh", ".h"))
    name: str = ""  # default "flashsparse_<device>"; names the entry and the library
    csrc: Path = CSRC

    @property
    def library_prefix(self) -> str:
        return self.name or f"flashsparse_{self.device}"

    @property
    def title(self) -> str:
        if self.name:
            return f"the {self.name} extension"
        return f"the flashsparse {self.device.upper()} extension"

    def sources(self, csrc: Path | None = None, machine: str | None = None) -> list[Path]:
        csrc = self.csrc if csrc is None else csrc
        glue = sorted((csrc / "bindings").glob(f"*_{self.device}.cpp"))
        kernels = sorted(
            p
            for p in (csrc / self.kernel_dir).glob(f"*{self.kernel_suffix}")
            if not p.stem.endswith("_emulator") and builds_on(p, machine)
        )
        return [*glue, *kernels]

    def missing_sources(self, csrc: Path | None = None) -> str | None:
        """Why this extension cannot be JIT-built from the sources on disk (None: it can)."""
        csrc = self.csrc if csrc is None else csrc
        if not (csrc / self.kernel_dir).is_dir() or not self.sources(csrc):
            return (
                f"the {self.device} kernel sources are missing ({csrc / self.kernel_dir}); "
                "install flashsparse from a source checkout (pip install -e .)"
            )
        return None

    def prebuilt_available(self) -> bool:
        if self.prebuilt is None or env_flag("FLASHSPARSE_JIT") or env_flag("FLASHSPARSE_CUDA_JIT"):
            return False
        try:
            return importlib.util.find_spec(self.prebuilt) is not None
        except (ImportError, ValueError):
            return False

    # -- the key ---------------------------------------------------------------------------------
    def jit_key(self, *, extra_cuda_cflags: Sequence[str] = (), tag: str = "") -> JitKey:
        """The cache key of a JIT build with these arguments (reads the sources; runs the
        compilers' ``--version`` once per process)."""
        sources = self.sources()
        headers = sorted(
            p
            for d in ("bindings", self.kernel_dir)
            for h in self.headers
            for p in (self.csrc / d).glob(f"*{h}")
        )
        code = hashlib.sha256()
        for path in [*sources, *headers]:
            code.update(path.name.encode() + b"\0")
            code.update(path.read_bytes())
        inputs: dict = {
            "format": CACHE_FORMAT,
            "extension": self.library_prefix,
            "device": self.device,
            "sources": code.hexdigest(),
            "files": [p.name for p in [*sources, *headers]],
            "cflags": list(self.cflags),
            "ldflags": list(self.ldflags),
            "cuda_cflags": list(extra_cuda_cflags),
            "tag": tag,
            "torch": _torch_identity(),
            "python": _python_identity(),
            "cxx": tool_identity(os.environ.get("CXX", "c++")),
            "platform": sys.platform,
        }
        if self.device == "cuda":
            nvcc = os.environ.get("PYTORCH_NVCC") or find_nvcc()
            inputs["cuda"] = {
                "home": cuda_home(),
                "nvcc": tool_identity(nvcc),
                "host_compiler": os.environ.get("CC"),
            }
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        readable = f"torch{torch.__version__}-{sys.implementation.cache_tag}"
        if tag:
            readable += f"-{tag}"
        readable = re.sub(r"[^A-Za-z0-9_.+-]", "_", readable)
        return JitKey(
            inputs=inputs,
            digest=digest,
            entry_name=f"{self.library_prefix}-{readable}-{digest}",
            library_name=f"{self.library_prefix}_{digest}",
        )

    def entry(self, key: JitKey) -> Path:
        return device_folder(self.device) / key.entry_name

    # -- loading ---------------------------------------------------------------------------------
    def load(self, *, extra_cuda_cflags: Sequence[str] = (), tag: str = "") -> Loaded:
        """Import the prebuilt module, else load the cache entry, else JIT-build, publish and
        load it (registering the ops with torch). Raises with the compiler's output on failure."""
        start = time.monotonic()
        prebuilt_error = None
        if self.prebuilt_available():
            try:
                module = importlib.import_module(self.prebuilt)  # type: ignore[arg-type]
                loaded = Loaded(
                    "prebuilt", getattr(module, "__file__", None), None, time.monotonic() - start
                )
                _last_by_name[self.library_prefix] = loaded
                return loaded
            except ImportError as exc:  # e.g. built against another torch: rebuild here
                prebuilt_error = f"the prebuilt {self.prebuilt} does not load ({exc})"
        try:
            loaded = self._jit(list(extra_cuda_cflags), tag, start)
        except Exception as exc:
            if prebuilt_error:
                raise RuntimeError(f"{prebuilt_error}; JIT build: {exc}") from exc
            raise
        _last_by_name[self.library_prefix] = loaded
        return loaded

    def _jit(self, cuda_cflags: list[str], tag: str, start: float) -> Loaded:
        key = self.jit_key(extra_cuda_cflags=cuda_cflags, tag=tag)
        with _process_lock:
            key_lock = _key_locks.setdefault(key.digest, threading.Lock())
        with key_lock:
            if key.digest in _loaded:
                return _loaded[key.digest]
            entry = self.entry(key)
            problem, load_failed = None, False
            if entry.exists() or entry.is_symlink():
                with EntryLock(entry).shared() as free:
                    if free:
                        library, problem = verify_entry(entry)
                        if library is not None:
                            try:
                                torch.ops.load_library(str(library))
                            except OSError as exc:  # e.g. a library it needs has changed
                                problem, load_failed = f"it does not load ({exc})", True
                            else:
                                loaded = Loaded(
                                    "cache", str(library), entry, time.monotonic() - start
                                )
                                _loaded[key.digest] = loaded
                                return loaded
            loaded = self._build(key, entry, problem, load_failed, start)
            _loaded[key.digest] = loaded
            return loaded

    def _build(
        self, key: JitKey, entry: Path, problem: str | None, load_failed: bool, start: float
    ) -> Loaded:
        folder = entry.parent
        cannot = writable_problem(folder)
        if cannot is None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                cannot = f"{exc.strerror or exc}"
        if cannot is not None:
            raise RuntimeError(
                f"the flashsparse cache folder {folder} cannot be written ({cannot}), so "
                f"{self.title} cannot be built there; set FLASHSPARSE_CACHE_DIR to a writable "
                "folder (or run `flashsparse build` where the cache is writable)"
            )
        lock = EntryLock(entry)
        lock.acquire(build_timeout(), self.title)
        try:
            if not load_failed:  # someone may have built or repaired it while we waited
                library, problem = verify_entry(entry)
                if library is not None:
                    torch.ops.load_library(str(library))
                    return Loaded("cache", str(library), entry, time.monotonic() - start)
            if problem is not None and (entry.exists() or entry.is_symlink()):
                warnings.warn(
                    f"flashsparse: the cached build of {self.title} in {entry} is broken "
                    f"({problem}); rebuilding it",
                    _warning_category(),
                    stacklevel=4,
                )
                _remove_tree(entry, folder)
            _clean_leftovers(folder, entry.name)
            tmp = folder / f".tmp-{entry.name}-{os.getpid()}-{secrets.token_hex(4)}"
            os.mkdir(tmp)
            try:
                library = self._compile(key, tmp)
                self._publish(key, tmp, library, entry, time.monotonic() - start)
            except BaseException as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, Exception):
                    _record_error(folder, entry.name, self.title, exc)
                raise
            _clear_error(folder, entry.name)
            return Loaded("built", str(entry / library.name), entry, time.monotonic() - start)
        finally:
            lock.release()

    def _compile(self, key: JitKey, tmp: Path) -> Path:
        """Compile and link into ``tmp`` (torch's own lock file stays private to it) and load
        the library; returns its path."""
        from torch.utils import cpp_extension

        ninja = find_ninja()
        if ninja and not shutil.which("ninja"):
            os.environ["PATH"] = os.path.dirname(ninja) + os.pathsep + os.environ.get("PATH", "")
        kwargs = {}
        if self.device == "cuda":
            home = cuda_home()
            torch_home = cpp_extension.CUDA_HOME
            if home and not (
                torch_home
                and os.path.isfile(os.path.join(torch_home, "include", "cuda_runtime_api.h"))
            ):
                # torch guessed the toolkit from `which nvcc`; point it at the real one.
                cpp_extension.CUDA_HOME = home
            kwargs["extra_cuda_cflags"] = ["-O3", "-lineinfo", *key.inputs["cuda_cflags"]]
        library = cpp_extension.load(
            name=key.library_name,
            sources=[str(p) for p in self.sources()],
            extra_include_paths=[str(self.csrc)],
            extra_cflags=list(self.cflags),
            extra_ldflags=list(self.ldflags),
            build_directory=str(tmp),
            verbose=env_flag("FLASHSPARSE_VERBOSE_BUILD"),
            is_python_module=False,
            **kwargs,
        )
        return Path(library)

    def _publish(self, key: JitKey, tmp: Path, library: Path, entry: Path, seconds: float) -> None:
        (tmp / "lock").unlink(missing_ok=True)  # torch's baton, released: meaningless elsewhere
        _fsync(library)
        _write_json_atomically(
            tmp / MANIFEST,
            {
                "format": CACHE_FORMAT,
                "title": self.title,
                "library": library.name,
                "size": library.stat().st_size,
                "sha256": _sha256(library),
                "digest": key.digest,
                "key": key.inputs,
                "built": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "build_seconds": round(seconds, 1),
                "builder": {"pid": os.getpid(), "host": socket.gethostname()},
            },
        )
        _fsync(tmp, directory=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Only without working locks can another process have published it meanwhile;
            # a good entry there is as good as ours.
            if verify_entry(entry)[0] is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(entry.parent, directory=True)

    # -- reporting -------------------------------------------------------------------------------
    def cache_status(self, *, key_args: dict | None = None, key_problem: str | None = None) -> dict:
        """What ``flashsparse info`` shows about this extension's cache (builds nothing).
        ``key_args`` are the JIT arguments (None with ``key_problem`` when unknown here)."""
        folder = device_folder(self.device)
        cannot = writable_problem(folder)
        status: dict = {
            "prebuilt": self.prebuilt if self.prebuilt_available() else None,
            "folder": str(folder),
            "writable": cannot is None,
            "not_writable_because": cannot,
            "entry": None,
            "entry_state": None,
            "building": building_now(self.device),
            "last_error": last_error(self.device),
        }
        missing = self.missing_sources()
        if key_problem or missing:
            status["entry_state"] = f"unknown: {key_problem or missing}"
            return status
        key = self.jit_key(**(key_args or {}))
        entry = self.entry(key)
        status["entry"] = str(entry)
        if key.digest in _loaded:
            status["entry_state"] = "ready (loaded in this process)"
            return status
        library, problem = verify_entry(entry)
        if library is not None:
            status["entry_state"] = "ready"
        elif problem is None:
            status["entry_state"] = "not built yet (the first call builds it)"
        else:
            status["entry_state"] = f"broken ({problem}): the first call rebuilds it"
        return status


def _warning_category() -> type[Warning]:
    from ..notices import FlashsparseWarning

    return FlashsparseWarning


def building_now(device: str) -> list[dict]:
    """The builds (or clears) of ``device`` entries in progress now: ``{"entry", "pid", ...}``."""
    found = []
    folder = device_folder(device)
    with contextlib.suppress(OSError):
        for lock_path in sorted(folder.glob("*.lock")):
            lock = EntryLock(folder / lock_path.name[: -len(".lock")])
            if lock.busy():
                holder = lock.holder()
                found.append(
                    {
                        "entry": str(lock.entry),
                        "pid": holder.get("pid"),
                        "host": holder.get("host"),
                        "action": holder.get("action", "building"),
                        "seconds": round(time.time() - holder["started"], 1)
                        if isinstance(holder.get("started"), (int, float))
                        else None,
                        "by": _describe(holder),
                    }
                )
    return found


# --- maintenance (``flashsparse cache``) ----------------------------------------------------------
@dataclass
class CacheItem:
    """One folder of the cache: an entry, a leftover of a dead build, or an old-layout build."""

    kind: str  # "entry" | "leftover" | "legacy"
    device: str
    path: Path
    state: str  # "ready", "broken (...)", "building (pid N)", ...
    size: int
    manifest: dict | None = None


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _legacy_builds(root: Path) -> list[Path]:
    """Builds of the old layout, ``<root>/<torch version>/<tag...>/<16 hex>/build.ninja``."""
    found = []
    with contextlib.suppress(OSError):
        for top in root.iterdir():
            if not (top.is_dir() and not top.is_symlink() and top.name[:1].isdigit()):
                continue
            for ninja in top.glob("**/build.ninja"):
                if re.fullmatch(r"[0-9a-f]{16}", ninja.parent.name):
                    found.append(ninja.parent)
    return sorted(found)


def list_cache(devices: Sequence[str] | None = None) -> list[CacheItem]:
    """Every folder ``flashsparse cache clear`` would consider, with its state."""
    items = []
    root = extensions_root()
    with contextlib.suppress(OSError):
        for dev_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            if devices and dev_dir.name not in devices:
                continue
            for child in sorted(dev_dir.iterdir()):
                leftover = _LEFTOVER_RE.match(child.name)
                if leftover:
                    busy = EntryLock(dev_dir / leftover.group("entry")).busy()
                    state = "a build in progress" if busy else "left by a build that died"
                    items.append(
                        CacheItem("leftover", dev_dir.name, child, state, _tree_size(child))
                    )
                    continue
                if not _ENTRY_RE.match(child.name) or not child.is_dir():
                    continue
                lock = EntryLock(child)
                library, problem = verify_entry(child)
                if lock.busy():
                    state = f"busy ({_describe(lock.holder())})"
                elif library is not None:
                    state = "ready"
                else:
                    state = f"broken ({problem})"
                items.append(
                    CacheItem(
                        "entry",
                        dev_dir.name,
                        child,
                        state,
                        _tree_size(child),
                        read_manifest(child),
                    )
                )
    for path in _legacy_builds(cache_root()):
        tag = path.relative_to(cache_root()).parts[1]
        device = "cpu" if tag == "cpu" else "cuda" if tag.startswith("cu") else tag
        if not devices or device in devices:
            items.append(CacheItem("legacy", device, path, "old layout", _tree_size(path)))
    return items


def clear_cache(
    devices: Sequence[str] | None = None, *, dry_run: bool = False
) -> tuple[list[CacheItem], list[tuple[CacheItem, str]]]:
    """Remove the JIT builds (of ``devices``, else all, old-layout ones included). An entry is
    removed only with its lock held, so never while a process builds or loads it; nothing
    outside the cache root is touched. Returns ``(removed, [(kept, why)])``."""
    root = extensions_root()
    removed: list[CacheItem] = []
    kept: list[tuple[CacheItem, str]] = []
    for item in list_cache(devices):
        if item.kind == "legacy":
            baton = item.path / "lock"
            if baton.exists() and time.time() - baton.stat().st_mtime < build_timeout():
                kept.append((item, "an older flashsparse may be building it (its lock is recent)"))
                continue
            if not dry_run:
                _remove_tree(item.path, cache_root())
                _prune_empty(item.path.parent, cache_root())
            removed.append(item)
            continue
        name = item.path.name
        entry_name = _LEFTOVER_RE.match(name).group("entry") if item.kind == "leftover" else name
        lock = EntryLock(item.path.parent / entry_name)
        if fcntl is not None and lock.busy():
            kept.append((item, f"in use: {_describe(lock.holder())}"))
            continue
        if dry_run:
            removed.append(item)
            continue
        try:
            lock.acquire(0.0, "the cache", action="clearing", announce=lambda _: None)
        except TimeoutError:
            kept.append((item, f"in use: {_describe(lock.holder())}"))
            continue
        try:
            _remove_tree(item.path, root)
        finally:
            lock.release(remove=item.kind == "entry")
        removed.append(item)
    if not dry_run:
        for device in devices or [p.name for p in _subfolders(root)]:
            folder = root / device
            with contextlib.suppress(OSError):
                (folder / LAST_ERROR).unlink()
            with contextlib.suppress(OSError):
                for lock_path in folder.glob("*.lock"):  # locks of entries already gone
                    if not (folder / lock_path.name[: -len(".lock")]).exists():
                        lock = EntryLock(folder / lock_path.name[: -len(".lock")])
                        try:
                            lock.acquire(0.0, "the cache", "clearing", announce=lambda _: None)
                        except TimeoutError:
                            continue
                        lock.release(remove=True)
    return removed, kept


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _prune_empty(path: Path, root: Path) -> None:
    while _inside(path, root) and os.path.abspath(path) != os.path.abspath(root):
        try:
            path.rmdir()
        except OSError:
            return
        path = path.parent


class LoadOnce:
    """Load (or JIT-build) an extension and self-check its kernel once per process. The outcome,
    ``None`` or why the backend cannot run, is kept: a failed build is reported on every later
    call, never retried (``flashsparse.backends`` warns once under ``auto``, raises when forced)."""

    def __init__(
        self,
        extension: str,
        kernel: str,
        load: Callable[[], None],
        self_check: Callable[[], str | None],
    ) -> None:
        self.extension, self.kernel = extension, kernel
        self._load, self._self_check = load, self_check
        self.loaded = False
        self.error: str | None = None
        self._lock = threading.Lock()

    def __call__(self) -> str | None:
        if self.loaded or self.error is not None:
            return self.error
        with self._lock:
            if self.loaded or self.error is not None:
                return self.error
            try:
                self._load()
            except Exception as exc:  # a build error must not take the process down under auto
                self.error = (
                    f"building or loading the {self.extension} failed ({type(exc).__name__}): "
                    f"{tail(str(exc))}"
                )
                return self.error
            try:
                self.error = self._self_check()
            except Exception as exc:
                self.error = (
                    f"the {self.kernel} failed to run its self-check ({type(exc).__name__}: {exc})"
                )
            self.loaded = self.error is None
        return self.error
