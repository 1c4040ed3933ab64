// torch glue for the quantized bitmap CPU kernels in csrc/cpu/bitmap_quant_*.cpp (torch-free).
// Internal ops, next to the Python-defined flashsparse ops (hence a FRAGMENT):
//   flashsparse::_bitmap_quant_spmm_cpu(x, masks, values, tile_offsets, scales, m, k, bias, isa)
//       -> y [N, M] in x's dtype (values int8 or float8_e4m3fn, scales float32 [m, G])
//   flashsparse::_bitmap_quant_decode_cpu(masks, values, tile_offsets, scales, m, k, dtype, isa)
//       -> the dequantized W [M, K] in dtype
//   flashsparse::_bitmap_quant_cpu_path(isa) -> the name of the kernels the isa code runs
// isa: 0 scalar, 1 avx2, 2 avx512 (flashsparse::_bitmap_cpu_isa_supported says which run here).
// form (spmm): 0 auto, 1 expand, 2 sparse: forces one form on every tile of the AVX2 path at
// n = 1, for tests (as _bitmap_spmm_cpu's); the other paths ignore it.
// Threads follow torch.get_num_threads() (at::parallel_for over 64-row tile rows).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "cpu/bitmap_cpu.h"
#include "cpu/bitmap_quant.h"

