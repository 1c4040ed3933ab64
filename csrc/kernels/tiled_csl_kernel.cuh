// Flash-LLM's Load-as-Sparse, Compute-as-Dense SpMM for Tiled-CSL weights (arXiv 2309.10285),
// with the original's defects fixed:
//   * any tile density (0 .. 100 %): a tile's words are staged through registers in chunks of
//     128 x V vectors, looping until the tile is done -- no fixed per-tile capacity;
//   * TileOffsets is only read for tiles this block owns (never index T + 2);
//   * any M, K, N >= 1: rows past M and tokens past N are masked, x past K is zero-filled,
//     and x rows that are not 16-byte aligned take a scalar-load path;
//   * split-K partial sums are fp32, reduced by a separate deterministic kernel.
//
// Per block (4 warps) and k step (64), double buffered in shared memory:
//   1. zero the next A tile; cp.async the next x tile (swizzled); issue 128-bit loads of the
//      next tile's first chunk of words into registers;
//   2. ldmatrix.x4 + mma.sync.m16n8k16 (fp32 accumulators) on the current buffers;
//   3. barrier; scatter the words into the next A tile (their locations are the swizzled
//      shared-memory positions); remaining chunks of a dense tile are loaded and scattered here;
//   4. wait for cp.async; barrier.
// The epilogue stages the accumulators through shared memory for coalesced stores of y (with
// the bias, in x's dtype) or of the fp32 split-K workspace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ptx.cuh"
#include "tiled_csl_api.cuh"
#include "tiled_csl_layout.cuh"

namespace flashsparse {
namespace tcsl {

struct KernelParams {
    const uint16_t* x;
    const uint4* words;
    const int32_t* tile_offsets;
    const uint16_t* bias;  // may be null
    uint16_t* y;
    float* workspace;  // non-null: write fp32 partial sums for blockIdx.z, no bias
    int m, k, n;
    int k_tiles, m_tiles;  // storage-tile grid
    int tiles_per_split;
    int x_aligned;  // x rows 16-byte aligned and k % 8 == 0: cp.async fast path
};

template <bool kBF16>
struct Elem;
template <>
struct Elem<false> {
    static __device__ __forceinline__ float to_float(uint16_t b) {
        return __half2float(__ushort_as_half(b));
    }
    static __device__ __forceinline__ uint16_t from_float(float f) {
        return __half_as_ushort(__float2half_rn(f));
    }
};
template <>
struct Elem<true> {
    static __device__ __forceinline__ float to_float(uint16_t b) {
        return __bfloat162float(__ushort_as_bfloat16(b));
    }
    static __device__ __forceinline__ uint16_t from_float(float f) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(f));
    }
};

// Where one k step's words are: up to two storage tiles (the second one is the lower half of
// a 256-row block), as a start and a length in 16-byte vectors.
struct TileWords {
    int start1, count1, start2, count2;
};

__device__ __forceinline__ int clamp_count(int c) {
    // A malformed TileOffsets must not make the chunk loop run away.
    return c < 0 ? 0 : (c > kMaxTileVectors ? kMaxTileVectors : c);
}

template <class Cfg>
__device__ __forceinline__ TileWords tile_words(const int32_t* offs1, bool has2, int k_tiles,
                                                int i) {
    TileWords tw;
    tw.start1 = __ldg(offs1 + i);
    tw.count1 = clamp_count(__ldg(offs1 + i + 1) - tw.start1);
    tw.start2 = 0;
    tw.count2 = 0;
    if (Cfg::kStorageTiles == 2 && has2) {
        tw.start2 = __ldg(offs1 + k_tiles + i);
        tw.count2 = clamp_count(__ldg(offs1 + k_tiles + i + 1) - tw.start2);
    }
    return tw;
}

