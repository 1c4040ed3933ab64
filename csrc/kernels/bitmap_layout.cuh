// Index and decode functions of the CUDA bitmap SpMM kernel (bitmap_kernel.cuh), shared with
// the host emulator (bitmap_emulator.cu) so both run exactly this code.
//
// Plain C++ (no CUDA headers): every function is __host__ __device__ under nvcc and inline
// under a host compiler; byte_perm and popc have bit-exact host fallbacks.
//
// Bitmap layout 2 (flashsparse/formats/bitmap.py): 64x64 tiles, one 64-bit mask per tile row,
// nonzeros packed row-major per tile from tile_offsets[t] * 8.
//
// Decode in registers. A warp owns 16 rows of a 64-row tile row; in mma.m16n8k16 k-step j
// (0..3) of a 64-column tile, thread (g = lane / 4, t = lane % 4) feeds the A k-slots
// {2t, 2t+1, 2t+8, 2t+9} from the four ADJACENT tile columns 16t + 4j .. 16t + 4j + 3 (the
// same permutation is applied to B, so the product is unchanged). Hence over the tile a thread
// reads the 16-bit chunk t of its rows' masks, one nibble per k-step, and the nonzeros of that
// chunk are contiguous in the packed values; its B fragment is x[n][16t + 4j .. +3], one
// 8-byte shared load.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FS_BHD __host__ __device__ __forceinline__
#else
#define FS_BHD inline
#endif

