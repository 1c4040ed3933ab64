"""Static kernel report: GPU speed from the compiled machine code, without a GPU (DESIGN §8).

    python bench/kernel_report.py [--json PATH] [--kernels a,b] [--no-plans]

For every kernel with a spec in ``bench/kernel_specs/`` (``bitmap_cuda``, ``tiled_csl_cuda``,
``bitmap_triton``) it compiles each instantiation to a cubin (CUDA: ``nvcc -cubin`` for sm_90a
and sm_80 with the flags of ``.ci/compile_kernels.sh``; Triton: ``triton.compile`` with a
``GPUTarget("cuda", 90, 32)``), disassembles it (``cuobjdump -sass``; CUDA's or the one the
triton wheel ships) and reports

* registers, spill bytes (ptxas spill stores + loads; Triton: the local-memory frame), shared
  memory (static + dynamic) and the CTAs an H100 SM holds (limits: 64 warps, 32 CTAs,
  65536 registers allocated per warp in units of 256, 228 KiB shared memory with 1 KiB
  reserved per CTA);
* ``instr_per_element`` at sparsity 0.5 / 0.7 / 0.9: SASS instructions a thread issues in one
  main-loop iteration x threads per CTA / dense weight elements that iteration consumes.
  Every instruction counts once per warp (predicated-off lanes issue too). The main loop is
  the natural loop of the control-flow graph holding the most MMA instructions (the innermost
  on ties); each of its blocks runs once per iteration unless the kernel's spec says
  otherwise: ``trip_counts`` for loops nested in it and ``block_weights`` for data-dependent
  branches, both derived from a uniform random mask at that sparsity (see
  ``bench/kernel_specs/__init__.py``). Also per class (global/shared loads and stores,
  integer, conversion, MMA, barrier, branch, other) and shared-memory bytes per element;

and, for the benchmark shapes (Llama-3-8B, OPT-66B; N = 1, 8, 16, 32; sparsity 0.5, 0.7, 0.9),
the launch plan of each kernel (CTAs, split-K, persistent) with a red flag under two CTAs per
SM (264 on an H100), and a predicted speed-up over dense from this model (H100, fp16;
``--gpu h200``: the same with 4.8 TB/s):

    time  = max(bytes / 3.35 TB/s,
                max(instr, 2 x int-pipe instr) x elements x N-blocks / (29 T thread-instr/s x util),
                shared bytes x elements x N-blocks / (132 x 128 B x 1.75 GHz x util)) + launches
    dense = (2 M K + 2 N K + 2 N M) bytes / 3.35 TB/s + one launch (cuBLAS, memory-bound)

``bytes`` is the compressed weight (bitmap: 2(1-s) + 1/8 bytes per element + offsets;
Tiled-CSL: 4(1-s) per element + offsets) + x + y + the fp32 split-K workspace written and read
back; 29 T = 132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz; the integer ALU pipe runs at half
rate, so its instructions (the ``integer`` class less IMAD/IMUL, which issue to the FMA pipe
on sm_80+: that is why compilers emit ``IMAD.MOV`` for moves) bound the time at twice their
count, whatever else issues meanwhile; ``util`` = the fraction of SMs busy (CTAs over 132 for
one partial wave, else the wave efficiency over SMs x CTAs per SM); a launch costs 2 us
(a separate split-K reduce kernel is a second launch). Instruction counts are per compiled
instance; predictions use the fp16 sm_90a instance whose ``n_tile`` the plan picks. These are
model estimates, not measurements: treat a rise in the numbers as a regression, and correct
the model from GPU runs (``bench/gpu_check.sh`` prints both).

Compiles are cached by a hash of the sources, flags and compiler version under
``$FLASHSPARSE_KERNEL_CACHE/kernel_report`` (default ``~/.cache/flashsparse``). Without nvcc
the CUDA kernels are skipped with a message (exit 0); without triton, the Triton kernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kernel_specs import KERNEL_NAMES, CudaSpec, Instance, TritonSpec  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.9)
NS = (1, 8, 16, 32)
SHAPES: tuple[tuple[str, int, int], ...] = (
    ("llama3-8b", 6144, 4096),
    ("llama3-8b", 4096, 4096),
    ("llama3-8b", 28672, 4096),
    ("llama3-8b", 4096, 14336),
    ("opt-66b", 27648, 9216),
    ("opt-66b", 9216, 9216),
    ("opt-66b", 36864, 9216),
    ("opt-66b", 9216, 36864),
)
# The flags of .ci/compile_kernels.sh (what torch's extension build adds), minus -c / warnings.
NVCC_FLAGS = (
    "-std=c++17",
    "-O3",
    "-cubin",
    "-Xptxas",
    "-v",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)


# --- the H100 model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gpu:
    name: str = "H100 SXM"
    sms: int = 132
    clock_hz: float = 1.75e9
    schedulers: int = 4
    bandwidth: float = 3.35e12  # bytes/s
    smem_bytes_per_clk: int = 128  # per SM
    launch_s: float = 2e-6
    max_warps: int = 64
    max_ctas: int = 32
    regs: int = 65536
    smem: int = 228 * 1024
    smem_reserved: int = 1024  # per CTA
    max_smem_per_cta: int = 227 * 1024

    @property
    def issue_rate(self) -> float:
        """Thread-instructions per second over the whole GPU."""
        return self.sms * self.schedulers * 32 * self.clock_hz


H100 = Gpu()
# Same SMs, clocks and occupancy limits as the H100; more bandwidth (the lent GPU is often one).
H200 = Gpu(name="H200", bandwidth=4.8e12)
GPUS = {"h100": H100, "h200": H200}


def ctas_per_sm(registers: int, smem_bytes: int, threads: int, gpu: Gpu = H100) -> int:
    """Resident CTAs per SM (the CUDA occupancy calculator's limits for sm_90)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    warps = -(-threads // 32)
    limits = [gpu.max_ctas, gpu.max_warps // warps]
    if registers > 0:
        per_warp = -(-registers * 32 // 256) * 256
        limits.append((gpu.regs // per_warp) // warps)
    if smem_bytes > gpu.max_smem_per_cta:
        return 0
    limits.append(gpu.smem // (smem_bytes + gpu.smem_reserved))
    return max(0, min(limits))


# --- SASS parsing ---------------------------------------------------------------------------------
_INSTR = re.compile(
    r"/\*(?P<addr>[0-9a-f]{4,})\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_.]*)(?P<rest>[^;]*);"
)
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_HEX = re.compile(r"0x([0-9a-f]+)")

CLASSES = (
    "global_load",
    "global_store",
    "shared_load",
    "shared_store",
    "integer",
    "conversion",
    "mma",
    "barrier",
    "branch",
    "other",
)
_CLASS_OF_BASE = {
    **dict.fromkeys(
        ("LDG", "LDGSTS", "UTMALDG", "UBLKCP", "LD", "LDL", "TLD", "UTMAPF"), "global_load"
    ),
    **dict.fromkeys(
        ("STG", "RED", "ATOM", "ATOMG", "ST", "STL", "REDG", "UTMASTG", "UTMAREDG"), "global_store"
    ),
    **dict.fromkeys(("LDS", "LDSM", "ATOMS"), "shared_load"),
    **dict.fromkeys(("STS", "STSM"), "shared_store"),
    **dict.fromkeys(
        (
            "IADD3",
            "IADD",
            "IMAD",
            "IMUL",
            "LOP3",
            "LOP",
            "SHF",
            "SHL",
            "SHR",
            "LEA",
            "ISETP",
            "IMNMX",
            "VIMNMX",
            "VIADD",
            "VIADDMNMX",
            "POPC",
            "FLO",
            "BFE",
            "BFI",
            "PRMT",
            "SEL",
            "IABS",
            "SGXT",
            "BMSK",
            "BREV",
            "ICMP",
            "IDP",
            "VABSDIFF",
            "VABSDIFF4",
            "PLOP3",
            "P2R",
            "R2P",
            "LEPC",
            "IADD32I",
            "IMADSP",
            "ISCADD",
            "IMNMX3",
            "VIMNMX3",
        ),
        "integer",
    ),
    **dict.fromkeys(("F2F", "F2I", "I2F", "I2I", "F2FP", "I2FP", "FRND", "F2IP"), "conversion"),
    **dict.fromkeys(
        ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA", "BGMMA", "UTCHMMA", "UTCMMA"),
        "mma",
    ),
    **dict.fromkeys(
        (
            "BAR",
            "DEPBAR",
            "LDGDEPBAR",
            "WARPSYNC",
            "BSSY",
            "BSYNC",
            "MEMBAR",
            "SYNCS",
            "ARRIVES",
            "WARPGROUP",
            "ERRBAR",
            "CCTL",
            "FENCE",
            "NANOSLEEP",
        ),
        "barrier",
    ),
    **dict.fromkeys(
        ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "CALL", "BREAK", "KILL", "YIELD"), "branch"
    ),
}
_MMA_OPS = {b for b, c in _CLASS_OF_BASE.items() if c == "mma"}
# Integer multiply-adds issue to the (full-rate) FMA pipe on sm_80 and newer.
_FMA_PIPE_INTEGER = {"IMAD", "IMUL", "IMADSP", "IDP"}


def classify(opcode: str) -> str:
    """Instruction class of a SASS opcode (``IMAD.WIDE.U32`` -> ``integer``). Uniform-datapath
    forms (``UIADD3``, ``ULDC``...) issue once per warp like any other and count as ``other``."""
    base = opcode.split(".", 1)[0]
    return _CLASS_OF_BASE.get(base, "other")


def shared_bytes(opcode: str) -> int:
    """Shared-memory bytes a warp moves with one instruction (0 if it does not touch it)."""
    base, *mods = opcode.split(".")
    if base == "LDSM":
        mats = 4 if "M88" in mods and "4" in mods else 2 if "2" in mods else 1
        for mod in mods:
            if mod in ("1", "2", "4"):
                mats = int(mod)
        return mats * 128
    if base == "STSM":
        mats = 1
        for mod in mods:
            if mod in ("1", "2", "4"):
                mats = int(mod)
        return mats * 128
    if base not in ("LDS", "STS", "LDGSTS", "ATOMS"):
        return 0
    width = 4
    for mod in mods:
        if mod in ("U8", "S8"):
            width = 1
        elif mod in ("U16", "S16"):
            width = 2
        elif mod == "64":
            width = 8
        elif mod == "128":
            width = 16
    return 32 * width


@dataclass
class Instr:
    addr: int
    opcode: str
    pred: str  # "" or e.g. "@!P0"
    operands: str

    @property
    def cls(self) -> str:
        return classify(self.opcode)

    @property
    def base(self) -> str:
        return self.opcode.split(".", 1)[0]

    def targets(self) -> list[int]:
        if self.base in ("BRA", "JMP", "CALL", "BRX", "JMX"):
            found = _HEX.findall(self.operands)
            return [int(found[-1], 16)] if found else []
        return []


def parse_sass(text: str) -> dict[str, list[Instr]]:
    """``cuobjdump -sass`` listing -> instructions per function (mangled name)."""
    funcs: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        fm = _FUNC.match(line)
        if fm:
            current = funcs.setdefault(fm.group(1), [])
            continue
        if current is None:
            continue
        im = _INSTR.search(line)
        if im:
            current.append(
                Instr(
                    int(im.group("addr"), 16),
                    im.group("op"),
                    (im.group("pred") or "").strip(),
                    im.group("rest").strip(),
                )
            )
    return funcs


# --- control flow ---------------------------------------------------------------------------------
@dataclass
class Block:
    addr: int
    instrs: list[Instr]
    succs: list[int] = field(default_factory=list)
    depth: int = 0  # loops nested inside the main loop that hold this block


@dataclass
class Loop:
    header: int
    body: set[int]  # block start addresses


@dataclass
class MainLoop:
    header: int
    blocks: list[Block]  # body, in address order
    nested: list[Loop]  # loops strictly inside, outermost first, in header order


def _unconditional(ins: Instr) -> bool:
    return ins.pred in ("", "@PT", "@UPT")


def build_cfg(instrs: Sequence[Instr]) -> dict[int, Block]:
    """Basic blocks (by start address) with successor edges."""
    if not instrs:
        return {}
    addrs = [i.addr for i in instrs]
    leaders = {addrs[0]}
    for idx, ins in enumerate(instrs):
        ends = ins.base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET", "BREAK", "KILL")
        if ends or ins.targets():
            leaders.update(t for t in ins.targets() if t in set(addrs))
            if idx + 1 < len(instrs):
                leaders.add(addrs[idx + 1])
    starts = sorted(leaders)
    blocks: dict[int, Block] = {}
    pos = {a: i for i, a in enumerate(addrs)}
    for bi, start in enumerate(starts):
        end = pos[starts[bi + 1]] if bi + 1 < len(starts) else len(instrs)
        body = list(instrs[pos[start] : end])
        blocks[start] = Block(start, body)
    for bi, start in enumerate(starts):
        blk = blocks[start]
        last = blk.instrs[-1]
        nxt = starts[bi + 1] if bi + 1 < len(starts) else None
        succs: list[int] = [t for t in last.targets() if t in blocks and last.base != "CALL"]
        falls = nxt is not None and not (
            last.base in ("BRA", "JMP", "BRX", "JMX", "EXIT", "RET", "KILL")
            and _unconditional(last)
            and not last.opcode.startswith("BRA.DIV")
        )
        if last.opcode.startswith("BRA.DIV") or (last.base == "BRA" and not _unconditional(last)):
            falls = nxt is not None
        if falls and nxt is not None:
            succs.append(nxt)
        blk.succs = list(dict.fromkeys(succs))
    return blocks


def dominators(blocks: Mapping[int, Block], entry: int) -> dict[int, set[int]]:
    """Dominator sets of the blocks reachable from ``entry`` (iterative data flow)."""
    preds: dict[int, list[int]] = {a: [] for a in blocks}
    for a, blk in blocks.items():
        for s in blk.succs:
            preds[s].append(a)
    reach, stack = set(), [entry]
    while stack:
        a = stack.pop()
        if a not in reach:
            reach.add(a)
            stack.extend(blocks[a].succs)
    dom = {a: set(reach) for a in reach}
    dom[entry] = {entry}
    changed = True
    order = sorted(reach)
    while changed:
        changed = False
        for a in order:
            if a == entry:
                continue
            ps = [dom[p] for p in preds[a] if p in reach]
            new = set.intersection(*ps) | {a} if ps else {a}
            if new != dom[a]:
                dom[a], changed = new, True
    return dom


def natural_loops(blocks: Mapping[int, Block], entry: int) -> list[Loop]:
    """Natural loops (back edges to a dominating header), merged per header."""
    dom = dominators(blocks, entry)
    preds: dict[int, list[int]] = {a: [] for a in blocks}
    for a, blk in blocks.items():
        for s in blk.succs:
            preds[s].append(a)
    loops: dict[int, set[int]] = {}
    for a in dom:
        for h in blocks[a].succs:
            if h in dom[a]:  # back edge a -> h
                body, stack = {h, a}, [a]
                while stack:
                    x = stack.pop()
                    if x == h:
                        continue
                    for p in preds[x]:
                        if p not in body and p in dom:
                            body.add(p)
                            stack.append(p)
                loops.setdefault(h, set()).update(body)
    return [Loop(h, b) for h, b in sorted(loops.items())]


def find_main_loop(instrs: Sequence[Instr]) -> MainLoop:
    """The loop holding the most MMA instructions (ties: the fewest blocks)."""
    blocks = build_cfg(instrs)
    if not blocks:
        raise ValueError("empty function")
    loops = natural_loops(blocks, min(blocks))

    def mmas(loop: Loop) -> int:
        return sum(1 for a in loop.body for i in blocks[a].instrs if i.base in _MMA_OPS)

    candidates = [lp for lp in loops if mmas(lp) > 0]
    if not candidates:
        raise ValueError("no loop contains an MMA instruction")
    main = max(candidates, key=lambda lp: (mmas(lp), -len(lp.body)))
    nested = [lp for lp in loops if lp.header != main.header and lp.body < main.body]
    nested.sort(key=lambda lp: (-len(lp.body), lp.header))
    body = [blocks[a] for a in sorted(main.body)]
    for blk in body:
        blk.depth = sum(1 for lp in nested if blk.addr in lp.body)
    return MainLoop(main.header, body, sorted(nested, key=lambda lp: lp.header))


def block_frequencies(
    loop: MainLoop,
    trip_counts: Sequence[float] | None = None,
    overrides: Mapping[int, float] | None = None,
) -> dict[int, float]:
    """Runs of each body block per main-loop iteration.

    ``trip_counts`` applies, in header order, to the loops nested *directly* in the main loop
    and then to deeper ones (each multiplies the weight of its blocks); missing counts are 1.
    ``overrides`` replaces the weight of the blocks it names.
    """
    weights = {b.addr: 1.0 for b in loop.blocks}
    # Outer nested loops first, so a deeper loop's count multiplies its parent's.
    order = sorted(loop.nested, key=lambda lp: (-len(lp.body), lp.header))
    direct = [lp for lp in order if not any(lp.body < o.body for o in order if o is not lp)]
    deeper = [lp for lp in order if lp not in direct]
    counts = list(trip_counts or [])
    for i, lp in enumerate(
        sorted(direct, key=lambda lp: lp.header) + sorted(deeper, key=lambda lp: lp.header)
    ):
        c = float(counts[i]) if i < len(counts) else 1.0
        if c < 0 or not math.isfinite(c):
            raise ValueError(f"trip count {i} must be finite and >= 0, got {c}")
        for a in lp.body:
            weights[a] *= c
    for a, w in (overrides or {}).items():
        if a not in weights:
            raise ValueError(f"block_weights names 0x{a:x}, which is not in the main loop")
        weights[a] = float(w)
    return weights


@dataclass
class Count:
    """Per-iteration issue counts of one main loop (per thread, weighted)."""

    by_class: dict[str, float]
    shared_bytes: float  # per warp per iteration
    int_pipe: float = 0.0  # integer instructions on the half-rate ALU pipe (not IMAD/IMUL)

    @property
    def total(self) -> float:
        return sum(self.by_class.values())


def count_loop(loop: MainLoop, weights: Mapping[int, float]) -> Count:
    by_class = dict.fromkeys(CLASSES, 0.0)
    sbytes = alu = 0.0
    for blk in loop.blocks:
        w = weights.get(blk.addr, 1.0)
        for ins in blk.instrs:
            by_class[ins.cls] += w
            sbytes += w * shared_bytes(ins.opcode)
            if ins.cls == "integer" and ins.base not in _FMA_PIPE_INTEGER:
                alu += w
    return Count(by_class, sbytes, alu)


# --- tools and compiles ---------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("FLASHSPARSE_KERNEL_CACHE")
    base = (
        Path(root)
        if root
        else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashsparse"
    )
    return base / "kernel_report"


def find_tool(name: str) -> str | None:
    """``cuobjdump``/``nvdisasm``/``nvcc``: PATH, CUDA_HOME, next to nvcc, then the triton wheel."""
    found = shutil.which(name)
    if found:
        return found
    dirs = [Path(os.environ[v]) / "bin" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dirs.append(Path(nvcc).resolve().parent)
        try:  # a wrapper script that execs the real nvcc
            text = Path(nvcc).read_text(errors="ignore")[:400]
            dirs += [Path(p).parent for p in re.findall(r"(/\S+/bin/nvcc)", text)]
        except OSError:
            pass
    dirs += [Path("/usr/local/cuda/bin")]
    try:
        import triton

        dirs.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin")
    except Exception:
        pass
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def _run(cmd: Sequence[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd[:3])}... failed ({res.returncode}):\n{res.stderr[-3000:]}"
        )
    return res.stdout + res.stderr


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """``-Xptxas -v`` output -> {mangled: {registers, spill_bytes, static_smem}}."""
    out: dict[str, dict[str, int]] = {}
    name = None
    spill = 0
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            name, spill = m.group(1), 0
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spill = int(m.group(1)) + int(m.group(2))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            sm = re.search(r"(\d+) bytes smem", line)
            out[name] = {
                "registers": int(m.group(1)),
                "spill_bytes": spill,
                "static_smem": int(sm.group(1)) if sm else 0,
            }
            name = None
    return out


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` -> {mangled: {registers, stack, local, shared}}."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+([^:\s]+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", line)
        if m and name:
            out[name] = {
                "registers": int(m.group(1)),
                "stack": int(m.group(2)),
                "shared": int(m.group(3)),
                "local": int(m.group(4)),
            }
            name = None
    return out


def compile_cuda(src: Path, arch: str, nvcc: str, cuobjdump: str) -> tuple[str, str]:
    """(SASS listing, ptxas log) of one source for one arch, cached by content hash."""
    version = _run([nvcc, "--version"]).strip().splitlines()[-1]
    h = hashlib.sha256()
    h.update(f"{arch} {NVCC_FLAGS} {version}".encode())
    for dep in sorted(src.parent.glob("*")):
        if dep.suffix in (".cu", ".cuh", ".h") and not dep.stem.endswith("_emulator"):
            h.update(dep.name.encode() + dep.read_bytes())
    cache = _cache_dir() / f"{src.stem}.sm_{arch}.{h.hexdigest()[:16]}"
    if (cache / "done").is_file():
        return (cache / "sass.txt").read_text(), (cache / "ptxas.log").read_text()
    cache.mkdir(parents=True, exist_ok=True)
    cubin = cache / "kernel.cubin"
    log = _run(
        [
            nvcc,
            *NVCC_FLAGS,
            f"-gencode=arch=compute_{arch},code=sm_{arch}",
            str(src),
            "-o",
            str(cubin),
        ]
    )
    sass = _run([cuobjdump, "-sass", str(cubin)])
    (cache / "sass.txt").write_text(sass)
    (cache / "ptxas.log").write_text(log)
    (cache / "done").touch()
    return sass, log


# --- per-kernel analysis --------------------------------------------------------------------------
@dataclass
class KernelResult:
    kernel: str
    arch: str
    dtype: str
    n_tile: int
    registers: int
    spill_bytes: int
    smem_bytes: int
    ctas_per_sm_h100: int
    instr_per_element: dict[str, float]
    detail: dict[str, Any]
    function: str = ""
    instance: Instance | None = None

    def entry(self) -> dict[str, Any]:
        return {
            "kernel": self.kernel,
            "arch": self.arch,
            "dtype": self.dtype,
            "n_tile": self.n_tile,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "smem_bytes": self.smem_bytes,
            "ctas_per_sm_h100": self.ctas_per_sm_h100,
            "instr_per_element": self.instr_per_element,
            "detail": self.detail,
        }


def analyse(
    spec: Any,
    name: str,
    arch: str,
    instrs: Sequence[Instr],
    inst: Instance,
    registers: int,
    spill: int,
    smem: int,
    gpu: Gpu = H100,
) -> KernelResult:
    """Count one instantiation's main loop at every sparsity."""
    loop = find_main_loop(instrs)
    ipe: dict[str, float] = {}
    detail: dict[str, Any] = {
        "function": name,
        "main_loop": f"0x{loop.header:x}",
        "blocks": len(loop.blocks),
        "nested_loops": len(loop.nested),
        "threads": inst.threads,
        "elements_per_iter": inst.elements,
        "per_class": {},
        "integer_per_element": {},
        "int_pipe_per_element": {},
        "smem_bytes_per_element": {},
        "params": dict(inst.params),
        "primary": inst.primary,
    }
    scale = inst.threads / inst.elements
    for s in SPARSITIES:
        trips = spec.trip_counts(s, inst) if spec.trip_counts else None
        weights = block_frequencies(loop, trips)
        if spec.block_weights:
            over = spec.block_weights(loop, s, inst)
            weights = block_frequencies(loop, trips, over)
        c = count_loop(loop, weights)
        key = str(s)
        ipe[key] = round(c.total * scale, 3)
        detail["per_class"][key] = {k: round(v * scale, 3) for k, v in c.by_class.items() if v}
        detail["integer_per_element"][key] = round(c.by_class["integer"] * scale, 3)
        detail["int_pipe_per_element"][key] = round(c.int_pipe * scale, 3)
        detail["smem_bytes_per_element"][key] = round(c.shared_bytes / 32 * scale, 3)
    return KernelResult(
        spec.name,
        f"sm_{arch}",
        inst.dtype,
        inst.n_tile,
        registers,
        spill,
        smem,
        ctas_per_sm(registers, smem, inst.threads, gpu),
        ipe,
        detail,
        name,
        inst,
    )


def report_cuda(spec: CudaSpec, log: list[str], jobs: int = 2) -> list[KernelResult]:
    nvcc = find_tool("nvcc")
    cuobjdump = find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        log.append(f"SKIP {spec.name}: {'nvcc' if nvcc is None else 'cuobjdump'} not found")
        return []
    tasks = [(ROOT / s, a) for s in spec.sources for a in spec.archs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outs = list(pool.map(lambda t: compile_cuda(t[0], t[1], nvcc, cuobjdump), tasks))
    results = []
    for (_, arch), (sass, ptx_log) in zip(tasks, outs, strict=True):
        res = parse_ptxas(ptx_log)
        for fname, instrs in parse_sass(sass).items():
            inst = spec.match(fname)
            if inst is None:
                continue
            r = res.get(fname, {"registers": 0, "spill_bytes": 0, "static_smem": 0})
            results.append(
                analyse(
                    spec,
                    fname,
                    arch,
                    instrs,
                    inst,
                    r["registers"],
                    r["spill_bytes"],
                    r["static_smem"] + inst.dynamic_smem,
                )
            )
    if not results:
        log.append(f"ERROR {spec.name}: no function in {list(spec.sources)} matched its spec")
    return results


def report_triton(spec: TritonSpec, log: list[str]) -> list[KernelResult]:
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as e:
        log.append(f"SKIP {spec.name}: triton unavailable ({e})")
        return []
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        log.append(f"SKIP {spec.name}: cuobjdump not found")
        return []
    mod_name, attr = spec.fn.split(":")
    fn = getattr(importlib.import_module(mod_name), attr)
    src_text = Path(sys.modules[mod_name].__file__).read_bytes()
    results = []
    for inst, signature, constexprs, options in spec.instances():
        key = hashlib.sha256(
            repr(
                (
                    triton.__version__,
                    spec.arch,
                    sorted(signature.items()),
                    sorted(constexprs.items()),
                    sorted(options.items()),
                )
            ).encode()
            + src_text
        ).hexdigest()[:16]
        cache = _cache_dir() / f"{spec.name}.{key}"
        if not (cache / "done").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", spec.arch, 32),
                options=options,
            )
            (cache / "kernel.cubin").write_bytes(compiled.asm["cubin"])
            (cache / "meta.json").write_text(
                json.dumps(
                    {"shared": int(compiled.metadata.shared), "name": compiled.metadata.name}
                )
            )
            (cache / "sass.txt").write_text(_run([cuobjdump, "-sass", str(cache / "kernel.cubin")]))
            (cache / "res.txt").write_text(
                _run([cuobjdump, "-res-usage", str(cache / "kernel.cubin")])
            )
            (cache / "done").touch()
        meta = json.loads((cache / "meta.json").read_text())
        funcs = parse_sass((cache / "sass.txt").read_text())
        res = parse_res_usage((cache / "res.txt").read_text())
        fname = meta["name"] if meta["name"] in funcs else next(iter(funcs))
        r = res.get(fname, {"registers": 0, "stack": 0, "local": 0})
        # Triton reports its whole shared-memory need (it has no separate static part).
        results.append(
            analyse(
                spec,
                fname,
                str(spec.arch),
                funcs[fname],
                inst,
                r["registers"],
                r["stack"] + r["local"],
                int(meta["shared"]),
            )
        )
    return results


def load_spec(name: str) -> Any:
    """``SPEC`` of ``bench/kernel_specs/<name>.py``; raises ImportError if it has none."""
    mod = importlib.import_module(f"kernel_specs.{name}")
    spec = getattr(mod, "SPEC", None)
    if not isinstance(spec, (CudaSpec, TritonSpec)):
        raise ImportError(f"kernel_specs/{name}.py defines no CudaSpec/TritonSpec named SPEC")
    return spec


# --- launch plans ---------------------------------------------------------------------------------
def _weight_bytes(kernel: str, m: int, k: int, s: float) -> float:
    """Stored weight bytes for a 16-bit weight at sparsity ``s`` (uniform random mask)."""
    tiles64 = -(-m // 64) * -(-k // 64)
    if kernel.startswith("bitmap"):
        # values (each tile padded to 8) + 64-bit row masks + int32 tile offsets
        return 2 * (1 - s) * m * k + tiles64 * (8 + 512 + 4)
    tiles128 = -(-m // 128) * -(-k // 64)
    return 4 * (1 - s) * m * k + tiles128 * (4 * 2 + 4)


def _cta_slots(results: Sequence[KernelResult], kernel: str, n_tile: int | None) -> int:
    """CTAs per SM of the kernel's fp16 sm_90 instance for ``n_tile`` (1 if unknown)."""
    cands = [
        r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch.startswith("sm_90")
        and (r.instance is None or r.instance.primary)
    ]
    if n_tile is not None:
        exact = [r for r in cands if r.n_tile == n_tile]
        cands = exact or cands
    return max(1, min((r.ctas_per_sm_h100 for r in cands), default=1))


def plan_for(
    kernel: str, m: int, k: int, n: int, s: float, results: Sequence[KernelResult], gpu: Gpu = H100
) -> dict[str, Any]:
    """Launch plan of ``kernel`` for one shape: the provider's own planner when it exists,
    else an adapter around today's plan functions."""
    if kernel == "bitmap_triton":
        from flashsparse.kernels.triton import bitmap_spmm

        cfg = bitmap_spmm.choose_config(m, k, n, gpu.sms)
        ctas = -(-m // cfg.block_m) * -(-n // cfg.block_n) * cfg.split_k
        return {
            "ctas": ctas,
            "split_k": cfg.split_k,
            "persistent": False,
            "tile_m": cfg.block_m,
            "tile_n": cfg.block_n,
            "extra_launches": int(cfg.split_k > 1),
            "workspace": cfg.split_k > 1,
        }
    from flashsparse.kernels.cuda import bitmap, tiled_csl

    wbytes = _weight_bytes(kernel, m, k, s)
    fn = {"tiled_csl_cuda": tiled_csl, "bitmap_cuda": bitmap}[kernel]
    fn = getattr(
        fn, {"tiled_csl_cuda": "tiled_csl_launch_plan", "bitmap_cuda": "bitmap_launch_plan"}[kernel]
    )
    accepted = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"num_sms": gpu.sms}
    if "weight_bytes" in accepted:
        kwargs["weight_bytes"] = int(wbytes)
    first = fn(m, k, n, **kwargs)  # the planner's own occupancy, for its tile_n
    counted = [
        r
        for r in results
        if r.kernel == kernel
        and r.n_tile == first.get("tile_n")
        and (r.instance is None or r.instance.primary)
    ]
    if "ctas_per_sm" in accepted and counted:
        kwargs["ctas_per_sm"] = _cta_slots(results, kernel, first.get("tile_n"))
    plan = dict(fn(m, k, n, **kwargs))
    split = int(plan.get("split_k", 1))
    plan.setdefault("extra_launches", 0)  # the kernels reduce split-K in the kernel
    plan.setdefault("workspace", split > 1)  # ... but the partial sums still move
    return plan


def predict(
    kernel: str,
    m: int,
    k: int,
    n: int,
    s: float,
    plan: Mapping[str, Any],
    result: KernelResult | None,
    gpu: Gpu = H100,
) -> dict[str, float]:
    """Model time and speed-up over dense (see the module docstring)."""
    key = str(s)
    x_y = 2 * n * k + 2 * n * m
    split = int(plan.get("split_k", 1))
    ws = 8 * n * m * split if plan.get("workspace") and split > 1 else 0
    nbytes = _weight_bytes(kernel, m, k, s) + x_y + ws
    t_mem = nbytes / gpu.bandwidth
    t_issue = t_smem = 0.0
    if result is not None:
        ctas = int(plan["ctas"])
        slots = gpu.sms * max(1, result.ctas_per_sm_h100)
        util = (
            min(ctas, gpu.sms) / gpu.sms if ctas <= gpu.sms else ctas / (-(-ctas // slots) * slots)
        )
        passes = m * k * -(-n // result.n_tile)  # weight elements decoded (once per N block)
        ipe = max(result.instr_per_element[key], 2 * result.detail["int_pipe_per_element"][key])
        t_issue = ipe * passes / (gpu.issue_rate * util)
        sbpe = result.detail["smem_bytes_per_element"][key]
        t_smem = sbpe * passes / (gpu.sms * gpu.smem_bytes_per_clk * gpu.clock_hz * util)
    t = max(t_mem, t_issue, t_smem) + gpu.launch_s * (1 + int(plan.get("extra_launches", 0)))
    dense = (2 * m * k + x_y) / gpu.bandwidth + gpu.launch_s
    bound = max(("memory", t_mem), ("issue", t_issue), ("shared", t_smem), key=lambda p: p[1])[0]
    return {
        "time_us": round(t * 1e6, 2),
        "dense_us": round(dense * 1e6, 2),
        "speedup": round(dense / t, 3),
        "bound": bound,
    }


def pick_instance(
    results: Sequence[KernelResult], kernel: str, tile_n: int | None
) -> KernelResult | None:
    """The fp16 sm_90 primary instance with this ``tile_n`` (else the nearest)."""
    cands = [
        r
        for r in results
        if r.kernel == kernel
        and r.dtype == "fp16"
        and r.arch.startswith("sm_90")
        and (r.instance is None or r.instance.primary)
    ]
    if not cands:
        return None
    if tile_n is not None:
        for r in cands:
            if r.n_tile == tile_n:
                return r
    return min(cands, key=lambda r: abs(r.n_tile - (tile_n or 0)))


# --- report ---------------------------------------------------------------------------------------
def build_report(
    kernels: Iterable[str] = KERNEL_NAMES, plans: bool = True, jobs: int = 2, gpu: Gpu = H100
) -> tuple[dict[str, Any], list[str]]:
    """(JSON-ready report, log lines: skips and errors)."""
    log: list[str] = []
    results: list[KernelResult] = []
    names = list(kernels)
    for name in names:
        try:
            spec = load_spec(name)
        except ImportError as e:
            log.append(f"ERROR {name}: no spec (bench/kernel_specs/{name}.py): {e}")
            continue
        try:
            results += (
                report_cuda(spec, log, jobs)
                if isinstance(spec, CudaSpec)
                else report_triton(spec, log)
            )
        except Exception as e:
            log.append(f"ERROR {name}: {type(e).__name__}: {e}")
    plan_rows: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    if plans:
        for name in names:
            failed = False
            for _, m, k in SHAPES:
                for n in NS:
                    for s in SPARSITIES:
                        try:
                            plan = plan_for(name, m, k, n, s, results, gpu)
                        except Exception as e:
                            if not failed:
                                log.append(f"ERROR {name}: no launch plan: {type(e).__name__}: {e}")
                            failed = True
                            break
                        plan_rows.append(
                            {
                                "kernel": name,
                                "m": m,
                                "k": k,
                                "n": n,
                                "sparsity": s,
                                "ctas": int(plan["ctas"]),
                                "split_k": int(plan["split_k"]),
                                "persistent": bool(plan["persistent"]),
                                "tile_m": plan.get("tile_m"),
                                "tile_n": plan.get("tile_n"),
                            }
                        )
                        inst = pick_instance(results, name, plan.get("tile_n"))
                        pred = predict(name, m, k, n, s, plan, inst, gpu)
                        predictions.append(
                            {
                                "kernel": name,
                                "m": m,
                                "k": k,
                                "n": n,
                                "sparsity": s,
                                "gpu": gpu.name,
                                "dtype": "fp16",
                                "counted": inst is not None,
                                **pred,
                            }
                        )
                    if failed:
                        break
                if failed:
                    break
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    report = {
        "kernels": [r.entry() for r in results],
        "plans": plan_rows,
        "predictions": predictions,
        "meta": {
            "triton": triton_version,
            "gpu_model": gpu.__dict__,
            "log": log,
            "sparsities": list(SPARSITIES),
        },
    }
    return report, log


def format_report(report: Mapping[str, Any], gpu: Gpu = H100) -> str:
    lines = [
        f"Static kernel report (SASS; model estimates, no GPU run; triton {report['meta']['triton']})"
    ]
    lines.append(
        f"{'kernel':15} {'arch':6} {'dtype':5} {'n_tile':>6} {'regs':>4} {'spill':>5} "
        f"{'smem':>7} {'CTA/SM':>6}  instr/elem 50/70/90 %   (int pipe 70 %)"
    )
    for e in report["kernels"]:
        ipe = e["instr_per_element"]
        lines.append(
            f"{e['kernel']:15} {e['arch']:6} {e['dtype']:5} {e['n_tile']:>6} {e['registers']:>4} "
            f"{e['spill_bytes']:>5} {e['smem_bytes']:>7} {e['ctas_per_sm_h100']:>6}  "
            f"{ipe['0.5']:6.2f} {ipe['0.7']:6.2f} {ipe['0.9']:6.2f}   ({e['detail']['int_pipe_per_element']['0.7']:.2f})"
            + ("" if e["detail"].get("primary", True) else "  variant (not planned)")
        )
    if report["plans"]:
        floor = 2 * gpu.sms
        lines.append("")
        lines.append(
            f"Launch plans and predicted speed-up over dense on an {gpu.name} (fp16; "
            f"'!' = fewer than {floor} CTAs, i.e. < 2 per SM)"
        )
        lines.append(
            f"{'kernel':15} {'m':>6} {'k':>6} {'n':>3} {'s':>4} {'ctas':>7} {'split':>5} "
            f"{'pers':>4} {'pred us':>8} {'dense us':>8} {'speed-up':>8} bound"
        )
        preds = {
            (p["kernel"], p["m"], p["k"], p["n"], p["sparsity"]): p for p in report["predictions"]
        }
        for p in report["plans"]:
            q = preds.get((p["kernel"], p["m"], p["k"], p["n"], p["sparsity"]), {})
            flag = "!" if p["ctas"] < floor and not p["persistent"] else " "
            lines.append(
                f"{p['kernel']:15} {p['m']:>6} {p['k']:>6} {p['n']:>3} {p['sparsity']:>4} "
                f"{p['ctas']:>6}{flag} {p['split_k']:>5} {'yes' if p['persistent'] else 'no':>4} "
                f"{q.get('time_us', float('nan')):>8} {q.get('dense_us', float('nan')):>8} "
                f"{q.get('speedup', float('nan')):>7}x {q.get('bound', '')}"
            )
        lines.append("")
        lines.append("Geomean predicted speed-up, N <= 32:")
        for kernel in dict.fromkeys(p["kernel"] for p in report["predictions"]):
            parts = []
            for s in SPARSITIES:
                vals = [
                    p["speedup"]
                    for p in report["predictions"]
                    if p["kernel"] == kernel and p["sparsity"] == s
                ]
                if vals:
                    parts.append(
                        f"{int(s * 100)} %: {math.exp(sum(map(math.log, vals)) / len(vals)):.2f}x"
                    )
            flagged = sum(
                1
                for p in report["plans"]
                if p["kernel"] == kernel and p["ctas"] < floor and not p["persistent"]
            )
            total = sum(1 for p in report["plans"] if p["kernel"] == kernel)
            uncounted = any(
                not p["counted"] for p in report["predictions"] if p["kernel"] == kernel
            )
            note = " (NO instruction counts: memory-bound ceiling only)" if uncounted else ""
            lines.append(
                f"  {kernel:15} "
                + ", ".join(parts)
                + f"; plans under {floor} CTAs: {flagged}/{total}{note}"
            )
    for msg in report["meta"]["log"]:
        lines.append(msg)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the report as JSON here")
    ap.add_argument(
        "--kernels", default=",".join(KERNEL_NAMES), help="comma-separated kernel names"
    )
    ap.add_argument("--no-plans", action="store_true", help="skip launch plans and predictions")
    ap.add_argument(
        "--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel nvcc runs"
    )
    ap.add_argument(
        "--gpu",
        choices=sorted(GPUS),
        default="h100",
        help="GPU of the speed-up model (h200: same SMs, 4.8 TB/s); occupancy is always H100's",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.kernels.split(",") if n.strip()]
    unknown = [n for n in names if n not in KERNEL_NAMES]
    if unknown:
        ap.error(f"--kernels: unknown {unknown}; expected a subset of {list(KERNEL_NAMES)}")
    gpu = GPUS[args.gpu]
    report, _ = build_report(names, plans=not args.no_plans, jobs=args.jobs, gpu=gpu)
    print(format_report(report, gpu))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