// Words of chunk `base` into registers: thread tid takes vectors base + i*128 + tid of the
// concatenation [tile 1 | tile 2]; tile 2's words get the +8192 location flag.
template <class Cfg>
__device__ __forceinline__ void load_chunk(uint4 (&r)[Cfg::kVectorsPerThread], const uint4* words,
                                           const TileWords& tw, int base, int tid) {
#pragma unroll
    for (int i = 0; i < Cfg::kVectorsPerThread; ++i) {
        const int j = chunk_vector(base, i, tid);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (j < tw.count1) {
            v = ptx::ld_stream_v4(words + tw.start1 + j);
        } else if (Cfg::kStorageTiles == 2 && j < tw.count1 + tw.count2) {
            v = ptx::ld_stream_v4(words + tw.start2 + (j - tw.count1));
            v.x |= kSecondTileFlag;
            v.y |= kSecondTileFlag;
            v.z |= kSecondTileFlag;
            v.w |= kSecondTileFlag;
        }
        r[i] = v;
    }
}

__device__ __forceinline__ void scatter_word(uint16_t* sA, uint32_t w, uint32_t mask) {
    sA[word_location(w, mask)] = word_value(w);
}

template <class Cfg>
__device__ __forceinline__ void scatter_chunk(uint16_t* sA, const uint4 (&r)[Cfg::kVectorsPerThread],
                                              int total, int base, int tid) {
    constexpr uint32_t mask = Cfg::kLocationMask;
#pragma unroll
    for (int i = 0; i < Cfg::kVectorsPerThread; ++i) {
        if (chunk_vector(base, i, tid) < total) {
            scatter_word(sA, r[i].x, mask);
            scatter_word(sA, r[i].y, mask);
            scatter_word(sA, r[i].z, mask);
            scatter_word(sA, r[i].w, mask);
        }
    }
}

// Scatter chunk 0 (already in registers) and then every further chunk of the tile(s).
template <class Cfg>
__device__ __forceinline__ void scatter_tile(uint16_t* sA, uint4 (&r)[Cfg::kVectorsPerThread],
                                             const uint4* words, const TileWords& tw, int tid) {
    const int total = tw.count1 + tw.count2;
    scatter_chunk<Cfg>(sA, r, total, 0, tid);
#pragma unroll 1
    for (int base = Cfg::kChunkVectors; base < total; base += Cfg::kChunkVectors) {
        load_chunk<Cfg>(r, words, tw, base, tid);
        scatter_chunk<Cfg>(sA, r, total, base, tid);
    }
}

template <class Cfg>
__device__ __forceinline__ void zero_a_tile(uint16_t* sA, int tid) {
    uint4* a4 = reinterpret_cast<uint4*>(sA);
    constexpr int kVecs = Cfg::kAElems / 8;
    static_assert(kVecs % kThreads == 0, "A tile zeroing is uniform over threads");
#pragma unroll
    for (int i = 0; i < kVecs / kThreads; ++i) a4[i * kThreads + tid] = make_uint4(0u, 0u, 0u, 0u);
}

// x[n0 .. n0+TN, kcol0 .. kcol0+64) -> swizzled [TN][64] tile; zeros past N and K.
template <class Cfg>
__device__ __forceinline__ void load_x_tile(uint16_t* sB, const KernelParams& p, int n0,
                                            int kcol0, int tid) {
    constexpr int kIters = ceil_div(Cfg::kXChunks, kThreads);
    if (p.x_aligned) {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int q = it * kThreads + tid;
            if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) break;
            const int n = n0 + x_chunk_row(q);
            const int kcol = kcol0 + x_chunk_col(q);
            // k % 8 == 0 here, so a chunk is entirely inside or entirely past K.
            const bool valid = n < p.n && kcol < p.k;
            const uint16_t* src = valid ? p.x + (static_cast<size_t>(n) * p.k + kcol) : p.x;
            ptx::cp_async_16_zfill(ptx::smem_addr(sB + x_chunk_dst(q)), src, valid);
        }
    } else {
#pragma unroll
        for (int it = 0; it < kIters; ++it) {
            const int q = it * kThreads + tid;
            if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) break;
            const int n = n0 + x_chunk_row(q);
            const int kcol = kcol0 + x_chunk_col(q);
            uint32_t packed[4];
            const uint16_t* row = p.x + static_cast<size_t>(n < p.n ? n : 0) * p.k;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int c0 = kcol + 2 * e;
                const uint32_t lo = (n < p.n && c0 < p.k) ? row[c0] : 0u;
                const uint32_t hi = (n < p.n && c0 + 1 < p.k) ? row[c0 + 1] : 0u;
                packed[e] = lo | (hi << 16);
            }
            *reinterpret_cast<uint4*>(sB + x_chunk_dst(q)) =
                make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
}

