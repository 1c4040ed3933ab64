// AVX-512 path (VBMI2 + BF16): vpexpandw rebuilds 32 16-bit weights from a 32-bit half of a row
// mask and the packed values in one instruction (vexpandps: 16 fp32 weights from 16 bits);
// bf16 rows multiply x with vdpbf16ps (exact bf16 products, fp32 sums), fp16 rows convert
// with vcvtph2ps. At n = 1, rows of few nonzeros skip the rebuild: x is gathered at their
// columns instead (see "n = 1" below). Masked loads never touch memory past a row's last value,
// so the end of the values buffer needs no padding.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bitmap_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi2,avx512bf16,avx2,fma,f16c,bmi,bmi2,popcnt")

namespace flashsparse {
namespace cpu {
namespace {

inline __mmask32 low_mask32(unsigned count) { return _bzhi_u32(0xffffffffu, count); }
inline __mmask16 low_mask16(unsigned count) { return static_cast<__mmask16>(_bzhi_u32(0xffffu, count)); }

// Software prefetch of tile t's masks and values (value_bytes each), issued kPrefetchTiles tiles
// ahead of the one being read. The values are read by masked and expanding loads, which the
// hardware prefetchers do not follow on every CPU: streaming a weight from DRAM took two to
// four times as long without this on a Zen 5 (bench/results/cpu-kernel-notes.md).
// always_inline: as a plain inline function GCC dropped the prefetches.
constexpr int64_t kPrefetchTiles = 2;
__attribute__((always_inline)) inline void prefetch_tile(const BitmapWeight& w, int64_t t, int64_t value_bytes) {
    if (t >= w.m_tiles() * w.k_tiles()) return;
    const char* m = reinterpret_cast<const char*>(w.masks + t * 64);
    for (int i = 0; i < 512; i += 64) _mm_prefetch(m + i, _MM_HINT_T0);
    const char* v = static_cast<const char*>(w.values) + static_cast<int64_t>(w.offsets[t]) * 8 * value_bytes;
    const char* e = static_cast<const char*>(w.values) + static_cast<int64_t>(w.offsets[t + 1]) * 8 * value_bytes;
    for (; v < e; v += 64) _mm_prefetch(v, _MM_HINT_T0);
}

// The 64 16-bit weights of a row as two 32-lane vectors; returns the number of values read.
// `mask` points at a row mask; its halves are read as two 32-bit words (from a 64-bit load and
// a shift, GCC routed the high half through mask registers: kmovq + kshiftrq + kmovd). The
// memory-source expand reads exactly popcount values (no over-read past a row, so the values
// buffer needs no padding) and beats a masked load followed by a register expand.
inline unsigned expand16(const uint64_t* mask, const uint16_t* p, __m512i& lo, __m512i& hi) {
    uint32_t ml, mh;
    std::memcpy(&ml, mask, 4);
    std::memcpy(&mh, reinterpret_cast<const char*>(mask) + 4, 4);
    const unsigned cl = _mm_popcnt_u32(ml), ch = _mm_popcnt_u32(mh);
    lo = _mm512_maskz_expandloadu_epi16(ml, p);
    hi = _mm512_maskz_expandloadu_epi16(mh, p + cl);
    return cl + ch;
}

// The 64 fp32 weights of a row as four 16-lane vectors; returns the number of values read. The
// four start offsets come from independent popcounts of mask prefixes, not a running sum.
inline unsigned expand32(uint64_t mask, const float* p, __m512 w[4]) {
    const unsigned c0 = static_cast<unsigned>(_mm_popcnt_u64(mask & 0xffffull));
    const unsigned c1 = static_cast<unsigned>(_mm_popcnt_u64(mask & 0xffffffffull));
    const unsigned c2 = static_cast<unsigned>(_mm_popcnt_u64(mask & 0xffffffffffffull));
    w[0] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask), p);
    w[1] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask >> 16), p + c0);
    w[2] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask >> 32), p + c1);
    w[3] = _mm512_maskz_expandloadu_ps(static_cast<__mmask16>(mask >> 48), p + c2);
    return static_cast<unsigned>(_mm_popcnt_u64(mask));
}

