// AVX2 path for quantized bitmap weights (AVX2 + FMA + F16C + BMI1/2 + POPCNT, no AVX-512): the
// forms of bitmap_avx2.cpp (see there) over int8 / fp8 e4m3 codes, converted to fp32 in
// registers and multiplied with fp32 x, accumulating in fp32.
//
// Codes to fp32 (a code type is a struct, Int8Codes and Fp8Codes):
// - expand(p, b): the 8 weights of the 8 columns of mask byte b, from the codes at p (reads 8
//   bytes). int8: one vpshufb puts code s(j) in byte j (0x80: zero), then vpmovsxbd and
//   vcvtdq2ps. fp8: one vpshufb puts code s(j) in the top byte of 16-bit lane j; shifting right
//   by 1 (arithmetic) and clearing bit 14 leaves the fp16 of the code's value / 256
//   (bitmap_quant.h), which vcvtph2ps converts exactly. A lane of a clear bit is +0.0 either way.
//   The expand form at n <= kQuantMaxRows moves those bits once per code instead (a tile's
//   codes are staged as fp16 before its rows are expanded: Fp8HalfCodes), not once per lane of
//   every mask byte.
// - load8(p): 8 consecutive codes (reads 8 bytes).
// - kUnit: what the converted value is short of the code's value (fp8: 1/256), folded into the
//   scales.
//
// Forms at n = 1, per 64x64 tile from its stored code count (no per-row branch on the count):
// - expand: every mask byte rebuilds its 8 weights (one table line), 8 FMAs per row segment
//   against x held in registers;
// - slots (tiles of few codes): a row's first 8 nonzeros are one FMA of 8 codes with x gathered
//   at their columns by scalar loads (vgatherdps is several times slower on Zen 2/3); rows with
//   more go to a work list that the next pass takes 8 more of.
// n = 2..kQuantMaxRows: each row segment is expanded once and multiplied with every row of x.
// Larger n: a 64 x kQuantBlockK block of the weight is dequantized into a buffer and multiplied
// with every row of x by a register-blocked micro-kernel (quant_spmm_blocked_avx2).
//
// Scales: per row, the sums are scaled once at the end of the row; groups of 64 or more columns
// (whole tiles) scale a row's accumulator into a second one at the end of each group; groups of
// 32 keep each row segment's two halves apart (expand: columns 0-31 and 32-63 are separate FMA
// chains) and scale each once; in a slot, lanes of the low half take the first scale (the
// slot's lanes hold the row's nonzeros in column order, so the low half's are the first ones).
//
// Loads of 8 codes read up to 8 bytes past a row's last code: a tile whose codes end less than
// that before the end of the buffer is first copied into a zero-padded local buffer.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bitmap_quant.h"

#if defined(__x86_64__) || defined(__i386__)

namespace flashsparse {
namespace cpu {
namespace {

// Built at compile time: no static initializer runs AVX2 code on a CPU without it. For mask
// byte b, s(j) = number of set bits of b below bit j (the rank of column j's code).
struct QuantTables {
    // int8: vpshufb control, byte j = s(j), or 0x80 where bit j is clear: 8 bytes a line, read
    // as 16 (the upper 8 pick bytes nobody reads; one more line pads the end), so that the line
    // address is base + 8 b, one addressing mode, with no shift of b.
    alignas(16) uint8_t expand_i8[257][8];
    // fp8: byte 2j + 1 = s(j), byte 2j = 0x80 (0x80 for both where bit j is clear).
    alignas(16) uint8_t expand_f8[256][16];
    // fp8 codes staged as fp16 (Fp8HalfCodes): byte 2j = 2 s(j), 2j + 1 = 2 s(j) + 1.
    alignas(16) uint8_t expand16[256][16];
    // first_lanes[c]: lanes < min(c, 8) all ones (a slot's codes past its row's nonzeros are
    // zeroed: they belong to the next row, and fp8 codes may be NaN).
    alignas(32) int32_t first_lanes[65][8];
    constexpr QuantTables() : expand_i8{}, expand_f8{}, expand16{}, first_lanes{} {
        for (int b = 0; b < 256; ++b) {
            int s = 0;
            for (int j = 0; j < 8; ++j) {
                const bool set = (b >> j) & 1;
                expand_i8[b][j] = set ? static_cast<uint8_t>(s) : 0x80;
                expand_f8[b][2 * j] = 0x80;
                expand_f8[b][2 * j + 1] = set ? static_cast<uint8_t>(s) : 0x80;
                expand16[b][2 * j] = set ? static_cast<uint8_t>(2 * s) : 0x80;
                expand16[b][2 * j + 1] = set ? static_cast<uint8_t>(2 * s + 1) : 0x80;
                s += set;
            }
        }
        for (int c = 0; c <= 64; ++c)
            for (int j = 0; j < 8; ++j) first_lanes[c][j] = j < c ? -1 : 0;
    }
};
constexpr QuantTables kQTables{};

// Bytes a row's loads may read past its last code.
constexpr int64_t kSlack = 8;

}  // namespace
}  // namespace cpu
}  // namespace flashsparse

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt,tune=znver3")

