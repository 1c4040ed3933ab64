// AVX-512 path for quantized bitmap weights (F/BW/VL/VBMI2 + F16C): each 16-column quarter of a
// row segment is rebuilt with one vexpandps from its codes converted to fp32 in registers (see
// rebuild()); the weights multiply fp32 x with FMAs, accumulating in fp32. Rows of few nonzeros
// at n = 1 gather x at their columns instead (vpcompressb of the column numbers).
//
// Codes to fp32: int8 by sign extension and vcvtdq2ps; fp8 e4m3 by sign-extending to 16 bits,
// shifting left by 7 and clearing bit 14 (the fp16 with the code's exponent and mantissa bits,
// value / 256 for normal and subnormal codes; see bitmap_quant.h) and vcvtph2ps, which converts
// fp16 subnormals exactly. The factor 256 is folded into the scales. With bf16 x at n = 1, codes
// become bf16 words instead and multiply with vdpbf16ps: gathered fp8 codes by byte lookups of
// their magnitude (fp8_to_bf16_lookup), gathered int8 codes through fp32, rebuilt rows of either
// by byte lookups before a byte expand (expand_codes_to_bf16).
//
// Scales: with one scale per row the accumulators sum unscaled products and each row's sum is
// scaled once at the end. Groups of 64 or more columns (whole tile rows) scale a row's
// accumulator into a second one at the end of each group (one FMA per row and group); groups of
// 32 split each row segment's products into two halves, each scaled once. With more than one
// row of x the dequantized weights are scaled in registers (shared by the rows of x).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bitmap_quant.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vbmi2,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace flashsparse {
namespace cpu {
namespace {

enum Mode : int { kRow = 0, kGroup32 = 1, kGroupTiles = 2 };
enum Code : int { kInt8 = 0, kFp8 = 1 };

inline __mmask16 low_mask16(unsigned count) { return static_cast<__mmask16>(_bzhi_u32(0xffffu, count)); }

// 16 codes (the low 16 bytes) as fp32 (fp8: value / 256).
template <int Q>
inline __m512 codes16(__m128i c) {
    if (Q == kInt8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c));
    const __m256i h = _mm256_slli_epi16(_mm256_cvtepi8_epi16(c), 7);
    return _mm512_cvtph_ps(_mm256_and_si256(h, _mm256_set1_epi16(static_cast<short>(0xBFFF))));
}

// The 64 weights of a row segment as four fp32 vectors (fp8: value / 256), zero where the
// mask is clear: each 16-column quarter's codes are loaded from their popcount offset,
// converted, and expanded in the fp32 domain (vexpandps). On Zen 4/5 this took about 6.5 TSC
// ticks per segment (int8) against about 17 for a byte expand (vpexpandb) of the whole segment
// followed by the conversions, and masked loads cost 2-3 ticks more than plain ones. Plain
// 16-byte loads read up to 15 bytes past a row's codes: SAFE (the tiles near the end of the
// values buffer) masks them.
template <int Q, bool SAFE>
inline void rebuild(uint64_t mk, const uint8_t* p, __m512 w[4]) {
    const unsigned c1 = static_cast<unsigned>(_mm_popcnt_u64(mk & 0xffffull));
    const unsigned c2 = static_cast<unsigned>(_mm_popcnt_u64(mk & 0xffffffffull));
    const unsigned c3 = static_cast<unsigned>(_mm_popcnt_u64(mk & 0xffffffffffffull));
    const unsigned starts[4] = {0u, c1, c2, c3};
    for (int q = 0; q < 4; ++q) {
        __m128i codes;
        if (SAFE) {
            const unsigned end = q == 3 ? static_cast<unsigned>(_mm_popcnt_u64(mk)) : starts[q + 1];
            codes = _mm_maskz_loadu_epi8(low_mask16(end - starts[q]), p + starts[q]);
        } else {
            codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + starts[q]));
        }
        w[q] = _mm512_maskz_expand_ps(static_cast<__mmask16>(mk >> (16 * q)), codes16<Q>(codes));
    }
}

// Byte i is i: compressed under a row mask, it lists the row's nonzero columns.
alignas(64) constexpr uint8_t kColumnIota[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
    44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};

// fp8 e4m3 subnormal codes (exponent field 0, mantissa m) as bf16 words worth m * 2^-9 / 256,
// indexed by m (vpermw reads the low 5 bits of the code's magnitude, which is m for them).
struct Fp8SubnormalBf16 {
    alignas(64) uint16_t words[32];
    constexpr Fp8SubnormalBf16() : words{} {
        for (int m = 1; m < 8; ++m) {
            const int h = m >= 4 ? 2 : m >= 2 ? 1 : 0;  // highest set bit of m
            words[m] = static_cast<uint16_t>(((127 + h - 17) << 7) | ((m - (1 << h)) << (7 - h)));
        }
    }
};
constexpr Fp8SubnormalBf16 kFp8SubnormalBf16{};

