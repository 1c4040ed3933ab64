// torch glue for the bitmap weight-gradient CPU kernels in csrc/cpu/bitmap_sddmm_*.cpp
// (torch-free). An internal op, next to the Python-defined flashsparse ops (hence a FRAGMENT):
//   flashsparse::_bitmap_sddmm_cpu(grad, x, masks, tile_offsets, m, k, num_values, isa)
//       -> [num_values] in grad's dtype: (grad^T x) at the stored positions, 0 in padding slots
// isa: 0 scalar, 1 avx2, 2 avx512 (as for _bitmap_spmm_cpu; other values run the scalar path).
// Threads follow torch.get_num_threads() (at::parallel_for over 64-row tile rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>

#include "cpu/bitmap_cpu.h"
#include "cpu/bitmap_sddmm_cpu.h"

namespace {

namespace fc = flashsparse::cpu;

fc::SddmmFn sddmm_fn(int64_t isa) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == fc::kAvx512) return fc::sddmm_avx512;
    if (isa == fc::kAvx2) return fc::sddmm_avx2;
#endif
    (void)isa;
    return fc::sddmm_scalar;
}

// dst[c * ld + i] = src[i * cols + c] for i < n, zero for n <= i < ldn: 64 x 64 blocks (8-16 KB,
// in L1 while they turn around), threads over column blocks. ATen's copy_ of a transposed view
// was about 10x slower at n = 2048.
template <typename S, typename D>
void transpose_block(const S* src, int64_t n, int64_t cols, D* dst, int64_t ldn, int64_t ld, int64_t c0,
                     int64_t c1) {
    for (int64_t n0 = 0; n0 < n; n0 += 64) {
        const int64_t n1 = n0 + 64 < n ? n0 + 64 : n;
        for (int64_t c = c0; c < c1; ++c) {
            D* d = dst + c * ld;
            for (int64_t i = n0; i < n1; ++i) {
                if constexpr (std::is_same_v<S, D>)
                    d[i] = src[i * cols + c];
                else
                    d[i] = static_cast<float>(src[i * cols + c]);
            }
        }
    }
    for (int64_t c = c0; c < c1; ++c)
        for (int64_t i = n; i < ldn; ++i) dst[c * ld + i] = D{0};
}

// grad or x ([n, cols], contiguous) transposed into [cols, ld] of `dtype`, zero in [n, ldn).
at::Tensor transposed(const at::Tensor& t, int64_t ldn, int64_t ld, at::ScalarType dtype) {
    const at::Tensor src = t.contiguous();
    const int64_t n = src.size(0), cols = src.size(1);
    at::Tensor out = at::empty({cols, ld}, src.options().dtype(dtype));
    at::parallel_for(0, (cols + 63) / 64, 1, [&](int64_t b, int64_t e) {
        const int64_t c0 = b * 64, c1 = e * 64 < cols ? e * 64 : cols;
        if (dtype == at::kBFloat16) {  // only from bf16 (the AVX-512 bf16 path)
            // bf16 -> bf16 moves the bits (no rounding through float).
            transpose_block(reinterpret_cast<const uint16_t*>(src.data_ptr()), n, cols,
                            reinterpret_cast<uint16_t*>(out.data_ptr()), ldn, ld, c0, c1);
        } else if (src.scalar_type() == at::kFloat) {
            transpose_block(src.data_ptr<float>(), n, cols, out.data_ptr<float>(), ldn, ld, c0, c1);
        } else if (src.scalar_type() == at::kBFloat16) {
            transpose_block(src.data_ptr<c10::BFloat16>(), n, cols, out.data_ptr<float>(), ldn, ld, c0, c1);
        } else {
            transpose_block(src.data_ptr<c10::Half>(), n, cols, out.data_ptr<float>(), ldn, ld, c0, c1);
        }
    });
    return out;
}