namespace flashsparse {
namespace cpu {
namespace {

enum Mode : int { kRow = 0, kGroup32 = 1, kGroupTiles = 2 };

struct Int8Codes {
    using Raw = uint8_t;
    using Staged = Int8Codes;  // what the expand form (n <= kQuantMaxRows) reads: see stage()
    static constexpr float kUnit = 1.0f;
    static constexpr int64_t kSlotsMaxCodesPerRowX2 = 15;  // see slots_tile
    static __m256 expand(const uint8_t* p, size_t b) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        const char* line = reinterpret_cast<const char*>(kQTables.expand_i8) + b * 8;
        const __m128i w = _mm_shuffle_epi8(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(line)));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
    }
    static __m256 load8(const uint8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    }
    static const uint8_t* stage(const uint8_t* p, int64_t, uint8_t*) { return p; }
};

// fp8 codes staged as fp16 (the bit move of Fp8Codes, 16 codes at a time over a whole tile):
// expand() is then one byte shuffle and vcvtph2ps, as for fp16 weights; two vector
// instructions fewer per mask byte, for three per 16 codes (fp8 at 50-70 % sparsity went from
// about 1.4x to 1.2x int8's time on Zen 5).
struct Fp8HalfCodes {
    using Raw = uint16_t;
    static constexpr float kUnit = kFp8HalfUnit;
    static __m256 expand(const uint16_t* p, size_t b) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const char* line = reinterpret_cast<const char*>(kQTables.expand16) + b * 16;
        return _mm256_cvtph_ps(_mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(line))));
    }
};

struct Fp8Codes {
    using Raw = uint8_t;
    using Staged = Fp8HalfCodes;
    static constexpr float kUnit = kFp8HalfUnit;
    static constexpr int64_t kSlotsMaxCodesPerRowX2 = 18;
    static __m256 expand(const uint8_t* p, size_t b) {
        const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
        const char* line = reinterpret_cast<const char*>(kQTables.expand_f8) + b * 16;
        const __m128i h = _mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(line)));
        return _mm256_cvtph_ps(_mm_and_si128(_mm_srai_epi16(h, 1), _mm_set1_epi16(static_cast<short>(0xBFFF))));
    }
    static __m256 load8(const uint8_t* p) {
        const __m128i h = _mm_slli_epi16(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 7);
        return _mm256_cvtph_ps(_mm_and_si128(h, _mm_set1_epi16(static_cast<short>(0xBFFF))));
    }
    // out[0, count) = the fp16 of codes p[0, count) (count: a multiple of 8; nothing past it is
    // read), then kSlack zeros (Fp8HalfCodes::expand reads that far); returns out.
    static const uint16_t* stage(const uint8_t* p, int64_t count, uint16_t* out) {
        const __m256i keep = _mm256_set1_epi16(static_cast<short>(0xBFFF));
        int64_t i = 0;
#pragma GCC unroll 4
        for (; i + 16 <= count; i += 16) {
            const __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_and_si256(_mm256_slli_epi16(h, 7), keep));
        }
        if (i < count) {
            const __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + i)));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                             _mm_and_si128(_mm_slli_epi16(h, 7), _mm256_castsi256_si128(keep)));
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + count), _mm_setzero_si128());
        return out;
    }
};

