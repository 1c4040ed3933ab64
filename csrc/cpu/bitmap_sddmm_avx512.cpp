// AVX-512 weight-gradient path: the stored positions of one weight row are taken 8 at a time (a
// tail pads to 4 by repeating its last column); each step loads the row's grad vectors once and
// multiplies them with the 8 x columns into 16 independent accumulators, so loads stay near
// one per multiply, the 8 column pointers stay in registers and no accumulator waits on its
// own latency. fp32 operands use FMA; bf16 operands vdpbf16ps (32 exact products per
// instruction, fp32 sums). The 8 sums come out of one transpose-and-add tree as a single
// vector, in packed order.
#include <immintrin.h>

#include <cstdint>

#include "bitmap_sddmm_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi,bmi2,popcnt")

namespace flashsparse {
namespace cpu {
namespace {

// s[g] = sum of the lanes of acc[g], g < 8, as one 8-lane vector.
inline __m256 sum_lanes8(const __m512 acc[8]) {
    __m512 b[4], c[2];
    for (int j = 0; j < 4; ++j)  // each 256-bit half: 8 partial sums of one accumulator
        b[j] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], 0x44),
                             _mm512_shuffle_f32x4(acc[2 * j], acc[2 * j + 1], 0xEE));
    for (int j = 0; j < 2; ++j)  // 128-bit lane q: 4 partial sums of accumulator 4j + q
        c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xDD));
    // lane q: 2 sums of accumulator q, then 2 of 4 + q
    const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
    // elements 4q and 4q + 2: accumulators q and 4 + q
    const __m512 e = _mm512_add_ps(d, _mm512_shuffle_ps(d, d, 0xB1));
    const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    return _mm512_castps512_ps256(_mm512_permutexvar_ps(pick, e));
}

// out[g] = dot(a, b[g]) over ldn elements for g < count <= G <= 8 (b[g] for g >= count repeats
// a valid column; its sum is not stored). G columns keep their pointers in registers; two
// accumulators per column (even and odd vectors) keep 2G multiplies in flight.
template <int G, bool BF16>
inline void dots(const char* a, const char* const* cols, int64_t ldn, int count, float* out) {
    constexpr int64_t step = BF16 ? 32 : 16;  // elements per vector
    constexpr int64_t esize = BF16 ? 2 : 4;
    const char* b[G];
    for (int g = 0; g < G; ++g) b[g] = cols[g];
    __m512 acc0[8], acc1[8];
    for (int g = 0; g < 8; ++g) acc0[g] = acc1[g] = _mm512_setzero_ps();
    for (int64_t i = 0; i < ldn * esize; i += 2 * step * esize) {
        const __m512 x0 = _mm512_loadu_ps(a + i), x1 = _mm512_loadu_ps(a + i + 64);
        for (int g = 0; g < G; ++g) {
            const __m512 y0 = _mm512_loadu_ps(b[g] + i), y1 = _mm512_loadu_ps(b[g] + i + 64);
            if constexpr (BF16) {
                acc0[g] = _mm512_dpbf16_ps(acc0[g], (__m512bh)x0, (__m512bh)y0);
                acc1[g] = _mm512_dpbf16_ps(acc1[g], (__m512bh)x1, (__m512bh)y1);
            } else {
                acc0[g] = _mm512_fmadd_ps(x0, y0, acc0[g]);
                acc1[g] = _mm512_fmadd_ps(x1, y1, acc1[g]);
            }
        }
    }
    for (int g = 0; g < G; ++g) acc0[g] = _mm512_add_ps(acc0[g], acc1[g]);
    _mm256_mask_storeu_ps(out, static_cast<__mmask8>(_bzhi_u32(0xffu, count)), sum_lanes8(acc0));
}

template <bool BF16>
bool sddmm_impl(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    const int64_t esize = BF16 ? 2 : 4;
    const char* gt = static_cast<const char*>(p.gt);
    const char* xt = static_cast<const char*>(p.xt);
    const int64_t row_bytes = p.ld * esize;
    const int64_t kt_count = p.k_tiles();
    const uint64_t last_cols = (p.k % 64) ? ((uint64_t{1} << (p.k % 64)) - 1) : ~uint64_t{0};
    const char* cols[64 + 8];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t rows = (p.m - tr * 64) < 64 ? (p.m - tr * 64) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            int64_t s = static_cast<int64_t>(p.offsets[t]) * 8;
            const int64_t end = static_cast<int64_t>(p.offsets[t + 1]) * 8;
            const uint64_t col_mask = kt == kt_count - 1 ? last_cols : ~uint64_t{0};
            const char* x_tile = xt + kt * 64 * row_bytes;
            for (int64_t r = 0; r < rows; ++r) {
                uint64_t mk = p.masks[t * 64 + r] & col_mask;
                const int count = static_cast<int>(_mm_popcnt_u64(mk));
                if (count == 0) continue;
                if (s + count > end) return false;
                for (int j = 0; j < count; ++j, mk = _blsr_u64(mk))
                    cols[j] = x_tile + static_cast<int64_t>(_tzcnt_u64(mk)) * row_bytes;
                for (int j = count; j < count + 8; ++j) cols[j] = cols[count - 1];
                const char* a = gt + (tr * 64 + r) * row_bytes;
                int j = 0;
                for (; count - j > 4; j += 8)
                    dots<8, BF16>(a, cols + j, p.ldn, count - j < 8 ? count - j : 8, out + s + j);
                if (count - j > 0) dots<4, BF16>(a, cols + j, p.ldn, count - j, out + s + j);
                s += count;
            }
            for (; s < end; ++s) out[s] = 0.0f;
        }
    }
    return true;
}

}  // namespace

bool sddmm_avx512(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    return p.operand == SddmmOperand::BF16 ? sddmm_impl<true>(p, out, tr0, tr1)
                                          : sddmm_impl<false>(p, out, tr0, tr1);
}

}  // namespace cpu
}  // namespace flashsparse

#endif
