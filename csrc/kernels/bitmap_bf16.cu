// Bitmap SpMM kernels for bf16 (one translation unit per element type).
#include "bitmap_kernel.cuh"

namespace flashsparse {
namespace detail {

cudaError_t bitmap_spmm_bf16(const BitmapProblem& problem, cudaStream_t stream) {
    return bmp::TypedOps<true>::run(problem, stream);
}

cudaError_t bitmap_fits_bf16(int tile_n) { return bmp::TypedOps<true>::fits(tile_n); }

cudaError_t bitmap_occupancy_bf16(int tile_n, int* blocks_per_sm) {
    return bmp::TypedOps<true>::occupancy(tile_n, blocks_per_sm);
}

cudaError_t bitmap_footprint_bf16(int tile_n, int* need_bytes, int* limit_bytes) {
    return bmp::TypedOps<true>::footprint(tile_n, need_bytes, limit_bytes);
}

}  // namespace detail
}  // namespace flashsparse
