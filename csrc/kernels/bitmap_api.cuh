// Host API of the CUDA bitmap SpMM kernel: raw pointers, sizes and a stream; no torch.
//
// Computes y[N, M] = x[N, K] @ W[M, K]^T (+ bias) for a bitmap (layout 2) weight W with 16-bit
// values (flashsparse/formats/bitmap.py), on sm_80 or newer, in ONE launch: split-K partial
// sums are reduced inside the kernel by the last CTA of each output tile, in split order
// (deterministic), through caller-owned arrival counters and fp32 partial sums reused across
// calls (no per-call allocation or memset).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "bitmap_layout.cuh"

namespace flashsparse {

enum class BitmapElem : int { kFloat16 = 0, kBFloat16 = 1 };

struct BitmapProblem {
    const void* x = nullptr;               // [n, k] row-major, 16-bit elements
    const uint64_t* masks = nullptr;       // [tiles * 64]; 16-byte aligned
    const void* values = nullptr;          // 16-bit values; 16-byte aligned
    const int32_t* tile_offsets = nullptr; // [tiles + 1], in 8-value units
    const void* bias = nullptr;            // [m] in x's type, or nullptr
    void* y = nullptr;                     // [n, m] row-major, x's type
    // split > 1: bitmap_output_tiles() arrival counters, zero before the call; the kernel leaves
    // them zero. Keep this buffer for counters only (never reuse it for data), so it stays zero.
    int32_t* counters = nullptr;
    // split > 1: bitmap_partial_floats() fp32 partial sums [split][n][m] (any contents).
    float* partials = nullptr;
    int m = 0;
    int k = 0;
    int n = 0;
    int value_chunks = 0;  // 16-byte chunks in `values` (numel / 8)
    int split_k = 1;  // requested; bitmap_effective_split(k, split_k) splits run
    int tile_n = 0;   // 8, 16, 32, or 0 to choose by n
};

inline int bitmap_default_tile_n(int n) { return bmp::default_tile_n(n); }
inline int bitmap_effective_split(int k, int split_k) {
    return bmp::effective_split(bmp::k_tiles_of(k), split_k < 1 ? 1 : split_k);
}
inline int bitmap_smem_bytes(int tile_n) { return bmp::valid_tile_n(tile_n) ? bmp::smem_bytes(tile_n) : 0; }
// Output tiles of a launch (one split-K arrival counter each).
inline size_t bitmap_output_tiles(int m, int n, int tile_n) {
    return static_cast<size_t>(bmp::ceil_div(m, bmp::kTileM)) * bmp::ceil_div(n, tile_n);
}
inline size_t bitmap_partial_floats(int m, int n, int split) {
    return split <= 1 ? 0 : static_cast<size_t>(split) * n * m;
}

// Launches the kernel on `stream`. tile_n 0 takes the widest tile for N that fits the device
// (bitmap_choose_tile_n). cudaErrorInvalidValue for a malformed problem (the caller checks
// inputs with messages: bmp::problem_size_error); cudaErrorInvalidConfiguration when the tile
// width's shared memory does not fit the device (bitmap_block_smem says by how much).
cudaError_t bitmap_spmm(BitmapElem type, const BitmapProblem& problem, cudaStream_t stream);
// The widest tile width <= bitmap_default_tile_n(n) whose shared memory fits the current device
// (8 fits every sm_80+ GPU; 32 does not fit the 99 KiB per block of sm_86/89/120).
cudaError_t bitmap_choose_tile_n(BitmapElem type, int n, int* tile_n);
// Resident blocks per SM of the kernel for a tile width on the current device (0: it does not
// fit the device's shared memory per block).
cudaError_t bitmap_max_active_blocks(BitmapElem type, int tile_n, int* blocks_per_sm);
// Shared memory one block of a tile width needs (static + dynamic) and the current device's
// per-block limit, for messages.
cudaError_t bitmap_block_smem(BitmapElem type, int tile_n, int* need_bytes, int* limit_bytes);

namespace detail {
cudaError_t bitmap_spmm_f16(const BitmapProblem& problem, cudaStream_t stream);
cudaError_t bitmap_spmm_bf16(const BitmapProblem& problem, cudaStream_t stream);
// cudaSuccess if the tile width fits the current device (opted in), else
// cudaErrorInvalidConfiguration.
cudaError_t bitmap_fits_f16(int tile_n);
cudaError_t bitmap_fits_bf16(int tile_n);
cudaError_t bitmap_occupancy_f16(int tile_n, int* blocks_per_sm);
cudaError_t bitmap_occupancy_bf16(int tile_n, int* blocks_per_sm);
cudaError_t bitmap_footprint_f16(int tile_n, int* need_bytes, int* limit_bytes);
cudaError_t bitmap_footprint_bf16(int tile_n, int* need_bytes, int* limit_bytes);
}  // namespace detail

}  // namespace flashsparse
