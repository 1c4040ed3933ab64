"""Triton Load-as-Sparse, Compute-as-Dense kernel for the ``bitmap`` format: ``y = x @ W.T + b``.

Each program owns ``BLOCK_M`` weight rows (whole 64-row tiles), ``BLOCK_N`` rows of x and a
contiguous range of 64-wide k tiles (its split-K slice). Per k tile it

1. loads the tile's row masks as ``[BLOCK_M, ROW_PARTS]`` words of ``8 // ROW_PARTS`` bytes
   (one word per thread: :func:`row_parts`), and splits each word into its bytes in
   registers,
2. turns every mask byte into a 32-bit word of eight nibbles, nibble ``j`` = (bit ``j`` << 3)
   | (set bits below ``j``): a shift-and-mask spread of the bits and ONE multiply (see
   :func:`_nibble_ranks`), which also yields the byte's popcount,
3. adds prefix sums of those popcounts (inside the word in registers, then one scan over the
   tile's (row, word) sequence) to the tile's value offset: the packed-value address of each
   byte's first nonzero,
4. gathers element ``j`` of every byte as its own tensor: ``j`` is a constant, so its nibble
   is one constant shift and mask, "nonzero" is ``nibble >= 8`` and the address is the
   byte's address - 8 + nibble (one 64-bit add); joins interleave the 8 ``j`` (and the bytes
   of a word) so that one thread holds its word's 8 to 32 consecutive weights, which go to
   shared memory in 16-byte stores,
5. multiplies the rebuilt dense ``[BLOCK_M, 64]`` tile with the ``[64, BLOCK_N]`` x tile on
   the tensor cores (``tl.dot``), accumulating in fp32.

Split-K programs write fp32 partials to a ``[split, N, M]`` workspace; a second kernel sums
them in a fixed order (deterministic), adds the bias and casts. Without split-K the bias is
added in the epilogue of the main kernel.

Block sizes and split-K come from :func:`choose_config`, a pure function of
``(m, k, n, num_sms)`` whose compiled variants depend on N only through its bucket
(``BLOCK_N``), so a new batch size never triggers a new compile or any autotuning.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TILE = 64  # bitmap tile edge (flashsparse.formats.bitmap.TILE)
MAX_SPLIT_K = 32
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --- kernels -----------------------------------------------------------------------------------
@triton.jit
def _nibble_ranks(b):
    """uint32 mask bytes -> (nibble word, popcount).

    Nibble ``j`` of the word is ``(bit_j << 3) | popcount(b & ((1 << j) - 1))`` (the rank is at
    most 7, so it fits in three bits); bit 3 of a nibble says "nonzero", the low three bits
    are its rank among the byte's nonzeros.
    """
    # Spread bit j to bit 4j (a Morton-style spread in three steps).
    s = (b | (b << 12)) & 0x000F000F
    s = (s | (s << 6)) & 0x03030303
    s = (s | (s << 3)) & 0x11111111
    # Multiplying by 0x11111111 makes nibble j the inclusive prefix count I_j of bits 0..j; it
    # never exceeds 8, so no nibble carries into the next and the wrap-around drops only nibbles
    # >= 8. The wanted nibble is 8 * bit_j + I_(j-1) = 8 * I_j - 7 * I_(j-1) (still 0..15, so no
    # borrows either), i.e. 8 * inclusive - 7 * (inclusive << 4): one multiply by
    # 0x11111111 * (8 - 7 * 16) = 0x11111118 (mod 2**32), which LLVM cannot see through to
    # re-derive the flag bits from the mask byte one shift at a time.
    count = ((s * 0x11111111) >> 28).to(tl.int32)
    return s * 0x11111118, count


@triton.jit
def _gather(base8, nibbles, J: tl.constexpr):
    """Element ``J`` of every mask byte: ``base8[8 + rank]`` where bit ``J`` is set, else 0.

    ``J`` is a constant, so the nibble is a constant shift and mask of the word; its flag bit
    makes a set element's offset ``8 + rank`` (``base8`` is the byte's first value - 8).
    """
    nib = (nibbles >> (4 * J)) & 15
    return tl.load(base8 + nib.to(tl.int32), mask=nib >= 8, other=0.0)


@triton.jit
def _bytes_j(
    base8_0,
    base8_1,
    base8_2,
    base8_3,
    nib_0,
    nib_1,
    nib_2,
    nib_3,
    J: tl.constexpr,
    PART: tl.constexpr,
):
    """Element ``J`` of each of a part's ``PART`` (1, 2 or 4) bytes: ``[BM, P]`` gathers
    joined into ``[BM, P, (2, 2)]``, byte 0 first."""
    if PART == 1:
        e = _gather(base8_0, nib_0, J)
    elif PART == 2:
        e = tl.join(_gather(base8_0, nib_0, J), _gather(base8_1, nib_1, J))
    else:
        e = tl.join(
            tl.join(_gather(base8_0, nib_0, J), _gather(base8_2, nib_2, J)),
            tl.join(_gather(base8_1, nib_1, J), _gather(base8_3, nib_3, J)),
        )
    return e


@triton.jit
def _byte_nibbles(words, C: tl.constexpr, PART: tl.constexpr):
    """Nibble word and popcount of byte ``C`` of each part (``words``: one per part)."""
    # (For PART == 1 the word is the byte and the mask is a no-op.)
    return _nibble_ranks((words.to(tl.uint32) >> (8 * C)) & 0xFF)


@triton.jit
def _accumulate_tiles(
    acc,
    x_rows,
    n_ok,
    mask_bytes_ptr,
    values_ptr,
    tile_offsets_ptr,
    tile_row,
    row_ok,
    k,
    k_tiles,
    kt_begin,
    kt_end,
    BLOCK_M: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
    ROW_PARTS: tl.constexpr,
):
    """``acc += W[rows, k tiles kt_begin..kt_end) @ x[.., same k].T``: the main loop, shared by
    the plain and the grouped kernel."""
    TM: tl.constexpr = BLOCK_M // 64  # 64-row tiles per program
    PART: tl.constexpr = 8 // ROW_PARTS  # mask bytes per row part: 1, 2 or 4
    if PART == 4:
        word_ptr = mask_bytes_ptr.to(tl.pointer_type(tl.uint32))
    elif PART == 2:
        word_ptr = mask_bytes_ptr.to(tl.pointer_type(tl.uint16))
    else:
        word_ptr = mask_bytes_ptr
    rows = tl.arange(0, BLOCK_M)
    r_in = rows % 64
    # Word (part) h of row r's mask, relative to the tile's first mask word: [BM, P]. One
    # thread decodes one part: its bytes are split off the word in registers, so the byte
    # prefix sums inside a part need no shuffles.
    mask_word = (r_in * ROW_PARTS)[:, None] + tl.arange(0, ROW_PARTS)[None, :]
    offs_k = tl.arange(0, 64)
    # The mask words and value offset of tile kt + 1 are loaded while tile kt is decoded, so
    # each k step waits for one round trip to memory (values and x) instead of two.
    t = tile_row.to(tl.int64) * k_tiles + kt_begin  # [BLOCK_M] tile index of each row
    # (The host never launches an empty split, so tile kt_begin exists. 64 rows per tile.)
    next_words = tl.load(
        word_ptr + t[:, None] * (64 * ROW_PARTS) + mask_word, mask=row_ok[:, None], other=0
    )
    next_start = tl.load(tile_offsets_ptr + t, mask=row_ok, other=0)
    for kt in range(kt_begin, kt_end):
        words = next_words
        tile_start = next_start.to(tl.int64) * 8 if OFFSETS_64 else next_start * 8
        # The last step reloads its own tile rather than predicating on kt (in bounds, and
        # the interpreter mistypes a scalar-bool & tensor-bool mask).
        t = tile_row.to(tl.int64) * k_tiles + tl.minimum(kt + 1, kt_end - 1)
        next_words = tl.load(
            word_ptr + t[:, None] * (64 * ROW_PARTS) + mask_word, mask=row_ok[:, None], other=0
        )
        next_start = tl.load(tile_offsets_ptr + t, mask=row_ok, other=0)

        # Nibble words and popcounts of the part's bytes (unused ones for PART < 4 are
        # dead code), then prefix sums: inside the part (in registers), then over the parts
        # of the tile.
        nib_0, cnt_0 = _byte_nibbles(words, 0, PART)
        nib_1, cnt_1 = _byte_nibbles(words, 1, PART)
        nib_2, cnt_2 = _byte_nibbles(words, 2, PART)
        nib_3, cnt_3 = _byte_nibbles(words, 3, PART)
        if PART == 1:
            part_total = cnt_0
        elif PART == 2:
            part_total = cnt_0 + cnt_1
        else:
            part_total = (cnt_0 + cnt_1) + (cnt_2 + cnt_3)
        # Row-major over (row, part), the parts of a tile are one sequence: a single scan
        # gives both the rows before and the parts before in the row.
        flat = tl.reshape(part_total, [TM, 64 * ROW_PARTS])
        before_part = tl.reshape(tl.cumsum(flat, axis=1) - flat, [BLOCK_M, ROW_PARTS])
        # Address of each byte's first nonzero, less 8 (see _gather): [BM, P] per byte.
        base8_0 = values_ptr + ((tile_start - 8)[:, None] + before_part)
        base8_1 = base8_0 + cnt_0
        base8_2 = base8_1 + cnt_1
        base8_3 = base8_2 + cnt_2
        # Element j of every byte, joined so that one thread holds its part's 8 * PART
        # elements (byte-major, then j): the values go to shared memory in 16-byte stores.
        e0 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 0, PART)
        e1 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 1, PART)
        e2 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 2, PART)
        e3 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 3, PART)
        e4 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 4, PART)
        e5 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 5, PART)
        e6 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 6, PART)
        e7 = _bytes_j(base8_0, base8_1, base8_2, base8_3, nib_0, nib_1, nib_2, nib_3, 7, PART)
        # join appends a minor axis: the last join picks j's bit 0, the first its bit 2.
        w = tl.join(
            tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7))
        )
        w = tl.reshape(w, [BLOCK_M, 64])

        kk = kt * 64 + offs_k
        xt = tl.load(x_rows + kk[:, None], mask=n_ok[None, :] & (kk < k)[:, None], other=0.0)
        if UPCAST:
            # The interpreter's bf16 tl.dot is wrong; fp32 operands are exact.
            acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc, input_precision=DOT_PRECISION)

    return acc


@triton.jit(do_not_specialize=["n"])
def _bitmap_linear_kernel(
    x_ptr,
    mask_bytes_ptr,
    values_ptr,
    tile_offsets_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    n,
    m,
    k,
    stride_xn,
    k_tiles,
    tiles_per_split,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
    ROW_PARTS: tl.constexpr,
):
    TM: tl.constexpr = BLOCK_M // 64  # 64-row tiles per program
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)

    rows = tl.arange(0, BLOCK_M)
    tile_row = pid_m * TM + rows // 64
    row_ok = tile_row < tl.cdiv(m, 64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n
    x_rows = x_ptr + offs_n.to(tl.int64)[None, :] * stride_xn  # [1, BLOCK_N]

    kt_begin = pid_s * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc = _accumulate_tiles(
        acc,
        x_rows,
        n_ok,
        mask_bytes_ptr,
        values_ptr,
        tile_offsets_ptr,
        tile_row,
        row_ok,
        k,
        k_tiles,
        kt_begin,
        kt_end,
        BLOCK_M,
        UPCAST,
        DOT_PRECISION,
        OFFSETS_64,
        ROW_PARTS,
    )

    offs_m = pid_m * BLOCK_M + rows
    m_ok = offs_m < m
    out_offs = offs_n.to(tl.int64)[None, :] * m + offs_m[:, None]  # y is [N, M]
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT:
        partial = ws_ptr + pid_s.to(tl.int64) * n * m + out_offs
        tl.store(partial, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["m"])
def _bitmap_grouped_kernel(
    x_ptr,
    row_starts_ptr,
    mask_table_ptr,
    value_table_ptr,
    offset_table_ptr,
    values_ptr,
    bias_ptr,
    out_ptr,
    m,
    k,
    stride_xn,
    k_tiles,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    OFFSETS_64: tl.constexpr,
    ROW_PARTS: tl.constexpr,
):
    """One launch for E weights of one shape: program ``(i, j, g)`` computes rows ``i`` of
    ``x[group g's rows, block j] @ W_g.T``. The groups' component tensors are reached through
    tables of their addresses (no copy of the weights); ``values_ptr`` (group 0's values) only
    gives the value type."""
    TM: tl.constexpr = BLOCK_M // 64
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    row0 = tl.load(row_starts_ptr + g)
    n = tl.load(row_starts_ptr + g + 1) - row0
    if pid_n * BLOCK_N < n:  # blocks past this group's rows have nothing to do
        masks = tl.load(mask_table_ptr + g).to(tl.pointer_type(tl.uint8))
        values = tl.load(value_table_ptr + g).to(values_ptr.dtype)
        offsets = tl.load(offset_table_ptr + g).to(tl.pointer_type(tl.int32))
        rows = tl.arange(0, BLOCK_M)
        tile_row = pid_m * TM + rows // 64
        row_ok = tile_row < tl.cdiv(m, 64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n
        x_rows = x_ptr + (row0 + offs_n.to(tl.int64))[None, :] * stride_xn
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _accumulate_tiles(
            acc,
            x_rows,
            n_ok,
            masks,
            values,
            offsets,
            tile_row,
            row_ok,
            k,
            k_tiles,
            0,
            k_tiles,
            BLOCK_M,
            UPCAST,
            DOT_PRECISION,
            OFFSETS_64,
            ROW_PARTS,
        )
        offs_m = pid_m * BLOCK_M + rows
        m_ok = offs_m < m
        if HAS_BIAS:
            acc += tl.load(bias_ptr + g.to(tl.int64) * m + offs_m, mask=m_ok, other=0.0).to(
                tl.float32
            )[:, None]
        out_offs = (row0 + offs_n.to(tl.int64))[None, :] * m + offs_m[:, None]
        tl.store(
            out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :]
        )


@triton.jit(do_not_specialize=["numel"])
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, out_ptr, numel, m, split, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    partial = ws_ptr + offs
    acc = tl.load(partial, mask=ok, other=0.0)
    for _ in range(1, split):  # fixed order: bitwise reproducible
        partial += numel
        acc += tl.load(partial, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % m, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


# Kernels are interpreted when TRITON_INTERPRET=1 was set when this module was imported.
INTERPRET = type(_bitmap_linear_kernel).__name__ == "InterpretedFunction"
REDUCE_BLOCK = 1024
# Value offsets fit int32 below this (32-bit offsets save registers in the decode).
_INT32_OFFSET_LIMIT = 2**31 - TILE * TILE


# --- launch heuristic --------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. ``block_m`` is a multiple of 64 (whole tiles), ``block_n`` a power of
    two >= 16 (``tl.dot``), ``split_k`` the number of k slices (1 = no workspace)."""

    block_m: int
    block_n: int
    split_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        if self.block_m < 64 or self.block_m % 64 or self.block_m & (self.block_m - 1):
            raise ValueError(f"block_m must be 64 times a power of two, got {self.block_m}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"block_n must be a power of two >= 16, got {self.block_n}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two <= 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")


def row_parts(block_m: int, num_warps: int) -> int:
    """Parts each weight row's 8 mask bytes are split into (``ROW_PARTS``: 2, 4 or 8): one
    part per thread when the ``block_m x 64`` tile is spread evenly over the CTA's threads (at
    most 4 bytes a part), so that a thread decodes whole, adjacent bytes."""
    bytes_per_thread = block_m * 8 // (32 * num_warps)
    return 8 // min(4, max(1, bytes_per_thread))


def n_bucket(n: int) -> int:
    """``BLOCK_N`` for ``n`` rows of x: the next power of two in [16, 128]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return min(128, max(16, 1 << (n - 1).bit_length()))


def wave_efficiency(ctas: int, slots: int) -> float:
    """Fraction of the ``slots`` (concurrent CTAs the GPU holds) busy, averaged over all waves."""
    waves = -(-ctas // slots)
    return ctas / (waves * slots)


def split_efficiency(base: int, split: int, k_tiles: int, slots: int) -> float:
    """Useful fraction of the machine when ``base`` CTAs each split k into ``split`` slices.

    The wave efficiency of the ``base * s`` CTAs (``s`` = the slices left once each holds
    ``ceil(k_tiles / split)`` tiles), times the k balance: the longest slice sets the time.
    """
    per = -(-k_tiles // split)
    slices = -(-k_tiles // per)
    return wave_efficiency(base * slices, slots) * k_tiles / (slices * per)


def _pos_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def choose_config(
    m: int, k: int, n: int, num_sms: int, *, dtype: torch.dtype = torch.float16
) -> KernelConfig:
    """Block sizes and split-K for an ``[n, k] @ [m, k].T`` product on ``num_sms`` SMs.

    * ``block_n`` = :func:`n_bucket` (N only matters through its bucket and through the number
      of N blocks beyond 128 rows);
    * ``block_m`` = 64 for N <= 16 (many small CTAs keep more loads in flight), 128 beyond
      (each decoded tile feeds twice the tensor-core work, and 8 warps on 64 rows would
      spend more on the per-tile decode than they save);
    * ``split_k`` = the smallest split whose :func:`split_efficiency` over
      ``num_sms * ctas_per_sm`` slots is >= 0.8 (else the most efficient one), at most the
      number of k tiles and :data:`MAX_SPLIT_K`, rounded so that no slice is empty.

    fp32 (the ieee dot) caps ``block_n`` at 64: at 128 it spills registers.
    """
    for value, name in ((m, "m"), (k, "k"), (n, "n"), (num_sms, "num_sms")):
        _pos_int(value, name)
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return _choose_config(m, k, n, num_sms, dtype == torch.float32)


@functools.lru_cache(maxsize=4096)
def _choose_config(m: int, k: int, n: int, num_sms: int, fp32: bool) -> KernelConfig:
    block_n = min(n_bucket(n), 64) if fp32 else n_bucket(n)
    # (block_m, num_warps, resident CTAs per SM) per bucket. Wider N buckets need more
    # registers per thread, and the register file is what bounds resident CTAs (the counts
    # ptxas gives are in bench/kernel_report.py's output). The decode's per-tile work (mask
    # words, prefix scan) is per thread, so a 64-row tile on 8 warps issues more instructions
    # per weight element than a 128-row one: from 32 on, 128 rows, and split-K supplies CTAs.
    block_m, num_warps, ctas_per_sm = {16: (64, 4, 5), 32: (128, 8, 2), 64: (128, 8, 1)}.get(
        block_n, (128, 8, 1)
    )
    num_stages = 2
    slots = num_sms * ctas_per_sm
    base = -(-m // block_m) * -(-n // block_n)
    k_tiles = -(-k // TILE)
    best, best_eff = 1, split_efficiency(base, 1, k_tiles, slots)
    for split in range(2, min(k_tiles, MAX_SPLIT_K) + 1):
        if best_eff >= 0.8:
            break
        eff = split_efficiency(base, split, k_tiles, slots)
        if eff > best_eff + 1e-9:
            best, best_eff = split, eff
    per_split = -(-k_tiles // best)
    return KernelConfig(block_m, block_n, -(-k_tiles // per_split), num_warps, num_stages)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: programs run one after another


# --- launch wrapper ----------------------------------------------------------------------------
def _check(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
) -> None:
    for name, t in (("x", x), ("masks", masks), ("values", values), ("tile_offsets", tile_offsets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    _pos_int(m, "m")
    _pos_int(k, "k")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be 2-D [N, {k}], got shape {tuple(x.shape)}")
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if values.dtype != x.dtype or values.dim() != 1:
        raise TypeError(
            f"values must be 1-D {x.dtype} (x's dtype), got {values.dtype} {tuple(values.shape)}"
        )
    num_tiles = -(-m // TILE) * -(-k // TILE)
    if masks.dtype != torch.int64 or masks.shape != (num_tiles * 64,):
        raise ValueError(
            f"masks must be int64 of shape ({num_tiles * 64},) for a {m}x{k} weight, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    if tile_offsets.dtype != torch.int32 or tile_offsets.shape != (num_tiles + 1,):
        raise ValueError(
            f"tile_offsets must be int32 of shape ({num_tiles + 1},), "
            f"got {tile_offsets.dtype} {tuple(tile_offsets.shape)}"
        )
    named = [("masks", masks), ("values", values), ("tile_offsets", tile_offsets)]
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (m,) or bias.dtype != x.dtype:
            raise ValueError(
                f"bias must be {x.dtype} of shape ({m},), got {bias.dtype} {tuple(bias.shape)}"
            )
        named.append(("bias", bias))
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if out.shape != (x.shape[0], m) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous {x.dtype} tensor of shape ({x.shape[0]}, {m}), "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        named.append(("out", out))
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def bitmap_linear(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for ``x`` ``[N, K]`` and a bitmap-encoded ``[m, k]`` weight ``W``.

    Returns ``out`` (a new ``[N, m]`` tensor in x's dtype unless one is passed). ``config``
    overrides :func:`choose_config` (tests force split-K with it).
    """
    _check(x, masks, values, tile_offsets, m, k, bias, out)
    if config is not None and not isinstance(config, KernelConfig):
        raise TypeError(f"config must be a KernelConfig or None, got {type(config).__name__}")
    return launch(x, masks, values, tile_offsets, m, k, bias, out=out, config=config)


def launch(
    x: torch.Tensor,
    masks: torch.Tensor,
    values: torch.Tensor,
    tile_offsets: torch.Tensor,
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """:func:`bitmap_linear` without the argument checks, for the op's hot path (the op layer
    has already checked what the kernel relies on)."""
    n = x.shape[0]
    if out is None:
        out = torch.empty((n, m), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None:
        config = _choose_config(m, k, n, _num_sms(x.device), x.dtype == torch.float32)
    k_tiles = -(-k // TILE)
    per_split = -(-k_tiles // min(config.split_k, k_tiles))
    split = -(-k_tiles // per_split)
    ws = torch.empty((split, n, m), dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (-(-m // config.block_m), -(-n // config.block_n), split)
    dummy = out  # stands in for absent pointers; never read
    with _device_guard(x.device):
        _bitmap_linear_kernel[grid](
            x,
            masks.view(torch.uint8),
            values,
            tile_offsets,
            bias if bias is not None else dummy,
            out,
            ws,
            n,
            m,
            k,
            x.stride(0),
            k_tiles,
            per_split,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            HAS_BIAS=bias is not None,
            SPLIT=split > 1,
            UPCAST=INTERPRET,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            OFFSETS_64=values.numel() >= _INT32_OFFSET_LIMIT,
            ROW_PARTS=row_parts(config.block_m, config.num_warps),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if split > 1:
            numel = n * m
            _splitk_reduce_kernel[(triton.cdiv(numel, REDUCE_BLOCK),)](
                ws,
                bias if bias is not None else dummy,
                out,
                numel,
                m,
                split,
                HAS_BIAS=bias is not None,
                BLOCK=REDUCE_BLOCK,
                num_warps=4,
            )
    return out


def launch_grouped(
    x: torch.Tensor,
    counts: list[int],
    weights: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    m: int,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows of g] = x[rows of g] @ W_g.T (+ bias[g])`` for E bitmap weights ``weights[g] =
    (masks, values, tile_offsets)`` of one shape ``[m, k]``, in ONE launch over (row block,
    token block, group). ``x [S, k]`` holds group 0's rows, then group 1's, ...; ``counts`` how
    many (host ints); ``bias`` ``[E, m]``. The caller has checked shapes, dtypes and devices."""
    if len(counts) != len(weights) or sum(counts) != x.shape[0]:
        raise ValueError(
            f"counts ({len(counts)} groups, {sum(counts)} rows) must match weights "
            f"({len(weights)}) and x ({x.shape[0]} rows)"
        )
    for w in weights:
        _check(x, *w, m, k, None, None)
        if not w[1].is_contiguous() or not w[0].is_contiguous() or not w[2].is_contiguous():
            raise ValueError("every group's masks, values and tile_offsets must be contiguous")
    if bias is not None and (
        bias.shape != (len(weights), m) or bias.dtype != x.dtype or bias.device != x.device
    ):
        raise ValueError(
            f"bias must be {x.dtype} of shape ({len(weights)}, {m}) on {x.device}, got {bias.dtype} {tuple(bias.shape)}"
        )
    if out is None:
        out = torch.empty((x.shape[0], m), dtype=x.dtype, device=x.device)
    elif (
        out.shape != (x.shape[0], m)
        or out.dtype != x.dtype
        or not out.is_contiguous()
        or out.device != x.device
    ):
        raise ValueError(
            f"out must be a contiguous {x.dtype} tensor of shape ({x.shape[0]}, {m}) on {x.device}"
        )
    n_max = max(counts, default=0)
    if n_max == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)

    def table(i: int) -> torch.Tensor:
        return torch.tensor([w[i].data_ptr() for w in weights], dtype=torch.int64, device=x.device)

    config = _choose_config(m, k, n_max, _num_sms(x.device), x.dtype == torch.float32)
    grid = (-(-m // config.block_m), -(-n_max // config.block_n), len(weights))
    with _device_guard(x.device):
        _bitmap_grouped_kernel[grid](
            x,
            torch.tensor(starts, dtype=torch.int64, device=x.device),
            table(0),
            table(1),
            table(2),
            weights[0][1],
            bias if bias is not None else out,
            out,
            m,
            k,
            x.stride(0),
            -(-k // TILE),
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            HAS_BIAS=bias is not None,
            UPCAST=INTERPRET,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            OFFSETS_64=max(w[1].numel() for w in weights) >= _INT32_OFFSET_LIMIT,
            ROW_PARTS=row_parts(config.block_m, config.num_warps),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    return out


class _NullGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _device_guard(device: torch.device):
    """Launch on ``device`` (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _NullGuard()
