// Host API of the Tiled-CSL SpMM kernels: raw pointers, sizes and a stream; no torch.
//
// Host-safe (plain C++ plus cuda_runtime_api.h), so csrc/bindings/tiled_csl_cuda.cpp can include it without
// nvcc. Computes y[N, M] = x[N, K] @ W[M, K]^T (+ bias) for a Tiled-CSL weight W
// (flashsparse/formats/tiled_csl.py) with 16-bit values, on sm_80 or newer.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "tiled_csl_layout.cuh"

namespace flashsparse {

enum class ElemType : int { kFloat16 = 0, kBFloat16 = 1 };

struct TiledCslProblem {
    const void* x = nullptr;             // [n, k] row-major, 16-bit elements
    const void* words = nullptr;         // uint32 words; 16-byte aligned
    const int32_t* tile_offsets = nullptr;  // [tiles + 2], in 4-word vectors
    const void* bias = nullptr;          // [m] in x's type, or nullptr
    void* y = nullptr;                   // [n, m] row-major, x's type
    float* workspace = nullptr;          // [effective split, n, m] fp32 when split > 1
    int* counters = nullptr;             // split > 1: tiled_csl_counter_count() ints, all zero
    int m = 0;
    int k = 0;
    int n = 0;
    int num_vectors = 0;  // words / 4; tile ranges are clamped to it
    int split_k = 1;  // requested; the kernel runs tiled_csl_effective_split(k, split_k) splits
    int tile_n = 0;   // block tile width (8, 16, 32, 64, 128), or 0 to choose by n
};

// Block tile width the kernel uses for n tokens when tile_n is 0.
inline int tiled_csl_default_tile_n(int n) { return tcsl::default_tile_n(n); }
// Block tile height for a tile width (256 for widths up to 32, else 128).
inline int tiled_csl_tile_m(int tile_n) { return tcsl::tile_m_for(tile_n); }
// Number of k splits actually run for a request (1 .. ceil(k / 64), no empty split).
inline int tiled_csl_effective_split(int k, int split_k) {
    const int k_tiles = tcsl::k_tiles_of(k);
    int split = split_k < 1 ? 1 : split_k;
    if (split > tcsl::kMaxSplitK) split = tcsl::kMaxSplitK;
    return tcsl::effective_split(k_tiles, split);
}
// Split-K arrival counters a launch needs (one per output tile of the block grid). They must be
// zero before the first launch; every launch leaves them zero again.
inline int64_t tiled_csl_counter_count(int m, int n, int tile_n) {
    const int tn = tile_n == 0 ? tcsl::default_tile_n(n) : tile_n;
    return static_cast<int64_t>(tcsl::ceil_div(n, tn)) * tcsl::ceil_div(m, tcsl::tile_m_for(tn));
}
// Dynamic shared memory of one block for a tile width (0 for an unknown width).
int tiled_csl_smem_bytes(int tile_n);

// Launches the SpMM (one kernel; split > 1 reduces in the kernel) on `stream`. Returns
// cudaErrorInvalidValue for a malformed problem (the caller checks inputs with messages:
// tcsl::problem_size_error) and cudaErrorInvalidConfiguration if the block tile's shared memory
// does not fit the device (every configuration needs at most 74 KiB: it fits any sm_80+ GPU).
cudaError_t tiled_csl_spmm(ElemType type, const TiledCslProblem& problem, cudaStream_t stream);

// Resident blocks per SM of the kernel for a tile width on the current device (0: it does not
// fit the device's shared memory per block).
cudaError_t tiled_csl_max_active_blocks(ElemType type, int tile_n, int* blocks_per_sm);

namespace detail {
// Per element type, defined in tiled_csl_f16.cu / tiled_csl_bf16.cu.
cudaError_t tiled_csl_spmm_f16(const TiledCslProblem& problem, cudaStream_t stream);
cudaError_t tiled_csl_spmm_bf16(const TiledCslProblem& problem, cudaStream_t stream);
cudaError_t tiled_csl_occupancy_f16(int tile_n, int* blocks_per_sm);
cudaError_t tiled_csl_occupancy_bf16(int tile_n, int* blocks_per_sm);
}  // namespace detail

}  // namespace flashsparse
