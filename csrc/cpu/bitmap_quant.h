// Torch-free CPU kernels for bitmap weights with quantized values (see
// flashsparse/formats/bitmap_quant.py): the bitmap layout (one 64-bit mask per row of a 64x64
// tile, codes packed row-major from values[tile_offsets[t] * 8]) with int8 or fp8 e4m3 codes,
// and float32 scales [m, groups] outside the tiles. W[r, c] = code(r, c) * scales[r, c / g].
//
// One translation unit per instruction set (bitmap_quant_scalar.cpp, bitmap_quant_avx2.cpp,
// bitmap_quant_avx512.cpp), each compiled for its own ISA with `#pragma GCC target`; the glue
// (csrc/bindings/bitmap_quant_cpu.cpp) picks one per call. The ISA codes and the CPU probe are
// the bitmap kernels' (bitmap_cpu.h). As there: ISA files must not instantiate std:: templates or
// inline functions shared with other translation units.
#pragma once

#include <cstdint>

namespace flashsparse {
namespace cpu {

enum class QuantType : int { Int8 = 0, Fp8E4M3 = 1 };

// An fp8 e4m3 code with its exponent and mantissa moved up by 7 bits, (code & 0x7f) << 7 with
// the sign at bit 15, is an fp16 whose value is the code's value / 256, normal and subnormal
// alike (e4m3 has bias 7, fp16 bias 15: 2^-8 either way). SIMD kernels convert codes that way
// (the F16C conversion is exact) and fold the 256 into the scale.
constexpr float kFp8HalfUnit = 256.0f;

struct QuantBitmapWeight {
    const uint64_t* masks;   // [#tiles * 64]
    const uint8_t* values;   // [num_values] int8 codes or fp8 e4m3 bits
    const int32_t* offsets;  // [#tiles + 1], units of 8 values
    const float* scales;     // [m, groups] row-major
    int64_t num_values;
    int64_t m, k;
    int64_t groups;      // scale columns: 1 (one scale per row) or ceil(k / group_size)
    int64_t group_size;  // columns per scale: a power of two >= 32, or k when groups == 1
    QuantType quant;
};

// Groups of 32: tile kt's columns 0-31 take scale column 2 kt, columns 32-63 column 2 kt + 1,
// which does not exist when the tile's upper half lies past k (k mod 64 in 1..32): then the
// upper half, all zeros, takes the lower half's scale. Reading column 2 kt + 1 there read past
// a row's scales: the next row's, and past the last row's, whatever follows the tensor (a NaN
// there made the zero products NaN).
inline int64_t group32_upper(int64_t kt, int64_t groups) { return 2 * kt + 1 < groups ? 1 : 0; }

// Rows of x one spmm pass handles (their accumulators stay in L1); the glue loops over more.
constexpr int64_t kQuantMaxRows = 8;

// y[i, r] (fp32, row stride ldy) = bias[r] + sum_c W[r, c] * x[i, c] for the weight rows of
// tile rows [tr0, tr1) and i < n <= kQuantMaxRows. x is fp32, zero-padded to k_tiles * 64
// columns (row stride ldx). The caller guarantees x is finite (zero weights are skipped, so
// 0 * Inf is not defined here; the glue sends non-finite x to the dense path, as F.linear).
using QuantSpmmFn = void (*)(const QuantBitmapWeight& w, const float* x, int64_t n, int64_t ldx,
                             const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1);
// Rows [tr0 * 64, min(tr1 * 64, m)) of the dequantized [m, k] weight as fp32; `out` points at row
// tr0 * 64, row stride ldo.
using QuantDecodeFn = void (*)(const QuantBitmapWeight& w, float* out, int64_t ldo, int64_t tr0,
                               int64_t tr1);

void quant_spmm_scalar(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                       int64_t, int64_t, int64_t);
void quant_decode_scalar(const QuantBitmapWeight&, float*, int64_t, int64_t, int64_t);

// AVX-512 (F/BW/VL/VBMI2, F16C): vpexpandb rebuilds a 64-code row segment from its mask in one
// instruction; codes become fp32 in registers (int8: sign extension + convert; fp8: the fp16
// bit move above + vcvtph2ps), multiplied with fp32 x and accumulated in fp32.
void quant_spmm_avx512(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                       int64_t, int64_t, int64_t);
void quant_decode_avx512(const QuantBitmapWeight&, float*, int64_t, int64_t, int64_t);
// n = 1 with bf16 activations: x as fp32 and as the bf16 it came from (both zero-padded to
// k_tiles * 64 columns); rows of few nonzeros multiply with vdpbf16ps (see the source). Same
// y/bias contract as QuantSpmmFn (ldy unused: one row of x). Needs AVX512-BF16 as well.
void quant_spmm_n1_bf16x_avx512(const QuantBitmapWeight&, const float* x, const uint16_t* xb, const float* bias,
                                float* y, int64_t tr0, int64_t tr1);
// Any n (the glue uses it above kQuantMaxRows rows): dequantizes a 64 x kQuantBlockK block of
// the weight at a time into `scratch` (quant_blocked_scratch_bytes(n) bytes) and multiplies it
// with every row of x. Same y/bias contract as QuantSpmmFn.
constexpr int64_t kQuantBlockK = 2048;
constexpr int64_t quant_blocked_scratch_bytes(int64_t n) { return 64 * n * 4 + 64 * kQuantBlockK * 4 + 128; }
void quant_spmm_blocked_avx512(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*,
                               float*, int64_t, int64_t, int64_t, void* scratch);


// AVX2 (+ FMA, F16C, BMI1/2, POPCNT): per mask byte, one vpshufb table line rebuilds 8 codes in
// place before they are converted (int8: sign extension + vcvtdq2ps; fp8: the fp16 bit move
// above + vcvtph2ps); at n = 1 tiles of few codes take "slots" of 8 nonzeros with x gathered at
// their columns instead (see the source). The QuantSpmmFn picks the form per tile; the _forms
// entry takes `form` as the unquantized kernels' SpmmForm (0 auto, 1 expand everywhere, 2 slots
// everywhere at n = 1; n >= 2 always expands), for tests.
void quant_spmm_avx2(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*, int64_t,
                     int64_t, int64_t);
void quant_spmm_avx2_forms(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                           int64_t, int64_t, int64_t, int form);
void quant_decode_avx2(const QuantBitmapWeight&, float*, int64_t, int64_t, int64_t);
// Any n, as quant_spmm_blocked_avx512 (same scratch size, quant_blocked_scratch_bytes(n)).
void quant_spmm_blocked_avx2(const QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                             int64_t, int64_t, int64_t, void* scratch);

}  // namespace cpu
}  // namespace flashsparse
