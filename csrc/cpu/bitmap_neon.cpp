// aarch64 NEON path. NEON has no expand or compress instruction (AVX-512 vpexpandw /
// vpcompressb), so a row mask is handled one byte (8 columns) at a time through 256-entry
// tables, and the work takes one of two forms:
// - Rebuild (any n): each byte's weights are expanded with TBL from the packed values (a table
//   entry is the TBL index of every column: its value's rank, or out of range for a zero) and
//   multiplied densely with every row of x. The expansion is paid once for all rows of x.
// - Gather (n = 1, the decode step): x is shared by every weight row, so for each k-tile the
//   compacted x of every (byte position, byte value) pair is tabulated once (8 x 256 entries,
//   32 KB for 16-bit x, 64 KB for fp32) and a row gathers its x by copying 8 table entries to a
//   buffer at its running value count: loads and stores, no TBL. Then the packed values are
//   multiplied with that buffer in fixed-size chunks of 8, as many per row as the tile's
//   average count calls for (rows with more take the rebuild, so the loop trip count is fixed
//   per tile and the branch predictable). Lanes past a row's count have their values zeroed:
//   they hold the next row's values, and an Inf there times a zero x would be NaN.
// bf16 weights use BFDOT (FEAT_BF16) on bf16 x, fp16 weights FMLAL/FMLAL2 (FEAT_FHM) on fp16 x;
// without those features both widen to fp32 (SHLL, FCVTL) and use FMLA. The optional
// instructions are inline assembly, so the file compiles for baseline armv8-a with GCC or clang
// and runs them only where bitmap_neon_features() found them.
// On llvm-mca's Neoverse-V1 model both forms issue 2.5-3.5x the cycles of a dense NEON GEMV per
// row segment (bench/neon_report.py): per mask byte a table load, a store or TBL, and address
// arithmetic, against one load and one BFDOT per 8 dense weights. What they save is the bytes
// read, which bound a decode-time GEMV on real machines (not measured on ARM hardware).
// Loads never go past the values buffer: a row near its end is copied to a zero-padded buffer.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/auxv.h>
#elif defined(__APPLE__)
#include <sys/sysctl.h>
#include <sys/types.h>
#endif

#include "bitmap_cpu.h"
#include "bitmap_neon.h"

