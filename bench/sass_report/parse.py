"""SASS and ptxas parsing: instructions per function, instruction classes, shared-memory bytes
per warp instruction, and the register/spill/shared-memory figures of ``-Xptxas -v`` and
``cuobjdump -res-usage``."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
