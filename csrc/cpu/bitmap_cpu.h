// Torch-free CPU kernels for the bitmap format (layout version 2, see
// flashsparse/formats/bitmap.py): one 64-bit mask per row of a 64x64 tile, the nonzeros of
// each tile packed row-major from values[tile_offsets[t] * 8].
//
// One translation unit per instruction set (bitmap_avx512.cpp, bitmap_avx2.cpp,
// bitmap_scalar.cpp), each compiled for its own ISA with `#pragma GCC target`, so one
// extension holds every path and the caller picks one at run time (bitmap_cpu_isa_supported).
// ISA files must not instantiate std:: templates or other inline functions shared with other
// translation units: the linker keeps one copy of each, which could be the AVX-512 one.
#pragma once

#include <cstdint>

namespace flashsparse {
namespace cpu {

enum class Dtype : int { F32 = 0, BF16 = 1, F16 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kNeon = 3 };

struct BitmapWeight {
    const uint64_t* masks;    // [#tiles * 64]
    const void* values;       // [num_values] in `dtype`
    const int32_t* offsets;   // [#tiles + 1], units of 8 values
    int64_t num_values;
    int64_t m, k;
    Dtype dtype;
    int64_t k_tiles() const { return (k + 63) / 64; }
    int64_t m_tiles() const { return (m + 63) / 64; }
};

// Rows of x processed by one spmm pass (accumulators for all of them stay in L1).
constexpr int64_t kMaxSpmmRows = 8;

// y[i, r] (fp32, row stride ldy) = bias[r] + sum_c W[r, c] * x[i, c] for the weight rows of
// tile rows [tr0, tr1) and i < n <= kMaxSpmmRows. x is zero-padded to k_tiles * 64 columns
// (row stride ldx) and is fp32, except bf16 when `bitmap_x_is_bf16(isa, dtype)`. The caller
// guarantees x is finite: zero weights are skipped or multiplied, so 0 * Inf is not defined
// here (the glue sends non-finite x to the dense path, which matches F.linear).
using SpmmFn = void (*)(const BitmapWeight& w, const void* x, int64_t n, int64_t ldx,
                        const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1);
// out rows [tr0 * 64, min(tr1 * 64, m)) of the dense [m, k] weight in its dtype; `out` points at
// row tr0 * 64, row stride ldo.
using DecodeFn = void (*)(const BitmapWeight& w, void* out, int64_t ldo, int64_t tr0, int64_t tr1);

void spmm_scalar(const BitmapWeight&, const void*, int64_t, int64_t, const float*, float*, int64_t,
                 int64_t, int64_t);
void decode_scalar(const BitmapWeight&, void*, int64_t, int64_t, int64_t);
void spmm_avx2(const BitmapWeight&, const void*, int64_t, int64_t, const float*, float*, int64_t,
               int64_t, int64_t);
void decode_avx2(const BitmapWeight&, void*, int64_t, int64_t, int64_t);
// Which form a kernel with per-tile forms runs on each tile: kFormAuto picks per tile from its
// value count; the others force one everywhere (tests cover every form that way).
enum SpmmForm : int { kFormAuto = 0, kFormExpand = 1, kFormSparse = 2 };
// AVX2, any n (the glue's AVX2 entry; spmm_avx2, the SpmmFn, runs it on row-major x only: the
// expand form for n >= 2). Per tile
// the expand form (x row-major: fp32 [n][ldx], as for SpmmFn; n <= kMaxSpmmRows per pass) or
// the sparse form (n = 1: x again; n >= 2: xt, x transposed in groups of bitmap_avx2_lanes(n)
// rows: [groups][k_tiles * 64][lanes] fp32, zero past n and k, 32-byte aligned). For n = 1, or
// form == kFormExpand, xt may be null. scratch: bitmap_avx2_scratch_bytes(n) bytes (null for
// n <= kMaxSpmmRows). Same y/bias contract as SpmmFn.
void spmm_avx2_forms(const BitmapWeight& w, const float* x, int64_t ldx, const float* xt, int64_t n,
                     const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1, int form, void* scratch);
inline int64_t bitmap_avx2_lanes(int64_t n) { return n <= 8 ? 8 : n <= 16 ? 16 : 32; }
inline int64_t bitmap_avx2_xt_floats(int64_t n, int64_t k) {
    const int64_t lanes = bitmap_avx2_lanes(n);
    return (n + lanes - 1) / lanes * lanes * ((k + 63) / 64) * 64;
}
inline int64_t bitmap_avx2_scratch_bytes(int64_t n) {
    return n <= kMaxSpmmRows ? 0 : (n + bitmap_avx2_lanes(n) - 1) / bitmap_avx2_lanes(n) * bitmap_avx2_lanes(n) * 64 * 4 + 32;
}
void spmm_avx512(const BitmapWeight&, const void*, int64_t, int64_t, const float*, float*, int64_t,
                 int64_t, int64_t);
// fp32 and fp16 weights, any n (for larger batches): decodes a 64 x kBlockK block of the weight
// at a time into `scratch` (bitmap_blocked_scratch_bytes(n) bytes, 64-byte aligned) and runs a
// register-blocked dense micro-kernel on it for every row of x. Same contract as SpmmFn (bf16
// runs the fused kernel on groups of kMaxSpmmRows rows: spmm_rowlanes_avx512 is its fast path).
void spmm_blocked_avx512(const BitmapWeight&, const void*, int64_t, int64_t, const float*, float*,
                         int64_t, int64_t, int64_t, void* scratch);
constexpr int64_t kBlockK = 2048;
inline int64_t bitmap_blocked_scratch_bytes(int64_t n) { return 64 * n * 4 + 64 * kBlockK * 4 + 128; }
// fp32 and fp16 weights, n <= kColumnsMaxRows (the glue uses it above the fused path's rows):
// one FMA per nonzero of its value with the 16 x values of its column, so the work follows the
// nonzeros (the blocked path multiplies every weight). xt is x transposed, [k_tiles * 64][16]
// fp32, zero past n and k, 64-byte aligned. Not for bf16: vdpbf16ps does 32 products per
// instruction, more than one FMA per nonzero gains at the sparsities that matter. Same y/bias
// contract.
constexpr int64_t kColumnsMaxRows = 16;
void spmm_columns_avx512(const BitmapWeight&, const float* xt, int64_t n, const float* bias, float* y,
                         int64_t ldy, int64_t tr0, int64_t tr1);
// bf16 weights, any n: 16 weight rows in the lanes of a vector, so x rows need no horizontal
// sums and the decoded weight stays in L1 (see bitmap_avx512.cpp). xg is x as bf16 pairs,
// [ceil(n / 16)][k_tiles * 32][16] uint32 (bitmap_x_pairs_words(n, k) of them), zero past n
// and k, 64-byte aligned; scratch: bitmap_rowlanes_scratch_bytes(n). Same y/bias contract as
// SpmmFn.
void spmm_rowlanes_avx512(const BitmapWeight&, const uint32_t* xg, int64_t n, const float* bias, float* y,
                          int64_t ldy, int64_t tr0, int64_t tr1, void* scratch);
inline int64_t bitmap_rowlanes_scratch_bytes(int64_t n) { return 4 * ((n + 15) / 16) * 256 * 4 + 64; }
inline int64_t bitmap_x_pairs_words(int64_t n, int64_t k) { return ((n + 15) / 16) * ((k + 63) / 64) * 32 * 16; }
void decode_avx512(const BitmapWeight&, void*, int64_t, int64_t, int64_t);

// aarch64 (bitmap_neon.cpp): fp32 x for every dtype (16-bit x is narrowed inside, exactly).
void spmm_neon(const BitmapWeight&, const void*, int64_t, int64_t, const float*, float*, int64_t,
               int64_t, int64_t);
void decode_neon(const BitmapWeight&, void*, int64_t, int64_t, int64_t);

// Whether this CPU (and OS) runs the path: avx512 needs AVX-512 F/BW/VL/VBMI2/BF16 + F16C,
// avx2 needs AVX2/FMA/F16C/BMI2/POPCNT, neon any aarch64 CPU; scalar always runs. Sources of an
// ISA are compiled only for its architecture (flashsparse/kernels/build.py); the paths of the
// others are stubs (bitmap_isa_stubs.cpp) that this reports unsupported.
bool bitmap_cpu_isa_supported(int isa);
inline bool bitmap_x_is_bf16(int isa, Dtype dtype) { return isa == kAvx512 && dtype == Dtype::BF16; }

}  // namespace cpu
}  // namespace flashsparse
