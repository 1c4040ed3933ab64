// AVX2 path: no expand instruction, so each byte of a row mask (8 columns) indexes a table:
// pshufb for 16-bit values, vpermps plus a lane mask for fp32. Full-width loads may read up to
// 8 values past a row's last one, so rows near the end of the values buffer are first copied
// into a padded local buffer.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "bitmap_cpu.h"

#if defined(__x86_64__) || defined(__i386__)

namespace flashsparse {
namespace cpu {
namespace {

// Built at compile time: no static initializer runs AVX2 code on a CPU without it.
struct Tables {
    alignas(16) uint8_t shuf16[256][16];
    alignas(32) int32_t perm32[256][8];
    constexpr Tables() : shuf16{}, perm32{} {
        for (int b = 0; b < 256; ++b) {
            int s = 0;
            for (int j = 0; j < 8; ++j) {
                if ((b >> j) & 1) {
                    shuf16[b][2 * j] = static_cast<uint8_t>(2 * s);
                    shuf16[b][2 * j + 1] = static_cast<uint8_t>(2 * s + 1);
                    perm32[b][j] = s;
                    ++s;
                } else {
                    shuf16[b][2 * j] = 0x80;
                    shuf16[b][2 * j + 1] = 0x80;
                    perm32[b][j] = 0;
                }
            }
        }
    }
};
constexpr Tables kTables{};

// Room a row may read past its values: 8 values after the last byte's first one.
constexpr int64_t kSlack = 72;

}  // namespace
}  // namespace cpu
}  // namespace flashsparse

#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")

namespace flashsparse {
namespace cpu {
namespace {

inline unsigned expand16(uint64_t mask, const uint16_t* p, __m128i out[8]) {
    unsigned used = 0;
    for (int q = 0; q < 8; ++q) {
        const unsigned b = static_cast<unsigned>(mask >> (8 * q)) & 0xffu;
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + used));
        out[q] = _mm_shuffle_epi8(v, _mm_load_si128(reinterpret_cast<const __m128i*>(kTables.shuf16[b])));
        used += _mm_popcnt_u32(b);
    }
    return used;
}

inline unsigned expand32(uint64_t mask, const float* p, __m256 out[8]) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    unsigned used = 0;
    for (int q = 0; q < 8; ++q) {
        const unsigned b = static_cast<unsigned>(mask >> (8 * q)) & 0xffu;
        const __m256 v = _mm256_permutevar8x32_ps(
            _mm256_loadu_ps(p + used),
            _mm256_load_si256(reinterpret_cast<const __m256i*>(kTables.perm32[b])));
        const __m256i keep = _mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), bits), bits);
        out[q] = _mm256_and_ps(v, _mm256_castsi256_ps(keep));
        used += _mm_popcnt_u32(b);
    }
    return used;
}

// A row whose full-width loads could run past the buffer: copy its values to a padded buffer.
template <typename T>
inline const T* safe_row(const T* p, const T* end, uint64_t mask, T* local) {
    if (end - p >= kSlack) return p;
    const int count = __builtin_popcountll(mask);
    for (int i = 0; i < kSlack; ++i) local[i] = i < count ? p[i] : T(0);
    return local;
}

