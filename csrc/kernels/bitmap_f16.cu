// Bitmap SpMM kernels for f16 (one translation unit per element type).
#include "bitmap_kernel.cuh"

namespace flashsparse {
namespace detail {

cudaError_t bitmap_spmm_f16(const BitmapProblem& problem, cudaStream_t stream) {
    return bmp::TypedOps<false>::run(problem, stream);
}

cudaError_t bitmap_prepare_f16() { return bmp::TypedOps<false>::prepare(); }

cudaError_t bitmap_occupancy_f16(int tile_n, int* blocks_per_sm) {
    return bmp::TypedOps<false>::occupancy(tile_n, blocks_per_sm);
}

}  // namespace detail
}  // namespace flashsparse