// Every code's bf16 word (int8: the code; fp8: value / 256, the unit the fp8 scales carry),
// split into a low-byte and a high-byte plane of 256 entries each, for byte lookups (vpermi2b
// reads 128 entries from two registers; the code's bit 7 picks the half).
struct CodeBf16Bytes {
    alignas(64) uint8_t lo[256];
    alignas(64) uint8_t hi[256];
    constexpr CodeBf16Bytes(int q) : lo{}, hi{} {
        for (int c = 0; c < 256; ++c) {
            int word = 0;
            if (q == kInt8) {
                const int v = c < 128 ? c : c - 256;
                const int a = v < 0 ? -v : v;
                if (a != 0) {
                    int e = 0;
                    while ((a >> (e + 1)) != 0) ++e;
                    word = ((127 + e) << 7) | ((a << (7 - e)) & 0x7f);  // exact: at most 8 bits
                }
                if (v < 0) word |= 0x8000;
            } else {
                const int mag = c & 0x7f;
                word = (mag >> 3) != 0 ? (mag << 4) + (112 << 7) : kFp8SubnormalBf16.words[mag];
                if (c & 0x80) word |= 0x8000;
            }
            lo[c] = static_cast<uint8_t>(word & 0xff);
            hi[c] = static_cast<uint8_t>(word >> 8);
        }
    }
};
constexpr CodeBf16Bytes kCodeBf16Bytes[2] = {CodeBf16Bytes(kInt8), CodeBf16Bytes(kFp8)};

// The tables of code type Q in registers (lo halves 0-1, hi halves 2-3, each 128 entries).
struct CodeTables {
    __m512i t[8];
};
// HOISTABLE = false: loaded where called, not hoisted out of the caller's loop (the address
// goes through an empty asm), for rows that rarely need them.
template <int Q, bool HOISTABLE = true>
inline CodeTables load_code_tables() {
    const CodeBf16Bytes* tables = &kCodeBf16Bytes[Q];
    if (!HOISTABLE) __asm__ volatile("" : "+r"(tables));
    CodeTables ct;
    for (int h = 0; h < 4; ++h) {
        ct.t[h] = _mm512_load_si512(tables->lo + 64 * h);
        ct.t[4 + h] = _mm512_load_si512(tables->hi + 64 * h);
    }
    return ct;
}

// fp8 codes to bf16 words by byte lookups (the gathering forms): a code's magnitude (its low
// 7 bits, which is all vpermi2b reads from an index byte) picks its word's two bytes from the
// first 128 entries of each kCodeBf16Bytes plane, the sign is or-ed into the high byte and one
// byte permute interleaves the planes into words. Four vector ops for up to 32 codes, against
// eight for moving the bits (exponent rebased) with a table for the subnormal codes: about 5 %
// fewer ticks per row at 90 % sparsity and 7-9 % at 65-80 % (where fp8 rows are now gathered
// up to 32 nonzeros, as int8's; they were rebuilt above 12 a row), C++ harness on Zen 5.
struct Fp8Lookup {
    __m512i lo0, lo1, hi0, hi1, weave;
};
alignas(64) constexpr uint8_t kWeaveBytes[64] = {
    0,  64, 1,  65, 2,  66, 3,  67, 4,  68, 5,  69, 6,  70, 7,  71, 8,  72, 9,  73, 10, 74,
    11, 75, 12, 76, 13, 77, 14, 78, 15, 79, 16, 80, 17, 81, 18, 82, 19, 83, 20, 84, 21, 85,
    22, 86, 23, 87, 24, 88, 25, 89, 26, 90, 27, 91, 28, 92, 29, 93, 30, 94, 31, 95};
inline Fp8Lookup load_fp8_lookup() {
    const CodeBf16Bytes& t = kCodeBf16Bytes[kFp8];
    return {_mm512_load_si512(t.lo), _mm512_load_si512(t.lo + 64), _mm512_load_si512(t.hi),
            _mm512_load_si512(t.hi + 64), _mm512_load_si512(kWeaveBytes)};
}
inline __m512i fp8_to_bf16_lookup(__m256i c, const Fp8Lookup& t) {
    const __m512i cz = _mm512_castsi256_si512(c);
    const __m512i lo = _mm512_permutex2var_epi8(t.lo0, cz, t.lo1);
    __m512i hi = _mm512_permutex2var_epi8(t.hi0, cz, t.hi1);
    hi = _mm512_ternarylogic_epi32(hi, cz, _mm512_set1_epi8(static_cast<char>(0x80)), 0xF8);  // hi | (c & 0x80)
    return _mm512_permutex2var_epi8(lo, t.weave, hi);
}

