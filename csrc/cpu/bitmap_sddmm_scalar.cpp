// Portable weight-gradient path: one sequential fp32 dot product per stored position. Also the
// reference the SIMD paths are tested against (FLASHSPARSE_CPU_ISA=scalar).
#include "bitmap_sddmm_cpu.h"

namespace flashsparse {
namespace cpu {

bool sddmm_scalar(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    const float* gt = static_cast<const float*>(p.gt);
    const float* xt = static_cast<const float*>(p.xt);
    const int64_t kt_count = p.k_tiles();
    // Bits past k in the last tile column are ignored (a valid encoding has none there), so a
    // corrupt mask cannot send a read past xt.
    const uint64_t last_cols = (p.k % 64) ? ((uint64_t{1} << (p.k % 64)) - 1) : ~uint64_t{0};
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t rows = (p.m - tr * 64) < 64 ? (p.m - tr * 64) : 64;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            int64_t s = static_cast<int64_t>(p.offsets[t]) * 8;
            const int64_t end = static_cast<int64_t>(p.offsets[t + 1]) * 8;
            const uint64_t cols = kt == kt_count - 1 ? last_cols : ~uint64_t{0};
            for (int64_t r = 0; r < rows; ++r) {
                uint64_t mk = p.masks[t * 64 + r] & cols;
                if (s + __builtin_popcountll(mk) > end) return false;
                const float* a = gt + (tr * 64 + r) * p.ld;
                while (mk) {
                    const float* b = xt + (kt * 64 + __builtin_ctzll(mk)) * p.ld;
                    float acc = 0.0f;
                    for (int64_t i = 0; i < p.ldn; ++i) acc += a[i] * b[i];
                    out[s++] = acc;
                    mk &= mk - 1;
                }
            }
            for (; s < end; ++s) out[s] = 0.0f;
        }
    }
    return true;
}

}  // namespace cpu
}  // namespace flashsparse
