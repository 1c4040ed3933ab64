// Portable path: walks the set bits of each row mask. Also the reference for the SIMD paths'
// tests (FLASHSPARSE_CPU_ISA=scalar) and the path on CPUs without AVX2.
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <cstring>

#include "bitmap_cpu.h"

namespace flashsparse {
namespace cpu {
namespace {

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float half_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));  // Inf / NaN
    if (exp == 0) {
        if (man == 0) return bits_to_float(sign);
        // subnormal: value = man * 2^-24, exact in fp32
        float f = static_cast<float>(man) * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline float load_value(const void* values, int64_t i, Dtype dtype) {
    switch (dtype) {
        case Dtype::F32:
            return static_cast<const float*>(values)[i];
        case Dtype::BF16:
            return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(values)[i]) << 16);
        default:
            return half_to_float(static_cast<const uint16_t*>(values)[i]);
    }
}

inline int ctz64(uint64_t v) { return __builtin_ctzll(v); }

}  // namespace

void spmm_scalar(const BitmapWeight& w, const void* xv, int64_t n, int64_t ldx, const float* bias,
                 float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    const float* x = static_cast<const float*>(xv);
    const int64_t kt_count = w.k_tiles();
    float acc[kMaxSpmmRows][64];
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t i = 0; i < n; ++i)
            for (int r = 0; r < 64; ++r) acc[i][r] = 0.0f;
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            int64_t p = static_cast<int64_t>(w.offsets[t]) * 8;
            for (int64_t r = 0; r < rows; ++r) {
                uint64_t mk = masks[r];
                while (mk) {
                    const int64_t c = kt * 64 + ctz64(mk);
                    const float v = load_value(w.values, p++, w.dtype);
                    for (int64_t i = 0; i < n; ++i) acc[i][r] += v * x[i * ldx + c];
                    mk &= mk - 1;
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r)
                y[i * ldy + row0 + r] = acc[i][r] + (bias ? bias[row0 + r] : 0.0f);
    }
}

void decode_scalar(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = w.k_tiles();
    const int64_t esize = w.dtype == Dtype::F32 ? 4 : 2;
    char* base = static_cast<char*>(out);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t r = 0; r < rows; ++r)
            std::memset(base + ((row0 - tr0 * 64) + r) * ldo * esize, 0, w.k * esize);
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            int64_t p = static_cast<int64_t>(w.offsets[t]) * 8;
            for (int64_t r = 0; r < rows; ++r) {
                char* dst = base + ((row0 - tr0 * 64) + r) * ldo * esize;
                uint64_t mk = masks[r];
                while (mk) {
                    const int64_t c = kt * 64 + ctz64(mk);
                    std::memcpy(dst + c * esize, static_cast<const char*>(w.values) + p * esize, esize);
                    ++p;
                    mk &= mk - 1;
                }
            }
        }
    }
}

namespace {
// CPUID traps to the hypervisor in a VM (microseconds per instruction), and every op call asks:
// probe once.
bool probe_isa(int isa) {
    if (isa == kScalar) return true;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    unsigned a = 0, b = 0, c = 0, d = 0;
    const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt") && f16c;
    if (isa == kAvx2) return avx2;
    if (isa == kAvx512)
        return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2") &&
               __builtin_cpu_supports("avx512bf16");
#endif
#if defined(__aarch64__)
    if (isa == kNeon) return true;  // Advanced SIMD is part of AArch64; its options are probed per call
#endif
    return false;
}
}  // namespace

bool bitmap_cpu_isa_supported(int isa) {
    static const bool supported[4] = {probe_isa(kScalar), probe_isa(kAvx2), probe_isa(kAvx512), probe_isa(kNeon)};
    return isa >= kScalar && isa <= kNeon && supported[isa];
}

}  // namespace cpu
}  // namespace flashsparse
