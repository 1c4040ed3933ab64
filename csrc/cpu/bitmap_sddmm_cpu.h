// Torch-free CPU kernels for the weight gradient of a bitmap layer (layout version 2, see
// flashsparse/formats/bitmap.py): dL/dvalues of y = x @ W.T is (grad^T x) sampled at the stored
// positions of W, in packed order (an SDDMM).
//
// Both operands come transposed, so every stored position (r, c) is one dot product of two
// contiguous rows: gt[r] (grad's column r) and xt[c] (x's column c), each n long and zero-padded
// to ldn. The work follows the nonzeros: nnz * n products, not m * k * n. The glue makes the row
// stride ld an odd number of cache lines, so that the 64 rows of a tile spread over the L1 sets
// (a stride of a power of two of lines puts them all into a few sets).
//
// One translation unit per instruction set (bitmap_sddmm_scalar.cpp, bitmap_sddmm_avx2.cpp,
// bitmap_sddmm_avx512.cpp), each compiled for its own ISA with `#pragma GCC target` and the x86
// ones empty elsewhere (the glue selects them only on x86). ISA files must not instantiate
// std:: templates or other inline functions shared with other translation units.
#pragma once

#include <cstdint>

namespace flashsparse {
namespace cpu {

// Element type of gt and xt: fp32, or bf16 (AVX-512 BF16 path only: vdpbf16ps multiplies
// bf16 pairs exactly and sums in fp32).
enum class SddmmOperand : int { F32 = 0, BF16 = 1 };

// ldn, the row stride of gt and xt, is a multiple of this many elements (two 64-byte vectors of
// bf16: the SIMD loops take two at a time), and both are zero past n.
constexpr int64_t kSddmmAlign = 64;

struct SddmmProblem {
    const uint64_t* masks;   // [#tiles * 64] row masks
    const int32_t* offsets;  // [#tiles + 1], units of 8 values
    int64_t m, k;
    const void* gt;  // [m][ld]: grad transposed, zero in [n, ldn)
    const void* xt;  // [k][ld]: x transposed, zero in [n, ldn)
    int64_t ldn;     // elements of each row the kernels read (a multiple of kSddmmAlign)
    int64_t ld;      // row stride in elements (>= ldn)
    SddmmOperand operand;
    int64_t k_tiles() const { return (k + 63) / 64; }
};

// out[s] for every packed slot s of the tiles in tile rows [tr0, tr1): the dot product of its
// stored position, 0 in padding slots. Returns false (leaving those tiles partly written) if a
// tile's masks hold more nonzeros than its tile_offsets leave slots for.
using SddmmFn = bool (*)(const SddmmProblem& p, float* out, int64_t tr0, int64_t tr1);

bool sddmm_scalar(const SddmmProblem&, float*, int64_t, int64_t);  // fp32 operands
bool sddmm_avx2(const SddmmProblem&, float*, int64_t, int64_t);    // fp32 operands
bool sddmm_avx512(const SddmmProblem&, float*, int64_t, int64_t);  // fp32 or bf16 operands

}  // namespace cpu
}  // namespace flashsparse
