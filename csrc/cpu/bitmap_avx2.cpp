// AVX2 path (AVX2 + FMA + F16C + BMI1/2 + POPCNT, no AVX-512): per 64x64 tile, one of two
// forms, so that the work follows the tile's nonzeros (see "Forms" below). Everything here is
// templated on a value loader (F32Values, BF16Values, F16Values): the only code that knows
// how the packed values are stored, so a new value type is a new loader, not new kernels.
//
// Forms:
// - expand (dense-ish tiles, any n <= 8): each byte of a row mask (8 columns) picks one table
//   line that rebuilds those 8 weights from the packed values (a permute or byte shuffle, plus
//   a lane mask for fp32), branch-free; the 8 weights are multiplied with 8 x values of each row
//   of x. Per row segment: 8 table lookups, whatever the mask holds.
// - sparse (tiles of few nonzeros):
//   * n = 1 "slots": the row's first 8 nonzeros are one FMA of 8 packed values with x gathered
//     at their columns (8 scalar loads into one vector: vgatherdps is several times slower on
//     Zen 2/3). Rows with more than 8 go to a work list that the next pass takes 8 at a time,
//     so no branch depends on a row's count (a per-row loop exit mispredicts about once a row,
//     which costs about as much as the row's work at 90 %).
//   * n >= 2 "columns": one broadcast value times the 8 (16, 32) x values of its column, x
//     transposed per tile (xt): one FMA per nonzero and group of 8 rows of x. Its per-row loop
//     exit mispredicts too, but that is small next to the row's FMAs from 2 rows of x on.
// The choice is per tile from its stored value count (tile_offsets), so it costs nothing and
// does not depend on the thread split; tests force either form (SpmmForm).
//
// Full-width loads read up to 8 values past a row's last one: a tile whose values end less
// than that before the end of the values buffer is first copied into a padded local buffer.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bitmap_cpu.h"

#if defined(__x86_64__) || defined(__i386__)

namespace flashsparse {
namespace cpu {
namespace {

// Built at compile time: no static initializer runs AVX2 code on a CPU without it. For mask
// byte b, s(j) = number of set bits of b below bit j (the rank of column j's value).
struct Tables {
    // fp32: one 64-byte line per mask byte: vpermps indices (lane j <- value s(j)), then the
    // lane mask (all ones where bit j is set) that zeroes the other lanes.
    alignas(64) int32_t expand32[256][16];
    // bf16: vpshufb control for 8 values (16 bytes) broadcast to both 128-bit halves: 32-bit
    // lane j = value s(j) << 16 (bf16 -> fp32 is a shift), or 0 (index 0x80).
    alignas(32) uint8_t expand_bf16[256][32];
    // 16-bit values as 16-bit lanes: pshufb control, lane j = value s(j) or 0 (fp16 converts
    // after it; the decode copies bits).
    alignas(16) uint8_t expand16[256][16];
    // first_lanes[c]: lanes < min(c, 8) all ones (a slot's values past its row's nonzeros are
    // zeroed: they belong to the next row and may be Inf or NaN).
    alignas(32) int32_t first_lanes[65][8];
    constexpr Tables() : expand32{}, expand_bf16{}, expand16{}, first_lanes{} {
        for (int b = 0; b < 256; ++b) {
            int s = 0;
            for (int j = 0; j < 8; ++j) {
                const bool set = (b >> j) & 1;
                expand32[b][j] = set ? s : 0;
                expand32[b][8 + j] = set ? -1 : 0;
                for (int h = 0; h < 2; ++h) {  // the two 128-bit halves: lanes 0-3 and 4-7
                    if ((j >> 2) != h) continue;
                    uint8_t* d = &expand_bf16[b][16 * h + 4 * (j & 3)];
                    d[0] = d[1] = 0x80;
                    d[2] = set ? static_cast<uint8_t>(2 * s) : 0x80;
                    d[3] = set ? static_cast<uint8_t>(2 * s + 1) : 0x80;
                }
                expand16[b][2 * j] = set ? static_cast<uint8_t>(2 * s) : 0x80;
                expand16[b][2 * j + 1] = set ? static_cast<uint8_t>(2 * s + 1) : 0x80;
                s += set;
            }
        }
        for (int c = 0; c <= 64; ++c)
            for (int j = 0; j < 8; ++j) first_lanes[c][j] = j < c ? -1 : 0;
    }
};
constexpr Tables kTables{};

// Values a row's loads may read past its last one.
constexpr int64_t kSlack = 8;

}  // namespace
}  // namespace cpu
}  // namespace flashsparse

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,tune=znver3")

