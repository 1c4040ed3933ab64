// Internals of the aarch64 NEON path (bitmap_neon.cpp) that tests and reports reach directly:
// the optional features it detected, and the kernel with its choices fixed, so that every
// variant runs on one CPU (tests/cpu_harness/bitmap_harness.cpp). The extension itself only
// calls spmm_neon / decode_neon (bitmap_cpu.h).
#pragma once

#include "bitmap_cpu.h"

namespace flashsparse {
namespace cpu {

struct NeonFeatures {
    bool fp16;  // FEAT_FP16 (Linux HWCAP_ASIMDHP, macOS hw.optional.arm.FEAT_FP16)
    bool fhm;   // FEAT_FHM: FMLAL/FMLAL2, fp16 products summed in fp32 (used for fp16 weights)
    bool bf16;  // FEAT_BF16: BFDOT (used for bf16 weights)
};

// Probed once (getauxval on Linux, sysctlbyname on macOS); all false off aarch64.
NeonFeatures bitmap_neon_features();

// Which n = 1 form spmm_neon runs: chosen by shape (auto), the rebuild for every tile, or the
// x-table gather for every tile that fits it (see bitmap_neon.cpp).
enum NeonForm : int { kNeonFormAuto = 0, kNeonFormRebuild = 1, kNeonFormGather = 2 };

// spmm_neon with its choices fixed: use_bf16 (BFDOT) / use_fhm (FMLAL) pick the instructions for
// 16-bit weights (the convert-and-FMA code otherwise); the caller must not ask for a feature
// the CPU lacks. Same contract as SpmmFn.
void spmm_neon_variant(bool use_bf16, bool use_fhm, int form, const BitmapWeight& w, const void* x, int64_t n,
                       int64_t ldx, const float* bias, float* y, int64_t ldy, int64_t tr0, int64_t tr1);

}  // namespace cpu
}  // namespace flashsparse
