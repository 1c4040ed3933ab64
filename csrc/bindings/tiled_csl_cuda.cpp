// torch glue for the CUDA kernels in csrc/kernels/ (the only torch-dependent C++ here).
//
// Defines internal ops next to the Python-defined flashsparse ops (hence a FRAGMENT):
//   flashsparse::_tiled_csl_spmm_cuda(x, words, tile_offsets, m, k, bias, split_k, tile_n,
//                                     workspace)
//       y[N, M] = x[N, K] @ W^T (+ bias) for a Tiled-CSL weight with 16-bit values (CUDA).
//       workspace (split_k > 1): int32, its counters zero before the call (the kernel leaves
//       them at zero, so one workspace serves every call on a stream); without it a zeroed one
//       is allocated. Every tensor is checked (dtype, shape, device, contiguity, alignment,
//       sizes: tcsl::problem_size_error); TileOffsets values are clamped to the words and word
//       locations masked to their tile inside the kernel (checking them here needs a sync).
//   flashsparse::_tiled_csl_cuda_occupancy(tile_n, bf16) -> resident blocks per SM on the
//       current device, 0 if the block tile does not fit it (for the launch plan in
//       flashsparse/kernels/cuda/tiled_csl.py).
// The output comes from the caching allocator on the current stream, so the op can be captured
// in a CUDA graph.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "kernels/tiled_csl_api.cuh"

namespace {

using flashsparse::ElemType;

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
    TORCH_CHECK(t.device() == x.device(), "_tiled_csl_spmm_cuda: ", name, " is on ", t.device(),
                " but x is on ", x.device());
}

void check_1d(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& x) {
    TORCH_CHECK(t.scalar_type() == dtype, "_tiled_csl_spmm_cuda: ", name, " must be ", dtype,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 1, "_tiled_csl_spmm_cuda: ", name, " must be 1-D, got shape ", t.sizes());
    check_on_device(t, name, x);
    TORCH_CHECK(t.is_contiguous(), "_tiled_csl_spmm_cuda: ", name, " must be contiguous");
}

// Ints of the workspace a launch needs: the arrival counters (rounded up to 16 bytes so the
// fp32 partial sums after them stay aligned), then split * n * m floats. Mirrors
// flashsparse.kernels.cuda.tiled_csl.tiled_csl_workspace_elems.
int64_t workspace_elems(int64_t m, int64_t n, int tile_n, int split) {
    if (split <= 1) return 0;
    const int64_t counters = flashsparse::tiled_csl_counter_count(static_cast<int>(m), static_cast<int>(n), tile_n);
    return (counters + 3) / 4 * 4 + static_cast<int64_t>(split) * n * m;
}

