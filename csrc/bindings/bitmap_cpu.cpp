// torch glue for the bitmap CPU kernels in csrc/cpu/ (torch-free). Internal ops, next to the
// Python-defined flashsparse ops (hence a FRAGMENT):
//   flashsparse::_bitmap_spmm_cpu(x, masks, values, tile_offsets, m, k, bias, isa, form) -> y [N, M]
//     (form: 0 auto, 1 expand, 2 sparse: forces one form on every tile of the AVX2 path, for
//     tests; the other paths ignore it)
//   flashsparse::_bitmap_decode_cpu(masks, values, tile_offsets, m, k, isa) -> W [M, K]
//   flashsparse::_bitmap_cpu_isa_supported(isa) -> bool   (0 scalar, 1 avx2, 2 avx512, 3 neon)
// Threads follow torch.get_num_threads() (at::parallel_for over 64-row tile rows).
#include <Python.h>

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
#include <vector>

#include "cpu/bitmap_cpu.h"

namespace {

namespace fc = flashsparse::cpu;

// AVX-512 path: up to this many x rows the fused kernel reads the weight once for all of them;
// above it fp32/fp16 weights take the column kernel up to kColumnsMaxRows rows, and otherwise
// the weight is decoded a block at a time into a cache-sized buffer that a dense micro-kernel
// reuses across the batch. bf16 weights take the row-lanes kernel from kRowLanesMinRows rows
// (where it overtakes the fused one: bench/results/cpu-kernel-notes.md). The AVX2 path picks
// its forms per tile itself (spmm_avx2_forms); the scalar path runs on groups of
// kMaxSpmmRows rows.
constexpr int64_t kFusedMaxRows = 4;
constexpr int64_t kRowLanesMinRows = 3;

// x for spmm_rowlanes_avx512: xg[(i / 16) * pairs * 16 + p * 16 + i % 16] = x[i][2p] | x[i][2p + 1] << 16
// (bf16 bits), from x packed as bf16 [n][kp]; zero for rows past n.
void pack_x_pairs(const uint16_t* x, int64_t n, int64_t kp, uint32_t* xg) {
    const int64_t pairs = kp / 2;
    const int64_t groups = (n + 15) / 16;
    for (int64_t i = 0; i < groups * 16; ++i) {
        uint32_t* dst = xg + (i / 16) * pairs * 16 + i % 16;
        if (i >= n) {
            for (int64_t p = 0; p < pairs; ++p) dst[p * 16] = 0;
            continue;
        }
        const uint16_t* src = x + i * kp;
        for (int64_t p = 0; p < pairs; ++p)
            dst[p * 16] = static_cast<uint32_t>(src[2 * p]) | static_cast<uint32_t>(src[2 * p + 1]) << 16;
    }
}

fc::Dtype to_dtype(at::ScalarType t, const char* op) {
    switch (t) {
        case at::kFloat: return fc::Dtype::F32;
        case at::kBFloat16: return fc::Dtype::BF16;
        case at::kHalf: return fc::Dtype::F16;
        default: TORCH_CHECK(false, op, ": weight values must be float32, bfloat16 or float16, got ", t);
    }
}

fc::SpmmFn spmm_fn(int64_t isa) {
    if (isa == fc::kNeon) return fc::spmm_neon;
    return isa == fc::kAvx512 ? fc::spmm_avx512 : isa == fc::kAvx2 ? fc::spmm_avx2 : fc::spmm_scalar;
}
fc::DecodeFn decode_fn(int64_t isa) {
    if (isa == fc::kNeon) return fc::decode_neon;
    return isa == fc::kAvx512 ? fc::decode_avx512 : isa == fc::kAvx2 ? fc::decode_avx2 : fc::decode_scalar;
}

void check_isa(int64_t isa, const char* op) {
    TORCH_CHECK(isa >= 0 && isa <= 3, op, ": isa must be 0 (scalar), 1 (avx2), 2 (avx512) or 3 (neon), got ", isa);
    const char* names[] = {"scalar", "avx2", "avx512", "neon"};
    TORCH_CHECK(fc::bitmap_cpu_isa_supported(static_cast<int>(isa)), op, ": this CPU does not support the ",
                names[isa], " path");
}

struct Checked {
    fc::BitmapWeight w;
    at::Tensor masks, values, offsets;  // contiguous, kept alive
};

Checked check_weight(const at::Tensor& masks, const at::Tensor& values, const at::Tensor& offsets,
                     int64_t m, int64_t k, const char* op) {
    TORCH_CHECK(m >= 1 && k >= 1, op, ": m and k must be >= 1, got m=", m, ", k=", k);
    for (const at::Tensor* t : {&masks, &values, &offsets}) {
        TORCH_CHECK(t->device().is_cpu(), op, ": weight tensors must be on the CPU, got ", t->device());
        TORCH_CHECK(t->dim() == 1, op, ": weight tensors must be 1-D, got shape ", t->sizes());
    }
    const int64_t tiles = ((m + 63) / 64) * ((k + 63) / 64);
    TORCH_CHECK(masks.scalar_type() == at::kLong && masks.numel() == tiles * 64, op,
                ": masks must be int64 with ", tiles * 64, " entries for a ", m, "x", k,
                " weight, got ", masks.scalar_type(), " with ", masks.numel());
    TORCH_CHECK(offsets.scalar_type() == at::kInt && offsets.numel() == tiles + 1, op,
                ": tile_offsets must be int32 with ", tiles + 1, " entries, got ",
                offsets.scalar_type(), " with ", offsets.numel());
    Checked c;
    c.masks = masks.contiguous();
    c.values = values.contiguous();
    c.offsets = offsets.contiguous();
    const int32_t* off = c.offsets.data_ptr<int32_t>();
    TORCH_CHECK(off[0] == 0 && static_cast<int64_t>(off[tiles]) * 8 == c.values.numel(), op,
                ": tile_offsets do not match values (", c.values.numel(), " values, last offset ",
                off[tiles], " x 8)");
    c.w = fc::BitmapWeight{reinterpret_cast<const uint64_t*>(c.masks.data_ptr<int64_t>()),
                           c.values.data_ptr(), off, c.values.numel(), m, k,
                           to_dtype(values.scalar_type(), op)};
    return c;
}

at::Tensor decode_into(const fc::BitmapWeight& w, int64_t isa, at::Tensor out, int64_t tr0, int64_t tr1) {
    const fc::DecodeFn fn = decode_fn(isa);
    char* base = static_cast<char*>(out.data_ptr());
    const int64_t row_bytes = w.k * out.element_size();
    at::parallel_for(tr0, tr1, 1, [&](int64_t b, int64_t e) {
        fn(w, base + (b - tr0) * 64 * row_bytes, w.k, b, e);
    });
    return out;
}

at::Tensor bitmap_decode_cpu(const at::Tensor& masks, const at::Tensor& values,
                             const at::Tensor& offsets, int64_t m, int64_t k, int64_t isa) {
    const char* op = "_bitmap_decode_cpu";
    check_isa(isa, op);
    Checked c = check_weight(masks, values, offsets, m, k, op);
    at::Tensor out = at::empty({m, k}, c.values.options());
    return decode_into(c.w, isa, out, 0, (m + 63) / 64);
}

// x as the kernels read it: zero-padded to whole tiles, fp32 (or bf16 for the AVX-512 bf16
// path). Returns false if x has a NaN or Inf.
template <typename T>
bool pack_x(const T* x, int64_t n, int64_t k, int64_t kp, bool keep_bf16, void* out) {
    bool finite = true;
    for (int64_t i = 0; i < n; ++i) {
        const T* xi = x + i * k;
        if (keep_bf16) {
            uint16_t* o = static_cast<uint16_t*>(out) + i * kp;
            std::memcpy(o, xi, k * 2);
            std::memset(o + k, 0, (kp - k) * 2);
            for (int64_t c = 0; c < k; ++c) finite &= (o[c] & 0x7f80u) != 0x7f80u;
        } else {
            float* o = static_cast<float*>(out) + i * kp;
            float all = 0.0f;
            for (int64_t c = 0; c < k; ++c) {
                o[c] = static_cast<float>(xi[c]);
                all += o[c] * 0.0f;  // NaN iff some element is NaN or Inf
            }
            std::memset(o + k, 0, (kp - k) * 4);
            finite &= all == 0.0f;
        }
    }
    return finite;
}

at::Tensor bitmap_spmm_cpu(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                           const at::Tensor& offsets, int64_t m, int64_t k,
                           const std::optional<at::Tensor>& bias, int64_t isa, int64_t form) {
    const char* op = "_bitmap_spmm_cpu";
    check_isa(isa, op);
    TORCH_CHECK(form >= fc::kFormAuto && form <= fc::kFormSparse, op,
                ": form must be 0 (auto), 1 (expand) or 2 (sparse), got ", form);
    TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() == 2 && x.size(1) == k, op, ": x must be 2-D [N, k=", k, "], got shape ", x.sizes());
    TORCH_CHECK(x.scalar_type() == values.scalar_type(), op, ": x must have the weight's dtype ",
                values.scalar_type(), ", got ", x.scalar_type());
    Checked c = check_weight(masks, values, offsets, m, k, op);
    if (bias.has_value()) {
        TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type() && bias->numel() == m,
                    op, ": bias must be a CPU ", x.scalar_type(), " tensor with m=", m, " elements");
    }
    const int64_t n = x.size(0);
    at::Tensor y = at::empty({n, m}, x.options());
    if (n == 0) return y;
    const at::Tensor xc = x.contiguous();
    const int64_t mt = (m + 63) / 64, kp = ((k + 63) / 64) * 64;

    // x as the kernels read it (every path): zero-padded to whole tiles, fp32 or bf16.
    const bool keep_bf16 = fc::bitmap_x_is_bf16(static_cast<int>(isa), c.w.dtype);
    // 64-byte aligned (rows too: kp is a multiple of 64 elements): the blocked micro-kernel's x
    // loads then never split a cache line.
    std::vector<float> xpack_store((keep_bf16 ? (n * kp + 1) / 2 : n * kp) + 16);
    float* xpack = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xpack_store.data()) + 63) & ~uintptr_t(63));
    bool finite;
    switch (c.w.dtype) {
        case fc::Dtype::F32: finite = pack_x(xc.data_ptr<float>(), n, k, kp, false, xpack); break;
        case fc::Dtype::BF16:
            finite = pack_x(xc.data_ptr<c10::BFloat16>(), n, k, kp, keep_bf16, xpack);
            break;
        default: finite = pack_x(xc.data_ptr<c10::Half>(), n, k, kp, false, xpack); break;
    }
    if (!finite) {
        // The kernels skip zero weights, but F.linear gives 0 * Inf = NaN: go dense.
        at::Tensor w = at::empty({m, k}, c.values.options());
        return at::linear(xc, decode_into(c.w, isa, w, 0, mt), bias);
    }

    std::vector<float> bias32;
    if (bias.has_value()) {
        const at::Tensor bc = bias->contiguous().to(at::kFloat);
        bias32.assign(bc.data_ptr<float>(), bc.data_ptr<float>() + m);
    }
    // NaN until a kernel writes it: a row a kernel misses shows in every test.
    std::vector<float> y32(n * m, std::numeric_limits<float>::quiet_NaN());
    const fc::SpmmFn fn = spmm_fn(isa);
    const at::ScalarType dtype = x.scalar_type();
    const float* b32 = bias32.empty() ? nullptr : bias32.data();
    const bool avx2 = isa == fc::kAvx2;
    const bool bf16_avx512 = isa == fc::kAvx512 && c.w.dtype == fc::Dtype::BF16;
    const bool rowlanes = bf16_avx512 && n >= kRowLanesMinRows;
    const bool columns = !bf16_avx512 && n > kFusedMaxRows && n <= fc::kColumnsMaxRows && isa == fc::kAvx512;
    const bool blocked = !bf16_avx512 && n > kFusedMaxRows && isa == fc::kAvx512 && !columns;
    std::vector<uint32_t> xg_store;
    uint32_t* xg = nullptr;
    if (rowlanes) {
        xg_store.resize(fc::bitmap_x_pairs_words(n, k) + 16);
        xg = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(xg_store.data()) + 63) & ~uintptr_t(63));
        pack_x_pairs(reinterpret_cast<const uint16_t*>(xpack), n, kp, xg);
    }
    std::vector<float> xt_store;
    float* xt = nullptr;
    if (columns) {
        // x transposed, 16 lanes per column (zero past n), 64-byte aligned for aligned loads.
        xt_store.assign(kp * 16 + 16, 0.0f);
        xt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xt_store.data()) + 63) & ~uintptr_t(63));
        for (int64_t i = 0; i < n; ++i)
            for (int64_t col = 0; col < kp; ++col) xt[col * 16 + i] = xpack[i * kp + col];
    } else if (avx2 && n > 1 && form != fc::kFormExpand) {
        // x transposed in groups of `lanes` rows: [group][column][lane], zero past n.
        const int64_t lanes = fc::bitmap_avx2_lanes(n);
        xt_store.assign(fc::bitmap_avx2_xt_floats(n, k) + 16, 0.0f);
        xt = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(xt_store.data()) + 63) & ~uintptr_t(63));
        for (int64_t i = 0; i < n; ++i) {
            float* dst = xt + (i / lanes) * kp * lanes + i % lanes;
            const float* src = xpack + i * kp;
            for (int64_t col = 0; col < kp; ++col) dst[col * lanes] = src[col];
        }
    }
    at::parallel_for(0, mt, 1, [&](int64_t b, int64_t e) {
        if (avx2) {
            thread_local std::vector<char> scratch;
            scratch.resize(std::max<size_t>(scratch.size(), fc::bitmap_avx2_scratch_bytes(n)));
            fc::spmm_avx2_forms(c.w, xpack, kp, xt, n, b32, y32.data(), m, b, e, static_cast<int>(form),
                                scratch.data());
        } else if (rowlanes) {
            thread_local std::vector<char> scratch;
            scratch.resize(std::max<size_t>(scratch.size(), fc::bitmap_rowlanes_scratch_bytes(n)));
            fc::spmm_rowlanes_avx512(c.w, xg, n, b32, y32.data(), m, b, e, scratch.data());
        } else if (columns) {
            fc::spmm_columns_avx512(c.w, xt, n, b32, y32.data(), m, b, e);
        } else if (blocked) {
            // Larger batches: decode a cache-sized block once, reuse it for every row of x.
            thread_local std::vector<char> scratch;
            scratch.resize(std::max<size_t>(scratch.size(), fc::bitmap_blocked_scratch_bytes(n)));
            fc::spmm_blocked_avx512(c.w, xpack, n, kp, b32, y32.data(), m, b, e, scratch.data());
        } else {
            // The fused kernel keeps accumulators for kMaxSpmmRows rows of x at a time.
            const int64_t xsize = keep_bf16 ? 2 : 4;
            for (int64_t i = 0; i < n; i += fc::kMaxSpmmRows) {
                const char* xi = reinterpret_cast<const char*>(xpack) + i * kp * xsize;
                fn(c.w, xi, std::min(fc::kMaxSpmmRows, n - i), kp, b32, y32.data() + i * m, m, b, e);
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

bool isa_supported(int64_t isa) {
    return isa >= 0 && isa <= 3 && fc::bitmap_cpu_isa_supported(static_cast<int>(isa));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashsparse, m) {
    m.def("_bitmap_spmm_cpu(Tensor x, Tensor masks, Tensor values, Tensor tile_offsets, int m, int k, "
          "Tensor? bias=None, int isa=0, int form=0) -> Tensor");
    m.def("_bitmap_decode_cpu(Tensor masks, Tensor values, Tensor tile_offsets, int m, int k, int isa=0) -> Tensor");
    m.def("_bitmap_cpu_isa_supported(int isa) -> bool", &isa_supported);
}

TORCH_LIBRARY_IMPL(flashsparse, CPU, m) {
    m.impl("_bitmap_spmm_cpu", &bitmap_spmm_cpu);
    m.impl("_bitmap_decode_cpu", &bitmap_decode_cpu);
}

// Lets a prebuilt copy (FLASHSPARSE_CPU=1 pip install --no-build-isolation -e .) be imported as
// flashsparse._C_cpu; the JIT build loads the library without importing it.
extern "C" PyObject* PyInit__C_cpu(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cpu", nullptr, -1, nullptr,
                                        nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&module);
}