namespace flashsparse {
namespace cpu {
namespace {

// --- tables, built at compile time --------------------------------------------------------

struct NeonTables {
    // Rebuild: TBL indices that expand a byte's packed 16-bit values (one 16-byte source) to
    // its 8 columns; 0xff (out of range: zero) for a zero column.
    alignas(16) uint8_t expand16[256][16];
    // The same for fp32 values (a 32-byte source, two registers): columns 0-3, then 4-7.
    alignas(16) uint8_t expand32[256][32];
    // x-table build: TBL indices that compact the 8 x values of a byte to its nonzero columns,
    // zero past the count, for 16-bit x (one register) and fp32 x (two registers).
    alignas(16) uint8_t compact16[256][16];
    alignas(16) uint8_t compact32[256][32];
    constexpr NeonTables() : expand16{}, expand32{}, compact16{}, compact32{} {
        for (int b = 0; b < 256; ++b) {
            for (int i = 0; i < 16; ++i) expand16[b][i] = compact16[b][i] = 0xff;
            for (int i = 0; i < 32; ++i) expand32[b][i] = compact32[b][i] = 0xff;
            int rank = 0;
            for (int j = 0; j < 8; ++j) {
                if (!((b >> j) & 1)) continue;
                for (int e = 0; e < 2; ++e) {
                    expand16[b][2 * j + e] = static_cast<uint8_t>(2 * rank + e);
                    compact16[b][2 * rank + e] = static_cast<uint8_t>(2 * j + e);
                }
                for (int e = 0; e < 4; ++e) {
                    expand32[b][4 * j + e] = static_cast<uint8_t>(4 * rank + e);
                    compact32[b][4 * rank + e] = static_cast<uint8_t>(4 * j + e);
                }
                ++rank;
            }
        }
    }
};
constexpr NeonTables kTables{};

// --- instruction choices per weight dtype ----------------------------------------------------

// The row code is a few hundred instructions that GCC would otherwise call out of line.
#define FS_NEON_INLINE __attribute__((always_inline)) inline

// F32: fp32 weights and x. BF16_DOT: BFDOT on bf16 x. BF16_CVT: bf16 widened by SHLL, fp32 x.
// F16_FHM: FMLAL on fp16 x. F16_CVT: fp16 widened by FCVTL, fp32 x.
enum Kind : int { kF32 = 0, kBf16Dot = 1, kBf16Cvt = 2, kF16Fhm = 3, kF16Cvt = 4 };

template <int K>
constexpr int kValueBytes = K == kF32 ? 4 : 2;
template <int K>
constexpr int kXBytes = (K == kBf16Dot || K == kF16Fhm) ? 2 : 4;  // x as the kernel reads it

FS_NEON_INLINE float32x4_t bfdot(float32x4_t acc, uint16x8_t a, uint16x8_t b) {
    __asm__(".arch_extension bf16\n\tbfdot %0.4s, %1.8h, %2.8h" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}

FS_NEON_INLINE float32x4_t fmlal_both(float32x4_t acc, uint16x8_t a, uint16x8_t b) {
    __asm__(".arch armv8.2-a+fp16fml\n\tfmlal %0.4s, %1.4h, %2.4h\n\tfmlal2 %0.4s, %1.4h, %2.4h"
            : "+w"(acc)
            : "w"(a), "w"(b));
    return acc;
}

// acc + 8 16-bit weights . 8 x values (x in the kind's format at `x`).
template <int K>
FS_NEON_INLINE float32x4_t dot8(float32x4_t acc, uint16x8_t w, const uint8_t* x) {
    if (K == kBf16Dot) return bfdot(acc, w, vld1q_u16(reinterpret_cast<const uint16_t*>(x)));
    if (K == kF16Fhm) return fmlal_both(acc, w, vld1q_u16(reinterpret_cast<const uint16_t*>(x)));
    const float* xf = reinterpret_cast<const float*>(x);
    float32x4_t lo, hi;
    if (K == kBf16Cvt) {
        lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(w), 16));
        hi = vreinterpretq_f32_u32(vshll_high_n_u16(w, 16));
    } else {
        lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(w)));
        hi = vcvt_high_f32_f16(vreinterpretq_f16_u16(w));
    }
    return vfmaq_f32(vfmaq_f32(acc, lo, vld1q_f32(xf)), hi, vld1q_f32(xf + 4));
}

// acc + 8 fp32 weights . 8 fp32 x.
FS_NEON_INLINE float32x4_t dot8f(float32x4_t acc, float32x4_t w0, float32x4_t w1, const uint8_t* x) {
    const float* xf = reinterpret_cast<const float*>(x);
    return vfmaq_f32(vfmaq_f32(acc, w0, vld1q_f32(xf)), w1, vld1q_f32(xf + 4));
}

// Inclusive prefix sums of the byte popcounts of a mask: byte q holds the set bits of bytes
// 0..q (at most 64, so no carries between bytes); the row's count is the top byte.
FS_NEON_INLINE uint64_t byte_prefix(uint64_t mask) {
    const uint64_t counts = vget_lane_u64(vreinterpret_u64_u8(vcnt_u8(vcreate_u8(mask))), 0);
    return counts * 0x0101010101010101ull;
}

// Start of byte Q's run in bytes, from the prefix sums scaled by the element size (a shift:
// bytes 0..6 hold at most 56 elements, 224 bytes at 4 bytes each, so no byte carries).
template <int Q>
FS_NEON_INLINE uint64_t byte_start(uint64_t scaled_prefix) {
    return Q == 0 ? 0 : (scaled_prefix >> (8 * (Q - 1))) & 0xff;
}

template <int Q>
FS_NEON_INLINE uint64_t mask_byte(uint64_t mask) {
    return (mask >> (8 * Q)) & 0xff;
}

constexpr int log2_bytes(int bytes) { return bytes == 4 ? 2 : 1; }