// The bf16 words of a row's packed codes (one per byte of `packed`) expanded to the row's 64
// columns under mask mk, in the order of _mm512_unpack{lo,hi}_epi8: w0 holds columns 0-7,
// 16-23, 32-39, 48-55, w1 columns 8-15, 24-31, 40-47, 56-63 (kXUnpackOrder puts x in the same
// order). The codes are looked up first and the two byte planes expanded after: a vpexpandb
// result used as a shuffle control cost about four times as much on Zen 5.
inline void expand_codes_to_bf16(uint64_t mk, __m512i packed, const CodeTables& ct, __m512i& w0, __m512i& w1) {
    const __mmask64 upper = _mm512_movepi8_mask(packed);  // codes 128-255
    const __m512i lo = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(ct.t[0], packed, ct.t[1]),
                                              _mm512_permutex2var_epi8(ct.t[2], packed, ct.t[3]));
    const __m512i hi = _mm512_mask_blend_epi8(upper, _mm512_permutex2var_epi8(ct.t[4], packed, ct.t[5]),
                                              _mm512_permutex2var_epi8(ct.t[6], packed, ct.t[7]));
    const __m512i elo = _mm512_maskz_expand_epi8(mk, lo), ehi = _mm512_maskz_expand_epi8(mk, hi);
    w0 = _mm512_unpacklo_epi8(elo, ehi);
    w1 = _mm512_unpackhi_epi8(elo, ehi);
}

// Word indices into (x0: columns 0-31, x1: columns 32-63) that put x in codes64_to_bf16's order.
struct XUnpackOrder {
    alignas(64) uint16_t idx[2][32];
    constexpr XUnpackOrder() : idx{} {
        for (int h = 0; h < 2; ++h)
            for (int i = 0; i < 32; ++i) idx[h][i] = static_cast<uint16_t>(16 * (i / 8) + 8 * h + i % 8);
    }
};
constexpr XUnpackOrder kXUnpackOrder{};

// Software prefetch of the codes a few rows ahead (and of the next tile's masks): without it a
// tile streamed from DRAM took about twice as long at 70-90 % sparsity (the hardware prefetchers
// did not run far enough ahead of the popcount-chained code loads).
// Codes 512 bytes ahead (256 to 2048 measured the same); masks two tiles ahead (a line per 8 rows).
inline void prefetch_ahead(const uint64_t* masks, const uint8_t* p, int64_t r) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + 512, _MM_HINT_T0);
    if ((r & 7) == 0) _mm_prefetch(reinterpret_cast<const char*>(masks + r + 128), _MM_HINT_T0);
}

// n = 1, one tile: acc[r] += row r of the tile . x (x: the tile's 64 columns), in two forms.
// - Dense: each row segment is rebuilt (vpexpandb) and multiplied as 64 weights (4 FMAs).
// - Sparse, for tiles of few codes: a row with at most 16 nonzeros is one FMA of its codes with
//   x gathered at their columns (vpcompressb of the column numbers, two-register permutes of x,
//   which stays in registers). Lanes past the row's count multiply zero codes by a finite x.
//   Denser rows are rebuilt.
// kGroup32: s points at the row's scales of this tile (stride sstride per row; the upper half's
// at s[s_hi]: group32_upper), applied here;
// other modes leave the sums unscaled. A function of its own, not inlined into the tile loop (a
// loop inside a larger function kept its state on the stack, as in bitmap_avx512.cpp).
template <int Q, int MODE, bool SPARSE, bool SAFE>
__attribute__((noinline)) void tile_n1(const uint64_t* masks, const uint8_t* p, const float* x, __m512* acc,
                                       int64_t rows, const float* s, int64_t sstride, int64_t s_hi, float unit) {
    __m512 xr[4];
    for (int q = 0; q < 4; ++q) xr[q] = _mm512_loadu_ps(x + 16 * q);
    const __m512i columns = _mm512_load_si512(kColumnIota);
    const __m512i high_half = _mm512_set1_epi32(32);
    for (int64_t r = 0; r < rows; ++r) {
        prefetch_ahead(masks, p, r);
        const uint64_t mk = masks[r];
        const unsigned count = static_cast<unsigned>(_mm_popcnt_u64(mk));
        if (SPARSE && count <= 16) {
            const __m512i nz = _mm512_mask_compress_epi8(columns, mk, columns);
            const __m512i col = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(nz));
            const __m512 lo = _mm512_permutex2var_ps(xr[0], col, xr[1]);
            const __m512 hi = _mm512_permutex2var_ps(xr[2], col, xr[3]);
            const __mmask16 upper = _mm512_test_epi32_mask(col, high_half);
            const __m512 xg = _mm512_mask_blend_ps(upper, lo, hi);
            __m512 v = codes16<Q>(_mm_maskz_loadu_epi8(low_mask16(count), p));
            if (MODE == kGroup32) {
                const __m512 sv = _mm512_mask_blend_ps(upper, _mm512_set1_ps(s[r * sstride] * unit),
                                                       _mm512_set1_ps(s[r * sstride + s_hi] * unit));
                v = _mm512_mul_ps(v, sv);
            }
            acc[r] = _mm512_fmadd_ps(v, xg, acc[r]);
        } else {
            __m512 w[4];
            rebuild<Q, SAFE>(mk, p, w);
            if (MODE == kGroup32) {
                const __m512 lo = _mm512_fmadd_ps(w[1], xr[1], _mm512_mul_ps(w[0], xr[0]));
                const __m512 hi = _mm512_fmadd_ps(w[3], xr[3], _mm512_mul_ps(w[2], xr[2]));
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * sstride + s_hi] * unit), hi,
                                         _mm512_fmadd_ps(_mm512_set1_ps(s[r * sstride] * unit), lo, acc[r]));
            } else {
                // Two chains: a row's four FMAs are not one dependency chain.
                const __m512 a = _mm512_fmadd_ps(w[2], xr[2], _mm512_fmadd_ps(w[0], xr[0], acc[r]));
                const __m512 b = _mm512_fmadd_ps(w[3], xr[3], _mm512_mul_ps(w[1], xr[1]));
                acc[r] = _mm512_add_ps(a, b);
            }
        }
        p += count;
    }
}