namespace flashsparse {
namespace cpu {
namespace {

// --- value loaders ----------------------------------------------------------------------
// A loader turns packed values (Raw, kBytes each) into fp32 lanes in three ways (and says, in
// kExpandIsShuffle, whether expand() is a single byte shuffle, which moves the n = 1 choice
// between the forms):
//   expand(p, b): the 8 weights of the 8 columns of mask byte b, from the values at p (reads 8
//                 values from p);
//   load8(p):     8 consecutive values (reads 8);
//   broadcast(p): one value in every lane (reads 1).
// A value type with a scale (int8 or fp8 with a per-row or per-group scale) would be a loader
// that converts in these three functions and whose scale the kernels apply to each row
// segment's sum (they keep it apart from the running sum for that reason: see the "segment"
// comments); its table would sit next to these.

struct F32Values {
    using Raw = float;
    static constexpr int kBytes = 4;
    static constexpr bool kExpandIsShuffle = false;
    static __m256 expand(const float* p, size_t b) {
        // Byte offsets from the table's start: GCC then addresses both halves of the line as
        // (table, offset), instead of adding the two first.
        const char* perm = reinterpret_cast<const char*>(kTables.expand32);
        const char* keep = perm + 32;
        const size_t off = b * 64;
        const __m256 v = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p),
                                                  _mm256_load_si256(reinterpret_cast<const __m256i*>(perm + off)));
        return _mm256_and_ps(v, _mm256_load_ps(reinterpret_cast<const float*>(keep + off)));
    }
    static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
    static __m256 broadcast(const float* p) { return _mm256_broadcast_ss(p); }
};

struct BF16Values {
    using Raw = uint16_t;
    static constexpr int kBytes = 2;
    static constexpr bool kExpandIsShuffle = true;  // expand() is one vpshufb, no conversion
    static __m256 expand(const uint16_t* p, size_t b) {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        const char* line = reinterpret_cast<const char*>(kTables.expand_bf16) + b * 32;
        return _mm256_castsi256_ps(_mm256_shuffle_epi8(v, _mm256_load_si256(reinterpret_cast<const __m256i*>(line))));
    }
    static __m256 load8(const uint16_t* p) {
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    }
    static __m256 broadcast(const uint16_t* p) {
        // Every 32-bit lane holds the value twice; keep the high copy.
        const __m256i v = _mm256_set1_epi16(static_cast<short>(*p));
        return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    }
};

struct F16Values {
    using Raw = uint16_t;
    static constexpr int kBytes = 2;
    static constexpr bool kExpandIsShuffle = false;
    static __m256 expand(const uint16_t* p, size_t b) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const char* line = reinterpret_cast<const char*>(kTables.expand16) + b * 16;
        return _mm256_cvtph_ps(_mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(line))));
    }
    static __m256 load8(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static __m256 broadcast(const uint16_t* p) { return _mm256_cvtph_ps(_mm_set1_epi16(static_cast<short>(*p))); }
};

inline unsigned popcnt64(uint64_t v) { return static_cast<unsigned>(_mm_popcnt_u64(v)); }

// Rank of column 8q's value in the row (values stored before byte q): independent popcounts
// of mask prefixes, not a running sum, so the 8 loads of a row do not wait on each other.
inline unsigned prefix(uint64_t m, unsigned q) { return popcnt64(_bzhi_u64(m, 8 * q)); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// --- expand form ------------------------------------------------------------------------

// n = 1: acc[r] += row r of the tile . x (x: the tile's 64 values). Two FMA chains per row; the
// row's sum over this tile (its segment) is added to acc[r] once.
template <class V>
__attribute__((noinline)) void tile_expand_n1(const uint64_t* masks, const typename V::Raw* p, const float* x,
                                              __m256* acc, int64_t rows) {
    __m256 xr[8];  // in registers: a memory operand per FMA is a fifth load per mask byte
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) xr[q] = _mm256_loadu_ps(x + 8 * q);
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = masks[r];
        if (!m) continue;  // x is finite (bitmap_cpu.h): an empty row adds nothing
        const uint8_t* mb = reinterpret_cast<const uint8_t*>(masks + r);
        __m256 a0 = _mm256_mul_ps(V::expand(p, mb[0]), xr[0]);
        __m256 a1 = _mm256_mul_ps(V::expand(p + prefix(m, 1), mb[1]), xr[1]);
#pragma GCC unroll 8
        for (unsigned q = 2; q < 8; q += 2) {
            a0 = _mm256_fmadd_ps(V::expand(p + prefix(m, q), mb[q]), xr[q], a0);
            a1 = _mm256_fmadd_ps(V::expand(p + prefix(m, q + 1), mb[q + 1]), xr[q + 1], a1);
        }
        acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(a0, a1));  // segment
        p += popcnt64(m);
    }
}