// A row's values, or a zero-padded copy when reading `span` bytes from p would pass `end`.
inline const uint8_t* padded_row(const uint8_t* p, const uint8_t* end, unsigned used_bytes, unsigned span,
                                 uint8_t* local) {
    if (static_cast<int64_t>(end - p) >= static_cast<int64_t>(span)) return p;
    std::memset(local, 0, span);
    std::memcpy(local, p, used_bytes);
    return local;
}

// Bytes a row may read past its first value: a byte's 16-byte (fp32: 32-byte) load starting at
// the last value, or the gather's chunks.
constexpr unsigned kRowSpanBytes = 64 * 4 + 32;

// --- rebuild form -----------------------------------------------------------------------------

// acc[i * acc_stride] += one row segment . x row i (x rows i at x + i * ldxb bytes, in the
// kind's format), for i < nb; returns the number of values read.
template <int K, int NB>
FS_NEON_INLINE unsigned rebuild_row(uint64_t mask, const uint8_t* p, const uint8_t* x, int64_t ldxb, float32x4_t* acc,
                            int64_t nb_rt) {
    const int64_t nb = NB > 0 ? NB : nb_rt;
    const uint64_t prefix = byte_prefix(mask);
    const uint64_t starts = prefix << log2_bytes(kValueBytes<K>);
#define FS_NEON_REBUILD_BYTE(Q)                                                                                  \
    {                                                                                                            \
        const uint64_t b = mask_byte<Q>(mask);                                                                   \
        const uint8_t* src = p + byte_start<Q>(starts);                                                          \
        if (K == kF32) {                                                                                         \
            const uint8x16x2_t v = vld1q_u8_x2(src);                                                             \
            const uint8_t* e = &kTables.expand32[0][0] + b * 32;                                                 \
            const float32x4_t w0 = vreinterpretq_f32_u8(vqtbl2q_u8(v, vld1q_u8(e)));                             \
            const float32x4_t w1 = vreinterpretq_f32_u8(vqtbl2q_u8(v, vld1q_u8(e + 16)));                        \
            for (int64_t i = 0; i < nb; ++i) acc[i] = dot8f(acc[i], w0, w1, x + i * ldxb + Q * 8 * 4);          \
        } else {                                                                                                 \
            const uint8x16_t e = vld1q_u8(&kTables.expand16[0][0] + b * 16);                                     \
            const uint16x8_t w = vreinterpretq_u16_u8(vqtbl1q_u8(vld1q_u8(src), e));                             \
            for (int64_t i = 0; i < nb; ++i) acc[i] = dot8<K>(acc[i], w, x + i * ldxb + Q * 8 * kXBytes<K>);     \
        }                                                                                                        \
    }
    FS_NEON_REBUILD_BYTE(0)
    FS_NEON_REBUILD_BYTE(1)
    FS_NEON_REBUILD_BYTE(2)
    FS_NEON_REBUILD_BYTE(3)
    FS_NEON_REBUILD_BYTE(4)
    FS_NEON_REBUILD_BYTE(5)
    FS_NEON_REBUILD_BYTE(6)
    FS_NEON_REBUILD_BYTE(7)
#undef FS_NEON_REBUILD_BYTE
    return static_cast<unsigned>(prefix >> 56);
}

// x tile kt of x rows [0, n) in the kind's format: xk[i * 64 * kXBytes ...]; fp32 kinds copy.
template <int K>
inline void convert_x_tile(const float* x, int64_t n, int64_t ldx, int64_t kt, uint8_t* xk) {
    for (int64_t i = 0; i < n; ++i) {
        const float* src = x + i * ldx + kt * 64;
        uint8_t* dst = xk + i * 64 * kXBytes<K>;
        for (int c = 0; c < 64; c += 4) {
            const float32x4_t v = vld1q_f32(src + c);
            if (kXBytes<K> == 4) {
                vst1q_f32(reinterpret_cast<float*>(dst) + c, v);
            } else if (K == kBf16Dot) {
                // x came from bf16 (the glue widens it), so dropping the low half is exact.
                vst1_u16(reinterpret_cast<uint16_t*>(dst) + c, vshrn_n_u32(vreinterpretq_u32_f32(v), 16));
            } else {
                vst1_u16(reinterpret_cast<uint16_t*>(dst) + c, vreinterpret_u16_f16(vcvt_f16_f32(v)));
            }
        }
    }
}

