// AVX2 weight-gradient path (fp32 operands): the stored positions of one weight row are taken 8
// at a time (a tail pads to 4 by repeating its last column); each step loads the row's grad
// vector once and FMAs it with the 8 x columns into 8 independent accumulators (16 ymm
// registers: 8 accumulators, the grad vector and loads). The 8 sums come out of one
// transpose-and-add tree as a single vector, in packed order.
#include <immintrin.h>

#include <cstdint>

#include "bitmap_sddmm_cpu.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,bmi,bmi2,popcnt")

namespace flashsparse {
namespace cpu {
namespace {

// s[g] = sum of the lanes of acc[g], g < 8, as one vector.
inline __m256 sum_lanes8(const __m256 acc[8]) {
    __m256 b[4], c[2];
    for (int j = 0; j < 4; ++j)  // 128-bit half h: 4 partial sums of accumulator 2j + h
        b[j] = _mm256_add_ps(_mm256_permute2f128_ps(acc[2 * j], acc[2 * j + 1], 0x20),
                             _mm256_permute2f128_ps(acc[2 * j], acc[2 * j + 1], 0x31));
    for (int j = 0; j < 2; ++j)  // half h: 2 sums of 4j + h, then 2 of 4j + 2 + h
        c[j] = _mm256_add_ps(_mm256_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44),
                             _mm256_shuffle_ps(b[2 * j], b[2 * j + 1], 0xEE));
    // element 4h + i holds accumulator 2i + h
    const __m256 d = _mm256_add_ps(_mm256_shuffle_ps(c[0], c[1], 0x88), _mm256_shuffle_ps(c[0], c[1], 0xDD));
    return _mm256_permutevar8x32_ps(d, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// out[g] = dot(a, b[g]) over ldn floats for g < count <= G (b[g] for g >= count repeats a valid
// column; its sum is not stored).
template <int G>
inline void dots(const float* a, const float* const* b, int64_t ldn, int count, float* out) {
    __m256 acc[8];
    for (int g = 0; g < 8; ++g) acc[g] = _mm256_setzero_ps();
    for (int64_t i = 0; i < ldn; i += 8) {
        const __m256 x = _mm256_loadu_ps(a + i);
        for (int g = 0; g < G; ++g) acc[g] = _mm256_fmadd_ps(x, _mm256_loadu_ps(b[g] + i), acc[g]);
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum_lanes8(acc));
    for (int g = 0; g < count; ++g) out[g] = sums[g];
}

}  // namespace

bool sddmm_avx2(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    const float* gt = static_cast<const float*>(p.gt);
    const float* xt = static_cast<const float*>(p.xt);
    const int64_t kt_count = p.k_tiles();
    const uint64_t last_cols = (p.k % 64) ? ((uint64_t{1} << (p.k % 64)) - 1) : ~uint64_t{0};
    const float* cols[64 + 8];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t rows = (p.m - tr * 64) < 64 ? (p.m - tr * 64) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            int64_t s = static_cast<int64_t>(p.offsets[t]) * 8;
            const int64_t end = static_cast<int64_t>(p.offsets[t + 1]) * 8;
            const uint64_t col_mask = kt == kt_count - 1 ? last_cols : ~uint64_t{0};
            const float* x_tile = xt + kt * 64 * p.ld;
            for (int64_t r = 0; r < rows; ++r) {
                uint64_t mk = p.masks[t * 64 + r] & col_mask;
                const int count = static_cast<int>(_mm_popcnt_u64(mk));
                if (count == 0) continue;
                if (s + count > end) return false;
                for (int j = 0; j < count; ++j, mk = _blsr_u64(mk))
                    cols[j] = x_tile + static_cast<int64_t>(_tzcnt_u64(mk)) * p.ld;
                for (int j = count; j < count + 8; ++j) cols[j] = cols[count - 1];
                const float* a = gt + (tr * 64 + r) * p.ld;
                int j = 0;
                for (; count - j > 4; j += 8) dots<8>(a, cols + j, p.ldn, count - j < 8 ? count - j : 8, out + s + j);
                if (count - j > 0) dots<4>(a, cols + j, p.ldn, count - j, out + s + j);
                s += count;
            }
            for (; s < end; ++s) out[s] = 0.0f;
        }
    }
    return true;
}

}  // namespace cpu
}  // namespace flashsparse

#endif