inline unsigned popcnt64(uint64_t v) { return static_cast<unsigned>(_mm_popcnt_u64(v)); }

// Rank of column 8q's code in the row: independent popcounts of mask prefixes, not a running
// sum, so the 8 loads of a row do not wait on each other.
inline unsigned prefix(uint64_t m, unsigned q) { return popcnt64(_bzhi_u64(m, 8 * q)); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The 8 vectors of a row segment (unscaled).
template <class C>
inline void expand_row(uint64_t m, const typename C::Raw* p, __m256 w[8]) {
    const uint8_t* mb = reinterpret_cast<const uint8_t*>(&m);
#pragma GCC unroll 8
    for (unsigned q = 0; q < 8; ++q) w[q] = C::expand(p + prefix(m, q), mb[q]);
}

// --- n = 1, expand form ----------------------------------------------------------------------

// acc[r] += row r of the tile . x (x: the tile's 64 values). Columns 0-31 and 32-63 are two
// FMA chains; kGroup32 scales each with its own scale (s: the row's scales of this tile, stride
// sstride per row, the upper half's at s[s_hi]: group32_upper), the other modes add both
// unscaled.
template <class C, int MODE>
__attribute__((noinline)) void tile_expand_n1(const uint64_t* masks, const typename C::Raw* p, const float* x,
                                              __m256* acc, int64_t rows, const float* s, int64_t sstride,
                                              int64_t s_hi) {
    __m256 xr[8];  // in registers: a memory operand per FMA is one more load per mask byte
#pragma GCC unroll 8
    for (int q = 0; q < 8; ++q) xr[q] = _mm256_loadu_ps(x + 8 * q);
    const __m256 unit = _mm256_set1_ps(C::kUnit);
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = masks[r];
        if (!m) continue;  // x is finite (bitmap_quant.h): an empty row adds nothing
        const uint8_t* mb = reinterpret_cast<const uint8_t*>(masks + r);
        __m256 a0 = _mm256_mul_ps(C::expand(p, mb[0]), xr[0]);
        __m256 a1 = _mm256_mul_ps(C::expand(p + prefix(m, 4), mb[4]), xr[4]);
#pragma GCC unroll 4
        for (unsigned q = 1; q < 4; ++q) {
            a0 = _mm256_fmadd_ps(C::expand(p + prefix(m, q), mb[q]), xr[q], a0);
            a1 = _mm256_fmadd_ps(C::expand(p + prefix(m, q + 4), mb[q + 4]), xr[q + 4], a1);
        }
        if (MODE == kGroup32) {
            const __m256 s0 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride), unit);
            const __m256 s1 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride + s_hi), unit);
            acc[r] = _mm256_fmadd_ps(s1, a1, _mm256_fmadd_ps(s0, a0, acc[r]));
        } else {
            acc[r] = _mm256_add_ps(acc[r], _mm256_add_ps(a0, a1));
        }
        p += popcnt64(m);
    }
}

// --- n = 1, slots of 8 nonzeros --------------------------------------------------------------

// The column of m's next set bit (m loses it). Past the last set bit tzcnt gives 64: x[64]
// must be finite (the next tile's first value, or zero padding), and the caller zeroes the
// codes of those lanes.
inline uint64_t next_column(uint64_t& m) {
    const uint64_t c = _tzcnt_u64(m);
    m = _blsr_u64(m);
    return c;
}

// v with lane I replaced by *p: vinsertps from memory (see bitmap_avx2.cpp).
template <int I>
inline __m128 insert_lane(__m128 v, const float* p) {
    __asm__("vinsertps %3, %2, %1, %0" : "=x"(v) : "x"(v), "m"(*p), "i"(I << 4));
    return v;
}