inline __m512 bh_dot(__m512 acc, __m512i w, const uint16_t* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)_mm512_loadu_si512(x));
}

// The 64 weights of a row segment as four fp32 vectors (fp32 or fp16 values); returns the
// number of values read.
template <int D>
inline unsigned expand_f32(const uint64_t* mask, const void* p, __m512 w[4]) {
    if (D == static_cast<int>(Dtype::F32)) return expand32(*mask, static_cast<const float*>(p), w);
    __m512i lo, hi;
    const unsigned count = expand16(mask, static_cast<const uint16_t*>(p), lo, hi);
    w[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(lo));
    w[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1));
    w[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(hi));
    w[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1));
    return count;
}

// acc + one row segment . x, the weights rebuilt densely (four expands, four FMAs).
template <int D>
inline __m512 row_dense(const uint64_t* mask, const void* p, const __m512 xr[4], __m512 acc) {
    __m512 wv[4];
    expand_f32<D>(mask, p, wv);
    // Two chains: a row's four FMAs are not one dependency chain.
    const __m512 a = _mm512_fmadd_ps(wv[2], xr[2], _mm512_fmadd_ps(wv[0], xr[0], acc));
    const __m512 b = _mm512_fmadd_ps(wv[3], xr[3], _mm512_mul_ps(wv[1], xr[1]));
    return _mm512_add_ps(a, b);
}

// n = 1: acc[r] += row r of one tile . x, one function per tile, in two forms.
// - Dense: each row segment is rebuilt (expands) and multiplied as 64 weights.
// - Sparse, for tiles of few values: a row with at most 16 nonzeros (fp32, fp16; 32 for bf16)
//   is one FMA (one vdpbf16ps) of its packed values with x gathered at their columns: a byte
//   compress of the column numbers, then two-register permutes of x, which stays in registers.
//   Lanes past the row's count multiply zero values by a finite x (x is finite by contract).
//   Denser rows are rebuilt. The compress merges into the column list: zero-masking
//   vpcompressb is much slower on Zen 4.
// The sparse form pays below about 15 values per row on average for fp32/fp16 and 28 for bf16
// (its limit is 32 per row); around 16 per row the per-row branch goes either way. The per-form
// timings behind these limits are in bench/results/cpu-kernel-notes.md.
// Functions of their own, not inlined into spmm_impl, where GCC kept the loop state on the stack.
// One tile per pass: two (half the accumulator traffic) paid only while the weight fit in L3.
template <int D>
constexpr int64_t kSparseTileMaxValues = D == static_cast<int>(Dtype::BF16) ? 64 * 28 : 64 * 15;

// Byte i is i: compressed under a row mask, it lists the row's nonzero columns.
alignas(64) constexpr uint8_t kColumnIota[64] = {
    0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
    22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
    44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63};

// fp32 and fp16 weights, x fp32.
template <int D, bool SPARSE>
__attribute__((noinline)) void f32_tile_n1(const uint64_t* masks, const void* values, const float* x, __m512* acc,
                                           int64_t rows) {
    constexpr int64_t kValueBytes = D == static_cast<int>(Dtype::F32) ? 4 : 2;
    const char* p = static_cast<const char*>(values);
    __m512 xr[4];
    for (int q = 0; q < 4; ++q) xr[q] = _mm512_loadu_ps(x + 16 * q);
    const __m512i columns = _mm512_load_si512(kColumnIota);
    const __m512i high_half = _mm512_set1_epi32(32);
    for (int64_t r = 0; r < rows; ++r) {
        const unsigned count = static_cast<unsigned>(_mm_popcnt_u64(masks[r]));
        if (SPARSE && count <= 16) {
            const __m512i nz = _mm512_mask_compress_epi8(columns, masks[r], columns);
            const __m512i col = _mm512_cvtepu8_epi32(_mm512_castsi512_si128(nz));
            const __m512 lo = _mm512_permutex2var_ps(xr[0], col, xr[1]);
            const __m512 hi = _mm512_permutex2var_ps(xr[2], col, xr[3]);
            const __m512 xg = _mm512_mask_blend_ps(_mm512_test_epi32_mask(col, high_half), lo, hi);
            const __m512 v = kValueBytes == 4 ? _mm512_maskz_loadu_ps(low_mask16(count), p)
                                        : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(low_mask16(count), p));
            acc[r] = _mm512_fmadd_ps(v, xg, acc[r]);
        } else {
            acc[r] = row_dense<D>(masks + r, p, xr, acc[r]);
        }
        p += count * kValueBytes;
    }
}