// The sparse form for tiles of at most this many stored codes (15 a row on average): below it
// most rows have at most 16 nonzeros.
constexpr int64_t kSparseTileMaxValues = 64 * 15;

// n = 1 with bf16 x (the common decode case), one scale per row or per whole tile rows: a row
// with at most 32 nonzeros is one vdpbf16ps of its codes (converted to bf16, exact: int8 codes
// and fp8 values / 256 have at most 8 significant bits) with x gathered at their columns by one
// word permute of the 64 bf16 x values held in two registers (vpcompressb lists the columns).
// Denser rows are rebuilt (expand_codes_to_bf16). In a C++ harness on Zen 5 (4096 x 4096, random
// masks, one thread, data in L3) this took 2.8 / 3.7 / 4.1 TSC ticks per row segment for int8
// and 3.3 / 3.5 / 3.6 for fp8 at 90 / 70 / 50 % sparsity (6.7 and 5.6 at 50 % when rebuilt rows
// expanded 16 fp32 or 32 bf16 lanes at a time after converting).
// vdpbf16ps treats bf16 denormals (|x| < 1.2e-38) as zero;
// their products are below float32's normal range anyway.
// One row of a tile with bf16 x: gathered (at most 32 nonzeros, GATHER) or rebuilt.
template <int Q, bool GATHER, bool SAFE>
__attribute__((always_inline)) inline void row_bf16(uint64_t mk, unsigned count, const uint8_t* p, __m512i x0,
                                                    __m512i x1, __m512i xu0, __m512i xu1, const CodeTables* ct,
                                                    __m512i columns, const Fp8Lookup& f8, __m512& acc) {
    if (GATHER && count <= 32) {
        // Lanes past the row's count keep their own column numbers (the compress merges into
        // the iota) and multiply zero codes by a finite x.
        const __m512i cols = _mm512_mask_compress_epi8(columns, mk, columns);
        const __m512i xg = _mm512_permutex2var_epi16(x0, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(cols)), x1);
        const __m256i c = _mm256_maskz_loadu_epi8(_bzhi_u32(0xffffffffu, count), p);
        const __m512bh wb =
            Q == kFp8 ? reinterpret_cast<__m512bh>(fp8_to_bf16_lookup(c, f8))
                      : _mm512_cvtne2ps_pbh(codes16<Q>(_mm256_extracti128_si256(c, 1)),
                                            codes16<Q>(_mm256_castsi256_si128(c)));
        acc = _mm512_dpbf16_ps(acc, wb, reinterpret_cast<__m512bh>(xg));
    } else {
        // Rebuilt in the bf16 domain: the row's codes expanded to its 64 columns as bytes (one
        // vpexpandb), looked up as bf16 words (codes64_to_bf16), then two vdpbf16ps with x in
        // the lookup's order. About half the vector work of expanding per 16 or 32 columns after
        // converting (vpmovsxbd + vcvtdq2ps + vexpandps per 16 int8 codes; a bit move, subnormal
        // fix and vpexpandw per 32 fp8 codes), which bounded dense rows by computation.
        const __m512i packed = SAFE ? _mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, count), p) : _mm512_loadu_si512(p);
        __m512i w0, w1;
        if (GATHER) {
            // Rare in the gathering forms: the tables stay out of registers there (holding them
            // made GCC rebuild the gather's constants every row).
            expand_codes_to_bf16(mk, packed, load_code_tables<Q, false>(), w0, w1);
        } else {
            expand_codes_to_bf16(mk, packed, *ct, w0, w1);
        }
        acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w0), reinterpret_cast<__m512bh>(xu0));
        acc = _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(w1), reinterpret_cast<__m512bh>(xu1));
    }
}

