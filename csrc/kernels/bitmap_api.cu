// Host dispatch of the bitmap SpMM: problem checks, tile width, element type. The kernels and
// their per-device shared-memory opt-in live in bitmap_f16.cu / bitmap_bf16.cu (one translation
// unit per type, built in parallel).
#include "bitmap_api.cuh"

namespace flashsparse {

namespace {
bool valid_type(BitmapElem type) { return type == BitmapElem::kFloat16 || type == BitmapElem::kBFloat16; }
bool bf16(BitmapElem type) { return type == BitmapElem::kBFloat16; }
}  // namespace

cudaError_t bitmap_choose_tile_n(BitmapElem type, int n, int* tile_n) {
    if (!valid_type(type) || n < 1 || tile_n == nullptr) return cudaErrorInvalidValue;
    for (int tn = bmp::default_tile_n(n);; tn /= 2) {
        const cudaError_t err = bf16(type) ? detail::bitmap_fits_bf16(tn) : detail::bitmap_fits_f16(tn);
        if (err == cudaSuccess) {
            *tile_n = tn;
            return cudaSuccess;
        }
        if (err != cudaErrorInvalidConfiguration || tn == 8) return err;
    }
}

cudaError_t bitmap_spmm(BitmapElem type, const BitmapProblem& problem, cudaStream_t stream) {
    const BitmapProblem& pr = problem;
    if (!valid_type(type) || pr.m < 1 || pr.k < 1 || pr.n < 1 || pr.n > bmp::kMaxExtent ||
        pr.k > bmp::kMaxExtent || pr.x == nullptr || pr.masks == nullptr || pr.tile_offsets == nullptr ||
        pr.y == nullptr || pr.value_chunks < 0 || (pr.value_chunks > 0 && pr.values == nullptr) ||
        (pr.tile_n != 0 && !bmp::valid_tile_n(pr.tile_n)) || reinterpret_cast<uintptr_t>(pr.masks) % 16 != 0 ||
        reinterpret_cast<uintptr_t>(pr.values) % 16 != 0) {
        return cudaErrorInvalidValue;
    }
    BitmapProblem resolved = pr;
    if (resolved.tile_n == 0) {
        const cudaError_t err = bitmap_choose_tile_n(type, pr.n, &resolved.tile_n);
        if (err != cudaSuccess) return err;
    }
    return bf16(type) ? detail::bitmap_spmm_bf16(resolved, stream) : detail::bitmap_spmm_f16(resolved, stream);
}

cudaError_t bitmap_max_active_blocks(BitmapElem type, int tile_n, int* blocks_per_sm) {
    if (!valid_type(type) || !bmp::valid_tile_n(tile_n) || blocks_per_sm == nullptr) return cudaErrorInvalidValue;
    return bf16(type) ? detail::bitmap_occupancy_bf16(tile_n, blocks_per_sm)
                      : detail::bitmap_occupancy_f16(tile_n, blocks_per_sm);
}

cudaError_t bitmap_block_smem(BitmapElem type, int tile_n, int* need_bytes, int* limit_bytes) {
    if (!valid_type(type) || !bmp::valid_tile_n(tile_n) || need_bytes == nullptr || limit_bytes == nullptr)
        return cudaErrorInvalidValue;
    return bf16(type) ? detail::bitmap_footprint_bf16(tile_n, need_bytes, limit_bytes)
                      : detail::bitmap_footprint_f16(tile_n, need_bytes, limit_bytes);
}

}  // namespace flashsparse