// bf16 weights and x.
template <bool SPARSE>
__attribute__((noinline)) void bf16_tile_n1(const uint64_t* masks, const uint16_t* p, const uint16_t* x,
                                            __m512* acc, int64_t rows) {
    const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 32);
    const __m512i columns = _mm512_load_si512(kColumnIota);
    for (int64_t r = 0; r < rows; ++r) {
        if (SPARSE) {
            const unsigned count = static_cast<unsigned>(_mm_popcnt_u64(masks[r]));
            if (count <= 32) {
                const __m512i nz = _mm512_mask_compress_epi8(columns, masks[r], columns);
                const __m512i col = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(nz));
                const __m512i xg = _mm512_permutex2var_epi16(x0, col, x1);
                const __m512i v = _mm512_maskz_loadu_epi16(low_mask32(count), p);
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)v, (__m512bh)xg);
                p += count;
                continue;
            }
        }
        __m512i lo, hi;
        p += expand16(masks + r, p, lo, hi);
        acc[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r], (__m512bh)lo, (__m512bh)x0), (__m512bh)hi,
                                  (__m512bh)x1);
    }
}

template <int D, int NB>  // Dtype; NB > 0: n == NB known at compile time (unrolled row loops)
void spmm_impl(const BitmapWeight& w, const void* xv, int64_t n_rt, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t n = NB > 0 ? NB : n_rt;
    const int64_t kt_count = (w.k + 63) / 64;
    constexpr int64_t kValueBytes = D == static_cast<int>(Dtype::F32) ? 4 : 2;
    // acc[r * n + i]: packed, so that at n = 1 the 64 accumulators take 4 KiB of L1, not 32.
    alignas(64) __m512 acc[64 * kMaxSpmmRows];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc[j] = _mm512_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            prefetch_tile(w, t + kPrefetchTiles, kValueBytes);
            if (NB == 1 && D != static_cast<int>(Dtype::BF16)) {
                const void* p = static_cast<const char*>(w.values) + start * kValueBytes;
                const int64_t values = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
                (values <= kSparseTileMaxValues<D> ? f32_tile_n1<D, true> : f32_tile_n1<D, false>)(
                    masks, p, static_cast<const float*>(xv) + kt * 64, acc, rows);
            } else if (D == static_cast<int>(Dtype::F32) || D == static_cast<int>(Dtype::F16)) {
                const float* x = static_cast<const float*>(xv) + kt * 64;
                const char* p = static_cast<const char*>(w.values) + start * kValueBytes;
                for (int64_t r = 0; r < rows; ++r) {
                    __m512 wv[4];
                    p += expand_f32<D>(masks + r, p, wv) * kValueBytes;
                    for (int64_t i = 0; i < n; ++i) {
                        // One chain per row; rows are independent, so out-of-order execution
                        // overlaps their latencies.
                        const float* xi = x + i * ldx;
                        __m512 a = _mm512_fmadd_ps(wv[0], _mm512_loadu_ps(xi), acc[r * n + i]);
                        a = _mm512_fmadd_ps(wv[1], _mm512_loadu_ps(xi + 16), a);
                        a = _mm512_fmadd_ps(wv[2], _mm512_loadu_ps(xi + 32), a);
                        acc[r * n + i] = _mm512_fmadd_ps(wv[3], _mm512_loadu_ps(xi + 48), a);
                    }
                }
            } else {
                const uint16_t* p = static_cast<const uint16_t*>(w.values) + start;
                const uint16_t* x = static_cast<const uint16_t*>(xv) + kt * 64;
                if (NB == 1) {
                    const int64_t values = static_cast<int64_t>(w.offsets[t + 1]) * 8 - start;
                    (values <= kSparseTileMaxValues<D> ? bf16_tile_n1<true> : bf16_tile_n1<false>)(masks, p, x, acc,
                                                                                                   rows);
                    continue;
                }
                for (int64_t r = 0; r < rows; ++r) {
                    __m512i lo, hi;
                    p += expand16(masks + r, p, lo, hi);
                    for (int64_t i = 0; i < n; ++i) {
                        const uint16_t* xi = x + i * ldx;
                        acc[r * n + i] = bh_dot(bh_dot(acc[r * n + i], lo, xi), hi, xi + 32);
                    }
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] =
                    _mm512_reduce_add_ps(acc[r * n + i]) + (bias ? bias[row0 + r] : 0.0f);
    }
}