namespace {

namespace fc = flashsparse::cpu;

// The kernels of a path and its name: every call goes through this table, and
// _bitmap_quant_cpu_path reports the name, so tests see which kernels an isa code runs.
using QuantSpmmFormsFn = void (*)(const fc::QuantBitmapWeight&, const float*, int64_t, int64_t, const float*,
                                  float*, int64_t, int64_t, int64_t, int);
using QuantBlockedFn = void (*)(const fc::QuantBitmapWeight&, const float*, int64_t, int64_t, const float*, float*,
                                int64_t, int64_t, int64_t, void*);
struct QuantPath {
    const char* name;
    fc::QuantSpmmFn spmm;        // n <= kQuantMaxRows a pass (when `forms` is null)
    QuantSpmmFormsFn forms;      // the same with a forced form, or null
    QuantBlockedFn blocked;      // n > kQuantMaxRows, or null (passes of spmm)
    fc::QuantDecodeFn decode;
};
QuantPath quant_path(int64_t isa) {
    switch (isa) {
        case fc::kAvx512:
            return {"avx512", fc::quant_spmm_avx512, nullptr, fc::quant_spmm_blocked_avx512, fc::quant_decode_avx512};
        case fc::kAvx2:
            return {"avx2", fc::quant_spmm_avx2, fc::quant_spmm_avx2_forms, fc::quant_spmm_blocked_avx2,
                    fc::quant_decode_avx2};
        default: return {"scalar", fc::quant_spmm_scalar, nullptr, nullptr, fc::quant_decode_scalar};
    }
}

void check_isa(int64_t isa, const char* op) {
    TORCH_CHECK(isa >= 0 && isa <= 3, op, ": isa must be 0 (scalar), 1 (avx2), 2 (avx512) or 3 (neon), got ",
                isa);
    static const char* const names[] = {"scalar", "avx2", "avx512", "neon"};
    TORCH_CHECK(fc::bitmap_cpu_isa_supported(static_cast<int>(isa)), op, ": this CPU does not support the ",
                names[isa], " path");
}

struct Checked {
    fc::QuantBitmapWeight w;
    at::Tensor masks, values, offsets, scales;  // contiguous, kept alive
};

// The group size [m, groups] scales mean for k columns (flashsparse.formats.bitmap_quant.group_size_of).
int64_t group_size_of(int64_t k, int64_t groups, const char* op) {
    if (groups == 1) return k;
    int64_t g = 32;
    while ((k + g - 1) / g > groups) g *= 2;
    TORCH_CHECK((k + g - 1) / g == groups, op, ": scales with ", groups, " columns match no group size for k=", k,
                " (ceil(k / group_size) columns, group_size a power of two >= 32)");
    return g;
}

Checked check_weight(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& offsets,
                     const at::Tensor& scales, int64_t m, int64_t k, const char* op) {
    TORCH_CHECK(m >= 1 && k >= 1, op, ": m and k must be >= 1, got m=", m, ", k=", k);
    for (const at::Tensor* t : {&masks, &values, &offsets}) {
        TORCH_CHECK(t->device().is_cpu(), op, ": weight tensors must be on the CPU, got ", t->device());
        TORCH_CHECK(t->dim() == 1, op, ": masks, values and tile_offsets must be 1-D, got shape ", t->sizes());
    }
    const int64_t tiles = ((m + 63) / 64) * ((k + 63) / 64);
    TORCH_CHECK(masks.scalar_type() == at::kLong && masks.numel() == tiles * 64, op,
                ": masks must be int64 with ", tiles * 64, " entries for a ", m, "x", k, " weight, got ",
                masks.scalar_type(), " with ", masks.numel());
    TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.numel() == tiles + 1, op,
                ": tile_offsets must be int32 with ", tiles + 1, " entries, got ", offsets.scalar_type(), " with ",
                offsets.numel());
    const bool int8 = values.scalar_type() == at::kChar;
    TORCH_CHECK(int8 || values.scalar_type() == at::kFloat8_e4m3fn, op,
                ": values must be int8 or float8_e4m3fn codes, got ", values.scalar_type());
    TORCH_CHECK(scales.device().is_cpu() && scales.scalar_type() == at::kFloat && scales.dim() == 2 &&
                    scales.size(0) == m && scales.size(1) >= 1,
                op, ": scales must be a float32 CPU tensor [m=", m, ", groups], got ", scales.scalar_type(), " ",
                scales.sizes());
    Checked c;
    c.masks = masks.contiguous();
    c.values = values.contiguous();
    c.offsets = offsets.contiguous();
    c.scales = scales.contiguous();
    const int32_t* off = c.offsets.data_ptr<int32_t>();
    TORCH_CHECK(off[0] == 0 && static_cast<int64_t>(off[tiles]) * 8 == c.values.numel(), op,
                ": tile_offsets do not match values (", c.values.numel(), " values, last offset ", off[tiles],
                " x 8)");
    const int64_t groups = c.scales.size(1);
    c.w = fc::QuantBitmapWeight{reinterpret_cast<const uint64_t*>(c.masks.data_ptr<int64_t>()),
                                static_cast<const uint8_t*>(c.values.data_ptr()),
                                off,
                                c.scales.data_ptr<float>(),
                                c.values.numel(),
                                m,
                                k,
                                groups,
                                group_size_of(k, groups, op),
                                int8 ? fc::QuantType::Int8 : fc::QuantType::Fp8E4M3};
    return c;
}

// fp32 rows to dtype.
void store_rows(const float* src, int64_t rows, int64_t cols, int64_t lds, at::Tensor& out, int64_t row0) {
    const int64_t k = out.size(1);
    for (int64_t r = 0; r < rows; ++r) {
        const float* s = src + r * lds;
        switch (out.scalar_type()) {
            case at::kFloat: std::memcpy(out.data_ptr<float>() + (row0 + r) * k, s, cols * 4); break;
            case at::kBFloat16: {
                c10::BFloat16* d = out.data_ptr<c10::BFloat16>() + (row0 + r) * k;
                for (int64_t c = 0; c < cols; ++c) d[c] = c10::BFloat16(s[c]);
                break;
            }
            default: {
                c10::Half* d = out.data_ptr<c10::Half>() + (row0 + r) * k;
                for (int64_t c = 0; c < cols; ++c) d[c] = c10::Half(s[c]);
                break;
            }
        }
    }
}