// FORM: 0 = every row rebuilt; 1 = rows of at most 32 nonzeros gathered, denser ones rebuilt;
// 2 = two rows of at most 16 nonzeros each at a time: their 16 + 16 columns in one word permute
// of x and their codes in one vdpbf16ps, whose lanes 0-7 hold row r's products and 8-15 row
// r + 1's, added into pacc[r / 2] (folded into the rows' accumulators by the caller); 15 % fewer
// cycles per row than one row at a time in a C++ harness (Zen 5, 90 % sparsity). Other rows go
// one at a time. The tile loop picks the form from the tile's stored count, so that the per-row
// branches go the same way for nearly every row: a row branch that goes either way half the
// time cost as much as rebuilding every row when the tile streamed from DRAM.
template <int Q, int FORM, bool SAFE>
__attribute__((noinline)) void tile_n1_bf16(const uint64_t* masks, const uint8_t* p, const uint16_t* xb,
                                            __m512* acc, __m512* pacc, int64_t rows) {
    const __m512i x0 = _mm512_loadu_si512(xb), x1 = _mm512_loadu_si512(xb + 32);
    const __m512i xu0 = _mm512_permutex2var_epi16(x0, _mm512_load_si512(kXUnpackOrder.idx[0]), x1);
    const __m512i xu1 = _mm512_permutex2var_epi16(x0, _mm512_load_si512(kXUnpackOrder.idx[1]), x1);
    CodeTables tables;  // in registers for the form that rebuilds every row
    if (FORM == 0) tables = load_code_tables<Q>();
    const CodeTables* ct = FORM == 0 ? &tables : nullptr;
    const __m512i columns = _mm512_load_si512(kColumnIota);
    Fp8Lookup f8{};
    if (Q == kFp8 && FORM != 0) f8 = load_fp8_lookup();
    int64_t r = 0;
    if (FORM == 2) {
        for (; r + 1 < rows; r += 2) {
            prefetch_ahead(masks, p, r);
            const uint64_t m0 = masks[r], m1 = masks[r + 1];
            const unsigned c0 = static_cast<unsigned>(_mm_popcnt_u64(m0));
            const unsigned c1 = static_cast<unsigned>(_mm_popcnt_u64(m1));
            if (c0 <= 16 && c1 <= 16) {
                const __m512i k0 = _mm512_mask_compress_epi8(columns, m0, columns);
                const __m512i k1 = _mm512_mask_compress_epi8(columns, m1, columns);
                const __m512i idx = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm512_castsi512_si128(k0))),
                                                       _mm256_cvtepu8_epi16(_mm512_castsi512_si128(k1)), 1);
                const __m512i xg = _mm512_permutex2var_epi16(x0, idx, x1);
                const __m128i k0c = _mm_maskz_loadu_epi8(low_mask16(c0), p);
                const __m128i k1c = _mm_maskz_loadu_epi8(low_mask16(c1), p + c0);
                const __m512bh wb =
                    Q == kFp8
                        ? reinterpret_cast<__m512bh>(fp8_to_bf16_lookup(_mm256_inserti128_si256(_mm256_castsi128_si256(k0c), k1c, 1), f8))
                        : _mm512_cvtne2ps_pbh(codes16<Q>(k1c), codes16<Q>(k0c));
                pacc[r >> 1] = _mm512_dpbf16_ps(pacc[r >> 1], wb, reinterpret_cast<__m512bh>(xg));
            } else {
                row_bf16<Q, true, SAFE>(m0, c0, p, x0, x1, xu0, xu1, ct, columns, f8, acc[r]);
                row_bf16<Q, true, SAFE>(m1, c1, p + c0, x0, x1, xu0, xu1, ct, columns, f8, acc[r + 1]);
            }
            p += c0 + c1;
        }
    }
    for (; r < rows; ++r) {
        prefetch_ahead(masks, p, r);
        const uint64_t mk = masks[r];
        const unsigned count = static_cast<unsigned>(_mm_popcnt_u64(mk));
        row_bf16<Q, FORM != 0, SAFE>(mk, count, p, x0, x1, xu0, xu1, ct, columns, f8, acc[r]);
        p += count;
    }
}

// The pair accumulators' halves into their rows' accumulators (then cleared).
inline void fold_pairs(__m512* acc, __m512* pacc, int64_t rows) {
    for (int64_t r = 0; r < rows; ++r) {
        acc[r] = _mm512_mask_add_ps(acc[r], (r & 1) ? 0xff00 : 0x00ff, acc[r], pacc[r >> 1]);
        if (r & 1) pacc[r >> 1] = _mm512_setzero_ps();
    }
    if (rows & 1) pacc[rows >> 1] = _mm512_setzero_ps();
}

