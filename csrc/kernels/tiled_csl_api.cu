// Host dispatch of the Tiled-CSL SpMM: problem checks, element type. Host code only; the
// kernels and their per-device shared-memory opt-in live in tiled_csl_f16.cu / tiled_csl_bf16.cu.
#include "tiled_csl_api.cuh"

namespace flashsparse {

namespace {
bool valid_type(ElemType type) { return type == ElemType::kFloat16 || type == ElemType::kBFloat16; }
}  // namespace

int tiled_csl_smem_bytes(int tile_n) {
    switch (tile_n) {
        case 8: return tcsl::Config256x8::kSmemBytes;
        case 16: return tcsl::Config256x16::kSmemBytes;
        case 32: return tcsl::Config256x32::kSmemBytes;
        case 64: return tcsl::Config128x64::kSmemBytes;
        case 128: return tcsl::Config128x128::kSmemBytes;
        default: return 0;
    }
}

cudaError_t tiled_csl_spmm(ElemType type, const TiledCslProblem& pr, cudaStream_t stream) {
    if (!valid_type(type) || pr.m < 1 || pr.k < 1 || pr.n < 1 || pr.n > tcsl::kMaxExtent ||
        pr.k > tcsl::kMaxExtent || pr.x == nullptr || pr.words == nullptr || pr.tile_offsets == nullptr ||
        pr.y == nullptr || (pr.tile_n != 0 && !tcsl::valid_tile_n(pr.tile_n)) ||
        reinterpret_cast<uintptr_t>(pr.words) % 16 != 0) {
        return cudaErrorInvalidValue;
    }
    return type == ElemType::kBFloat16 ? detail::tiled_csl_spmm_bf16(pr, stream)
                                       : detail::tiled_csl_spmm_f16(pr, stream);
}

cudaError_t tiled_csl_max_active_blocks(ElemType type, int tile_n, int* blocks_per_sm) {
    if (!valid_type(type) || !tcsl::valid_tile_n(tile_n) || blocks_per_sm == nullptr) return cudaErrorInvalidValue;
    return type == ElemType::kBFloat16 ? detail::tiled_csl_occupancy_bf16(tile_n, blocks_per_sm)
                                       : detail::tiled_csl_occupancy_f16(tile_n, blocks_per_sm);
}

}  // namespace flashsparse