at::Tensor bitmap_sddmm_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& masks,
                            const at::Tensor& offsets, int64_t m, int64_t k, int64_t num_values,
                            int64_t isa) {
    const char* op = "_bitmap_sddmm_cpu";
    TORCH_CHECK(isa < 0 || isa > 2 || fc::bitmap_cpu_isa_supported(static_cast<int>(isa)), op,
                ": this CPU does not support the ", isa == fc::kAvx512 ? "avx512" : "avx2", " path");
    TORCH_CHECK(m >= 1 && k >= 1, op, ": m and k must be >= 1, got m=", m, ", k=", k);
    for (const at::Tensor* t : {&grad, &x, &masks, &offsets})
        TORCH_CHECK(t->device().is_cpu(), op, ": every tensor must be on the CPU, got ", t->device());
    const at::ScalarType dtype = grad.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, op,
                ": grad must be float32, bfloat16 or float16, got ", dtype);
    TORCH_CHECK(grad.dim() == 2 && grad.size(1) == m, op, ": grad must be 2-D [N, m=", m, "], got shape ",
                grad.sizes());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == grad.size(0) && x.size(1) == k, op, ": x must be 2-D [N=",
                grad.size(0), ", k=", k, "], got shape ", x.sizes());
    TORCH_CHECK(x.scalar_type() == dtype, op, ": x must have grad's dtype ", dtype, ", got ", x.scalar_type());
    const int64_t mt = (m + 63) / 64, kt = (k + 63) / 64, tiles = mt * kt;
    TORCH_CHECK(masks.dim() == 1 && masks.scalar_type() == at::kLong && masks.numel() == tiles * 64, op,
                ": masks must be 1-D int64 with ", tiles * 64, " entries for a ", m, "x", k, " weight, got ",
                masks.scalar_type(), " ", masks.sizes());
    TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kInt && offsets.numel() == tiles + 1, op,
                ": tile_offsets must be 1-D int32 with ", tiles + 1, " entries, got ", offsets.scalar_type(),
                " ", offsets.sizes());
    const at::Tensor masks_c = masks.contiguous(), offsets_c = offsets.contiguous();
    const int32_t* off = offsets_c.data_ptr<int32_t>();
    TORCH_CHECK(off[0] == 0 && static_cast<int64_t>(off[tiles]) * 8 == num_values, op,
                ": tile_offsets do not match num_values (", num_values, " values, last offset ", off[tiles],
                " x 8)");
    for (int64_t t = 0; t < tiles; ++t)
        TORCH_CHECK(off[t + 1] >= off[t], op, ": tile_offsets must not decrease (tile ", t, ")");

    const int64_t n = grad.size(0);
    at::Tensor out = at::empty({num_values}, grad.options());
    if (n == 0) return out.zero_();
    // bf16 operands only where vdpbf16ps multiplies them; every other path reads fp32.
    const bool bf16 = isa == fc::kAvx512 && dtype == at::kBFloat16;
    const at::ScalarType operand = bf16 ? at::kBFloat16 : at::kFloat;
    const int64_t ldn = (n + fc::kSddmmAlign - 1) / fc::kSddmmAlign * fc::kSddmmAlign;
    // An odd number of cache lines per row (ldn is a whole number of 128-byte pairs): rows a
    // power of two of lines apart would all fall into a few L1 sets.
    const int64_t ld = ldn + 64 / c10::elementSize(operand);
    const at::Tensor gt = transposed(grad, ldn, ld, operand);
    const at::Tensor xt = transposed(x, ldn, ld, operand);
    const fc::SddmmProblem p{reinterpret_cast<const uint64_t*>(masks_c.data_ptr<int64_t>()),
                             off,
                             m,
                             k,
                             gt.data_ptr(),
                             xt.data_ptr(),
                             ldn,
                             ld,
                             bf16 ? fc::SddmmOperand::BF16 : fc::SddmmOperand::F32};
    at::Tensor out32 = dtype == at::kFloat ? out : at::empty({num_values}, grad.options().dtype(at::kFloat));
    float* o32 = out32.data_ptr<float>();
    const fc::SddmmFn fn = sddmm_fn(isa);
    std::atomic<bool> ok{true};
    at::parallel_for(0, mt, 1, [&](int64_t b, int64_t e) {
        if (!fn(p, o32, b, e)) {
            ok = false;
            return;
        }
        // This tile-row range's slots, in the gradient's dtype.
        const int64_t s0 = static_cast<int64_t>(off[b * kt]) * 8, s1 = static_cast<int64_t>(off[e * kt]) * 8;
        if (dtype == at::kBFloat16) {
            c10::BFloat16* dst = out.data_ptr<c10::BFloat16>();
            for (int64_t s = s0; s < s1; ++s) dst[s] = c10::BFloat16(o32[s]);
        } else if (dtype == at::kHalf) {
            c10::Half* dst = out.data_ptr<c10::Half>();
            for (int64_t s = s0; s < s1; ++s) dst[s] = c10::Half(o32[s]);
        }
    });
    TORCH_CHECK(ok.load(), op, ": a tile's masks hold more nonzeros than its tile_offsets leave slots for");
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashsparse, m) {
    m.def("_bitmap_sddmm_cpu(Tensor grad, Tensor x, Tensor masks, Tensor tile_offsets, int m, int k, "
          "int num_values, int isa=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashsparse, CPU, m) { m.impl("_bitmap_sddmm_cpu", &bitmap_sddmm_cpu); }