// Forms by the tile's stored codes a row (rows hold Binomial(64, density) nonzeros, a standard
// deviation of about 4), tuned on Zen 5 in a C++ harness: the 16-code form up to 12 a row on
// average, the 32-code form up to 24 (int8: 3.7 TSC ticks a row against 3.9 for rebuilding
// every row at 30-35 % density; fp8: 3.1-3.2 against 3.4-3.5 at 20-35 %), every row rebuilt
// above (at 25.6 a row the rows over 32 made the 32-code form 1.1x, at 28.8 1.8x, slower).
constexpr int64_t kNarrowTileMaxValues = 64 * 12;
constexpr int64_t kGatherTileMaxValues = 64 * 24;

template <int Q>
constexpr float code_unit() {
    return Q == kFp8 ? kFp8HalfUnit : 1.0f;
}

template <int Q, int MODE>
void spmm_n1(const QuantBitmapWeight& w, const float* x, const uint16_t* xb, const float* bias, float* y, int64_t tr0,
             int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t tiles_per_group = MODE == kGroupTiles ? w.group_size / 64 : 1;
    const float unit = code_unit<Q>();
    alignas(64) __m512 acc[64];
    alignas(64) __m512 tot[64];
    alignas(64) __m512 pacc[32];  // row pairs of tile_n1_bf16's form 2
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        const float* srow0 = w.scales + row0 * w.groups;
        for (int64_t r = 0; r < rows; ++r) acc[r] = tot[r] = _mm512_setzero_ps();
        for (int64_t r = 0; r < 32; ++r) pacc[r] = _mm512_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t stored = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
            // 64-byte code loads in tile_n1_bf16's rebuilt rows (16-byte ones in tile_n1)
            const bool safe = start + stored + 64 > w.num_values;
            if (MODE != kGroup32 && xb != nullptr) {
                const int form = stored <= kNarrowTileMaxValues ? 2 : stored <= kGatherTileMaxValues ? 1 : 0;
                const auto fn = form == 2 ? (safe ? tile_n1_bf16<Q, 2, true> : tile_n1_bf16<Q, 2, false>)
                                : form == 1 ? (safe ? tile_n1_bf16<Q, 1, true> : tile_n1_bf16<Q, 1, false>)
                                            : (safe ? tile_n1_bf16<Q, 0, true> : tile_n1_bf16<Q, 0, false>);
                fn(w.masks + t * 64, w.values + start, xb + kt * 64, acc, pacc, rows);
            } else {
                const bool sparse = stored <= kSparseTileMaxValues;
                (sparse ? (safe ? tile_n1<Q, MODE, true, true> : tile_n1<Q, MODE, true, false>)
                        : (safe ? tile_n1<Q, MODE, false, true> : tile_n1<Q, MODE, false, false>))(
                    w.masks + t * 64, w.values + start, x + kt * 64, acc, rows, srow0 + 2 * kt, w.groups,
                    group32_upper(kt, w.groups), unit);
            }
            if (MODE == kGroupTiles && ((kt + 1) % tiles_per_group == 0 || kt + 1 == kt_count)) {
                if (xb != nullptr) fold_pairs(acc, pacc, rows);
                const float* s = srow0 + kt / tiles_per_group;
                for (int64_t r = 0; r < rows; ++r) {
                    tot[r] = _mm512_fmadd_ps(_mm512_set1_ps(s[r * w.groups] * unit), acc[r], tot[r]);
                    acc[r] = _mm512_setzero_ps();
                }
            }
        }
        if (MODE == kRow && xb != nullptr) fold_pairs(acc, pacc, rows);
        for (int64_t r = 0; r < rows; ++r) {
            const float b = bias ? bias[row0 + r] : 0.0f;
            if (MODE == kRow)
                y[row0 + r] = _mm512_reduce_add_ps(acc[r]) * (srow0[r] * unit) + b;
            else if (MODE == kGroup32)
                y[row0 + r] = _mm512_reduce_add_ps(acc[r]) + b;
            else
                y[row0 + r] = _mm512_reduce_add_ps(tot[r]) + b;
        }
    }
}

// The scale(s) of row r for tile kt, times the code unit, as the four vectors of a segment.
template <int MODE>
inline void segment_scales(const float* srow, int64_t kt, int64_t groups, int64_t group_size, float unit,
                           __m512 sv[4]) {
    if (MODE == kGroup32) {
        sv[0] = sv[1] = _mm512_set1_ps(srow[2 * kt] * unit);
        sv[2] = sv[3] = _mm512_set1_ps(srow[2 * kt + group32_upper(kt, groups)] * unit);
    } else {
        sv[0] = sv[1] = sv[2] = sv[3] = _mm512_set1_ps(srow[MODE == kRow ? 0 : (kt * 64) / group_size] * unit);
    }
}