template <int D>
void decode_impl(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const int64_t cols = (w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64;
            prefetch_tile(w, t + kPrefetchTiles, D == static_cast<int>(Dtype::F32) ? 4 : 2);
            if (D == static_cast<int>(Dtype::F32)) {
                const float* p = static_cast<const float*>(w.values) + start;
                __mmask16 store[4];
                for (int q = 0; q < 4; ++q) {
                    const int64_t c = cols - 16 * q;
                    store[q] = low_mask16(c <= 0 ? 0u : (c >= 16 ? 16u : static_cast<unsigned>(c)));
                }
                for (int64_t r = 0; r < rows; ++r) {
                    float* dst = static_cast<float*>(out) + ((tr - tr0) * 64 + r) * ldo + kt * 64;
                    __m512 wv[4];
                    p += expand32(masks[r], p, wv);
                    if (cols == 64) {
                        for (int q = 0; q < 4; ++q) _mm512_storeu_ps(dst + 16 * q, wv[q]);
                    } else {
                        for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(dst + 16 * q, store[q], wv[q]);
                    }
                }
            } else {
                const uint16_t* p = static_cast<const uint16_t*>(w.values) + start;
                const __mmask32 store_lo = low_mask32(cols >= 32 ? 32u : static_cast<unsigned>(cols));
                const __mmask32 store_hi = low_mask32(cols <= 32 ? 0u : static_cast<unsigned>(cols - 32));
                for (int64_t r = 0; r < rows; ++r) {
                    uint16_t* dst = static_cast<uint16_t*>(out) + ((tr - tr0) * 64 + r) * ldo + kt * 64;
                    __m512i lo, hi;
                    p += expand16(masks + r, p, lo, hi);
                    if (cols == 64) {
                        _mm512_storeu_si512(dst, lo);
                        _mm512_storeu_si512(dst + 32, hi);
                    } else {
                        _mm512_mask_storeu_epi16(dst, store_lo, lo);
                        _mm512_mask_storeu_epi16(dst + 32, store_hi, hi);
                    }
                }
            }
        }
    }
}


// --- blocked path (fp32, fp16): decode 64 x kBlockK into scratch, then a 4-row x NB-column micro-kernel

// Tile columns [kt0, kt1) of tile row tr as 64 dense rows of (kt1 - kt0) * 64 fp32 values
// (fp16 is converted). Columns past k decode as zeros.
template <int D>
void decode_block(const BitmapWeight& w, int64_t tr, int64_t kt0, int64_t kt1, void* buf) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t ldb = (kt1 - kt0) * 64;
    for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t t = tr * kt_count + kt;
        const uint64_t* masks = w.masks + t * 64;
        const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
        prefetch_tile(w, t + kPrefetchTiles, D == static_cast<int>(Dtype::F32) ? 4 : 2);
        if (D == static_cast<int>(Dtype::F32)) {
            const float* p = static_cast<const float*>(w.values) + start;
            for (int r = 0; r < 64; ++r) {
                float* dst = static_cast<float*>(buf) + r * ldb + (kt - kt0) * 64;
                __m512 wv[4];
                p += expand32(masks[r], p, wv);
                for (int q = 0; q < 4; ++q) _mm512_store_ps(dst + 16 * q, wv[q]);
            }
        } else {
            const uint16_t* p = static_cast<const uint16_t*>(w.values) + start;
            for (int r = 0; r < 64; ++r) {
                __m512i lo, hi;
                p += expand16(masks + r, p, lo, hi);
                float* dst = static_cast<float*>(buf) + r * ldb + (kt - kt0) * 64;
                _mm512_store_ps(dst, _mm512_cvtph_ps(_mm512_castsi512_si256(lo)));
                _mm512_store_ps(dst + 16, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1)));
                _mm512_store_ps(dst + 32, _mm512_cvtph_ps(_mm512_castsi512_si256(hi)));
                _mm512_store_ps(dst + 48, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1)));
            }
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