// One 64-deep k step of the warp's 64 x kWarpN output on tensor cores.
template <class Cfg, bool kBF16>
__device__ __forceinline__ void compute_stage(float (&acc)[Cfg::kWarpMTiles][Cfg::kWarpNTiles][4],
                                              const uint16_t* sA, const uint16_t* sB, int row0,
                                              int col0, int lane) {
    constexpr int MT = Cfg::kWarpMTiles;
    constexpr int NT = Cfg::kWarpNTiles;
    const uint32_t a_base = ptx::smem_addr(sA);
    const uint32_t b_base = ptx::smem_addr(sB);
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
            ptx::ldmatrix_x4(a[mi], a_base + 2u * a_ldsm_offset(row0 + mi * 16, kk, lane));
        uint32_t b[NT][2];
        if constexpr (NT == 1) {
            ptx::ldmatrix_x2(b[0], b_base + 2u * b_ldsm_x2_offset(col0, kk, lane));
        } else {
#pragma unroll
            for (int pj = 0; pj < NT / 2; ++pj) {
                uint32_t r[4];
                ptx::ldmatrix_x4(r, b_base + 2u * b_ldsm_x4_offset(col0 + pj * 16, kk, lane));
                b[2 * pj][0] = r[0];
                b[2 * pj][1] = r[1];
                b[2 * pj + 1][0] = r[2];
                b[2 * pj + 1][1] = r[3];
            }
        }
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
#pragma unroll
            for (int nj = 0; nj < NT; ++nj) ptx::mma_16816<kBF16>(acc[mi][nj], a[mi], b[nj]);
    }
}

