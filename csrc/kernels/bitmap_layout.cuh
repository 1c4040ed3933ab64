// Index and decode functions of the CUDA bitmap SpMM kernel (bitmap_kernel.cuh), shared with
// the host emulator (bitmap_emulator.cu) so both run exactly this code.
//
// Plain C++ (no CUDA headers): every function is __host__ __device__ under nvcc and inline
// under a host compiler; byte_perm and popc have bit-exact host fallbacks.
//
// Bitmap layout 2 (flashsparse/formats/bitmap.py): 64x64 tiles, one 64-bit mask per tile row,
// nonzeros packed row-major per tile from tile_offsets[t] * 8.
//
// One warp decodes one whole 64x64 tile (the 64-row scan is paid once per 4096 elements).
// The four warps of a CTA take four consecutive k tiles of the same tile row per pipeline
// stage: their masks and values are contiguous in memory, so a stage is one contiguous copy
// of each. Within a warp, thread (g = lane / 4, t = lane % 4) owns the eight tile rows
// 8g .. 8g+7 and their 16-bit mask chunk t (columns 16t .. 16t+15): the nonzeros of that chunk
// are contiguous in the packed values. mma.m16n8k16 block b (0..3) takes tile rows 8g+2b
// (A row g) and 8g+2b+1 (A row g+8) -- a row permutation the epilogue undoes. In k-step j
// (0..3) thread (g, t) feeds the A k-slots {2t, 2t+1, 2t+8, 2t+9} from the four ADJACENT tile
// columns 16t+4j .. 16t+4j+3, i.e. nibble j of its chunk (the same k permutation is applied to
// B, so the product is unchanged); its B fragment is x[n][16t + 4j .. +3], one 8-byte load.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define FS_BHD __host__ __device__ __forceinline__
#else
#define FS_BHD inline
#endif

