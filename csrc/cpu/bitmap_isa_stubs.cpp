// The entry points of the SIMD paths whose sources are not compiled for this architecture
// (flashsparse/kernels/build.py compiles *_avx2.cpp and *_avx512.cpp only for x86 and
// *_neon.cpp only for aarch64), so the glue links everywhere. bitmap_cpu_isa_supported reports those
// paths unsupported and the glue refuses them; if one were called anyway it would still be
// correct (the scalar kernel).
#include "bitmap_cpu.h"
#include "bitmap_quant.h"
#include "bitmap_sddmm_cpu.h"

namespace flashsparse {
namespace cpu {

#if !(defined(__x86_64__) || defined(__i386__))
void spmm_avx2(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias, float* y,
               int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void decode_avx2(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
void spmm_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias, float* y,
                 int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void decode_avx512(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
void spmm_blocked_avx512(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias,
                         float* y, int64_t ldy, int64_t tr0, int64_t tr1, void*) {
    for (int64_t i = 0; i < n; i += kMaxSpmmRows) {
        const int64_t rows = n - i < kMaxSpmmRows ? n - i : kMaxSpmmRows;
        spmm_scalar(w, static_cast<const float*>(x) + i * ldx, rows, ldx, bias, y + i * ldy, ldy, tr0, tr1);
    }
}
// Their x layouts (transposed, bf16 pairs) have no scalar equivalent; bitmap_cpu.cpp calls them
// only on the AVX-512 path.
void spmm_columns_avx512(const BitmapWeight&, const float*, int64_t, const float*, float*, int64_t, int64_t,
                         int64_t) {}
void spmm_rowlanes_avx512(const BitmapWeight&, const uint32_t*, int64_t, const float*, float*, int64_t, int64_t,
                          int64_t, void*) {}
void spmm_avx2_forms(const BitmapWeight& w, const float* x, int64_t ldx, const float*, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, int, void*) {
    for (int64_t i = 0; i < n; i += kMaxSpmmRows) {
        const int64_t rows = n - i < kMaxSpmmRows ? n - i : kMaxSpmmRows;
        spmm_scalar(w, x + i * ldx, rows, ldx, bias, y + i * ldy, ldy, tr0, tr1);
    }
}
void quant_spmm_avx512(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                       float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    quant_spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void quant_decode_avx512(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    quant_decode_scalar(w, out, ldo, tr0, tr1);
}
void quant_spmm_avx2(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                     float* y, int64_t ldy, int64_t tr0, int64_t tr1) {
    quant_spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void quant_spmm_avx2_forms(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                           float* y, int64_t ldy, int64_t tr0, int64_t tr1, int) {
    quant_spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void quant_decode_avx2(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    quant_decode_scalar(w, out, ldo, tr0, tr1);
}
void quant_spmm_blocked_avx2(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx, const float* bias,
                             float* y, int64_t ldy, int64_t tr0, int64_t tr1, void*) {
    for (int64_t i = 0; i < n; i += kQuantMaxRows) {
        const int64_t rows = n - i < kQuantMaxRows ? n - i : kQuantMaxRows;
        quant_spmm_scalar(w, x + i * ldx, rows, ldx, bias, y + i * ldy, ldy, tr0, tr1);
    }
}
// Called by the glue only on the AVX-512 path.
void quant_spmm_n1_bf16x_avx512(const QuantBitmapWeight&, const float*, const uint16_t*, const float*, float*,
                                int64_t, int64_t) {}
void quant_spmm_blocked_avx512(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                               int64_t, int64_t, int64_t, void*) {}
bool sddmm_avx2(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    return sddmm_scalar(p, out, tr0, tr1);
}
bool sddmm_avx512(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1) {
    return sddmm_scalar(p, out, tr0, tr1);
}
#endif

#if !defined(__aarch64__)
void spmm_neon(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* bias, float* y,
               int64_t ldy, int64_t tr0, int64_t tr1) {
    spmm_scalar(w, x, n, ldx, bias, y, ldy, tr0, tr1);
}
void decode_neon(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1) {
    decode_scalar(w, out, ldo, tr0, tr1);
}
#endif

}  // namespace cpu
}  // namespace flashsparse