namespace flashsparse {
namespace bmp {

constexpr int kTile = 64;             // tile edge (rows and columns)
constexpr int kThreads = 128;         // 4 warps; warp w owns tile rows 16w .. 16w + 15
constexpr int kWarps = 4;
constexpr int kTileM = 64;            // rows of a block tile = one tile row of the weight
constexpr int kStages = 3;            // cp.async pipeline depth (tiles in flight)
constexpr int kMaskBytes = kTile * 8;                 // 512: one tile's row masks
constexpr int kMaxValueChunks = kTile * kTile / 8;    // 16-byte chunks of a dense 16-bit tile
constexpr int kValueBytes = kMaxValueChunks * 16;     // 8192
constexpr int kValueSlack = 16;       // the decode reads up to 3 words past a run's last value
constexpr int kXStride = kTile + 8;   // halfwords per staged x row (144 B: 16-byte aligned)
constexpr int kMaxGridY = 65535;
constexpr int kMaxSplitK = 65535;
constexpr int kMaxN = 1 << 24;        // grid.x * tile_n bound used by the host checks

FS_BHD constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// --- block tile widths -------------------------------------------------------------------------
FS_BHD constexpr bool valid_tile_n(int tile_n) { return tile_n == 8 || tile_n == 16 || tile_n == 32; }
FS_BHD constexpr int default_tile_n(int n) { return n <= 8 ? 8 : (n <= 16 ? 16 : 32); }

// Shared memory of one pipeline stage and of the block (dynamic; below 48 KiB for every width).
FS_BHD constexpr int stage_bytes(int tile_n) {
    return kMaskBytes + kValueBytes + kValueSlack + tile_n * kXStride * 2;
}
constexpr int kNibbleTableBytes = 16 * 16;
FS_BHD constexpr int smem_bytes(int tile_n) { return kNibbleTableBytes + kStages * stage_bytes(tile_n); }
static_assert(kStages * (kMaskBytes + kValueBytes + kValueSlack + 32 * kXStride * 2) + 256 <= 48 * 1024,
              "the block's shared memory fits the default 48 KiB (no opt-in attribute)");
static_assert((kMaskBytes + kValueBytes + kValueSlack) % 16 == 0, "x tile 16-byte aligned");

// --- split-K ------------------------------------------------------------------------------------
FS_BHD constexpr int k_tiles_of(int k) { return ceil_div(k, kTile); }
FS_BHD constexpr int tiles_per_split(int k_tiles, int split) { return ceil_div(k_tiles, split); }
// Splits actually run: every split owns tiles_per_split k tiles except the last; none is empty.
FS_BHD constexpr int effective_split(int k_tiles, int split) {
    const int s = split < 1 ? 1 : (split > k_tiles ? k_tiles : (split > kMaxSplitK ? kMaxSplitK : split));
    return ceil_div(k_tiles, tiles_per_split(k_tiles, s));
}

// --- pipeline stage loads -------------------------------------------------------------------------
// 16-byte chunk q of x tile rows: row q / 8, halfword column 8 * (q % 8).
FS_BHD constexpr int x_chunk_row(int q) { return q >> 3; }
FS_BHD constexpr int x_chunk_col(int q) { return (q & 7) * 8; }
FS_BHD constexpr int x_elem_offset(int row, int col) { return row * kXStride + col; }

// --- bit helpers with host fallbacks --------------------------------------------------------------
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

// (hi:lo) >> (shift & 31) (funnel shift, wrap mode): with shift = 8 * byte offset, the two
// 16-bit values starting at that byte of the pair.
FS_BHD uint32_t funnel_right(uint32_t lo, uint32_t hi, uint32_t shift) {
#if defined(__CUDA_ARCH__)
    return __funnelshift_r(lo, hi, shift);
#else
    return static_cast<uint32_t>(((static_cast<uint64_t>(hi) << 32) | lo) >> (shift & 31u));
#endif
}

// --- row starts (per tile, once per warp) ---------------------------------------------------------
// Lane l of every warp counts tile rows 2l and 2l+1 (masks words lo/hi); an inclusive warp
// scan of pair_count gives P_l = nonzeros of rows 0 .. 2l+1. From it, the exclusive starts of
// rows 2l and 2l+1 travel packed in one word (both < 2^13), so a thread fetches the start of
// any row with a single shuffle from lane row/2.
FS_BHD uint32_t row_count(uint32_t lo, uint32_t hi) { return popc32(lo) + popc32(hi); }
FS_BHD uint32_t pack_row_starts(uint32_t inclusive, uint32_t pair_count, uint32_t first_row_count) {
    const uint32_t start_even = inclusive - pair_count;
    return start_even | ((start_even + first_row_count) << 16);
}
FS_BHD uint32_t unpack_row_start(uint32_t packed, int row) {
    return (packed >> ((row & 1) * 16)) & 0xFFFFu;
}
// A thread's rows r0 and r0 + 8 have the same parity: one prmt picks both starts from the two
// shuffled words, start(r0) in the low half and start(r0 + 8) in the high half.
FS_BHD constexpr uint32_t row_start_selector(int row) { return (row & 1) ? 0x7632u : 0x5410u; }

// --- per thread, per row: chunk t of the row mask and where its values start -----------------------
// The 16 mask bits of columns 16t .. 16t+15.
FS_BHD uint32_t chunk_bits(uint32_t lo, uint32_t hi, int t) {
    return ((t < 2 ? lo : hi) >> ((t & 1) * 16)) & 0xFFFFu;
}
// Shared byte (from the stage start) of chunk t of row `row`'s mask (masks are little-endian).
FS_BHD constexpr int chunk_byte(int row, int t) { return row * 8 + 2 * t; }
// The chunk ranks of a thread's two rows come from an exclusive scan over the 4 lanes t of its
// group g (they hold chunks 0..3 of the same rows) of both popcounts packed in one word (each
// half stays < 2^16, so the halves never carry into each other).
FS_BHD uint32_t pack_chunk_counts(uint32_t chunk0, uint32_t chunk1) {
    return popc32(chunk0) | (popc32(chunk1) << 16);
}
// Nonzeros of the row left of column 16t (the chunk's rank within its row), from the full mask
// (the emulator's cross-check of the scan).
FS_BHD uint32_t below_lo_mask(int t) { return t == 0 ? 0u : (t == 1 ? 0xFFFFu : 0xFFFFFFFFu); }
FS_BHD uint32_t below_hi_mask(int t) { return t == 3 ? 0xFFFFu : 0u; }
FS_BHD uint32_t chunk_rank(uint32_t lo, uint32_t hi, uint32_t mlo, uint32_t mhi) {
    return popc32(lo & mlo) + popc32(hi & mhi);
}

// --- per thread, per row, per k-step j: one nibble -> two A fragment registers -----------------------
FS_BHD uint32_t nibble(uint32_t chunk, int j) { return (chunk >> (4 * j)) & 15u; }
// Byte offset of nibble j's NibbleEntry (16 bytes each) in the table: 16 * nibble(chunk, j).
FS_BHD uint32_t nibble_entry_byte(uint32_t chunk, int j) { return ((chunk << 4) >> (4 * j)) & 0xF0u; }
// Values of the chunk before nibble j.
FS_BHD uint32_t nibble_rank(uint32_t chunk, int j) { return popc32(chunk & ((1u << (4 * j)) - 1u)); }

// Decode table entry of a nibble: prmt selectors for the halfword slots 0,1 (sel_lo) and 2,3
// (sel_hi), and the mask that keeps value 3 only when all four bits are set. Slot s takes
// value v = popcount(nibble below bit s) (bytes 2v, 2v+1 of {V01, V23}) when bit s is set;
// otherwise "value 3", which the mask has zeroed (a nibble with a clear bit has <= 3 values).
struct NibbleEntry {
    uint32_t sel_lo, sel_hi, keep23, bytes;  // bytes: 2 * popcount(nibble), to the next nibble
};
FS_BHD uint32_t slot_selector(uint32_t nib, int s) {
    const uint32_t v = ((nib >> s) & 1u) ? popc32(nib & ((1u << s) - 1u)) : 3u;
    return (2u * v) | ((2u * v + 1u) << 4);
}
FS_BHD NibbleEntry nibble_entry(uint32_t nib) {
    NibbleEntry e;
    e.sel_lo = slot_selector(nib, 0) | (slot_selector(nib, 1) << 8);
    e.sel_hi = slot_selector(nib, 2) | (slot_selector(nib, 3) << 8);
    e.keep23 = nib == 15u ? 0xFFFFFFFFu : 0x0000FFFFu;
    e.bytes = 2u * popc32(nib);
    return e;
}

// The up to four values of a nibble start at byte `fb` (= 2 * value index) of the stage's
// values; w0..w2 are the 32-bit words at bytes value_byte(fb) + 0, 4, 8 (read by the caller),
// and the funnel shift takes value_shift(fb) = 8 * fb, of which it uses fb % 4 * 8 (wrap).
// The next nibble of the chunk starts at fb + NibbleEntry::bytes.
FS_BHD uint32_t value_byte(uint32_t fb) { return fb & ~3u; }
FS_BHD uint32_t value_shift(uint32_t fb) { return fb << 3; }
// Byte of the chunk's first value, from the start of shared memory: the stage's values begin
// at `values_byte` (a multiple of 4), then 2 * (row start + values of the row left of the chunk).
FS_BHD uint32_t chunk_first_byte(uint32_t values_byte, uint32_t row_start, uint32_t rank) {
    return values_byte + 2u * (row_start + rank);
}

// lo = slots 0,1 (A k-slots 2t, 2t+1), hi = slots 2,3 (k-slots 2t+8, 2t+9), zero where the
// mask bit is clear.
FS_BHD void expand_nibble(const NibbleEntry& e, uint32_t w0, uint32_t w1, uint32_t w2, uint32_t shift,
                          uint32_t& lo, uint32_t& hi) {
    const uint32_t v01 = funnel_right(w0, w1, shift);
    const uint32_t v23 = funnel_right(w1, w2, shift) & e.keep23;
    lo = byte_perm(v01, v23, e.sel_lo);
    hi = byte_perm(v01, v23, e.sel_hi);
}

// --- B fragment and accumulators ---------------------------------------------------------------
// Thread (g, t), k-step j, n8 tile nb: x tile row nb*8 + g, halfword columns 16t+4j .. +3
// (b0,b1 = first word = k-slots 2t,2t+1; b2,b3 = second word = k-slots 2t+8, 2t+9).
FS_BHD constexpr int b_col(int t, int j) { return 16 * t + 4 * j; }
// Accumulator r (0..3) of thread (g, t) in n8 tile nb: weight row (block-local)
// 16w + g + 8*(r/2), token nb*8 + 2t + r%2.
FS_BHD constexpr int c_row(int warp, int g, int r) { return 16 * warp + g + 8 * (r >> 1); }
FS_BHD constexpr int c_col(int nb, int t, int r) { return nb * 8 + 2 * t + (r & 1); }

}  // namespace bmp
}  // namespace flashsparse