at::Tensor decode_into(const fc::QuantBitmapWeight& w, int64_t isa, at::Tensor out) {
    const fc::QuantDecodeFn fn = quant_path(isa).decode;
    at::parallel_for(0, (w.m + 63) / 64, 1, [&](int64_t b, int64_t e) {
        thread_local std::vector<float> rows;
        rows.resize(std::max<size_t>(rows.size(), static_cast<size_t>(64 * w.k)));
        for (int64_t tr = b; tr < e; ++tr) {
            fn(w, rows.data(), w.k, tr, tr + 1);
            store_rows(rows.data(), std::min<int64_t>(64, w.m - tr * 64), w.k, w.k, out, tr * 64);
        }
    });
    return out;
}

void check_dtype(at::ScalarType t, const char* op, const char* what) {
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op, ": ", what,
                " must be float32, bfloat16 or float16, got ", t);
}

at::Tensor bitmap_quant_decode_cpu(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& offsets,
                                   const at::Tensor& scales, int64_t m, int64_t k, at::ScalarType dtype,
                                   int64_t isa) {
    const char* op = "_bitmap_quant_decode_cpu";
    check_isa(isa, op);
    check_dtype(dtype, op, "dtype");
    Checked c = check_weight(masks, values, offsets, scales, m, k, op);
    return decode_into(c.w, isa, at::empty({m, k}, c.scales.options().dtype(dtype)));
}

// x as fp32, zero-padded to kp columns; false if x has a NaN or Inf.
template <typename T>
bool pack_x(const T* x, int64_t n, int64_t k, int64_t kp, float* out) {
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
        const T* xi = x + i * k;
        float* o = out + i * kp;
        float all = 0.0f;
        for (int64_t c = 0; c < k; ++c) {
            o[c] = static_cast<float>(xi[c]);
            all += o[c] * 0.0f;  // NaN iff some element is NaN or Inf
        }
        std::memset(o + k, 0, (kp - k) * 4);
        finite &= all == 0.0f;
    }
    return finite;
}

