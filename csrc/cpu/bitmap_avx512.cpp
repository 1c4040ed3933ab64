// AVX-512 path (VBMI2 + BF16): vpexpandw rebuilds 32 16-bit weights from a 32-bit half of a row
// mask and the packed values in one instruction (vexpandps: 16 fp32 weights from 16 bits);
// bf16 rows multiply x with vdpbf16ps (exact bf16 products, fp32 sums), fp16 rows convert
// with vcvtph2ps. Masked loads never touch memory past a row's last value, so the end of the
// values buffer needs no padding.
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

// The 64 16-bit weights of a row as two 32-lane vectors; returns the number of values read.
// `mask` points at a row mask; its halves are read as two 32-bit words (from a 64-bit load and
// a shift, GCC routed the high half through mask registers: kmovq + kshiftrq + kmovd). The
// memory-source expand reads exactly popcount values (no over-read past a row, so the values
// buffer needs no padding) and was about 10 % faster per row on Zen 4 than a masked load
// followed by a register expand.
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

// n = 1: acc[r] += row r of one tile . x. Functions of their own (not inlined into spmm_impl,
// where GCC kept the loop state on the stack: the same loop stand-alone ran about 17 % faster in
// a single-thread C++ harness on Zen 4). Two tiles per pass (half the accumulator traffic) was
// faster only while the weight fit in L3 and slower on larger ones, so it is one tile.
__attribute__((noinline)) void bf16_tile_n1(const uint64_t* masks, const uint16_t* p, const uint16_t* x,
                                            __m512* acc, int64_t rows) {
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(x), x1 = (__m512bh)_mm512_loadu_si512(x + 32);
    for (int64_t r = 0; r < rows; ++r) {
        __m512i lo, hi;
        p += expand16(masks + r, p, lo, hi);
        acc[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r], (__m512bh)lo, x0), (__m512bh)hi, x1);
    }
}

__attribute__((noinline)) void f32_tile_n1(const uint64_t* masks, const float* p, const float* x, __m512* acc,
                                           int64_t rows) {
    __m512 xr[4];
    for (int q = 0; q < 4; ++q) xr[q] = _mm512_loadu_ps(x + 16 * q);
    for (int64_t r = 0; r < rows; ++r) {
        __m512 wv[4];
        p += expand32(masks[r], p, wv);
        // Two chains: a row's four FMAs are not one dependency chain.
        const __m512 a = _mm512_fmadd_ps(wv[2], xr[2], _mm512_fmadd_ps(wv[0], xr[0], acc[r]));
        const __m512 b = _mm512_fmadd_ps(wv[3], xr[3], _mm512_mul_ps(wv[1], xr[1]));
        acc[r] = _mm512_add_ps(a, b);
    }
}

template <int D, int NB>  // Dtype; NB > 0: n == NB known at compile time (unrolled row loops)
void spmm_impl(const BitmapWeight& w, const void* xv, int64_t n_rt, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t n = NB > 0 ? NB : n_rt;
    const int64_t kt_count = (w.k + 63) / 64;
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
            if (NB == 1 && D == static_cast<int>(Dtype::F32)) {
                f32_tile_n1(masks, static_cast<const float*>(w.values) + start,
                            static_cast<const float*>(xv) + kt * 64, acc, rows);
            } else if (D == static_cast<int>(Dtype::F32) || D == static_cast<int>(Dtype::F16)) {
                const float* x = static_cast<const float*>(xv) + kt * 64;
                // n = 1: x stays in registers for the whole tile (the __m512 stores into acc may
                // alias it, so the compiler would reload it for every row).
                __m512 x1[4];
                if (NB == 1)
                    for (int q = 0; q < 4; ++q) x1[q] = _mm512_loadu_ps(x + 16 * q);
                const float* p32 = static_cast<const float*>(w.values) + start;
                const uint16_t* p16 = static_cast<const uint16_t*>(w.values) + start;
                for (int64_t r = 0; r < rows; ++r) {
                    const uint64_t mask = masks[r];
                    __m512 wv[4];
                    if (D == static_cast<int>(Dtype::F32)) {
                        p32 += expand32(mask, p32, wv);
                    } else {
                        __m512i lo, hi;
                        p16 += expand16(masks + r, p16, lo, hi);
                        wv[0] = _mm512_cvtph_ps(_mm512_castsi512_si256(lo));
                        wv[1] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1));
                        wv[2] = _mm512_cvtph_ps(_mm512_castsi512_si256(hi));
                        wv[3] = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1));
                    }
                    if (NB == 1) {
                        __m512 a = _mm512_fmadd_ps(wv[0], x1[0], acc[r]);
                        a = _mm512_fmadd_ps(wv[1], x1[1], a);
                        a = _mm512_fmadd_ps(wv[2], x1[2], a);
                        acc[r] = _mm512_fmadd_ps(wv[3], x1[3], a);
                        continue;
                    }
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
                    bf16_tile_n1(masks, p, x, acc, rows);
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


// --- blocked path: decode 64 x kBlockK into scratch, then a 4-row x NB-column micro-kernel ---