template <int K, int NB>
void rebuild_impl(const BitmapWeight& w, const float* x, int64_t n_rt, int64_t ldx, const float* bias, float* y,
                  int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t n = NB > 0 ? NB : n_rt;
    const int64_t kt_count = w.k_tiles();
    const uint8_t* values = static_cast<const uint8_t*>(w.values);
    const uint8_t* end = values + w.num_values * kValueBytes<K>;
    alignas(16) float32x4_t acc[64 * kMaxSpmmRows];
    alignas(16) uint8_t xk[kMaxSpmmRows * 64 * 4];
    alignas(16) uint8_t local[kRowSpanBytes];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc[j] = vdupq_n_f32(0.0f);
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const uint8_t* p = values + static_cast<int64_t>(w.offsets[t]) * 8 * kValueBytes<K>;
            convert_x_tile<K>(x, n, ldx, kt, xk);
            for (int64_t r = 0; r < rows; ++r) {
                const uint64_t mask = masks[r];
                if (!mask) continue;  // x is finite (bitmap_cpu.h)
                const unsigned count = static_cast<unsigned>(__builtin_popcountll(mask));
                const uint8_t* src =
                    padded_row(p, end, count * kValueBytes<K>, count * kValueBytes<K> + 32, local);
                rebuild_row<K, NB>(mask, src, xk, 64 * kXBytes<K>, acc + r * n, n);
                p += count * kValueBytes<K>;
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = vaddvq_f32(acc[r * n + i]) + (bias ? bias[row0 + r] : 0.0f);
    }
}

// --- gather form (n = 1) ------------------------------------------------------------------------

template <int K>
constexpr int kEntryBytes = 8 * kXBytes<K>;  // one x-table entry: 8 x values
template <int K>
constexpr int64_t kXTableBytes = 8 * 256 * kEntryBytes<K>;

// The x-table of one k-tile: entry (q, b) = the x values of byte q's columns where b has a bit,
// in column order, zero after them.
template <int K>
void build_xtable(const uint8_t* xk, uint8_t* table) {
    for (int q = 0; q < 8; ++q) {
        uint8_t* t = table + q * 256 * kEntryBytes<K>;
        if (kXBytes<K> == 2) {
            const uint8x16_t xq = vld1q_u8(xk + q * 16);
            for (int b = 0; b < 256; ++b) vst1q_u8(t + b * 16, vqtbl1q_u8(xq, vld1q_u8(kTables.compact16[b])));
        } else {
            const uint8x16x2_t xq = {{vld1q_u8(xk + q * 32), vld1q_u8(xk + q * 32 + 16)}};
            for (int b = 0; b < 256; ++b) {
                vst1q_u8(t + b * 32, vqtbl2q_u8(xq, vld1q_u8(kTables.compact32[b])));
                vst1q_u8(t + b * 32 + 16, vqtbl2q_u8(xq, vld1q_u8(kTables.compact32[b] + 16)));
            }
        }
    }
}

// Gathered x of one row into buf (its first `count` entries; then the table's zeros, then what
// earlier rows left, which is finite).
template <int K>
FS_NEON_INLINE void gather_x(uint64_t mask, uint64_t prefix, const uint8_t* table, uint8_t* buf) {
    const uint64_t starts = prefix << log2_bytes(kXBytes<K>);
#define FS_NEON_GATHER_BYTE(Q)                                                                       \
    {                                                                                                \
        const uint8_t* e = table + Q * 256 * kEntryBytes<K> + mask_byte<Q>(mask) * kEntryBytes<K>; \
        uint8_t* d = buf + byte_start<Q>(starts);                                                    \
        vst1q_u8(d, vld1q_u8(e));                                                                    \
        if (kEntryBytes<K> == 32) vst1q_u8(d + 16, vld1q_u8(e + 16));                               \
    }
    FS_NEON_GATHER_BYTE(0)
    FS_NEON_GATHER_BYTE(1)
    FS_NEON_GATHER_BYTE(2)
    FS_NEON_GATHER_BYTE(3)
    FS_NEON_GATHER_BYTE(4)
    FS_NEON_GATHER_BYTE(5)
    FS_NEON_GATHER_BYTE(6)
    FS_NEON_GATHER_BYTE(7)
#undef FS_NEON_GATHER_BYTE
}