inline __m256 gather_slot(const float* x, uint64_t& m) {
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

// One slot: acc += (the codes at p of m's next 8 nonzeros, scaled for kGroup32 by s0 in the
// lanes of columns < 32 and s1 in the others) . (x at their columns); returns what is left of m.
template <class C, int MODE>
inline uint64_t slot(const uint8_t* p, uint64_t m, const float* x, __m256& acc, __m256 s0, __m256 s1) {
    const __m256 keep = _mm256_load_ps(reinterpret_cast<const float*>(kQTables.first_lanes[popcnt64(m)]));
    __m256 v = _mm256_and_ps(C::load8(p), keep);
    if (MODE == kGroup32) {
        const __m256 low = _mm256_load_ps(reinterpret_cast<const float*>(kQTables.first_lanes[popcnt64(m & 0xffffffffu)]));
        v = _mm256_mul_ps(v, _mm256_blendv_ps(s1, s0, low));
    }
    const __m256 xg = gather_slot(x, m);
    acc = _mm256_fmadd_ps(v, xg, acc);
    return m;
}

// acc[r] += row r of the tile . x. Pass 1 takes every row's first 8 nonzeros; rows with more are
// appended (branch-free) to a work list that the next pass takes 8 more of, and so on.
template <class C, int MODE>
__attribute__((noinline)) void tile_slots_n1(const uint64_t* masks, const uint8_t* p, const float* x, __m256* acc,
                                             int64_t rows, const float* s, int64_t sstride, int64_t s_hi) {
    int32_t row_of[64];
    const uint8_t* at[64];
    uint64_t left[64];
    int64_t count = 0;
    const __m256 unit = _mm256_set1_ps(C::kUnit);
    __m256 s0 = unit, s1 = unit;
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = masks[r];
        if (MODE == kGroup32) {
            s0 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride), unit);
            s1 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride + s_hi), unit);
        }
        const uint64_t rest = slot<C, MODE>(p, m, x, acc[r], s0, s1);
        row_of[count] = static_cast<int32_t>(r);
        at[count] = p + 8;
        left[count] = rest;
        count += rest != 0;
        p += popcnt64(m);
    }
    while (count) {
        int64_t next = 0;
        for (int64_t e = 0; e < count; ++e) {
            const int32_t r = row_of[e];
            const uint8_t* q = at[e];
            if (MODE == kGroup32) {
                s0 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride), unit);
                s1 = _mm256_mul_ps(_mm256_broadcast_ss(s + r * sstride + s_hi), unit);
            }
            const uint64_t rest = slot<C, MODE>(q, left[e], x, acc[r], s0, s1);
            row_of[next] = r;
            at[next] = q + 8;
            left[next] = rest;
            next += rest != 0;
        }
        count = next;
    }
}

// --- tiles -----------------------------------------------------------------------------------

// The slots form for tiles of at most this many stored codes (about 64 rows times the crossover
// of codes a row): expand costs the same whatever the mask (fp8, staged as fp16, about 1.2x
// int8's time), slots one pass per 8 nonzeros of a row (about 50 instructions at 90 %
// sparsity). Crossovers timed on Zen 5 (4096x4096, uniform masks, one thread, 2026-12-04): int8
// at about 7.5 codes a row, fp8 at about 9.
template <class C>
inline bool slots_tile(int64_t codes, int form) {
    if (form == 1) return false;  // kFormExpand
    if (form == 2) return true;   // kFormSparse
    return 2 * codes <= 64 * C::kSlotsMaxCodesPerRowX2;
}

struct TileCodes {
    explicit TileCodes(const QuantBitmapWeight& w) : base(w.values), num_values(w.num_values) {}
    const uint8_t* base;
    int64_t num_values;
    alignas(32) uint8_t tail[64 * 64 + kSlack];  // not initialized: only get() writes and reads it
    // The tile's codes, from a zero-padded copy if its loads could run past the buffer.
    const uint8_t* get(int64_t start, int64_t count) {
        if (start + count + kSlack <= num_values) return base + start;
        std::memcpy(tail, base + start, count);
        std::memset(tail + count, 0, kSlack);
        return tail;
    }
};