// 2 <= n <= kMaxSpmmRows: the row rebuilt once (8 vectors), then multiplied with every row of
// x (row stride ldx); acc[r * n + i] += row r . x row i.
template <class V>
__attribute__((noinline)) void tile_expand_rows(const uint64_t* masks, const typename V::Raw* p, const float* x,
                                                int64_t ldx, int64_t n, __m256* acc, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = masks[r];
        if (!m) continue;
        const uint8_t* mb = reinterpret_cast<const uint8_t*>(masks + r);
        __m256 wv[8];
#pragma GCC unroll 8
        for (unsigned q = 0; q < 8; ++q) wv[q] = V::expand(p + prefix(m, q), mb[q]);
        p += popcnt64(m);
        for (int64_t i = 0; i < n; ++i) {
            const float* xi = x + i * ldx;
            __m256 s = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xi));
            __m256 u = _mm256_mul_ps(wv[1], _mm256_loadu_ps(xi + 8));
#pragma GCC unroll 8
            for (int q = 2; q < 8; q += 2) {
                s = _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(xi + 8 * q), s);
                u = _mm256_fmadd_ps(wv[q + 1], _mm256_loadu_ps(xi + 8 * q + 8), u);
            }
            acc[r * n + i] = _mm256_add_ps(acc[r * n + i], _mm256_add_ps(s, u));  // segment
        }
    }
}

// --- sparse form, n = 1: slots of 8 nonzeros ---------------------------------------------

// The x values at the columns of the next 8 set bits of m (m loses them). Past the last set
// bit tzcnt gives 64: x[64] must be finite (the next tile's first value, or padding), and the
// caller zeroes the values of those lanes.
inline uint64_t next_column(uint64_t& m) {
    const uint64_t c = _tzcnt_u64(m);
    m = _blsr_u64(m);
    return c;
}

// v with lane I replaced by *p: vinsertps from memory, one load and one shuffle. GCC does not
// fold the load of _mm_insert_ps(v, _mm_load_ss(p), I << 4) into it, and the vpinsrd whose
// load it does fold costs more shuffle-port time on Zen 3/4 (bench/results/cpu-kernel-notes.md).
template <int I>
inline __m128 insert_lane(__m128 v, const float* p) {
    __asm__("vinsertps %3, %2, %1, %0" : "=x"(v) : "x"(v), "m"(*p), "i"(I << 4));
    return v;
}

inline __m256 gather_slot(const float* x, uint64_t& m) {
    // In this order GCC keeps two column numbers live, not eight (no spills).
    __m128 lo = _mm_load_ss(x + next_column(m));
    lo = insert_lane<1>(lo, x + next_column(m));
    lo = insert_lane<2>(lo, x + next_column(m));
    lo = insert_lane<3>(lo, x + next_column(m));
    __m128 hi = _mm_load_ss(x + next_column(m));
    hi = insert_lane<1>(hi, x + next_column(m));
    hi = insert_lane<2>(hi, x + next_column(m));
    hi = insert_lane<3>(hi, x + next_column(m));
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}

// One slot: acc += (the values at p of m's next 8 nonzeros) . (x at their columns); returns
// what is left of m.
template <class V>
inline uint64_t slot(const typename V::Raw* p, uint64_t m, const float* x, __m256& acc) {
    const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kTables.first_lanes[popcnt64(m)]));
    const __m256 xg = gather_slot(x, m);
    acc = _mm256_fmadd_ps(_mm256_and_ps(V::load8(p), keep), xg, acc);
    return m;
}