// One row segment . x by the gather, C chunks of 8 values (count <= 8 C).
template <int K, int C>
FS_NEON_INLINE float32x4_t gather_row(uint64_t mask, uint64_t prefix, const uint8_t* p, const uint8_t* table,
                              uint8_t* buf) {
    gather_x<K>(mask, prefix, table, buf);
    const unsigned count = static_cast<unsigned>(prefix >> 56);
    float32x4_t acc = vdupq_n_f32(0.0f);
    if (K == kF32) {
        const uint32x4_t live = vdupq_n_u32(count);
        const uint32x4_t iota = {0, 1, 2, 3};
        for (int j = 0; j < C; ++j) {
            const uint32x4_t m0 = vcltq_u32(vaddq_u32(iota, vdupq_n_u32(8 * j)), live);
            const uint32x4_t m1 = vcltq_u32(vaddq_u32(iota, vdupq_n_u32(8 * j + 4)), live);
            const float* v = reinterpret_cast<const float*>(p) + 8 * j;
            const float32x4_t w0 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(v)), m0));
            const float32x4_t w1 = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(vld1q_f32(v + 4)), m1));
            acc = dot8f(acc, w0, w1, buf + j * 8 * 4);
        }
    } else {
        const uint16x8_t live = vdupq_n_u16(static_cast<uint16_t>(count));
        const uint16x8_t iota = {0, 1, 2, 3, 4, 5, 6, 7};
        for (int j = 0; j < C; ++j) {
            const uint16x8_t m = vcltq_u16(vaddq_u16(iota, vdupq_n_u16(static_cast<uint16_t>(8 * j))), live);
            const uint16x8_t v = vandq_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(p) + 8 * j), m);
            acc = dot8<K>(acc, v, buf + j * 8 * kXBytes<K>);
        }
    }
    return acc;
}

// row_sum[0..3] += rows 0..3 of masks . x; p advances past their values. C: gather chunks per
// row; rows with more than 8 C values (every row when C = 0) are rebuilt. CHECKS = false
// leaves out the two rarely taken branches (an overfull row, a row at the end of the values
// buffer) for the static cost report (bench/neon_report.py), which reads only this hot path.
template <int K, int C, bool CHECKS>
FS_NEON_INLINE void four_rows_n1(const uint64_t* masks, const uint8_t*& p, const uint8_t* end,
                                                        const uint8_t* table, const uint8_t* xk, uint8_t* buf,
                                                        uint8_t* local, float* row_sum) {
    float32x4_t a[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
        const uint64_t mask = masks[i];
        const uint64_t prefix = byte_prefix(mask);
        const unsigned count = static_cast<unsigned>(prefix >> 56);
        const unsigned used = count * kValueBytes<K>;
        if (C > 0 && (!CHECKS || count <= 8 * C)) {
            const uint8_t* src = CHECKS ? padded_row(p, end, used, 8 * C * kValueBytes<K>, local) : p;
            a[i] = gather_row<K, C>(mask, prefix, src, table, buf);
        } else {
            const uint8_t* src = CHECKS ? padded_row(p, end, used, used + 32, local) : p;
            a[i] = vdupq_n_f32(0.0f);
            rebuild_row<K, 1>(mask, src, xk, 0, &a[i], 1);
        }
        p += used;
    }
    const float32x4_t sums = vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]));
    vst1q_f32(row_sum, vaddq_f32(vld1q_f32(row_sum), sums));
}

// row_sum[r] += row r of one tile . x for its 64 rows (masks of rows past the weight are zero).
template <int K, int C>
void tile_rows_n1(const uint64_t* masks, const uint8_t* p, const uint8_t* end, const uint8_t* table,
                  const uint8_t* xk, uint8_t* buf, float* row_sum) {
    alignas(16) uint8_t local[kRowSpanBytes];
    for (int r = 0; r < 64; r += 4) four_rows_n1<K, C, true>(masks + r, p, end, table, xk, buf, local, row_sum + r);
}