template <class C, int MODE>
void spmm_n1(const QuantBitmapWeight& w, const float* x, const float* bias, float* y, int64_t tr0, int64_t tr1,
             int form) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t kp = kt_count * 64;
    const int64_t tiles_per_group = MODE == kGroupTiles ? w.group_size / 64 : 1;
    alignas(32) __m256 acc[64];
    alignas(32) __m256 tot[64];
    alignas(32) float x_last[128];  // the last tile's x, then zeros (slots read x[64])
    using Staged = typename C::Staged;
    alignas(32) typename Staged::Raw staged[64 * 64 + kSlack];  // see C::stage
    std::memcpy(x_last, x + kp - 64, 64 * sizeof(float));
    std::memset(x_last + 64, 0, 64 * sizeof(float));
    TileCodes tc(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        const float* srow0 = w.scales + row0 * w.groups;
        for (int64_t r = 0; r < rows; ++r) acc[r] = tot[r] = _mm256_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t count = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
            if (count != 0) {
                const uint64_t* masks = w.masks + t * 64;
                const uint8_t* p = tc.get(start, count);
                const float* xk = kt + 1 < kt_count ? x + kt * 64 : x_last;
                const float* s = srow0 + 2 * kt;  // kGroup32 only
                const int64_t s_hi = group32_upper(kt, w.groups);
                if (slots_tile<C>(count, form))
                    tile_slots_n1<C, MODE>(masks, p, xk, acc, rows, s, w.groups, s_hi);
                else
                    tile_expand_n1<Staged, MODE>(masks, C::stage(p, count, staged), xk, acc, rows, s, w.groups,
                                                 s_hi);
            }
            if (MODE == kGroupTiles && ((kt + 1) % tiles_per_group == 0 || kt + 1 == kt_count)) {
                const __m256 unit = _mm256_set1_ps(C::kUnit);
                const float* s = srow0 + kt / tiles_per_group;
                for (int64_t r = 0; r < rows; ++r) {
                    tot[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_broadcast_ss(s + r * w.groups), unit), acc[r], tot[r]);
                    acc[r] = _mm256_setzero_ps();
                }
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            const float b = bias ? bias[row0 + r] : 0.0f;
            if (MODE == kRow)
                y[row0 + r] = hsum(acc[r]) * (srow0[r] * C::kUnit) + b;
            else if (MODE == kGroup32)
                y[row0 + r] = hsum(acc[r]) + b;
            else
                y[row0 + r] = hsum(tot[r]) + b;
        }
    }
}

// The scale(s) of row r for tile kt, times the code unit: lo for columns 0-31, hi for 32-63.
template <class C, int MODE>
inline void segment_scales(const float* srow, int64_t kt, int64_t groups, int64_t group_size, __m256& lo,
                           __m256& hi) {
    if (MODE == kGroup32) {
        lo = _mm256_set1_ps(srow[2 * kt] * C::kUnit);
        hi = _mm256_set1_ps(srow[2 * kt + group32_upper(kt, groups)] * C::kUnit);
    } else {
        lo = hi = _mm256_set1_ps(srow[MODE == kRow ? 0 : (kt * 64) / group_size] * C::kUnit);
    }
}

// --- 2 <= n <= kQuantMaxRows -----------------------------------------------------------------

// acc[r * n + i] += row r of the tile (scaled) . x row i: each row segment expanded once.
template <class C, int MODE>
__attribute__((noinline)) void tile_expand_rows(const uint64_t* masks, const typename C::Raw* p, const float* x, int64_t ldx,
                                                int64_t n, __m256* acc, int64_t rows, const float* srow0,
                                                int64_t groups, int64_t kt, int64_t group_size) {
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t m = masks[r];
        if (!m) continue;
        __m256 wv[8];
        expand_row<C>(m, p, wv);
        p += popcnt64(m);
        __m256 lo, hi;
        segment_scales<C, MODE>(srow0 + r * groups, kt, groups, group_size, lo, hi);
        for (int64_t i = 0; i < n; ++i) {
            const float* xi = x + i * ldx;
            __m256 a0 = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xi));
            __m256 a1 = _mm256_mul_ps(wv[4], _mm256_loadu_ps(xi + 32));
#pragma GCC unroll 4
            for (int q = 1; q < 4; ++q) {
                a0 = _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(xi + 8 * q), a0);
                a1 = _mm256_fmadd_ps(wv[q + 4], _mm256_loadu_ps(xi + 8 * q + 32), a1);
            }
            acc[r * n + i] = _mm256_fmadd_ps(hi, a1, _mm256_fmadd_ps(lo, a0, acc[r * n + i]));
        }
    }
}