// acc[r] += row r of the tile . x. Pass 1 takes every row's first 8 nonzeros; rows with more
// are appended (branch-free) to a work list that the next pass takes 8 more of, and so on.
template <class V>
__attribute__((noinline)) void tile_slots_n1(const uint64_t* masks, const typename V::Raw* p, const float* x,
                                             __m256* acc, int64_t rows) {
    using Raw = typename V::Raw;
    __m256* acc_of[64];
    const Raw* at[64];
    uint64_t left[64];
    int64_t count = 0;
    for (const uint64_t* end = masks + rows; masks != end; ++masks, ++acc) {
        const uint64_t m = *masks;
        const uint64_t rest = slot<V>(p, m, x, *acc);  // segment: a scaled type would keep it apart
        acc_of[count] = acc;
        at[count] = p + 8;
        left[count] = rest;
        count += rest != 0;
        p += popcnt64(m);
    }
    while (count) {
        int64_t next = 0;
        for (int64_t e = 0; e < count; ++e) {
            __m256* a = acc_of[e];
            const Raw* q = at[e];
            const uint64_t rest = slot<V>(q, left[e], x, *a);
            acc_of[next] = a;
            at[next] = q + 8;
            left[next] = rest;
            next += rest != 0;
        }
        count = next;
    }
}

// --- sparse form, n >= 2: columns --------------------------------------------------------

// L vectors of 8 rows of x: acc[r * L + l] (lane j: x row 8 l + j) += row r . x, with xt the
// tile's x transposed, [64 columns][8 L]. Four sets of accumulators: one FMA chain per set
// would otherwise bound a row to the FMA latency per nonzero.
template <class V, int L>
__attribute__((noinline)) void tile_columns(const uint64_t* masks, const typename V::Raw* p, const float* xt,
                                            __m256* acc, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        uint64_t m = masks[r];
        if (!m) continue;
        __m256 a[4][L];
#pragma GCC unroll 16
        for (int s = 0; s < 4 * L; ++s) a[s / L][s % L] = _mm256_setzero_ps();
        for (;;) {
#pragma GCC unroll 4
            for (int s = 0; s < 4; ++s) {
                const float* xc = xt + next_column(m) * 8 * L;
                const __m256 v = V::broadcast(p + s);
#pragma GCC unroll 4
                for (int l = 0; l < L; ++l) a[s][l] = _mm256_fmadd_ps(v, _mm256_load_ps(xc + 8 * l), a[s][l]);
                if (!m) {
                    p += s + 1;
                    goto done;
                }
            }
            p += 4;
        }
    done:
#pragma GCC unroll 4
        for (int l = 0; l < L; ++l)  // segment
            acc[r * L + l] = _mm256_add_ps(
                acc[r * L + l], _mm256_add_ps(_mm256_add_ps(a[0][l], a[1][l]), _mm256_add_ps(a[2][l], a[3][l])));
    }
}

// --- tile loops ----------------------------------------------------------------------------

// Whether a tile of `values` stored values (a multiple of 8) takes the sparse form at n rows
// of x, from instruction counts per 64-weight row segment (bench/results/cpu-kernel-notes.md):
// expand about 70 + 19 n whatever the mask; columns about 8 per nonzero plus a mispredicted
// loop exit per row; slots about 50 per 8 nonzeros, where bf16's cheap expand (one byte
// shuffle per mask byte) leaves them less room than fp32's and fp16's.
template <class V>
inline bool sparse_tile(int64_t values, int64_t n) {
    if (n == 1) return values <= 64 * (V::kExpandIsShuffle ? 8 : 10);
    return values * 8 <= 64 * (19 * n + 10);
}

template <class V>
struct TileValues {
    using Raw = typename V::Raw;
    TileValues(const BitmapWeight& w) : base(static_cast<const Raw*>(w.values)), num_values(w.num_values) {}
    const Raw* base;
    int64_t num_values;
    alignas(32) Raw tail[64 * 64 + kSlack];  // not initialized: only get() writes and reads it
    // The tile's values, from a padded copy if its loads could run past the buffer.
    const Raw* get(int64_t start, int64_t count) {
        if (start + count + kSlack <= num_values) return base + start;
        std::memcpy(tail, base + start, count * sizeof(Raw));
        std::memset(tail + count, 0, kSlack * sizeof(Raw));
        return tail;
    }
};