// Gather chunks for a tile of `values` values (padded count, 64 rows): the average row's count
// with room for a few standard deviations of a uniform mask, so that only skewed rows take the
// rebuild; 0 (rebuild the tile) past the most chunks at which the gather is cheaper than the
// rebuild on llvm-mca's Neoverse-V1 model (bench/neon_report.py): fp32 and bf16 gather at about
// 80 % sparsity and above, fp16 with FMLAL from about 65 %.
template <int K>
constexpr int kGatherMaxChunks = K == kF16Fhm ? 5 : K == kF16Cvt ? 4 : 3;
template <int K>
inline int gather_chunks(int64_t values) {
    const int64_t avg = (values + 63) / 64;
    const int64_t room = avg + avg / 4 + 6;
    const int64_t c = (room + 7) / 8;
    return c > kGatherMaxChunks<K> ? 0 : static_cast<int>(c);
}

// Tile rows per pass: each pass builds the x-table once per k-tile for all of them.
constexpr int64_t kGatherBlockTileRows = 64;

template <int K>
void gather_impl(const BitmapWeight& w, const float* x, const float* bias, float* y, int64_t tr0, int64_t tr1,
                 bool force_gather) {
    const int64_t kt_count = w.k_tiles();
    const uint8_t* values = static_cast<const uint8_t*>(w.values);
    const uint8_t* end = values + w.num_values * kValueBytes<K>;
    alignas(64) uint8_t table[kXTableBytes<K>];
    alignas(16) uint8_t buf[(64 + 8 * 8) * 4];
    alignas(16) uint8_t xk[64 * 4];
    alignas(16) float row_sum[kGatherBlockTileRows * 64];  // 16 KB
    alignas(16) uint64_t tail_masks[64];
    std::memset(buf, 0, sizeof(buf));  // chunks past a row's count read it: must be finite
    for (int64_t tb = tr0; tb < tr1; tb += kGatherBlockTileRows) {
        const int64_t te = (tr1 - tb) < kGatherBlockTileRows ? tr1 : tb + kGatherBlockTileRows;
        for (int64_t i = 0; i < (te - tb) * 64; ++i) row_sum[i] = 0.0f;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            convert_x_tile<K>(x, 1, 0, kt, xk);
            build_xtable<K>(xk, table);
            for (int64_t tr = tb; tr < te; ++tr) {
                const int64_t t = tr * kt_count + kt;
                const int64_t rows = (w.m - tr * 64) < 64 ? (w.m - tr * 64) : 64;
                const uint64_t* masks = w.masks + t * 64;
                if (rows < 64) {
                    for (int64_t r = 0; r < 64; ++r) tail_masks[r] = r < rows ? masks[r] : 0;
                    masks = tail_masks;
                }
                const uint8_t* p = values + static_cast<int64_t>(w.offsets[t]) * 8 * kValueBytes<K>;
                int c = gather_chunks<K>((static_cast<int64_t>(w.offsets[t + 1]) - w.offsets[t]) * 8);
                if (force_gather && c == 0) c = 8;
                float* rs = row_sum + (tr - tb) * 64;
                switch (c) {
                    case 0: tile_rows_n1<K, 0>(masks, p, end, table, xk, buf, rs); break;
                    case 1: tile_rows_n1<K, 1>(masks, p, end, table, xk, buf, rs); break;
                    case 2: tile_rows_n1<K, 2>(masks, p, end, table, xk, buf, rs); break;
                    case 3: tile_rows_n1<K, 3>(masks, p, end, table, xk, buf, rs); break;
                    case 4: tile_rows_n1<K, 4>(masks, p, end, table, xk, buf, rs); break;
                    case 5: tile_rows_n1<K, 5>(masks, p, end, table, xk, buf, rs); break;
                    case 6: tile_rows_n1<K, 6>(masks, p, end, table, xk, buf, rs); break;
                    default: tile_rows_n1<K, 8>(masks, p, end, table, xk, buf, rs); break;
                }
            }
        }
        for (int64_t tr = tb; tr < te; ++tr) {
            const int64_t row0 = tr * 64;
            const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
            for (int64_t r = 0; r < rows; ++r)
                y[row0 + r] = row_sum[(tr - tb) * 64 + r] + (bias ? bias[row0 + r] : 0.0f);
        }
    }
}