// Tile columns [kt0, kt1) of tile row tr as 64 dense rows of (kt1 - kt0) * 64 compute values
// (bf16 stays bf16 for vdpbf16ps; fp16 becomes fp32). Columns past k decode as zeros.
template <int D>
void decode_block(const BitmapWeight& w, int64_t tr, int64_t kt0, int64_t kt1, void* buf) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t ldb = (kt1 - kt0) * 64;
    for (int64_t kt = kt0; kt < kt1; ++kt) {
        const int64_t t = tr * kt_count + kt;
        const uint64_t* masks = w.masks + t * 64;
        const int64_t start = static_cast<int64_t>(w.offsets[t]) * 8;
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
                if (D == static_cast<int>(Dtype::BF16)) {
                    uint16_t* dst = static_cast<uint16_t*>(buf) + r * ldb + (kt - kt0) * 64;
                    _mm512_store_si512(dst, lo);
                    _mm512_store_si512(dst + 32, hi);
                } else {
                    float* dst = static_cast<float*>(buf) + r * ldb + (kt - kt0) * 64;
                    _mm512_store_ps(dst, _mm512_cvtph_ps(_mm512_castsi512_si256(lo)));
                    _mm512_store_ps(dst + 16, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(lo, 1)));
                    _mm512_store_ps(dst + 32, _mm512_cvtph_ps(_mm512_castsi512_si256(hi)));
                    _mm512_store_ps(dst + 48, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(hi, 1)));
                }
            }
        }
    }
}

// yacc[r * n + i] += sum_c buf[r, c] * x[i, c] for 64 rows r and NB rows i of x.
template <bool BF16, int NB>
void micro_block(const void* buf, int64_t kc, const void* x, int64_t ldx, float* yacc, int64_t n) {
    for (int r = 0; r < 64; r += 4) {
        __m512 a[4][NB];
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) a[q][j] = _mm512_setzero_ps();
        if (BF16) {
            const uint16_t* wb = static_cast<const uint16_t*>(buf) + r * kc;
            const uint16_t* xb = static_cast<const uint16_t*>(x);
            for (int64_t c = 0; c < kc; c += 32) {
                __m512i wv[4];
                for (int q = 0; q < 4; ++q) wv[q] = _mm512_load_si512(wb + q * kc + c);
                for (int j = 0; j < NB; ++j) {
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + j * ldx + c);
                    for (int q = 0; q < 4; ++q) a[q][j] = _mm512_dpbf16_ps(a[q][j], (__m512bh)wv[q], xv);
                }
            }
        } else {
            const float* wb = static_cast<const float*>(buf) + r * kc;
            const float* xb = static_cast<const float*>(x);
            for (int64_t c = 0; c < kc; c += 16) {
                __m512 wv[4];
                for (int q = 0; q < 4; ++q) wv[q] = _mm512_load_ps(wb + q * kc + c);
                for (int j = 0; j < NB; ++j) {
                    const __m512 xv = _mm512_loadu_ps(xb + j * ldx + c);
                    for (int q = 0; q < 4; ++q) a[q][j] = _mm512_fmadd_ps(wv[q], xv, a[q][j]);
                }
            }
        }
        for (int q = 0; q < 4; ++q)
            for (int j = 0; j < NB; ++j) yacc[(r + q) * n + j] += _mm512_reduce_add_ps(a[q][j]);
    }
}

template <int D>
void spmm_blocked_impl(const BitmapWeight& w, const void* xv, int64_t n, int64_t ldx,
                       const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1,
                       void* scratch) {
    constexpr bool kBf16 = D == static_cast<int>(Dtype::BF16);
    const int64_t xsize = kBf16 ? 2 : 4;
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t block_tiles = kBlockK / 64;
    char* base = reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~uintptr_t(63));
    float* yacc = reinterpret_cast<float*>(base);
    void* buf = base + ((64 * n * 4 + 63) & ~int64_t(63));
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t i = 0; i < 64 * n; ++i) yacc[i] = 0.0f;
        for (int64_t kt0 = 0; kt0 < kt_count; kt0 += block_tiles) {
            const int64_t kt1 = (kt0 + block_tiles) < kt_count ? (kt0 + block_tiles) : kt_count;
            const int64_t kc = (kt1 - kt0) * 64;
            decode_block<D>(w, tr, kt0, kt1, buf);
            const char* x = static_cast<const char*>(xv) + kt0 * 64 * xsize;
            int64_t i = 0;
            for (; i + 4 <= n; i += 4)
                micro_block<kBf16, 4>(buf, kc, x + i * ldx * xsize, ldx, yacc + i, n);
            switch (n - i) {
                case 3: micro_block<kBf16, 3>(buf, kc, x + i * ldx * xsize, ldx, yacc + i, n); break;
                case 2: micro_block<kBf16, 2>(buf, kc, x + i * ldx * xsize, ldx, yacc + i, n); break;
                case 1: micro_block<kBf16, 1>(buf, kc, x + i * ldx * xsize, ldx, yacc + i, n); break;
                default: break;
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = yacc[r * n + i] + (bias ? bias[row0 + r] : 0.0f);
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
    switch (w.dtype) {
        case Dtype::F32: return spmm_blocked_impl<0>(w, x, n, ldx, bias, y, ldy, tr0, tr1, scratch);
        case Dtype::BF16: return spmm_blocked_impl<1>(w, x, n, ldx, bias, y, ldy, tr0, tr1, scratch);
        default: return spmm_blocked_impl<2>(w, x, n, ldx, bias, y, ldy, tr0, tr1, scratch);
    }
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
}  // namespace cpu
}  // namespace flashsparse

#endif
