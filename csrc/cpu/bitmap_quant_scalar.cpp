// Portable path for quantized bitmap weights: walks the set bits of each row mask and
// dequantizes each code (int8: a cast; fp8 e4m3: a 256-entry table of exact values) times its
// scale. The reference for the SIMD paths' tests (FLASHSPARSE_CPU_ISA=scalar) and the path on
// CPUs without one.
#include <cstring>

#include "bitmap_quant.h"

namespace flashsparse {
namespace cpu {
namespace {

// Value of each e4m3 (fn) code: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
// subnormal (m * 2^-9). The NaN codes (0x7f, 0xff) are refused when a weight is checked, so
// they never reach a kernel; their entry is a NaN anyway.
struct Fp8Table {
    float v[256];
    Fp8Table() {
        for (int b = 0; b < 256; ++b) {
            const int e = (b >> 3) & 15, mant = b & 7;
            float mag;
            if (e == 15 && mant == 7) {
                uint32_t nan = 0x7fc00000u;
                std::memcpy(&mag, &nan, 4);
            } else if (e == 0) {
                mag = static_cast<float>(mant) * 0.001953125f;  // 2^-9
            } else {
                mag = static_cast<float>(8 + mant) / 8.0f;
                for (int i = 7; i < e; ++i) mag *= 2.0f;
                for (int i = e; i < 7; ++i) mag *= 0.5f;
            }
            v[b] = (b & 0x80) ? -mag : mag;
        }
    }
};
const Fp8Table kFp8;

inline float code_value(const QuantBitmapWeight& w, int64_t i) {
    const uint8_t b = w.values[i];
    return w.quant == QuantType::Int8 ? static_cast<float>(static_cast<int8_t>(b)) : kFp8.v[b];
}

inline int ctz64(uint64_t v) { return __builtin_ctzll(v); }

inline int log2_group(const QuantBitmapWeight& w) {
    if (w.groups == 1) return 62;  // every column in group 0
    int s = 0;
    while ((int64_t{1} << s) < w.group_size) ++s;
    return s;
}

}  // namespace

void quant_spmm_scalar(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                       float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int shift = log2_group(w);
    float acc[kQuantMaxRows][64];
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
                const float* srow = w.scales + (row0 + r) * w.groups;
                uint64_t mk = masks[r];
                while (mk) {
                    const int64_t c = kt * 64 + ctz64(mk);
                    const float v = code_value(w, p++) * srow[c >> shift];
                    for (int64_t i = 0; i < n; ++i) acc[i][r] += v * x[i * ldx + c];
                    mk &= mk - 1;
                }
            }
        }
        for (int64_t i = 0; i < n; ++i)
            for (int64_t r = 0; r < rows; ++r) y[i * ldy + row0 + r] = acc[i][r] + (bias ? bias[row0 + r] : 0.0f);
    }
}

void quant_decode_scalar(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    const int64_t kt_count = (w.k + 63) / 64;
    const int shift = log2_group(w);
    for (int64_t tr = tr0; tr < tr1; ++tr) {
        const int64_t row0 = tr * 64;
        const int64_t rows = (w.m - row0) < 64 ? (w.m - row0) : 64;
        for (int64_t r = 0; r < rows; ++r) {
            float* dst = out + ((tr - tr0) * 64 + r) * ldo;
            for (int64_t c = 0; c < w.k; ++c) dst[c] = 0.0f;
        }
        for (int64_t kt = 0; kt < kt_count; ++kt) {
            const int64_t t = tr * kt_count + kt;
            const uint64_t* masks = w.masks + t * 64;
            int64_t p = static_cast<int64_t>(w.offsets[t]) * 8;
            for (int64_t r = 0; r < rows; ++r) {
                float* dst = out + ((tr - tr0) * 64 + r) * ldo;
                const float* srow = w.scales + (row0 + r) * w.groups;
                uint64_t mk = masks[r];
                while (mk) {
                    const int64_t c = kt * 64 + ctz64(mk);
                    dst[c] = code_value(w, p++) * srow[c >> shift];
                    mk &= mk - 1;
                }
            }
        }
    }
}

}  // namespace cpu
}  // namespace flashsparse