template <int D>  // F32 or F16
void spmm_blocked_impl(const BitmapWeight& w, const float* xv, int64_t n, int64_t ldx, const float* bias,
                       float* y, int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t block_tiles = kBlockK / 64;
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
            decode_block<D>(w, tr, kt0, kt1, buf);
            const float* x = xv + kt0 * 64;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) micro_block<4>(buf, kc, x + i * ldx, ldx, yacc + i, n);
            switch (n - i) {
                case 3: micro_block<3>(buf, kc, x + i * ldx, ldx, yacc + i, n); break;
                case 2: micro_block<2>(buf, kc, x + i * ldx, ldx, yacc + i, n); break;
                case 1: micro_block<1>(buf, kc, x + i * ldx, ldx, yacc + i, n); break;
                default: break;
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = yacc[r * n + i] + (bias ? bias[row0 + r] : 0.0f);
    }
}

// --- bf16 row-lanes path: 16 weight rows across the lanes of one vector ----------------------
//
// vdpbf16ps adds the products of adjacent bf16 pairs into fp32 lanes. The blocked path puts 32
// columns of one weight row in a vector, so every (weight row, x row) pair ends in a horizontal
// sum, and its decoded block lives in L2. Here a vector holds one column pair of 16 weight rows
// (a 16 x 16 dword transpose of the decoded rows), and x comes as broadcast column pairs, so
// vector j of the accumulators is directly y[x row j][16 weight rows], with no reductions:
// 16 vdpbf16ps per weight vector, each with an embedded broadcast of x from L1.
// The decode + transpose of the next 16 x 64 step (32 expands, 128 shuffles) is spread over
// the 32 weight vectors of the current step: done in one piece between steps it was not
// overlapped with the vdpbf16ps. Stages 1-2 of the transpose
// stay in registers per 4 rows, stages 3-4 run per output column; their intermediate values go
// through an L1 buffer, because 16 accumulators leave only 16 vector registers.
//
// xg: x as bf16 pairs, [ceil(n / 16)][k_tiles * 32][16] uint32 (pair p of x row 16 g + j at
// [g][p][j]), zero past n and k, 64-byte aligned. acc: 4 * ceil(n / 16) * 256 floats.

inline void rowlanes_stage12(__m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i* u) {
    const __m512i t0 = _mm512_unpacklo_epi32(r0, r1), t1 = _mm512_unpackhi_epi32(r0, r1);
    const __m512i t2 = _mm512_unpacklo_epi32(r2, r3), t3 = _mm512_unpackhi_epi32(r2, r3);
    _mm512_store_si512(u + 0, _mm512_unpacklo_epi64(t0, t2));
    _mm512_store_si512(u + 1, _mm512_unpackhi_epi64(t0, t2));
    _mm512_store_si512(u + 2, _mm512_unpacklo_epi64(t1, t3));
    _mm512_store_si512(u + 3, _mm512_unpackhi_epi64(t1, t3));
}

// Stages 3-4 for output columns m, m + 4, m + 8, m + 12 of one 16 x 16 half.
inline void rowlanes_stage34(const __m512i* u, int m, __m512i* out) {
    const __m512i u0 = _mm512_load_si512(u + m), u1 = _mm512_load_si512(u + 4 + m);
    const __m512i u2 = _mm512_load_si512(u + 8 + m), u3 = _mm512_load_si512(u + 12 + m);
    const __m512i s0 = _mm512_shuffle_i32x4(u0, u1, 0x88), s1 = _mm512_shuffle_i32x4(u0, u1, 0xdd);
    const __m512i s2 = _mm512_shuffle_i32x4(u2, u3, 0x88), s3 = _mm512_shuffle_i32x4(u2, u3, 0xdd);
    _mm512_store_si512(out + m, _mm512_shuffle_i32x4(s0, s2, 0x88));
    _mm512_store_si512(out + 8 + m, _mm512_shuffle_i32x4(s0, s2, 0xdd));
    _mm512_store_si512(out + 4 + m, _mm512_shuffle_i32x4(s1, s3, 0x88));
    _mm512_store_si512(out + 12 + m, _mm512_shuffle_i32x4(s1, s3, 0xdd));
}