template <class C, int MODE>
void spmm_rows(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias, float* y,
               int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    alignas(32) __m256 acc[64 * kQuantMaxRows];
    using Staged = typename C::Staged;
    alignas(32) typename Staged::Raw staged[64 * 64 + kSlack];  // see C::stage
    TileCodes tc(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t count = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
            if (count == 0) continue;
            tile_expand_rows<Staged, MODE>(w.masks + t * 64, C::stage(tc.get(start, count), count, staged),
                                           x + kt * 64, ldx, n, acc, rows, w.scales + row0 * w.groups, w.groups,
                                           kt, w.group_size);
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = hsum(acc[r * n + i]) + (bias ? bias[row0 + r] : 0.0f);
    }
}

// --- dequantized rows (decode, and the blocked kernel's buffer) --------------------------------

// Rows [0, rows) of tile columns [kt0, kt1) of tile row tr, dequantized to fp32 into dst (row
// stride ldd floats, column kt0 * 64 first); columns past k as zeros when `full`, otherwise not
// written.
template <class C, int MODE>
void dequant_tiles(const QuantBitmapWeight& w, TileCodes& tc, int64_t tr, int64_t rows, int64_t kt0, int64_t kt1,
                   float* dst, int64_t ldd, bool full) {
    const int64_t kt_count = (w.k + 63) / 64;
    for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t t = tr * kt_count + kt;
        const uint64_t* masks = w.masks + t * 64;
        const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
        const uint8_t* p = tc.get(start, static_cast<int64_t>(w.offsets[t + 1]) * 8 - start);
        const int64_t cols = full ? 64 : ((w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64);
        for (int64_t r = 0; r < rows; ++r) {
            const uint64_t m = masks[r];
            __m256 wv[8];
            expand_row<C>(m, p, wv);
            p += popcnt64(m);
            __m256 lo, hi;
            segment_scales<C, MODE>(w.scales + (tr * 64 + r) * w.groups, kt, w.groups, w.group_size, lo, hi);
            float* out = dst + r * ldd + (kt - kt0) * 64;
            alignas(32) float row[64];
            float* target = cols == 64 ? out : row;
#pragma GCC unroll 8
            for (int q = 0; q < 8; ++q) _mm256_storeu_ps(target + 8 * q, _mm256_mul_ps(wv[q], q < 4 ? lo : hi));
            if (cols != 64) std::memcpy(out, row, cols * sizeof(float));
        }
    }
}

template <class C, int MODE>
void decode_impl(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    TileCodes tc(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t rows = (w.m - tr * 64) < 64 ? (w.m - tr * 64) : 64;
        dequant_tiles<C, MODE>(w, tc, tr, rows, 0, kt_count, out + (tr - tr0) * 64 * ldo, ldo, false);
    }
}

// --- any n: dequantized blocks times x -------------------------------------------------------