// 2 <= n <= kQuantMaxRows: each row segment is rebuilt and scaled once, then multiplied with
// every row of x.
template <int Q, int MODE>
void spmm_fused(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias, float* y,
                int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const float unit = code_unit<Q>();
    // acc[r * n + i]: packed, so that few rows of x take little of L1.
    alignas(64) __m512 acc[64 * kQuantMaxRows];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const uint8_t* p = w.values + static_cast<int64_t>(w.offsets[t]) * 8;
            const bool safe = static_cast<int64_t>(w.offsets[t + 1]) * 8 + 16 > w.num_values;
            const float* xk = x + kt * 64;
            for (int64_t r = 0; r < rows; ++r) {
                prefetch_ahead(masks, p, r);
                const uint64_t mk = masks[r];
                __m512 wv[4];
                if (safe)
                    rebuild<Q, true>(mk, p, wv);
                else
                    rebuild<Q, false>(mk, p, wv);
                p += _mm_popcnt_u64(mk);
                __m512 sv[4];
                segment_scales<MODE>(w.scales + (row0 + r) * w.groups, kt, w.groups, w.group_size, unit, sv);
                for (int q = 0; q < 4; ++q) wv[q] = _mm512_mul_ps(wv[q], sv[q]);
                for (int64_t i = 0; i < n; ++i) {
                    const float* xi = xk + i * ldx;
                    __m512 a = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xi), acc[r * n + i]);
                    a = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xi + 16), a);
                    a = _mm512_fmadd_ps(wv[2], _mm512_loadu_ps(xi + 32), a);
                    acc[r * n + i] = _mm512_fmadd_ps(wv[3], _mm512_loadu_ps(xi + 48), a);
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = _mm512_reduce_add_ps(acc[r * n + i]) + (bias ? bias[row0 + r] : 0.0f);
    }
}

// Dequantized rows [0, rows) of tile columns [kt0, kt1) of tile row tr into buf (row stride ldb
// floats; columns past k decode as zeros).
template <int Q, int MODE>
void dequant_block(const QuantBitmapWeight& w, int64_t tr, int64_t rows, int64_t kt0, int64_t kt1, float* buf,
                   int64_t ldb) {
    const int64_t kt_count = (w.k + 63) / 64;
    const float unit = code_unit<Q>();
    for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t t = tr * kt_count + kt;
        const uint64_t* masks = w.masks + t * 64;
        const uint8_t* p = w.values + static_cast<int64_t>(w.offsets[t]) * 8;
        const bool safe = static_cast<int64_t>(w.offsets[t + 1]) * 8 + 16 > w.num_values;
        for (int64_t r = 0; r < rows; ++r) {
            __m512 wv[4];
            if (safe)
                rebuild<Q, true>(masks[r], p, wv);
            else
                rebuild<Q, false>(masks[r], p, wv);
            p += _mm_popcnt_u64(masks[r]);
            __m512 sv[4];
            segment_scales<MODE>(w.scales + (tr * 64 + r) * w.groups, kt, w.groups, w.group_size, unit, sv);
            float* dst = buf + r * ldb + (kt - kt0) * 64;
            for (int q = 0; q < 4; ++q) _mm512_storeu_ps(dst + 16 * q, _mm512_mul_ps(wv[q], sv[q]));
        }
    }
}

// yacc[r * n + i] += sum_c buf[r, c] * x[i, c] for 64 rows r and NB rows i of x.
template <int NB>
void micro_block(const float* buf, int64_t kc, const float* x, int64_t ldx, float* yacc, int64_t n) {
    for (int r = 0; r < 64; r += 4) {
        __m512 a[4][NB];
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) a[q][j] = _mm512_setzero_ps();
        const float* wb = buf + r * kc;
        for (int64_t c = 0; c < kc; c += 16) {
            __m512 wv[4];
            for (int q = 0; q < 4; ++q) wv[q] = _mm512_load_ps(wb + q * kc + c);
            for (int j = 0; j < NB; ++j) {
                const __m512 xv = _mm512_loadu_ps(x + j * ldx + c);
                for (int q = 0; q < 4; ++q) a[q][j] = _mm512_fmadd_ps(wv[q], xv, a[q][j]);
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) yacc[(r + q) * n + j] += _mm512_reduce_add_ps(a[q][j]);
    }
}