at::Tensor bitmap_quant_spmm_cpu(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                                 const at::Tensor& offsets, const at::Tensor& scales, int64_t m, int64_t k,
                                 const std::optional<at::Tensor>& bias, int64_t isa, int64_t form) {
    const char* op = "_bitmap_quant_spmm_cpu";
    check_isa(isa, op);
    TORCH_CHECK(form >= fc::kFormAuto && form <= fc::kFormSparse, op,
                ": form must be 0 (auto), 1 (expand) or 2 (sparse), got ", form);
    TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be 2-D [N, k=", k, "], got shape ", x.sizes());
    check_dtype(x.scalar_type(), op, "x");
    Checked c = check_weight(masks, values, offsets, scales, m, k, op);
    if (bias.has_value()) {
        TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->numel() == m, op,
                    ": bias must be a CPU ", x.scalar_type(), " tensor with m=", m, " elements");
    }
    const int64_t n = x.size(0);
    at::Tensor y = at::empty({n, m}, x.options());
    if (n == 0) return y;
    const at::Tensor xc = x.contiguous();
    const int64_t mt = (m + 63) / 64, kp = ((k + 63) / 64) * 64;
    // 64-byte aligned, rows too (kp is a multiple of 16 floats).
    std::vector<float> xpack_store(n * kp + 16);
    float* xpack = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xpack_store.data()) + 63) & ~uintptr_t(63));
    bool finite;
    switch (x.scalar_type()) {
        case at::kFloat: finite = pack_x(xc.data_ptr<float>(), n, k, kp, xpack); break;
        case at::kBFloat16: finite = pack_x(xc.data_ptr<c10::BFloat16>(), n, k, kp, xpack); break;
        default: finite = pack_x(xc.data_ptr<c10::Half>(), n, k, kp, xpack); break;
    }
    if (!finite) {
        // The kernels skip zero weights, but F.linear gives 0 * Inf = NaN: go dense.
        at::Tensor w = decode_into(c.w, isa, at::empty({m, k}, x.options()));
        return at::linear(xc, w, bias);
    }
    std::vector<float> bias32;
    if (bias.has_value()) {
        const at::Tensor bc = bias->contiguous().to(at::kFloat);
        bias32.assign(bc.data_ptr<float>(), bc.data_ptr<float>() + m);
    }
    const float* b32 = bias32.empty() ? nullptr : bias32.data();
    // NaN until a kernel writes it: an output the kernel misses shows.
    std::vector<float> y32(n * m, std::numeric_limits<float>::quiet_NaN());
    const QuantPath path = quant_path(isa);
    const bool blocked = path.blocked != nullptr && n > fc::kQuantMaxRows;
    // Decode with bf16 activations: the AVX-512 kernel also reads x as bf16 (zero-padded).
    std::vector<uint16_t> xb_store;
    const uint16_t* xb = nullptr;
    if (isa == fc::kAvx512 && n == 1 && x.scalar_type() == at::kBFloat16) {
        xb_store.assign(kp + 32, 0);
        uint16_t* dst = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(xb_store.data()) + 63) & ~uintptr_t(63));
        std::memcpy(dst, xc.data_ptr<c10::BFloat16>(), k * 2);
        xb = dst;
    }
    const at::ScalarType dtype = x.scalar_type();
    at::parallel_for(0, mt, 1, [&](int64_t b, int64_t e) {
        if (xb != nullptr) {
            fc::quant_spmm_n1_bf16x_avx512(c.w, xpack, xb, b32, y32.data(), b, e);
        } else if (blocked) {
            thread_local std::vector<char> scratch;
            scratch.resize(std::max<size_t>(scratch.size(), fc::quant_blocked_scratch_bytes(n)));
            path.blocked(c.w, xpack, n, kp, b32, y32.data(), m, b, e, scratch.data());
        } else {
            for (int64_t i = 0; i < n; i += fc::kQuantMaxRows) {
                const int64_t rows = std::min(fc::kQuantMaxRows, n - i);
                if (path.forms != nullptr)
                    path.forms(c.w, xpack + i * kp, rows, kp, b32, y32.data() + i * m, m, b, e, static_cast<int>(form));
                else
                    path.spmm(c.w, xpack + i * kp, rows, kp, b32, y32.data() + i * m, m, b, e);
            }
        }
        const int64_t r0 = b * 64, r1 = std::min(m, e * 64);
        for (int64_t i = 0; i < n; ++i) {
            const float* src = y32.data() + i * m;
            if (dtype == at::kFloat) {
                float* dst = y.data_ptr<float>() + i * m;
                for (int64_t r = r0; r < r1; ++r) dst[r] = src[r];
            } else if (dtype == at::kBFloat16) {
                c10::BFloat16* dst = y.data_ptr<c10::BFloat16>() + i * m;
                for (int64_t r = r0; r < r1; ++r) dst[r] = c10::BFloat16(src[r]);
            } else {
                c10::Half* dst = y.data_ptr<c10::Half>() + i * m;
                for (int64_t r = r0; r < r1; ++r) dst[r] = c10::Half(src[r]);
            }
        }
    });
    return y;
}

std::string quant_path_name(int64_t isa) {
    check_isa(isa, "_bitmap_quant_cpu_path");
    return quant_path(isa).name;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashsparse, m) {
    m.def(
        "_bitmap_quant_spmm_cpu(Tensor x, Tensor masks, Tensor values, Tensor tile_offsets, Tensor scales, "
        "int m, int k, Tensor? bias=None, int isa=0, int form=0) -> Tensor");
    m.def(
        "_bitmap_quant_decode_cpu(Tensor masks, Tensor values, Tensor tile_offsets, Tensor scales, int m, int k, "
        "ScalarType dtype, int isa=0) -> Tensor");
    m.def("_bitmap_quant_cpu_path(int isa) -> str", &quant_path_name);
}

TORCH_LIBRARY_IMPL(flashsparse, CPU, m) {
    m.impl("_bitmap_quant_spmm_cpu", &bitmap_quant_spmm_cpu);
    m.impl("_bitmap_quant_decode_cpu", &bitmap_quant_decode_cpu);
}
