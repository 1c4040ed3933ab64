// torch glue for the CUDA kernels in csrc/kernels/ (the only torch-dependent C++ here).
//
// Defines internal ops next to the Python-defined flashsparse ops (hence a FRAGMENT):
//   flashsparse::_tiled_csl_spmm_cuda(x, words, tile_offsets, m, k, bias, split_k, tile_n)
//       y[N, M] = x[N, K] @ W^T (+ bias) for a Tiled-CSL weight with 16-bit values (CUDA).
//   flashsparse::_tiled_csl_cuda_occupancy(tile_n, bf16) -> resident blocks per SM on the
//       current device (for the split-K heuristic in flashsparse/kernels/cuda.py).
// Output and split-K workspace come from the caching allocator on the current stream, so the
// op can be captured in a CUDA graph.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>

#include "kernels/tiled_csl_api.cuh"

namespace {

using flashsparse::ElemType;

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& x) {
    TORCH_CHECK(t.scalar_type() == dtype, "_tiled_csl_spmm_cuda: ", name, " must be ", dtype,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1, "_tiled_csl_spmm_cuda: ", name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), "_tiled_csl_spmm_cuda: ", name, " is on ", t.device(),
                " but x is on ", x.device());
}

at::Tensor tiled_csl_spmm_cuda(const at::Tensor& x, const at::Tensor& words,
                               const at::Tensor& tile_offsets, int64_t m, int64_t k,
                               const std::optional<at::Tensor>& bias, int64_t split_k,
                               int64_t tile_n) {
    TORCH_CHECK(x.is_cuda(), "_tiled_csl_spmm_cuda: x must be a CUDA tensor, got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "_tiled_csl_spmm_cuda: x must be float16 or bfloat16 (the kernel reads 16-bit "
                "Tiled-CSL words), got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2, "_tiled_csl_spmm_cuda: x must be 2-D [N, K], got shape ", x.sizes());
    TORCH_CHECK(m >= 1 && k >= 1 && m <= kIntMax && k <= kIntMax,
                "_tiled_csl_spmm_cuda: m and k must be in [1, 2^31), got m=", m, ", k=", k);
    TORCH_CHECK(x.size(1) == k, "_tiled_csl_spmm_cuda: x must have k=", k, " columns, got shape ",
                x.sizes());
    TORCH_CHECK(x.size(0) <= kIntMax, "_tiled_csl_spmm_cuda: x has too many rows (", x.size(0), ")");
    check_tensor(words, "words", at::kInt, x);
    check_tensor(tile_offsets, "tile_offsets", at::kInt, x);
    const int64_t tiles = ((m + 127) / 128) * ((k + 63) / 64);
    TORCH_CHECK(tile_offsets.numel() == tiles + 2, "_tiled_csl_spmm_cuda: tile_offsets must have ",
                tiles + 2, " entries for a ", m, "x", k, " weight, got ", tile_offsets.numel());
    TORCH_CHECK((m + 127) / 128 <= 65535, "_tiled_csl_spmm_cuda: m=", m,
                " exceeds the kernel's grid (at most 65535 blocks of 128 rows)");
    TORCH_CHECK(split_k >= 1, "_tiled_csl_spmm_cuda: split_k must be >= 1, got ", split_k);
    TORCH_CHECK(tile_n == 0 || tile_n == 8 || tile_n == 16 || tile_n == 32 || tile_n == 64 || tile_n == 128,
                "_tiled_csl_spmm_cuda: tile_n must be 0 (by N), 8, 16, 32, 64 or 128, got ", tile_n);
    if (bias.has_value()) {
        check_tensor(*bias, "bias", x.scalar_type(), x);
        TORCH_CHECK(bias->numel() == m, "_tiled_csl_spmm_cuda: bias must have m=", m,
                    " elements, got ", bias->numel());
    }

    const c10::cuda::CUDAGuard guard(x.device());
    const int n = static_cast<int>(x.size(0));
    at::Tensor y = at::empty({x.size(0), m}, x.options());
    if (n == 0) return y;

    const at::Tensor xc = x.contiguous();
    // 128-bit loads need 16-byte aligned words (a fresh allocation is; an offset view may not be).
    at::Tensor wc = words.contiguous();
    if (reinterpret_cast<uintptr_t>(wc.data_ptr()) % 16 != 0) wc = wc.clone();
    const at::Tensor oc = tile_offsets.contiguous();
    std::optional<at::Tensor> bc;
    if (bias.has_value()) bc = bias->contiguous();

    const int split = flashsparse::tiled_csl_effective_split(static_cast<int>(k),
                                                             static_cast<int>(std::min<int64_t>(split_k, kIntMax)));
    at::Tensor workspace;
    if (split > 1) workspace = at::empty({split, x.size(0), m}, x.options().dtype(at::kFloat));

    flashsparse::TiledCslProblem pr;
    pr.x = xc.data_ptr();
    pr.words = wc.data_ptr();
    pr.tile_offsets = oc.data_ptr<int32_t>();
    pr.bias = bc.has_value() ? bc->data_ptr() : nullptr;
    pr.y = y.data_ptr();
    pr.workspace = split > 1 ? workspace.data_ptr<float>() : nullptr;
    pr.m = static_cast<int>(m);
    pr.k = static_cast<int>(k);
    pr.n = n;
    pr.split_k = split;
    pr.tile_n = static_cast<int>(tile_n);
    const ElemType type = x.scalar_type() == at::kBFloat16 ? ElemType::kBFloat16 : ElemType::kFloat16;
    const cudaError_t err =
        flashsparse::tiled_csl_spmm(type, pr, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, "_tiled_csl_spmm_cuda: kernel launch failed: ", cudaGetErrorString(err));
    return y;
}

int64_t tiled_csl_cuda_occupancy(int64_t tile_n, bool bf16) {
    int blocks = 0;
    const cudaError_t err = flashsparse::tiled_csl_max_active_blocks(
        bf16 ? ElemType::kBFloat16 : ElemType::kFloat16, static_cast<int>(tile_n), &blocks);
    TORCH_CHECK(err == cudaSuccess, "_tiled_csl_cuda_occupancy(tile_n=", tile_n,
                "): ", cudaGetErrorString(err));
    return blocks;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashsparse, m) {
    m.def(
        "_tiled_csl_spmm_cuda(Tensor x, Tensor words, Tensor tile_offsets, int m, int k, "
        "Tensor? bias=None, int split_k=1, int tile_n=0) -> Tensor");
    m.def("_tiled_csl_cuda_occupancy(int tile_n, bool bf16) -> int", &tiled_csl_cuda_occupancy);
}

TORCH_LIBRARY_IMPL(flashsparse, CUDA, m) {
    m.impl("_tiled_csl_spmm_cuda", &tiled_csl_spmm_cuda);
}

// Lets `import flashsparse._C` load the prebuilt library (which registers the ops above).
extern "C" PyObject* PyInit__C(void) {
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                        nullptr, nullptr, nullptr, nullptr};
    return PyModule_Create(&module);
}
