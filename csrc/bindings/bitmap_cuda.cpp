// torch glue for the CUDA bitmap kernel (csrc/kernels/bitmap_api.cuh).
//
//   flashsparse::_bitmap_spmm_cuda(x, masks, values, tile_offsets, m, k, bias, split_k, tile_n,
//                                  counters, partials) -> y[N, M] = x[N, K] @ W^T (+ bias)
// for a bitmap (layout 2) weight with 16-bit values. When the effective split is > 1 the kernel
// needs `counters` (int32, >= one per output tile, all zero; it leaves them zero, so they are
// reused without a memset) and `partials` (fp32, >= split * N * M), both from
// flashsparse.kernels.cuda.bitmap.bitmap_workspace. tile_n 0 picks the widest tile for N that
// fits the GPU's shared memory per block (32 does not fit the 99 KiB of sm_86/89/120).
//   flashsparse::_bitmap_cuda_occupancy(tile_n, bf16) -> resident blocks per SM on the current
// device, 0 if that tile width does not fit it (for the launch plan in
// flashsparse/kernels/cuda/bitmap.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>

#include "kernels/bitmap_api.cuh"

namespace {

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

void check_1d(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& x) {
    TORCH_CHECK(t.scalar_type() == dtype, "_bitmap_spmm_cuda: ", name, " must be ", dtype, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.dim() == 1, "_bitmap_spmm_cuda: ", name, " must be 1-D, got shape ", t.sizes());
    TORCH_CHECK(t.device() == x.device(), "_bitmap_spmm_cuda: ", name, " is on ", t.device(), " but x is on ",
                x.device());
}

at::Tensor aligned16(const at::Tensor& t) {
    at::Tensor c = t.contiguous();
    if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
    return c;
}

at::Tensor bitmap_spmm_cuda(const at::Tensor& x, const at::Tensor& masks, const at::Tensor& values,
                            const at::Tensor& tile_offsets, int64_t m, int64_t k, const std::optional<at::Tensor>& bias,
                            int64_t split_k, int64_t tile_n, const std::optional<at::Tensor>& counters,
                            const std::optional<at::Tensor>& partials) {
    TORCH_CHECK(x.is_cuda(), "_bitmap_spmm_cuda: x must be a CUDA tensor, got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                "_bitmap_spmm_cuda: x must be float16 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2, "_bitmap_spmm_cuda: x must be 2-D [N, K], got shape ", x.sizes());
    check_1d(masks, "masks", at::kLong, x);
    check_1d(values, "values", x.scalar_type(), x);
    check_1d(tile_offsets, "tile_offsets", at::kInt, x);
    // Sizes only: the offsets' values would need a device sync (the kernel clamps them).
    const std::string error = flashsparse::bmp::problem_size_error(
        m, k, x.size(0), masks.numel(), tile_offsets.numel(), values.numel(), split_k, tile_n);
    TORCH_CHECK(error.empty(), "_bitmap_spmm_cuda: ", error);
    TORCH_CHECK(x.size(1) == k, "_bitmap_spmm_cuda: x must have k=", k, " columns, got shape ", x.sizes());
    if (bias.has_value()) {
        check_1d(*bias, "bias", x.scalar_type(), x);
        TORCH_CHECK(bias->numel() == m, "_bitmap_spmm_cuda: bias must have m=", m, " elements, got ", bias->numel());
    }

    const c10::cuda::CUDAGuard guard(x.device());
    const int n = static_cast<int>(x.size(0));
    at::Tensor y = at::empty({x.size(0), m}, x.options());
    if (n == 0) return y;

    const auto type = x.scalar_type() == at::kBFloat16 ? flashsparse::BitmapElem::kBFloat16
                                                       : flashsparse::BitmapElem::kFloat16;
    int tn = static_cast<int>(tile_n);
    if (tn == 0) {  // by N: the widest tile that fits this GPU's shared memory per block
        const cudaError_t err = flashsparse::bitmap_choose_tile_n(type, n, &tn);
        TORCH_CHECK(err == cudaSuccess, "_bitmap_spmm_cuda: choosing the tile width failed: ", cudaGetErrorString(err));
    }
    const int split = flashsparse::bitmap_effective_split(static_cast<int>(k),
                                                          static_cast<int>(std::min<int64_t>(split_k, kIntMax)));
    const size_t tiles_out = flashsparse::bitmap_output_tiles(static_cast<int>(m), n, tn);
    const size_t floats = flashsparse::bitmap_partial_floats(static_cast<int>(m), n, split);
    if (split > 1) {
        TORCH_CHECK(counters.has_value() && partials.has_value(), "_bitmap_spmm_cuda: split_k=", split_k, " runs ",
                    split, " splits and needs `counters` (int32, ", tiles_out, " zeros) and `partials` (float32, ", floats,
                    " elements); flashsparse.kernels.cuda.bitmap.bitmap_workspace provides them");
        check_1d(*counters, "counters", at::kInt, x);
        check_1d(*partials, "partials", at::kFloat, x);
        TORCH_CHECK(static_cast<size_t>(counters->numel()) >= tiles_out, "_bitmap_spmm_cuda: counters must have at least ",
                    tiles_out, " entries, got ", counters->numel());
        TORCH_CHECK(static_cast<size_t>(partials->numel()) >= floats, "_bitmap_spmm_cuda: partials must have at least ",
                    floats, " entries, got ", partials->numel());
        // Not copied: the counters' state persists across calls, and the kernel writes partials.
        TORCH_CHECK(counters->is_contiguous() && partials->is_contiguous(),
                    "_bitmap_spmm_cuda: counters and partials must be contiguous");
    }

    const at::Tensor xc = x.contiguous();
    const at::Tensor mc = aligned16(masks);
    const at::Tensor vc = aligned16(values);
    const at::Tensor oc = tile_offsets.contiguous();
    std::optional<at::Tensor> bc;
    if (bias.has_value()) bc = bias->contiguous();

    flashsparse::BitmapProblem pr;
    pr.x = xc.data_ptr();
    pr.masks = reinterpret_cast<const uint64_t*>(mc.data_ptr());
    pr.values = vc.numel() > 0 ? vc.data_ptr() : nullptr;
    pr.tile_offsets = oc.data_ptr<int32_t>();
    pr.bias = bc.has_value() ? bc->data_ptr() : nullptr;
    pr.y = y.data_ptr();
    pr.counters = split > 1 ? counters->data_ptr<int32_t>() : nullptr;
    pr.partials = split > 1 ? partials->data_ptr<float>() : nullptr;
    pr.m = static_cast<int>(m);
    pr.k = static_cast<int>(k);
    pr.n = n;
    pr.value_chunks = static_cast<int>(values.numel() / 8);
    pr.split_k = split;
    pr.tile_n = tn;
    const cudaError_t err =
        flashsparse::bitmap_spmm(type, pr, c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    if (err == cudaErrorInvalidConfiguration) {
        int need = 0, limit = 0;
        flashsparse::bitmap_block_smem(type, tn, &need, &limit);
        TORCH_CHECK(false, "_bitmap_spmm_cuda: tile_n=", tn, " needs ", need,
                    " bytes of shared memory per block (static + dynamic); this GPU allows ", limit,
                    " (cudaDevAttrMaxSharedMemoryPerBlockOptin). Pass a narrower tile_n, or 0 to choose one");
    }
    TORCH_CHECK(err == cudaSuccess, "_bitmap_spmm_cuda: kernel launch failed: ", cudaGetErrorString(err));
    return y;
}

int64_t bitmap_cuda_occupancy(int64_t tile_n, bool bf16) {
    int blocks = 0;
    const cudaError_t err = flashsparse::bitmap_max_active_blocks(
        bf16 ? flashsparse::BitmapElem::kBFloat16 : flashsparse::BitmapElem::kFloat16, static_cast<int>(tile_n),
        &blocks);
    TORCH_CHECK(err == cudaSuccess, "_bitmap_cuda_occupancy(tile_n=", tile_n, "): ", cudaGetErrorString(err));
    return blocks;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flashsparse, m) {
    m.def(
        "_bitmap_spmm_cuda(Tensor x, Tensor masks, Tensor values, Tensor tile_offsets, int m, int k, "
        "Tensor? bias=None, int split_k=1, int tile_n=0, Tensor? counters=None, Tensor? partials=None) -> Tensor");
    m.def("_bitmap_cuda_occupancy(int tile_n, bool bf16) -> int", &bitmap_cuda_occupancy);
}

TORCH_LIBRARY_IMPL(flashsparse, CUDA, m) { m.impl("_bitmap_spmm_cuda", &bitmap_spmm_cuda); }