// n = 1 takes the gather when a call has this many tile rows: building the x-table of a k-tile
// costs about as much as the gather saves on 250 (fp16) to 1300 (bf16) rows at 90 % on the
// Neoverse-V1 model (bench/neon_report.py).
constexpr int64_t kGatherMinTileRows = 16;

template <int K>
void spmm_kind(int form, const BitmapWeight& w, const void* xv, int64_t n, int64_t ldx, const float* bias, float* y,
               int64_t ldy, int64_t tr0, int64_t tr1) {
    const float* x = static_cast<const float*>(xv);
    if (n == 1 && form != kNeonFormRebuild && (form == kNeonFormGather || tr1 - tr0 >= kGatherMinTileRows))
        return gather_impl<K>(w, x, bias, y, tr0, tr1, form == kNeonFormGather);
    if (n == 1) return rebuild_impl<K, 1>(w, x, 1, ldx, bias, y, ldy, tr0, tr1);
    return rebuild_impl<K, 0>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}

// --- decode -----------------------------------------------------------------------------------

template <int VB>  // value bytes: 4 or 2 (any 16-bit type: bits are copied)
void decode_impl(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = w.k_tiles();
    const uint8_t* values = static_cast<const uint8_t*>(w.values);
    const uint8_t* end = values + w.num_values * VB;
    alignas(16) uint8_t local[kRowSpanBytes];
    alignas(16) uint8_t row[64 * 4];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const uint8_t* p = values + static_cast<int64_t>(w.offsets[t]) * 8 * VB;
            const int64_t cols = (w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64;
            for (int64_t r = 0; r < rows; ++r) {
                uint8_t* dst = static_cast<uint8_t*>(out) + (((tr - tr0) * 64 + r) * ldo + kt * 64) * VB;
                uint8_t* target = cols == 64 ? dst : row;
                const uint64_t mask = masks[r];
                const uint64_t prefix = byte_prefix(mask);
                const unsigned used = static_cast<unsigned>(prefix >> 56) * VB;
                const uint8_t* src = padded_row(p, end, used, used + 32, local);
                for (int q = 0; q < 8; ++q) {
                    const unsigned b = static_cast<unsigned>(mask >> (8 * q)) & 0xffu;
                    const unsigned start = q == 0 ? 0u : static_cast<unsigned>(prefix >> (8 * (q - 1))) & 0xffu;
                    const uint8_t* s = src + start * VB;
                    if (VB == 4) {
                        const uint8x16x2_t v = {{vld1q_u8(s), vld1q_u8(s + 16)}};
                        vst1q_u8(target + q * 32, vqtbl2q_u8(v, vld1q_u8(kTables.expand32[b])));
                        vst1q_u8(target + q * 32 + 16, vqtbl2q_u8(v, vld1q_u8(kTables.expand32[b] + 16)));
                    } else {
                        vst1q_u8(target + q * 16, vqtbl1q_u8(vld1q_u8(s), vld1q_u8(kTables.expand16[b])));
                    }
                }
                if (cols != 64) std::memcpy(dst, row, cols * VB);
                p += used;
            }
        }
    }
}

NeonFeatures probe_features() {
    NeonFeatures f{false, false, false};
#if defined(__linux__)
    // Bit numbers from the kernel's uapi asm/hwcap.h (not included: older headers lack them).
    const unsigned long hwcap = getauxval(AT_HWCAP);
    const unsigned long hwcap2 = getauxval(AT_HWCAP2);
    f.fp16 = (hwcap & (1ul << 10)) != 0;  // HWCAP_ASIMDHP
    f.fhm = (hwcap & (1ul << 23)) != 0;   // HWCAP_ASIMDFHM
    f.bf16 = (hwcap2 & (1ul << 14)) != 0;  // HWCAP2_BF16
#elif defined(__APPLE__)
    auto has = [](const char* name) {
        int value = 0;
        size_t size = sizeof(value);
        return sysctlbyname(name, &value, &size, nullptr, 0) == 0 && value != 0;
    };
    f.fp16 = has("hw.optional.arm.FEAT_FP16");
    f.fhm = has("hw.optional.arm.FEAT_FHM");
    f.bf16 = has("hw.optional.arm.FEAT_BF16");
#endif
    f.fhm = f.fhm && f.fp16;
    return f;
}