namespace flashsparse {
namespace bmp {

constexpr int kTile = 64;             // tile edge (rows and columns)
constexpr int kThreads = 128;         // 4 warps
constexpr int kWarps = 4;
constexpr int kTileM = 64;            // rows of a block tile = one tile row of the weight
constexpr int kTilesPerStage = kWarps;  // warp w decodes k tile 4s + w of its split in stage s
constexpr int kStages = 2;            // cp.async double buffer (a stage is 4 k tiles)
constexpr int kMaskBytes = kTile * 8;                 // 512: one tile's row masks
constexpr int kStageMaskBytes = kTilesPerStage * kMaskBytes;  // 2048: one 16-byte copy per thread
constexpr int kMaxValueChunks = kTile * kTile / 8;    // 16-byte chunks of a dense 16-bit tile
constexpr int kStageValueChunks = kTilesPerStage * kMaxValueChunks;
constexpr int kValueBytes = kStageValueChunks * 16;   // 32 KiB: four dense tiles
constexpr int kValueSlack = 16;       // the decode reads up to 3 words past a run's last value
constexpr int kXCols = kTilesPerStage * kTile;        // 256 x columns per stage
constexpr int kXStride = kXCols + 8;  // halfwords per staged x row (528 B: 16-byte aligned)
constexpr int kMaxGridY = 65535;
constexpr int kMaxSplitK = 65535;
// Largest N and K the host accepts (checked by bitmap_problem_error): a block's first token or
// column plus a tile-local offset (< 256), and K rounded up to whole stages, stay below 2^31.
constexpr int kMaxExtent = 0x7FFFFFFF - 255;

// a >= 0, b >= 1; never overflows (a + b - 1 would for a near 2^31).
FS_BHD constexpr int ceil_div(int a, int b) { return a / b + (a % b != 0 ? 1 : 0); }

// --- block tile widths -------------------------------------------------------------------------
FS_BHD constexpr bool valid_tile_n(int tile_n) { return tile_n == 8 || tile_n == 16 || tile_n == 32; }
FS_BHD constexpr int default_tile_n(int n) { return n <= 8 ? 8 : (n <= 16 ? 16 : 32); }

// Shared memory: the two nibble decode tables (static, 4 KiB: their base is a link-time
// constant the loads fold in), and dynamic: kStages stages of (masks of 4 tiles, values of 4
// tiles + slack, x tile [tile_n][256 (+8 pad)]). Above 48 KiB: the launch opts in.
constexpr int kTableEntries = 256;    // one entry per mask byte
constexpr int kTableBytes = 2 * kTableEntries * 8;  // low-nibble table, then high-nibble table
constexpr int kHighTable = kTableEntries * 8;       // byte offset of the high-nibble table
FS_BHD constexpr int stage_bytes(int tile_n) {
    return kStageMaskBytes + kValueBytes + kValueSlack + tile_n * kXStride * 2;
}
FS_BHD constexpr int stage_x_byte() { return kStageMaskBytes + kValueBytes + kValueSlack; }
FS_BHD constexpr int smem_bytes(int tile_n) { return kStages * stage_bytes(tile_n); }  // dynamic
// The end-of-kernel cross-warp reduction reuses the stages: 4 warps x 64 rows x tile_n floats.
static_assert(kWarps * kTileM * 32 * 4 <= kStages * stage_bytes(8), "reduction buffer fits the stages");
static_assert(stage_x_byte() % 16 == 0 && stage_bytes(8) % 16 == 0, "x tile and stages 16-byte aligned");
static_assert(kTableBytes + kStages * (kStageMaskBytes + kValueBytes + kValueSlack + 32 * kXStride * 2) + 1024 <=
                  227 * 1024 / 2,
              "two CTAs fit an sm_90 SM at every tile width");

// --- split-K ------------------------------------------------------------------------------------
FS_BHD constexpr int k_tiles_of(int k) { return ceil_div(k, kTile); }
FS_BHD constexpr int tiles_per_split(int k_tiles, int split) { return ceil_div(k_tiles, split); }
// Splits actually run: every split owns tiles_per_split k tiles except the last; none is empty.
FS_BHD constexpr int effective_split(int k_tiles, int split) {
    const int s = split < 1 ? 1 : (split > k_tiles ? k_tiles : (split > kMaxSplitK ? kMaxSplitK : split));
    return ceil_div(k_tiles, tiles_per_split(k_tiles, s));
}
// Pipeline stages of a split of `num` k tiles.
FS_BHD constexpr int stages_of(int num) { return ceil_div(num, kTilesPerStage); }
// End (exclusive) of the K columns of the split whose first k tile is kt0 and which owns `num`
// k tiles. The split stages x only up to here: the x of the next split's columns would meet
// this split's all-zero masks of absent tiles, and 0 x Inf is NaN.
FS_BHD constexpr int split_k_end(int k, int kt0, int num) {
    return (kt0 + num) * kTile < k ? (kt0 + num) * kTile : k;
}

// --- host checks --------------------------------------------------------------------------------
// Why a problem with these sizes cannot run (empty: it can), from the sizes alone: what the torch
// glue checks before every launch (no device access), and what the host emulator checks on its
// input. `masks`, `offsets`, `values`: element counts of the weight's three tensors; n may be 0.
inline std::string problem_size_error(int64_t m, int64_t k, int64_t n, int64_t masks, int64_t offsets,
                                      int64_t values, int64_t split_k, int64_t tile_n) {
    using std::to_string;
    if (m < 1 || k < 1) return "m and k must be >= 1, got m=" + to_string(m) + ", k=" + to_string(k);
    if (m > static_cast<int64_t>(kMaxGridY) * kTileM)
        return "m=" + to_string(m) + " exceeds the kernel's grid (at most 65535 blocks of 64 rows)";
    if (k > kMaxExtent) return "k=" + to_string(k) + " exceeds " + to_string(kMaxExtent);
    if (n < 0 || n > kMaxExtent) return "x has " + to_string(n) + " rows; at most " + to_string(kMaxExtent);
    const int64_t tiles = ((m + kTile - 1) / kTile) * ((k + kTile - 1) / kTile);
    if (masks != tiles * kTile)
        return "masks must have " + to_string(tiles * kTile) + " entries (64 per tile) for a " + to_string(m) +
               "x" + to_string(k) + " weight, got " + to_string(masks);
    if (offsets != tiles + 1)
        return "tile_offsets must have " + to_string(tiles + 1) + " entries for a " + to_string(m) + "x" +
               to_string(k) + " weight, got " + to_string(offsets);
    if (values % 8 != 0)
        return "values must hold whole 8-value units (tile_offsets count them), got " + to_string(values) +
               " values";
    if (values / 8 > 0x7FFFFFFF) return "values has " + to_string(values) + " entries; at most 2^31 8-value units";
    if (values > tiles * kTile * kTile)
        return "values has " + to_string(values) + " entries, more than " + to_string(tiles) +
               " dense 64x64 tiles hold: not this weight's values";
    if (split_k < 1) return "split_k must be >= 1, got " + to_string(split_k);
    if (tile_n != 0 && !valid_tile_n(static_cast<int>(tile_n > 64 ? 0 : tile_n)))
        return "tile_n must be 0 (by N), 8, 16 or 32, got " + to_string(tile_n);
    return std::string();
}

// --- pipeline stage loads -------------------------------------------------------------------------
// The stage's x tile is tile_n rows x 32 chunks of 16 bytes; thread tid copies
// x_chunks_per_thread chunks of ONE row, 128 / tile_n threads per row side by side (coalesced),
// its chunks x_chunk_stride halfwords apart (constant offsets from one pointer).
FS_BHD constexpr int x_chunks_per_thread(int tile_n) { return tile_n * (kXCols / 8) / kThreads; }
FS_BHD constexpr int x_threads_per_row(int tile_n) { return kThreads / tile_n; }
FS_BHD constexpr int x_chunk_stride(int tile_n) { return 8 * x_threads_per_row(tile_n); }
FS_BHD constexpr int x_chunk_row(int tile_n, int tid) { return tid / x_threads_per_row(tile_n); }
FS_BHD constexpr int x_chunk_col(int tile_n, int tid, int u) {
    return 8 * (tid % x_threads_per_row(tile_n)) + u * x_chunk_stride(tile_n);
}
FS_BHD constexpr int x_elem_offset(int row, int col) { return row * kXStride + col; }
// Value chunks of a stage, from the offsets of its first tile (start) and past its last (end):
// malformed offsets must neither read outside `values` nor overflow the stage.
FS_BHD int clamp_start(int start, int value_chunks) {
    return start < 0 ? 0 : (start > value_chunks ? value_chunks : start);
}
FS_BHD int stage_value_count(int start, int end, int value_chunks) {
    const int c = end - start;
    const int room = value_chunks - clamp_start(start, value_chunks);
    return c < kStageValueChunks ? (c < room ? c : room) : (kStageValueChunks < room ? kStageValueChunks : room);
}
// First value chunk of warp w's tile within the stage: clamped so the tile's up to 512 chunks
// (+ slack) stay inside the stage's value buffer whatever the offsets say.
FS_BHD int tile_rel_chunk(int tile_start, int stage_start) {
    const int r = tile_start - stage_start;
    return r < 0 ? 0 : (r > kStageValueChunks - kMaxValueChunks ? kStageValueChunks - kMaxValueChunks : r);
}

// --- bit helpers with host fallbacks --------------------------------------------------------------
// lo + (hi << 16) as one multiply-add (ptxas otherwise emits a shift and an OR).
FS_BHD uint32_t pack_halves(uint32_t lo, uint32_t hi) {
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("mad.lo.u32 %0, %1, 65536, %2;" : "=r"(r) : "r"(hi), "r"(lo));
    return r;
#else
    return lo + (hi << 16);
#endif
}

FS_BHD uint32_t popc32(uint32_t v) {
#if defined(__CUDA_ARCH__)
    return static_cast<uint32_t>(__popc(v));
#else
    return static_cast<uint32_t>(__builtin_popcount(v));
#endif
}

// PTX prmt.b32 (default mode): byte i of the result is byte sel[4i+2 : 4i] of {b, a}
// (a = bytes 0..3, b = bytes 4..7); bit 4i+3 (sign replication) is never set here.
FS_BHD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
    // Inline prmt: __byte_perm would first mask the selector with 0x7777 (one more LOP3).
    uint32_t r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
    return r;
#else
    const uint64_t src = (static_cast<uint64_t>(b) << 32) | a;
    uint32_t r = 0;
    for (int i = 0; i < 4; ++i) {
        const uint32_t s = (sel >> (4 * i)) & 7u;
        r |= static_cast<uint32_t>((src >> (8 * s)) & 0xFFu) << (8 * i);
    }
    return r;
#endif
}

// PTX prmt.b32.f4e: bytes c%4 .. c%4 + 3 of {b, a}, i.e. (b:a) >> (8 * (c & 3)). With c = the
// byte offset of a value run it aligns the run without first scaling the offset to bits.
FS_BHD uint32_t byte_funnel(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
    uint32_t r;
    asm("prmt.b32.f4e %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    return static_cast<uint32_t>(((static_cast<uint64_t>(b) << 32) | a) >> (8 * (c & 3u)));
#endif
}

// --- row starts (per tile, once per warp) ---------------------------------------------------------
// Lane l counts tile rows 2l and 2l+1 (mask words lo/hi); an inclusive warp scan of pair_count
// gives P_l = nonzeros of rows 0 .. 2l+1. The exclusive starts of rows 2l and 2l+1 travel
// packed in one word (both < 2^13). Thread (g, t) needs the starts of rows 8g+2b, 8g+2b+1
// (b = 0..3): exactly the packed word of lane 4g + b, a shuffle within its 4-lane group.
FS_BHD uint32_t row_count(uint32_t lo, uint32_t hi) { return popc32(lo) + popc32(hi); }
FS_BHD uint32_t pack_row_starts(uint32_t inclusive, uint32_t pair_count, uint32_t first_row_count) {
    const uint32_t start_even = inclusive - pair_count;
    return pack_halves(start_even, start_even + first_row_count);
}
FS_BHD uint32_t unpack_row_start(uint32_t packed, int row) {
    return (packed >> ((row & 1) * 16)) & 0xFFFFu;
}
FS_BHD constexpr int row_pair_lane(int g, int b) { return 4 * g + b; }
// shfl.sync.idx "c" operand: 4-lane segments (source lane = (lane & ~3) | b, b the immediate).
constexpr uint32_t kGroupShflC = 0x1C03u;

// --- per thread: its 8 rows, chunk t of each, and where the chunk's values start ---------------------
// Tile row of chunk r (0..7) of thread group g; block b = r / 2 (A row g + 8 * (r % 2)).
FS_BHD constexpr int thread_row(int g, int r) { return 8 * g + r; }
// The 16 mask bits of columns 16t .. 16t+15.
FS_BHD uint32_t chunk_bits(uint32_t lo, uint32_t hi, int t) {
    return ((t < 2 ? lo : hi) >> ((t & 1) * 16)) & 0xFFFFu;
}
// Shared byte (from the tile's masks) of chunk t of tile row `row` (masks are little-endian).
FS_BHD constexpr int chunk_byte(int row, int t) { return row * 8 + 2 * t; }
// The chunk ranks of rows 8g+2b, 8g+2b+1 come from a scan over the 4 lanes t of group g (they
// hold chunks 0..3 of the same rows) of both popcounts packed in one word (each half stays
// < 2^16, so the halves never carry into each other).
FS_BHD uint32_t pack_chunk_counts(uint32_t chunk0, uint32_t chunk1) {
    return pack_halves(popc32(chunk0), popc32(chunk1));
}
// Nonzeros of the row left of column 16t (the chunk's rank within its row), from the full mask
// (the emulator's cross-check of the scan).
FS_BHD uint32_t below_lo_mask(int t) { return t == 0 ? 0u : (t == 1 ? 0xFFFFu : 0xFFFFFFFFu); }
FS_BHD uint32_t below_hi_mask(int t) { return t == 3 ? 0xFFFFu : 0u; }
FS_BHD uint32_t chunk_rank(uint32_t lo, uint32_t hi, uint32_t mlo, uint32_t mhi) {
    return popc32(lo & mlo) + popc32(hi & mhi);
}
// Byte of a chunk's first value: the tile's values begin at `values_byte` (a multiple of 16),
// then 2 * (row start + values of the row left of the chunk).
FS_BHD uint32_t chunk_first_byte(uint32_t values_byte, uint32_t first_value) { return values_byte + 2u * first_value; }
// The same for both chunks of a row pair from the packed firsts (halves < 2^13): the high half
// as firsts >> 15 (bit 15 is clear) folds the scaling into one shift-add.
FS_BHD uint32_t first_byte_lo(uint32_t values_byte, uint32_t firsts) { return values_byte + 2u * (firsts & 0xFFFFu); }
FS_BHD uint32_t first_byte_hi(uint32_t values_byte, uint32_t firsts) { return values_byte + (firsts >> 15); }

// --- per thread, per chunk, per k-step j: one nibble -> two A fragment registers -----------------------
// Decode table entry of a nibble (8 bytes, one LDS.64): prmt selectors for the halfword slots
// 0,1 (low half of `lo_bytes`) and 2,3 (low half of `hi_keep`; prmt reads only a selector's low
// 16 bits), 2 * popcount(nibble) -- the bytes to the next nibble -- in the high half of
// `lo_bytes`, and in the high half of `hi_keep` the mask that keeps value 3 only when all four
// bits are set. Slot s takes value v = popcount(nibble below bit s) (bytes 2v, 2v+1 of
// {V01, V23}) when bit s is set; otherwise "value 3", which the mask has zeroed (a nibble with
// a clear bit has <= 3 values).
struct NibbleEntry {
    uint32_t lo_bytes, hi_keep;
};
FS_BHD uint32_t slot_selector(uint32_t nib, int s) {
    const uint32_t v = ((nib >> s) & 1u) ? popc32(nib & ((1u << s) - 1u)) : 3u;
    return (2u * v) | ((2u * v + 1u) << 4);
}
FS_BHD NibbleEntry nibble_entry(uint32_t nib) {
    NibbleEntry e;
    e.lo_bytes = slot_selector(nib, 0) | (slot_selector(nib, 1) << 8) | ((2u * popc32(nib)) << 16);
    e.hi_keep = slot_selector(nib, 2) | (slot_selector(nib, 3) << 8) | (nib == 15u ? 0xFFFF0000u : 0u);
    return e;
}
FS_BHD uint32_t entry_bytes(const NibbleEntry& e) { return e.lo_bytes >> 16; }
// Two tables indexed by a mask BYTE: entry e of the low table decodes nibble e & 15, of the high
// table nibble e >> 4. Nibbles 0, 1 of a chunk c share the address (c << 3) & 0x7F8 (byte 0 x
// 8), nibbles 2, 3 share (c >> 5) & 0x7F8 (byte 1 x 8): two ALU ops per chunk address all four.
FS_BHD NibbleEntry table_entry(int index) {  // index 0 .. 511: low table, then high table
    const uint32_t byte = static_cast<uint32_t>(index) & 0xFFu;
    return nibble_entry(index < kTableEntries ? (byte & 15u) : (byte >> 4));
}
FS_BHD uint32_t chunk_addr01(uint32_t chunk) { return (chunk << 3) & 0x7F8u; }
FS_BHD uint32_t chunk_addr23(uint32_t chunk) { return (chunk >> 5) & 0x7F8u; }
// Table byte of nibble j's entry from the chunk's two addresses.
FS_BHD uint32_t table_byte(uint32_t addr01, uint32_t addr23, int j) {
    return (j < 2 ? addr01 : addr23) + (j & 1) * kHighTable;
}
// Values of the chunk before nibble j (the emulator's cross-check of the running offset).
FS_BHD uint32_t nibble_rank(uint32_t chunk, int j) { return popc32(chunk & ((1u << (4 * j)) - 1u)); }

// The up to four values of a nibble start at byte `fb` (2-byte aligned) of shared memory;
// w0..w2 are the 32-bit words at bytes value_byte(fb) + 0, 4, 8 (read by the caller).
// The next nibble of the chunk starts at fb + NibbleEntry::bytes.
FS_BHD uint32_t value_byte(uint32_t fb) { return fb & ~3u; }

// lo = slots 0,1 (A k-slots 2t, 2t+1), hi = slots 2,3 (k-slots 2t+8, 2t+9), zero where the
// mask bit is clear.
FS_BHD void expand_nibble(const NibbleEntry& e, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t fb, uint32_t& lo,
                          uint32_t& hi) {
    const uint32_t v01 = byte_funnel(w0, w1, fb);
    const uint32_t v23 = byte_funnel(w1, w2, fb) & (e.hi_keep | 0xFFFFu);  // one LOP3
    lo = byte_perm(v01, v23, e.lo_bytes);
    hi = byte_perm(v01, v23, e.hi_keep);
}

// --- B fragment and accumulators ---------------------------------------------------------------
// Thread (g, t) of warp w, k-step j, n8 tile nb: x tile row nb*8 + g, stage halfword columns
// 64w + 16t + 4j .. +3 (b0,b1 = first word = k-slots 2t,2t+1; b2,b3 = second word = k-slots
// 2t+8, 2t+9).
FS_BHD constexpr int b_col(int warp, int t, int j) { return kTile * warp + 16 * t + 4 * j; }
// Accumulator r (0..3) of thread (g, t), m16 block b, n8 tile nb: tile row 8g + 2b + r/2,
// token nb*8 + 2t + r%2.
FS_BHD constexpr int c_row(int g, int b, int r) { return 8 * g + 2 * b + (r >> 1); }
FS_BHD constexpr int c_col(int nb, int t, int r) { return nb * 8 + 2 * t + (r & 1); }
// Cross-warp reduction buffer (floats, from the first stage): warp w's partial of output
// (row, col) of the block tile.
FS_BHD constexpr int red_index(int warp, int tile_n, int row, int col) { return (warp * tile_n + col) * kTileM + row; }

}  // namespace bmp
}  // namespace flashsparse