// The row as eight vectors of 8 fp32 weights.
template <int D>
inline unsigned row_fp32(uint64_t mask, const void* pv, const void* end, __m256 w[8]) {
    if (D == static_cast<int>(Dtype::F32)) {
        alignas(32) float local[kSlack];
        const float* p = safe_row(static_cast<const float*>(pv), static_cast<const float*>(end), mask, local);
        return expand32(mask, p, w);
    }
    alignas(16) uint16_t local[kSlack];
    const uint16_t* p =
        safe_row(static_cast<const uint16_t*>(pv), static_cast<const uint16_t*>(end), mask, local);
    __m128i h[8];
    const unsigned used = expand16(mask, p, h);
    for (int q = 0; q < 8; ++q) {
        if (D == static_cast<int>(Dtype::BF16))
            w[q] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h[q]), 16));
        else
            w[q] = _mm256_cvtph_ps(h[q]);
    }
    return used;
}

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int D>
void spmm_impl(const BitmapWeight& w, const void* xv, int64_t n, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t esize = D == static_cast<int>(Dtype::F32) ? 4 : 2;
    const char* values = static_cast<const char*>(w.values);
    const char* end = values + w.num_values * esize;
    // acc[r * n + i]: packed, so that small n keeps the accumulators in few cache lines.
    alignas(32) __m256 acc[64 * kMaxSpmmRows];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t j = 0; j < rows * n; ++j) acc[j] = _mm256_setzero_ps();
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const char* p = values + static_cast<int64_t>(w.offsets[t]) * 8 * esize;
            const float* x = static_cast<const float*>(xv) + kt * 64;
            for (int64_t r = 0; r < rows; ++r) {
                const uint64_t mask = masks[r];
                if (!mask) continue;  // x is finite (see bitmap_cpu.h)
                __m256 wv[8];
                p += row_fp32<D>(mask, p, end, wv) * esize;
                for (int64_t i = 0; i < n; ++i) {
                    const float* xi = x + i * ldx;
                    __m256 s = _mm256_mul_ps(wv[0], _mm256_loadu_ps(xi));
                    __m256 u = _mm256_mul_ps(wv[1], _mm256_loadu_ps(xi + 8));
                    for (int q = 2; q < 8; q += 2) {
                        s = _mm256_fmadd_ps(wv[q], _mm256_loadu_ps(xi + 8 * q), s);
                        u = _mm256_fmadd_ps(wv[q + 1], _mm256_loadu_ps(xi + 8 * q + 8), u);
                    }
                    acc[r * n + i] = _mm256_add_ps(acc[r * n + i], _mm256_add_ps(s, u));
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = hsum(acc[r * n + i]) + (bias ? bias[row0 + r] : 0.0f);
    }
}

template <int D>  // 0: fp32, 1: any 16-bit type
void decode_impl(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int64_t esize = D == 0 ? 4 : 2;
    const char* values = static_cast<const char*>(w.values);
    const char* end = values + w.num_values * esize;
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            const char* p = values + static_cast<int64_t>(w.offsets[t]) * 8 * esize;
            const int64_t cols = (w.k - kt * 64) < 64 ? (w.k - kt * 64) : 64;
            for (int64_t r = 0; r < rows; ++r) {
                char* dst = static_cast<char*>(out) + (((tr - tr0) * 64 + r) * ldo + kt * 64) * esize;
                const uint64_t mask = masks[r];
                alignas(32) char row[256];
                char* target = cols == 64 ? dst : row;
                if (D == 0) {
                    alignas(32) float local[kSlack];
                    const float* src = safe_row(reinterpret_cast<const float*>(p),
                                                reinterpret_cast<const float*>(end), mask, local);
                    __m256 wv[8];
                    p += expand32(mask, src, wv) * esize;
                    for (int q = 0; q < 8; ++q) _mm256_storeu_ps(reinterpret_cast<float*>(target) + 8 * q, wv[q]);
                } else {
                    alignas(16) uint16_t local[kSlack];
                    const uint16_t* src = safe_row(reinterpret_cast<const uint16_t*>(p),
                                                   reinterpret_cast<const uint16_t*>(end), mask, local);
                    __m128i h[8];
                    p += expand16(mask, src, h) * esize;
                    for (int q = 0; q < 8; ++q)
                        _mm_storeu_si128(reinterpret_cast<__m128i*>(target) + q, h[q]);
                }
                if (cols != 64) std::memcpy(dst, row, cols * esize);
            }
        }
    }
}

}  // namespace

void spmm_avx2(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
               float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    switch (w.dtype) {
        case Dtype::F32: return spmm_impl<0>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
        case Dtype::BF16: return spmm_impl<1>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
        default: return spmm_impl<2>(w, x, n, ldx, bias, y, ldy, tr0, tr1);
    }
}

void decode_avx2(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    if (w.dtype == Dtype::F32) return decode_impl<0>(w, out, ldo, tr0, tr1);
    return decode_impl<1>(w, out, ldo, tr0, tr1);
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
void decode_avx2(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
}  // namespace cpu
}  // namespace flashsparse

#endif