// Piece P (of 32) of decoding 16 rows x 64 columns (masks mn, values from pn) into out[32]:
// pieces 0, 4, 8, 12 expand 4 rows and run stages 1-2, pieces 16-23 run stages 3-4.
template <int P>
__attribute__((always_inline)) inline void rowlanes_piece(const uint64_t* mn, const uint16_t*& pn, __m512i* u,
                                                          __m512i* out) {
    if constexpr (P < 16 && P % 4 == 0) {
        __m512i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) pn += expand16(mn + P + i, pn, lo[i], hi[i]);
        rowlanes_stage12(lo[0], lo[1], lo[2], lo[3], u + P);
        rowlanes_stage12(hi[0], hi[1], hi[2], hi[3], u + 16 + P);
    } else if constexpr (P >= 16 && P < 24) {
        rowlanes_stage34(u + 16 * ((P - 16) / 4), (P - 16) % 4, out + 16 * ((P - 16) / 4));
    }
}

// The whole decode of one step at once (the first step of a tile row).
inline void rowlanes_decode(const uint64_t* mn, const uint16_t*& pn, __m512i* u, __m512i* out) {
    for (int r = 0; r < 16; r += 4) {
        __m512i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) pn += expand16(mn + r + i, pn, lo[i], hi[i]);
        rowlanes_stage12(lo[0], lo[1], lo[2], lo[3], u + r);
        rowlanes_stage12(hi[0], hi[1], hi[2], hi[3], u + 16 + r);
    }
    for (int h = 0; h < 2; ++h)
        for (int m = 0; m < 4; ++m) rowlanes_stage34(u + 16 * h, m, out + 16 * h);
}

// a[j] += tb[P] . broadcast(x pair P of x row j), for P in [P, 32); with NEXT, piece P of the
// next step's decode first. vdpbf16ps with an embedded broadcast ({1to16}) from memory: GCC
// emits a separate vpbroadcastd for _mm512_set1_epi32, which is slower.
template <int P, int NB, bool NEXT>
__attribute__((always_inline)) inline void rowlanes_step(__m512 (&a)[NB], const __m512i* tb, const uint32_t* xk,
                                                         const uint64_t* mn, const uint16_t*& pn, __m512i* u,
                                                         __m512i* out) {
    if constexpr (NEXT) rowlanes_piece<P>(mn, pn, u, out);
    const __m512i wv = _mm512_load_si512(tb + P);
    const uint32_t* xq = xk + P * 16;
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) __asm__("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(a[j]) : "v"(wv), "m"(xq[j]));
    if constexpr (P + 1 < 32) rowlanes_step<P + 1, NB, NEXT>(a, tb, xk, mn, pn, u, out);
}

// Returns pn advanced past the 16 rows decoded (with NEXT).
template <int NB, bool NEXT>
__attribute__((always_inline)) inline const uint16_t* rowlanes_micro(float* accp, const __m512i* tb,
                                                                      const uint32_t* xk, const uint64_t* mn,
                                                                      const uint16_t* pn, __m512i* u, __m512i* out) {
    // Unrolled: as loops, GCC turns these into memcpy calls and keeps a[] on the stack.
    __m512 a[NB];
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) a[j] = _mm512_load_ps(accp + 16 * j);
    rowlanes_step<0, NB, NEXT>(a, tb, xk, mn, pn, u, out);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) _mm512_store_ps(accp + 16 * j, a[j]);
    return pn;
}

// Accumulators for x rows [16 g, 16 g + nb) (nb rounded up to 4: x is zero there).
template <bool NEXT>
const uint16_t* rowlanes_group(int64_t nb, float* accp, const __m512i* tb, const uint32_t* xk, const uint64_t* mn,
                               const uint16_t* pn, __m512i* u, __m512i* out) {
    switch ((nb + 3) / 4) {
        case 1: return rowlanes_micro<4, NEXT>(accp, tb, xk, mn, pn, u, out);
        case 2: return rowlanes_micro<8, NEXT>(accp, tb, xk, mn, pn, u, out);
        case 3: return rowlanes_micro<12, NEXT>(accp, tb, xk, mn, pn, u, out);
        default: return rowlanes_micro<16, NEXT>(accp, tb, xk, mn, pn, u, out);
    }
}