template <class Cfg, bool kBF16>
__global__ void __launch_bounds__(kThreads) tiled_csl_spmm_kernel(const KernelParams p) {
    extern __shared__ __align__(128) uint8_t smem_raw[];
    uint16_t* const smem = reinterpret_cast<uint16_t*>(smem_raw);
    constexpr int TM = Cfg::kTileM;
    constexpr int TN = Cfg::kTileN;

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n0 = blockIdx.x * TN;
    const int m0 = blockIdx.y * TM;
    const int kt0 = blockIdx.z * p.tiles_per_split;
    const int rest = p.k_tiles - kt0;
    const int num_iter = rest < p.tiles_per_split ? (rest > 0 ? rest : 0) : p.tiles_per_split;

    const int mt1 = blockIdx.y * Cfg::kStorageTiles;
    const bool has2 = Cfg::kStorageTiles == 2 && mt1 + 1 < p.m_tiles;
    // Entries [t, t+1] of tile t = mt * k_tiles + kt; only tiles of this block's k range are
    // read, so the largest index is t_last + 1 <= #tiles (the array has #tiles + 2 entries).
    const int32_t* offs1 = p.tile_offsets + (static_cast<size_t>(mt1) * p.k_tiles + kt0);

    const int row0 = warp_row0<Cfg>(warp);
    const int col0 = warp_col0<Cfg>(warp);
    // Warps whose rows are all past M or whose columns are all past N have nothing to compute.
    const bool warp_active = m0 + row0 < p.m && n0 + col0 < p.n;

    float acc[Cfg::kWarpMTiles][Cfg::kWarpNTiles][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kWarpMTiles; ++mi)
#pragma unroll
        for (int nj = 0; nj < Cfg::kWarpNTiles; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.f;

    if (num_iter > 0) {
        uint4 regs[Cfg::kVectorsPerThread];
        TileWords tw = tile_words<Cfg>(offs1, has2, p.k_tiles, 0);
        zero_a_tile<Cfg>(smem, tid);
        load_x_tile<Cfg>(smem + Cfg::kAElems, p, n0, kt0 * kTileK, tid);
        ptx::cp_async_commit();
        load_chunk<Cfg>(regs, p.words, tw, 0, tid);
        TileWords tw_next = tw;
        if (num_iter > 1) tw_next = tile_words<Cfg>(offs1, has2, p.k_tiles, 1);
        __syncthreads();  // the zeroed A tile is complete before anyone scatters into it
        scatter_tile<Cfg>(smem, regs, p.words, tw, tid);
        ptx::cp_async_wait_all();
        __syncthreads();

#pragma unroll 1
        for (int i = 0; i < num_iter; ++i) {
            const uint16_t* cur = smem + (i & 1) * Cfg::kStageElems;
            uint16_t* nxt = smem + ((i + 1) & 1) * Cfg::kStageElems;
            const bool has_next = i + 1 < num_iter;  // uniform over the block
            if (has_next) {
                tw = tw_next;
                // nxt was last read by step i-1's compute, which ended with a barrier.
                zero_a_tile<Cfg>(nxt, tid);
                load_x_tile<Cfg>(nxt + Cfg::kAElems, p, n0, (kt0 + i + 1) * kTileK, tid);
                ptx::cp_async_commit();
                load_chunk<Cfg>(regs, p.words, tw, 0, tid);
                if (i + 2 < num_iter) tw_next = tile_words<Cfg>(offs1, has2, p.k_tiles, i + 2);
            }
            if (warp_active) compute_stage<Cfg, kBF16>(acc, cur, cur + Cfg::kAElems, row0, col0, lane);
            if (has_next) {
                __syncthreads();  // every thread's zeroing of nxt is done
                scatter_tile<Cfg>(nxt, regs, p.words, tw, tid);
            }
            ptx::cp_async_wait_all();
            __syncthreads();  // nxt complete for everyone; cur free for reuse
        }
    }

    // Epilogue: accumulators -> shared [n][m] (fp32) -> coalesced global stores.
    float* const sC = reinterpret_cast<float*>(smem_raw);
#pragma unroll
    for (int mi = 0; mi < Cfg::kWarpMTiles; ++mi)
#pragma unroll
        for (int nj = 0; nj < Cfg::kWarpNTiles; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int m_l = row0 + mi * 16 + c_frag_row(lane, r);
                const int n_l = col0 + nj * 8 + c_frag_col(lane, r);
                sC[n_l * Cfg::kCStride + m_l] = acc[mi][nj][r];
            }
    __syncthreads();

    const int rows = p.m - m0 < TM ? p.m - m0 : TM;
    const int cols = p.n - n0 < TN ? p.n - n0 : TN;
    if (p.workspace != nullptr) {
        float* out = p.workspace + (static_cast<size_t>(blockIdx.z) * p.n + n0) * p.m + m0;
#pragma unroll 1
        for (int idx = tid; idx < cols * TM; idx += kThreads) {
            const int n_l = idx / TM;
            const int m_l = idx % TM;
            if (m_l < rows) out[static_cast<size_t>(n_l) * p.m + m_l] = sC[n_l * Cfg::kCStride + m_l];
        }
    } else {
        uint16_t* out = p.y + static_cast<size_t>(n0) * p.m + m0;
#pragma unroll 1
        for (int idx = tid; idx < cols * TM; idx += kThreads) {
            const int n_l = idx / TM;
            const int m_l = idx % TM;
            if (m_l < rows) {
                float v = sC[n_l * Cfg::kCStride + m_l];
                if (p.bias != nullptr) v += Elem<kBF16>::to_float(p.bias[m0 + m_l]);
                out[static_cast<size_t>(n_l) * p.m + m_l] = Elem<kBF16>::from_float(v);
            }
        }
    }
}

// y = sum over splits of the fp32 workspace (in split order: deterministic) + bias.
template <bool kBF16>
__global__ void __launch_bounds__(256)
    tiled_csl_splitk_reduce_kernel(const float* __restrict__ ws, int split, size_t mn, int m,
                                   const uint16_t* __restrict__ bias, uint16_t* __restrict__ y) {
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < mn; i += stride) {
        float s = 0.f;
        for (int z = 0; z < split; ++z) s += ws[static_cast<size_t>(z) * mn + i];
        if (bias != nullptr) s += Elem<kBF16>::to_float(bias[i % m]);
        y[i] = Elem<kBF16>::from_float(s);
    }
}

// --- host side -----------------------------------------------------------------------------
template <class Cfg, bool kBF16>
cudaError_t set_kernel_attributes() {
    return cudaFuncSetAttribute(tiled_csl_spmm_kernel<Cfg, kBF16>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
}

template <class Cfg, bool kBF16>
cudaError_t max_active_blocks(int* blocks) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, tiled_csl_spmm_kernel<Cfg, kBF16>,
                                                         kThreads, Cfg::kSmemBytes);
}

