// Bitmap SpMM kernels for f16 (one translation unit per element type).
#include "bitmap_kernel.cuh"

namespace flashsparse {
namespace detail {

cudaError_t bitmap_spmm_f16(const BitmapProblem& problem, cudaStream_t stream) {
    return bmp::TypedOps<false>::run(problem, stream);
}

cudaError_t bitmap_fits_f16(int tile_n) { return bmp::TypedOps<false>::fits(tile_n); }

cudaError_t bitmap_occupancy_f16(int tile_n, int* blocks_per_sm) {
    return bmp::TypedOps<false>::occupancy(tile_n, blocks_per_sm);
}

cudaError_t bitmap_footprint_f16(int tile_n, int* need_bytes, int* limit_bytes) {
    return bmp::TypedOps<false>::footprint(tile_n, need_bytes, limit_bytes);
}

}  // namespace detail
}  // namespace flashsparse
