"""Control flow of one SASS function: basic blocks, dominators, natural loops, the main loop
(the loop holding the most MMA instructions) and per-iteration issue counts of its blocks."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .parse import _FMA_PIPE_INTEGER, _MMA_OPS, CLASSES, Instr, shared_bytes


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