// n <= kMaxSpmmRows: per tile, expand or sparse. acc_e[r * n + i] (expand, and slots at
// n = 1) are partial-sum vectors; acc_c[r] (columns) holds x row i in lane i.
template <class V>
void spmm_small_impl(const BitmapWeight& w, const float* x, int64_t ldx, const float* xt, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, int form) {
    const int64_t kt_count = w.k_tiles();
    const int64_t kp = kt_count * 64;
    alignas(32) __m256 acc_e[64 * kMaxSpmmRows];
    alignas(32) __m256 acc_c[64];
    alignas(32) float x_last[128];  // the last tile's x, then zeros (slots read x[64])
    alignas(32) float lanes[8];
    TileValues<V> tv(w);
    if (n == 1) {
        std::memcpy(x_last, x + kp - 64, 64 * sizeof(float));
        std::memset(x_last + 64, 0, 64 * sizeof(float));
    }
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc_e[j] = _mm256_setzero_ps();
        for (int64_t r = 0; r < rows; ++r) acc_c[r] = _mm256_setzero_ps();
        bool any_columns = false;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t count = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
            if (count == 0) continue;
            const uint64_t* masks = w.masks + t * 64;
            const typename V::Raw* p = tv.get(start, count);
            const bool sparse = form == kFormSparse || (form == kFormAuto && sparse_tile<V>(count, n));
            if (n == 1) {
                const float* xk = kt + 1 < kt_count ? x + kt * 64 : x_last;
                (sparse ? tile_slots_n1<V> : tile_expand_n1<V>)(masks, p, xk, acc_e, rows);
            } else if (sparse) {
                tile_columns<V, 1>(masks, p, xt + kt * 64 * 8, acc_c, rows);
                any_columns = true;
            } else {
                tile_expand_rows<V>(masks, p, x + kt * 64, ldx, n, acc_e, rows);
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            const float b = bias ? bias[row0 + r] : 0.0f;
            if (any_columns) _mm256_store_ps(lanes, acc_c[r]);
            for (int64_t i = 0; i < n; ++i)
                y[i * ldy + row0 + r] = hsum(acc_e[r * n + i]) + (any_columns ? lanes[i] : 0.0f) + b;
        }
    }
}

// Any n, columns only: x rows in groups of 8 L (xt: [groups][kp][8 L]); acc: 64 * groups * L
// vectors of scratch.
template <class V, int L>
void spmm_columns_impl(const BitmapWeight& w, const float* xt, int64_t n, const float* bias, float* y, int64_t ldy,
                       int64_t tr0, int64_t tr1, __m256* acc) {
    const int64_t kt_count = w.k_tiles();
    const int64_t kp = kt_count * 64;
    const int64_t groups = (n + 8 * L - 1) / (8 * L);
    const typename V::Raw* values = static_cast<const typename V::Raw*>(w.values);
    alignas(32) float lanes[8 * L];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < groups * 64 * L; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            if (static_cast<int64_t>(w.offsets[t + 1]) * 8 == start) continue;
            const uint64_t* masks = w.masks + t * 64;
            // Each group re-reads the tile's masks and values from L1.
            for (int64_t g = 0; g < groups; ++g)
                tile_columns<V, L>(masks, values + start, xt + (g * kp + kt * 64) * 8 * L, acc + g * 64 * L, rows);
        }
        for (int64_t g = 0; g < groups; ++g) {
            const int64_t live = (n - g * 8 * L) < 8 * L ? (n - g * 8 * L) : 8 * L;
            for (int64_t r = 0; r < rows; ++r) {
                const float b = bias ? bias[row0 + r] : 0.0f;
                for (int l = 0; l < L; ++l) _mm256_store_ps(lanes + 8 * l, acc[(g * 64 + r) * L + l]);
                for (int64_t i = 0; i < live; ++i) y[(g * 8 * L + i) * ldy + row0 + r] = lanes[i] + b;
            }
        }
    }
}