// yacc[r * n + j] += sum_c buf[r, c] * x[j, c] for 64 rows r and NB rows j of x: 4 weight rows by
// NB rows of x per pass (4 NB accumulators, 4 weight vectors and one x vector in 16 registers).
template <int NB>
void micro_block(const float* buf, int64_t kc, const float* x, int64_t ldx, float* yacc, int64_t n) {
    for (int r = 0; r < 64; r += 4) {
        __m256 a[4][NB];
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) a[q][j] = _mm256_setzero_ps();
        const float* wb = buf + r * kc;
        for (int64_t c = 0; c < kc; c += 8) {
            __m256 wv[4];
            for (int q = 0; q < 4; ++q) wv[q] = _mm256_load_ps(wb + q * kc + c);
            for (int j = 0; j < NB; ++j) {
                const __m256 xv = _mm256_loadu_ps(x + j * ldx + c);
                for (int q = 0; q < 4; ++q) a[q][j] = _mm256_fmadd_ps(wv[q], xv, a[q][j]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) yacc[(r + q) * n + j] += hsum(a[q][j]);
    }
}

template <class C, int MODE>
void spmm_blocked(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias, float* y,
                  int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t block_tiles = kQuantBlockK / 64;
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    float* yacc = reinterpret_cast<float*>(base);
    float* buf = reinterpret_cast<float*>(base + ((64 * n * 4 + 63) & ~int64_t(63)));
    TileCodes tc(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t i = 0; i < 64 * n; ++i) yacc[i] = 0.0f;
        for (int64_t kt0 = 0; kt0 < kt_count; kt0 += block_tiles) {
            const int64_t kt1 = (kt0 + block_tiles) < kt_count ? (kt0 + block_tiles) : kt_count;
            const int64_t kc = (kt1 - kt0) * 64;
            // Rows past m multiply zeros (their results are not stored).
            for (int64_t i = rows * kc; i < 64 * kc; ++i) buf[i] = 0.0f;
            dequant_tiles<C, MODE>(w, tc, tr, rows, kt0, kt1, buf, kc, true);
            const float* xb = x + kt0 * 64;
            int64_t i = 0;
            for (; i + 2 <= n; i += 2) micro_block<2>(buf, kc, xb + i * ldx, ldx, yacc + i, n);
            if (i < n) micro_block<1>(buf, kc, xb + i * ldx, ldx, yacc + i, n);
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = yacc[r * n + i] + (bias ? bias[row0 + r] : 0.0f);
    }
}

int mode_of(const QuantBitmapWeight& w) {
    if (w.groups == 1) return kRow;
    return w.group_size == 32 ? kGroup32 : kGroupTiles;
}

// One instantiation per (code type, scale mode): CALL(C, MODE).
#define FLASHSPARSE_QUANT_AVX2_DISPATCH(w, CALL)               \
    do {                                                       \
        const int mode_ = mode_of(w);                          \
        if ((w).quant == QuantType::Int8) {                    \
            if (mode_ == kRow) CALL(Int8Codes, kRow);          \
            else if (mode_ == kGroup32) CALL(Int8Codes, kGroup32); \
            else CALL(Int8Codes, kGroupTiles);                 \
        } else {                                               \
            if (mode_ == kRow) CALL(Fp8Codes, kRow);           \
            else if (mode_ == kGroup32) CALL(Fp8Codes, kGroup32); \
            else CALL(Fp8Codes, kGroupTiles);                  \
        }                                                      \
    } while (0)

}  // namespace

void quant_spmm_avx2_forms(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                           float* y, int64_t ldy, int64_t tr0, int64_t tr1, int form) {
    if (n == 1) {
#define CALL_N1(C, M) return spmm_n1<C, M>(w, x, bias, y, tr0, tr1, form)
        FLASHSPARSE_QUANT_AVX2_DISPATCH(w, CALL_N1);
#undef CALL_N1
    }
#define CALL_ROWS(C, M) return spmm_rows<C, M>(w, x, n, ldx, bias, y, ldy, tr0, tr1)
    FLASHSPARSE_QUANT_AVX2_DISPATCH(w, CALL_ROWS);
#undef CALL_ROWS
}

void quant_spmm_avx2(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias, float* y,
                     int64_t ldy, int64_t tr0, int64_t tr1) {
    quant_spmm_avx2_forms(w, x, n, ldx, bias, y, ldy, tr0, tr1, 0);
}

void quant_spmm_blocked_avx2(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                             float* y, int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
#define CALL_BLOCKED(C, M) return spmm_blocked<C, M>(w, x, n, ldx, bias, y, ldy, tr0, tr1, scratch)
    FLASHSPARSE_QUANT_AVX2_DISPATCH(w, CALL_BLOCKED);
#undef CALL_BLOCKED
}

void quant_decode_avx2(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
#define CALL_DECODE(C, M) return decode_impl<C, M>(w, out, ldo, tr0, tr1)
    FLASHSPARSE_QUANT_AVX2_DISPATCH(w, CALL_DECODE);
#undef CALL_DECODE
}

}  // namespace cpu
}  // namespace flashsparse

#endif  // x86: elsewhere bitmap_isa_stubs.cpp defines these entry points