at::Tensor tiled_csl_spmm_cuda(const at::Tensor& x, const at::Tensor& words,
                               const at::Tensor& tile_offsets, int64_t m, int64_t k,
                               const std::optional<at::Tensor>& bias, int64_t split_k,
                               int64_t tile_n, const std::optional<at::Tensor>& workspace) {
    TORCH_CHECK(x.is_cuda(), "_tiled_csl_spmm_cuda: x must be a CUDA tensor, got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "_tiled_csl_spmm_cuda: x must be float16 or bfloat16 (the kernel reads 16-bit "
                "Tiled-CSL words), got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2, "_tiled_csl_spmm_cuda: x must be 2-D [N, K], got shape ", x.sizes());
    // fp32 weights encode to int64 words (value in the low 32 bits): a different layout.
    TORCH_CHECK(words.scalar_type() != at::kLong,
                "_tiled_csl_spmm_cuda: words are int64, the Tiled-CSL encoding of a float32 weight; "
                "the kernel takes int32 words of a float16/bfloat16 weight of x's dtype (",
                x.scalar_type(), ")");
    check_1d(words, "words", at::kInt, x);
    check_1d(tile_offsets, "tile_offsets", at::kInt, x);
    // Sizes only (reading the words' locations would need a device sync; the kernel masks each
    // location to its own tile, so a malformed word gives wrong data, never a stray write).
    const std::string error = flashsparse::tcsl::problem_size_error(m, k, x.size(0), words.numel(),
                                                                     tile_offsets.numel(), split_k, tile_n);
    TORCH_CHECK(error.empty(), "_tiled_csl_spmm_cuda: ", error);
    TORCH_CHECK(x.size(1) == k, "_tiled_csl_spmm_cuda: x must have k=", k, " columns, got shape ",
                x.sizes());
    TORCH_CHECK(reinterpret_cast<uintptr_t>(words.data_ptr()) % 16 == 0,
                "_tiled_csl_spmm_cuda: words must start 16 bytes aligned (the kernel loads 16-byte "
                "vectors); pass words.clone() instead of an offset view");
    if (bias.has_value()) {
        TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "_tiled_csl_spmm_cuda: bias must be ",
                    x.scalar_type(), " like x, got ", bias->scalar_type());
        TORCH_CHECK(bias->dim() == 1, "_tiled_csl_spmm_cuda: bias must be 1-D, got shape ", bias->sizes());
        check_on_device(*bias, "bias", x);
        TORCH_CHECK(bias->numel() == m, "_tiled_csl_spmm_cuda: bias must have m=", m,
                    " elements, got ", bias->numel());
    }

    const c10::cuda::CUDAGuard guard(x.device());
    const int n = static_cast<int>(x.size(0));
    at::Tensor y = at::empty({x.size(0), m}, x.options());
    if (n == 0) return y;

    const at::Tensor xc = x.contiguous();
    std::optional<at::Tensor> bc;
    if (bias.has_value()) bc = bias->contiguous();

    const int split = flashsparse::tiled_csl_effective_split(static_cast<int>(k),
                                                             static_cast<int>(std::min<int64_t>(split_k, kIntMax)));
    const int tn = tile_n == 0 ? flashsparse::tiled_csl_default_tile_n(n) : static_cast<int>(tile_n);
    const int64_t need = workspace_elems(m, n, tn, split);
    at::Tensor ws;
    if (split > 1) {
        if (workspace.has_value()) {
            ws = *workspace;
            check_1d(ws, "workspace", at::kInt, x);
            TORCH_CHECK(ws.numel() >= need, "_tiled_csl_spmm_cuda: workspace must hold at least ", need,
                        " int32 for split_k=", split, ", n=", n, ", m=", m, ", got ", ws.numel());
            TORCH_CHECK(reinterpret_cast<uintptr_t>(ws.data_ptr()) % 16 == 0,
                        "_tiled_csl_spmm_cuda: workspace must start 16 bytes aligned");
        } else {
            // Zeroed counters; the provider passes a cached workspace instead (no allocation).
            ws = at::zeros({need}, x.options().dtype(at::kInt));
        }
    }

    flashsparse::TiledCslProblem pr;
    pr.x = xc.data_ptr();
    pr.words = words.data_ptr();
    pr.tile_offsets = tile_offsets.data_ptr<int32_t>();
    pr.bias = bc.has_value() ? bc->data_ptr() : nullptr;
    pr.y = y.data_ptr();
    if (split > 1) {
        const int64_t counters = flashsparse::tiled_csl_counter_count(static_cast<int>(m), n, tn);
        pr.counters = ws.data_ptr<int32_t>();
        pr.workspace = reinterpret_cast<float*>(ws.data_ptr<int32_t>() + (counters + 3) / 4 * 4);
    }
    pr.m = static_cast<int>(m);
    pr.k = static_cast<int>(k);
    pr.n = n;
    pr.num_vectors = static_cast<int>(words.numel() / 4);
    pr.split_k = split;
    pr.tile_n = tn;
    const ElemType type = x.scalar_type() == at::kBFloat16 ? ElemType::kBFloat16 : ElemType::kFloat16;
    const cudaError_t err =
        flashsparse::tiled_csl_spmm(type, pr, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err != cudaErrorInvalidConfiguration, "_tiled_csl_spmm_cuda: tile_n=", tn, " needs ",
                flashsparse::tiled_csl_smem_bytes(tn),
                " bytes of dynamic shared memory per block, more than this GPU allows");
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
        "Tensor? bias=None, int split_k=1, int tile_n=0, Tensor? workspace=None) -> Tensor");
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