void spmm_rowlanes_impl(const BitmapWeight& w, const uint32_t* xg, int64_t n, const float* bias, float* y,
                        int64_t ldy, int64_t tr0, int64_t tr1, float* acc) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t groups = (n + 15) / 16;
    const int64_t gstride = kt_count * 32 * 16;  // uint32 per group of 16 x rows
    alignas(64) __m512i tb[2][32];
    alignas(64) __m512i u[32];
    const uint16_t* vals = static_cast<const uint16_t*>(w.values);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        const int64_t tbase = tr * kt_count;
        for (int64_t i = 0; i < 4 * groups * 256; ++i) acc[i] = 0.0f;
        // Step s: tile kt = s / 4, weight rows 16 (s % 4) .. + 16 of it.
        const int64_t steps = kt_count * 4;
        const uint16_t* p = vals + static_cast<int64_t>(w.offsets[tbase]) * 8;
        rowlanes_decode(w.masks + tbase * 64, p, u, tb[0]);
        for (int64_t s = 0; s < steps; ++s) {
            const int64_t s1 = s + 1;
            const __m512i* cur = tb[s & 1];
            const uint32_t* xk = xg + (s >> 2) * 32 * 16;
            float* as = acc + (s & 3) * groups * 256;
            if (s1 < steps) {
                const int64_t t1 = tbase + (s1 >> 2);
                // Tiles are contiguous in values, but each starts at a multiple of 8.
                if ((s1 & 3) == 0) {
                    p = vals + static_cast<int64_t>(w.offsets[t1]) * 8;
                    prefetch_tile(w, t1 + kPrefetchTiles, 2);
                }
                p = rowlanes_group<true>(n < 16 ? n : 16, as, cur, xk, w.masks + t1 * 64 + 16 * (s1 & 3), p, u,
                                         tb[s1 & 1]);
            } else {
                rowlanes_group<false>(n < 16 ? n : 16, as, cur, xk, nullptr, p, u, nullptr);
            }
            for (int64_t g = 1; g < groups; ++g) {
                const int64_t nb = (n - 16 * g) < 16 ? (n - 16 * g) : 16;
                rowlanes_group<false>(nb, as + g * 256, cur, xk + g * gstride, nullptr, p, u, nullptr);
            }
        }
        alignas(64) float lanes[16];
        for (int q = 0; q < 4; ++q) {
            const int64_t r0 = 16 * q;
            if (r0 >= rows) break;
            const int64_t live = (rows - r0) < 16 ? (rows - r0) : 16;
            for (int64_t i = 0; i < n; ++i) {
                _mm512_store_ps(lanes, _mm512_load_ps(acc + ((q * groups + i / 16) * 16 + i % 16) * 16));
                for (int64_t r = 0; r < live; ++r)
                    y[i * ldy + row0 + r0 + r] = lanes[r] + (bias ? bias[row0 + r0 + r] : 0.0f);
            }
        }
    }
}

// --- column path: one FMA per nonzero, 16 rows of x at once ---------------------------------

template <int D>  // F32 or F16
void spmm_columns_impl(const BitmapWeight& w, const float* xt, int64_t n, const float* bias, float* y,
                       int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    alignas(64) __m512 acc[64];
    alignas(64) float lanes[16];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const float* xk = xt + kt * 64 * 16;
            const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
            const float* p32 = static_cast<const float*>(w.values) + start;
            const uint16_t* p16 = static_cast<const uint16_t*>(w.values) + start;
            for (int64_t r = 0; r < rows; ++r) {
                uint64_t m = masks[r];
                // Two accumulators halve the FMA dependency chain of a row.
                __m512 a0 = acc[r], a1 = _mm512_setzero_ps();
                while (m) {
                    int c = static_cast<int>(_tzcnt_u64(m));
                    m = _blsr_u64(m);
                    float v = D == static_cast<int>(Dtype::F32) ? *p32++ : _cvtsh_ss(*p16++);
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(v), _mm512_load_ps(xk + c * 16), a0);
                    if (!m) break;
                    c = static_cast<int>(_tzcnt_u64(m));
                    m = _blsr_u64(m);
                    v = D == static_cast<int>(Dtype::F32) ? *p32++ : _cvtsh_ss(*p16++);
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(v), _mm512_load_ps(xk + c * 16), a1);
                }
                acc[r] = _mm512_add_ps(a0, a1);
            }
        }
        for (int64_t r = 0; r < rows; ++r) {
            _mm512_store_ps(lanes, acc[r]);
            const float b = bias ? bias[row0 + r] : 0.0f;
            for (int64_t i = 0; i < n; ++i) y[i * ldy + row0 + r] = lanes[i] + b;
        }
    }
}

}  // namespace