template <int Q, int MODE>
void spmm_blocked(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias, float* y,
                  int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t block_tiles = kQuantBlockK / 64;
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    float* yacc = reinterpret_cast<float*>(base);
    float* buf = reinterpret_cast<float*>(base + ((64 * n * 4 + 63) & ~int64_t(63)));
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t i = 0; i < 64 * n; ++i) yacc[i] = 0.0f;
        for (int64_t kt0 = 0; kt0 < kt_count; kt0 += block_tiles) {
            const int64_t kt1 = (kt0 + block_tiles) < kt_count ? (kt0 + block_tiles) : kt_count;
            const int64_t kc = (kt1 - kt0) * 64;
            // Rows past m multiply zeros (their results are not stored).
            for (int64_t i = rows * kc; i < 64 * kc; ++i) buf[i] = 0.0f;
            dequant_block<Q, MODE>(w, tr, rows, kt0, kt1, buf, kc);
            const float* xb = x + kt0 * 64;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) micro_block<4>(buf, kc, xb + i * ldx, ldx, yacc + i, n);
            switch (n - i) {
                case 3: micro_block<3>(buf, kc, xb + i * ldx, ldx, yacc + i, n); break;
                case 2: micro_block<2>(buf, kc, xb + i * ldx, ldx, yacc + i, n); break;
                case 1: micro_block<1>(buf, kc, xb + i * ldx, ldx, yacc + i, n); break;
                default: break;
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = yacc[r * n + i] + (bias ? bias[row0 + r] : 0.0f);
    }
}

template <int Q, int MODE>
void decode_impl(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const float unit = code_unit<Q>();
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const uint8_t* p = w.values + static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t cols = (w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64;
            __mmask16 store[4];
            for (int q = 0; q < 4; ++q) {
                const int64_t c = cols - 16 * q;
                store[q] = low_mask16(c <= 0 ? 0u : (c >= 16 ? 16u : static_cast<unsigned>(c)));
            }
            const bool safe = static_cast<int64_t>(w.offsets[t + 1]) * 8 + 16 > w.num_values;
            for (int64_t r = 0; r < rows; ++r) {
                __m512 wv[4];
                if (safe)
                    rebuild<Q, true>(masks[r], p, wv);
                else
                    rebuild<Q, false>(masks[r], p, wv);
                p += _mm_popcnt_u64(masks[r]);
                __m512 sv[4];
                segment_scales<MODE>(w.scales + (row0 + r) * w.groups, kt, w.groups, w.group_size, unit, sv);
                float* dst = out + ((tr - tr0) * 64 + r) * ldo + kt * 64;
                for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(dst + 16 * q, store[q], _mm512_mul_ps(wv[q], sv[q]));
            }
        }
    }
}

int mode_of(const QuantBitmapWeight& w) {
    if (w.groups == 1) return kRow;
    return w.group_size == 32 ? kGroup32 : kGroupTiles;
}

// One instantiation per (code type, scale mode): calls fn<Q, MODE>.
#define FLASHSPARSE_QUANT_DISPATCH(w, CALL)                                     \
    do {                                                                        \
        const int mode_ = mode_of(w);                                           \
        if ((w).quant == QuantType::Int8) {                                     \
            if (mode_ == kRow) CALL(kInt8, kRow);                               \
            else if (mode_ == kGroup32) CALL(kInt8, kGroup32);                  \
            else CALL(kInt8, kGroupTiles);                                      \
        } else {                                                                \
            if (mode_ == kRow) CALL(kFp8, kRow);                                \
            else if (mode_ == kGroup32) CALL(kFp8, kGroup32);                   \
            else CALL(kFp8, kGroupTiles);                                       \
        }                                                                       \
    } while (0)

}  // namespace

void quant_spmm_avx512(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                       float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    if (n == 1) {
#define CALL_N1(Q, M) return spmm_n1<Q, M>(w, x, nullptr, bias, y, tr0, tr1)
        FLASHSPARSE_QUANT_DISPATCH(w, CALL_N1);
#undef CALL_N1
    }
#define CALL_FUSED(Q, M) return spmm_fused<Q, M>(w, x, n, ldx, bias, y, ldy, tr0, tr1)
    FLASHSPARSE_QUANT_DISPATCH(w, CALL_FUSED);
#undef CALL_FUSED
}

void quant_spmm_n1_bf16x_avx512(const QuantBitmapWeight& w, const float* x, const uint16_t* xb, const float* bias,
                                float* y, int64_t tr0, int64_t tr1) {
#define CALL_N1(Q, M) return spmm_n1<Q, M>(w, x, xb, bias, y, tr0, tr1)
    FLASHSPARSE_QUANT_DISPATCH(w, CALL_N1);
#undef CALL_N1
}

void quant_spmm_blocked_avx512(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                               float* y, int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
#define CALL_BLOCKED(Q, M) return spmm_blocked<Q, M>(w, x, n, ldx, bias, y, ldy, tr0, tr1, scratch)
    FLASHSPARSE_QUANT_DISPATCH(w, CALL_BLOCKED);
#undef CALL_BLOCKED
}

void quant_decode_avx512(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
#define CALL_DECODE(Q, M) return decode_impl<Q, M>(w, out, ldo, tr0, tr1)
    FLASHSPARSE_QUANT_DISPATCH(w, CALL_DECODE);
#undef CALL_DECODE
}

}  // namespace cpu
}  // namespace flashsparse

#endif  // x86: off x86 the stubs in bitmap_isa_stubs.cpp stand in