template <class V>
void spmm_forms_impl(const BitmapWeight& w, const float* x, int64_t ldx, const float* xt, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, int form, void* scratch) {
    if (n <= kMaxSpmmRows) return spmm_small_impl<V>(w, x, ldx, xt, n, bias, y, ldy, tr0, tr1, form);
    if (form == kFormExpand) {  // groups of kMaxSpmmRows rows of x, expand only
        for (int64_t i = 0; i < n; i += kMaxSpmmRows) {
            const int64_t rows = n - i < kMaxSpmmRows ? n - i : kMaxSpmmRows;
            spmm_small_impl<V>(w, x + i * ldx, ldx, nullptr, rows, bias, y + i * ldy, ldy, tr0, tr1, kFormExpand);
        }
        return;
    }
    __m256* acc = reinterpret_cast<__m256*>((reinterpret_cast<uintptr_t>(scratch) + 31) & ~uintptr_t(31));
    if (n <= 16) return spmm_columns_impl<V, 2>(w, xt, n, bias, y, ldy, tr0, tr1, acc);
    return spmm_columns_impl<V, 4>(w, xt, n, bias, y, ldy, tr0, tr1, acc);
}

// --- decode -----------------------------------------------------------------------------------

// V: F32Values, or F16Values for any 16-bit type (bits are copied).
template <class V>
void decode_impl(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    constexpr int D = V::kBytes == 4 ? 0 : 1;
    using Raw = typename V::Raw;
    constexpr int64_t kEsize = sizeof(Raw);
    const int64_t kt_count = w.k_tiles();
    TileValues<V> tv(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const Raw* p = tv.get(start, static_cast<int64_t>(w.offsets[t + 1]) * 8 - start);
            const int64_t cols = (w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64;
            for (int64_t r = 0; r < rows; ++r) {
                Raw* dst = static_cast<Raw*>(out) + ((tr - tr0) * 64 + r) * ldo + kt * 64;
                const uint64_t m = masks[r];
                const uint8_t* mb = reinterpret_cast<const uint8_t*>(masks + r);
                alignas(32) Raw row[64];
                Raw* target = cols == 64 ? dst : row;
                for (unsigned q = 0; q < 8; ++q) {
                    const Raw* src = p + prefix(m, q);
                    if (D == 0) {
                        _mm256_storeu_ps(reinterpret_cast<float*>(target) + 8 * q,
                                         F32Values::expand(reinterpret_cast<const float*>(src), mb[q]));
                    } else {
                        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
                        _mm_storeu_si128(reinterpret_cast<__m128i*>(reinterpret_cast<uint16_t*>(target) + 8 * q),
                                         _mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(
                                                                 kTables.expand16[mb[q]]))));
                    }
                }
                p += popcnt64(m);
                if (cols != 64) std::memcpy(dst, row, cols * kEsize);
            }
        }
    }
}

template <class Fn>
void by_dtype(Dtype d, Fn&& fn) {
    switch (d) {
        case Dtype::F32: return fn(F32Values{});
        case Dtype::BF16: return fn(BF16Values{});
        default: return fn(F16Values{});
    }
}

}  // namespace

void spmm_avx2_forms(const BitmapWeight& w, const float* x, int64_t ldx, const float* xt, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, int form, void* scratch) {
    by_dtype(w.dtype, [&](auto v) {
        spmm_forms_impl<decltype(v)>(w, x, ldx, xt, n, bias, y, ldy, tr0, tr1, form, scratch);
    });
}

void spmm_avx2(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    // The SpmmFn contract gives x row-major only, which the columns form cannot take: n >= 2
    // runs the expand form everywhere.
    spmm_avx2_forms(w, static_cast<const float*>(x), ldx, nullptr, n, bias, y, ldy, tr0, tr1,
                    n == 1 ? kFormAuto : kFormExpand, nullptr);
}

void decode_avx2(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    if (w.dtype == Dtype::F32) return decode_impl<F32Values>(w, out, ldo, tr0, tr1);
    return decode_impl<F16Values>(w, out, ldo, tr0, tr1);
}

}  // namespace cpu
}  // namespace flashsparse

#else  // not x86: never selected

namespace flashsparse {
namespace cpu {
void spmm_avx2(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void spmm_avx2_forms(const BitmapWeight& w, const float* x, int64_t ldx, const float*, int64_t n, const float* bias,
                     float* y, int64_t ldy, int64_t tr0, int64_t tr1, int, void*) {
    for (int64_t i = 0; i < n; i += kMaxSpmmRows)
        spmm_scalar(w, x + i * ldx, n - i < kMaxSpmmRows ? n - i : kMaxSpmmRows, ldx, bias, y + i * ldy, ldy, tr0,
                    tr1);
}
void decode_avx2(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
}  // namespace cpu
}  // namespace flashsparse

#endif