template <class Cfg, bool kBF16>
cudaError_t launch_spmm(const TiledCslProblem& pr, cudaStream_t stream) {
    const int k_tiles = k_tiles_of(pr.k);
    const int split = tiled_csl_effective_split(pr.k, pr.split_k);
    const int grid_y = ceil_div(pr.m, Cfg::kTileM);
    if (grid_y > kMaxGridY) return cudaErrorInvalidValue;
    if (split > 1 && pr.workspace == nullptr) return cudaErrorInvalidValue;

    KernelParams kp;
    kp.x = static_cast<const uint16_t*>(pr.x);
    kp.words = static_cast<const uint4*>(pr.words);
    kp.tile_offsets = pr.tile_offsets;
    kp.bias = static_cast<const uint16_t*>(pr.bias);
    kp.y = static_cast<uint16_t*>(pr.y);
    kp.workspace = split > 1 ? pr.workspace : nullptr;
    kp.m = pr.m;
    kp.k = pr.k;
    kp.n = pr.n;
    kp.k_tiles = k_tiles;
    kp.m_tiles = ceil_div(pr.m, kStorageTileM);
    kp.tiles_per_split = tiles_per_split(k_tiles, split);
    kp.x_aligned = (pr.k % 8 == 0) && (reinterpret_cast<uintptr_t>(pr.x) % 16 == 0);

    const dim3 grid(static_cast<unsigned>(ceil_div(pr.n, Cfg::kTileN)), static_cast<unsigned>(grid_y),
                    static_cast<unsigned>(split));
    tiled_csl_spmm_kernel<Cfg, kBF16><<<grid, kThreads, Cfg::kSmemBytes, stream>>>(kp);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || split == 1) return err;

    const size_t mn = static_cast<size_t>(pr.n) * pr.m;
    const size_t blocks = (mn + 255) / 256;
    const unsigned grid_r = static_cast<unsigned>(blocks < 65535 ? blocks : 65535);
    tiled_csl_splitk_reduce_kernel<kBF16><<<grid_r, 256, 0, stream>>>(
        pr.workspace, split, mn, pr.m, kp.bias, kp.y);
    return cudaGetLastError();
}

// Everything one element type needs: dispatch by tile width, attributes, occupancy.
template <bool kBF16>
struct TypedOps {
    static cudaError_t run(const TiledCslProblem& pr, cudaStream_t stream) {
        const int tile_n = pr.tile_n == 0 ? default_tile_n(pr.n) : pr.tile_n;
        switch (tile_n) {
            case 8: return launch_spmm<Config256x8, kBF16>(pr, stream);
            case 16: return launch_spmm<Config256x16, kBF16>(pr, stream);
            case 32: return launch_spmm<Config256x32, kBF16>(pr, stream);
            case 64: return launch_spmm<Config128x64, kBF16>(pr, stream);
            case 128: return launch_spmm<Config128x128, kBF16>(pr, stream);
            default: return cudaErrorInvalidValue;
        }
    }
    static cudaError_t prepare() {
        cudaError_t errs[] = {
            set_kernel_attributes<Config256x8, kBF16>(), set_kernel_attributes<Config256x16, kBF16>(),
            set_kernel_attributes<Config256x32, kBF16>(), set_kernel_attributes<Config128x64, kBF16>(),
            set_kernel_attributes<Config128x128, kBF16>()};
        for (cudaError_t e : errs)
            if (e != cudaSuccess) return e;
        return cudaSuccess;
    }
    static cudaError_t occupancy(int tile_n, int* blocks) {
        switch (tile_n) {
            case 8: return max_active_blocks<Config256x8, kBF16>(blocks);
            case 16: return max_active_blocks<Config256x16, kBF16>(blocks);
            case 32: return max_active_blocks<Config256x32, kBF16>(blocks);
            case 64: return max_active_blocks<Config128x64, kBF16>(blocks);
            case 128: return max_active_blocks<Config128x128, kBF16>(blocks);
            default: return cudaErrorInvalidValue;
        }
    }
};

}  // namespace tcsl
}  // namespace flashsparse