void spmm_blocked_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx,
                         const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1,
                         void* scratch) {
    const float* xf = static_cast<const float*>(x);
    switch (w.dtype) {
        case Dtype::F32: return spmm_blocked_impl<0>(w, xf, n, ldx, bias, y, ldy, tr0, tr1, scratch);
        case Dtype::F16: return spmm_blocked_impl<2>(w, xf, n, ldx, bias, y, ldy, tr0, tr1, scratch);
        default:  // bf16 takes spmm_rowlanes_avx512; kept correct here, kMaxSpmmRows rows at a time
            for (int64_t i = 0; i < n; i += kMaxSpmmRows) {
                const int64_t rows = n - i < kMaxSpmmRows ? n - i : kMaxSpmmRows;
                spmm_impl<1, 0>(w, static_cast<const uint16_t*>(x) + i * ldx, rows, ldx, bias, y + i * ldy, ldy, tr0,
                                tr1);
            }
    }
}

void spmm_rowlanes_avx512(const BitmapWeight& w, const uint32_t* xg, int64_t n, const float* bias, float* y,
                          int64_t ldy, int64_t tr0, int64_t tr1, void* scratch) {
    float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    spmm_rowlanes_impl(w, xg, n, bias, y, ldy, tr0, tr1, acc);
}

void spmm_columns_avx512(const BitmapWeight& w, const float* xt, int64_t n, const float* bias, float* y,
                         int64_t ldy, int64_t tr0, int64_t tr1) {
    if (w.dtype == Dtype::F32) return spmm_columns_impl<0>(w, xt, n, bias, y, ldy, tr0, tr1);
    return spmm_columns_impl<2>(w, xt, n, bias, y, ldy, tr0, tr1);
}

void spmm_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
                 float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    switch (w.dtype) {
        // Decode (N = 1) is the case that matters most: its row loop is unrolled away.
        case Dtype::F32:
            return n == 1 ? spmm_impl<0, 1>(w, x, n, ldx, bias, y, ldy, tr0, tr1)
                          : spmm_impl<0, 0>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
        case Dtype::BF16:
            return n == 1 ? spmm_impl<1, 1>(w, x, n, ldx, bias, y, ldy, tr0, tr1)
                          : spmm_impl<1, 0>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
        default:
            return n == 1 ? spmm_impl<2, 1>(w, x, n, ldx, bias, y, ldy, tr0, tr1)
                          : spmm_impl<2, 0>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
    }
}

void decode_avx512(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    if (w.dtype == Dtype::F32) return decode_impl<0>(w, out, ldo, tr0, tr1);
    return decode_impl<1>(w, out, ldo, tr0, tr1);  // any 16-bit type: bits are copied
}

}  // namespace cpu
}  // namespace flashsparse

#else  // not x86: never selected (bitmap_cpu_isa_supported says no)

namespace flashsparse {
namespace cpu {
void spmm_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
                 float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void decode_avx512(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
void spmm_blocked_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx,
                         const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, void*) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void spmm_columns_avx512(const BitmapWeight& w, const float*, int64_t, const float*, float*, int64_t, int64_t,
                         int64_t) {
    (void)w;  // never selected off x86
}
void spmm_rowlanes_avx512(const BitmapWeight& w, const uint32_t*, int64_t, const float*, float*, int64_t, int64_t,
                          int64_t, void*) {
    (void)w;  // never selected off x86
}
}  // namespace cpu
}  // namespace flashsparse

#endif
