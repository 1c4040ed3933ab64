// Tiled-CSL SpMM kernels for bf16 (mma .bf16): one translation unit per element type so they build in
// parallel (flash-attention style).
#include "tiled_csl_kernel.cuh"

namespace flashsparse {
namespace detail {

cudaError_t tiled_csl_spmm_bf16(const TiledCslProblem& problem, cudaStream_t stream) {
    return tcsl::TypedOps<true>::run(problem, stream);
}

cudaError_t tiled_csl_occupancy_bf16(int tile_n, int* blocks_per_sm) {
    return tcsl::TypedOps<true>::occupancy(tile_n, blocks_per_sm);
}

}  // namespace detail
}  // namespace flashsparse