void spmm_dispatch(bool use_bf16, bool use_fhm, int form, const BitmapWeight& w, const void* x, int64_t n,
                   int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    switch (w.dtype) {
        case Dtype::F32: return spmm_kind<kF32>(form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
        case Dtype::BF16:
            if (use_bf16) return spmm_kind<kBf16Dot>(form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
            return spmm_kind<kBf16Cvt>(form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
        default:
            if (use_fhm) return spmm_kind<kF16Fhm>(form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
            return spmm_kind<kF16Cvt>(form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
    }
}

#if defined(FLASHSPARSE_NEON_MCA)
// Regions for llvm-mca (bench/neon_report.py compiles this file with -S
// -DFLASHSPARSE_NEON_MCA): four rows of a tile in each n = 1 form, and eight x-table entries.
template <int K, int C>
__attribute__((noipa)) void mca_four_rows(const uint64_t* masks, const uint8_t* p, const uint8_t* table,
                                             const uint8_t* xk, uint8_t* buf, float* row_sum) {
    __asm__ volatile("// MCA-BEGIN rows %0 %1" ::"i"(K), "i"(C));
    four_rows_n1<K, C, false>(masks, p, nullptr, table, xk, buf, nullptr, row_sum);
    __asm__ volatile("// MCA-END" ::: "memory");
}

template <int K>
__attribute__((noipa)) void mca_xtable(const uint8_t* xk, uint8_t* table, int b0) {
    __asm__ volatile("// MCA-BEGIN xtable %0" ::"i"(K));
    for (int b = b0; b < b0 + 8; ++b) {
        if (kXBytes<K> == 2) {
            vst1q_u8(table + b * 16, vqtbl1q_u8(vld1q_u8(xk), vld1q_u8(kTables.compact16[b])));
        } else {
            const uint8x16x2_t xq = {{vld1q_u8(xk), vld1q_u8(xk + 16)}};
            vst1q_u8(table + b * 32, vqtbl2q_u8(xq, vld1q_u8(kTables.compact32[b])));
            vst1q_u8(table + b * 32 + 16, vqtbl2q_u8(xq, vld1q_u8(kTables.compact32[b] + 16)));
        }
    }
    __asm__ volatile("// MCA-END" ::: "memory");
}

template <int K>
void mca_kind() {
    mca_four_rows<K, 0>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 1>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 2>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 3>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 4>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 5>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 6>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_four_rows<K, 8>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
    mca_xtable<K>(nullptr, nullptr, 0);
}

}  // namespace

// Never called: keeps the regions in the object file.
void bitmap_neon_mca_regions() {
    mca_kind<kF32>();
    mca_kind<kBf16Dot>();
    mca_kind<kBf16Cvt>();
    mca_kind<kF16Fhm>();
    mca_kind<kF16Cvt>();
}
namespace {
#endif

}  // namespace

NeonFeatures bitmap_neon_features() {
    static const NeonFeatures features = probe_features();
    return features;
}

void spmm_neon_variant(bool use_bf16, bool use_fhm, int form, const BitmapWeight& w, const void* x, int64_t n,
                       int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_dispatch(use_bf16, use_fhm, form, w, x, n, ldx, bias, y, ldy, tr0, tr1);
}

void spmm_neon(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias, float* y,
               int64_t ldy, int64_t tr0, int64_t tr1) {
    const NeonFeatures f = bitmap_neon_features();
    spmm_dispatch(f.bf16, f.fhm, kNeonFormAuto, w, x, n, ldx, bias, y, ldy, tr0, tr1);
}

void decode_neon(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    if (w.dtype == Dtype::F32) return decode_impl<4>(w, out, ldo, tr0, tr1);
    return decode_impl<2>(w, out, ldo, tr0, tr1);
}

}  // namespace cpu
}  // namespace flashsparse

#endif  // __aarch64__
