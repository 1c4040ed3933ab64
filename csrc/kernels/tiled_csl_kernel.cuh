// Flash-LLM's Load-as-Sparse, Compute-as-Dense SpMM for Tiled-CSL weights (arXiv 2309.10285),
// with the original's defects fixed:
//   * any tile density (0 .. 100 %): every configuration stages a whole storage tile's words in
//     registers (one chunk, static_assert kOneChunk), loaded before the tensor-core work of the
//     previous step, so no density leaves a load exposed after the barrier;
//   * TileOffsets is only read for tiles this block owns (never index T + 2);
//   * any M, K, N >= 1: rows past M and tokens past N are masked, x past K is zero-filled, and
//     x rows that are not 16-byte aligned are read with two aligned 16-byte loads per chunk;
//   * split-K partial sums are fp32 in a caller-provided workspace, reduced inside the kernel by
//     the last block of each output tile to arrive, always in split order (deterministic).
//
// Per block (4 warps) and k step (64), double buffered in shared memory:
//   1. zero the next A tile; copy the next x tile (cp.async, or aligned vector loads held in
//      registers); issue 128-bit loads of the next step's words into registers: a 256-row
//      block's threads 0-63 take its upper storage tile, 64-127 the lower; each thread loads
//      only the slots its tile fills;
//   2. ldmatrix.x4 + mma.sync.m16n8k16 (fp32 accumulators) on the current buffers;
//   3. barrier; scatter the words into the next A tile (their locations are the swizzled
//      shared-memory positions; the encoder's word order makes each warp store conflict free);
//   4. wait for cp.async; barrier.
// The epilogue stages the accumulators through shared memory for coalesced stores of y (with
// the bias, in x's dtype) or of the fp32 split-K partial sums.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ptx.cuh"
#include "smem_opt_in.cuh"
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
    float* workspace;  // split > 1: fp32 partial sums [split][n][m]
    int* counters;     // split > 1: one arrival counter per output tile, zero between launches
    int m, k, n;
    int num_vectors;       // 16-byte vectors in words: every tile's range is clamped to it
    int k_tiles, m_tiles;  // storage-tile grid
    int tiles_per_split;
    int split;
    int x_aligned;  // x rows 16-byte aligned and k % 8 == 0: cp.async fast path
};

using ptx::Elem;

// This thread's share of one storage tile: its first vector and how many vectors of the tile
// lie at or after it (slot i is valid while i * kThreadsPerTile < rem).
struct TileSlice {
    const uint4* ptr;
    int rem;
};

template <class Cfg>
__device__ __forceinline__ TileSlice tile_slice(const int32_t* offs, bool valid, const uint4* words,
                                                int num_vectors, int i, int htid) {
    TileSlice ts;
    int start = 0, count = 0;
    if (valid) {
        // Malformed TileOffsets (the op cannot check them without a device sync) must not read
        // outside the words nor make a chunk loop run away: clamp the range.
        tile_range(__ldg(offs + i), __ldg(offs + i + 1), num_vectors, &start, &count);
    }
    ts.ptr = words + start + htid;
    ts.rem = count - htid;
    return ts;
}

// The thread's slots of its tile into registers (the whole tile fits: kOneChunk); slots past
// the tile are neither loaded nor scattered.
template <class Cfg>
__device__ __forceinline__ void load_chunk(uint4 (&r)[Cfg::kVectorsPerThread], const TileSlice& ts) {
    static_assert(Cfg::kOneChunk, "a dense storage tile fits in one chunk of registers");
#pragma unroll
    for (int i = 0; i < Cfg::kVectorsPerThread; ++i) {
        if (i * Cfg::kThreadsPerTile >= ts.rem) break;
        r[i] = ptx::ld_stream_v4(ts.ptr + i * Cfg::kThreadsPerTile);
    }
}

__device__ __forceinline__ void scatter_word(uint32_t a_base, uint32_t w) {
    // LOP3 + LEA.HI + STS: the location is masked to its storage tile (word_byte_offset), so
    // a malformed word cannot write outside the tile's part of the A buffer.
    ptx::st_shared_u16(a_base + word_byte_offset(w), w);
}

template <class Cfg>
__device__ __forceinline__ void scatter_chunk(uint32_t a_base, const uint4 (&r)[Cfg::kVectorsPerThread],
                                              int rem) {
#pragma unroll
    for (int i = 0; i < Cfg::kVectorsPerThread; ++i) {
        if (i * Cfg::kThreadsPerTile >= rem) break;
        scatter_word(a_base, r[i].x);
        scatter_word(a_base, r[i].y);
        scatter_word(a_base, r[i].z);
        scatter_word(a_base, r[i].w);
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

// Raw aligned blocks of the unaligned-x path (and each chunk's shift), in flight across the
// compute.
template <class Cfg>
struct XRegs {
    uint32_t w[Cfg::kXIters][8];
    int shift[Cfg::kXIters];
};

template <class Cfg>
__device__ __forceinline__ void store_x_chunk(uint16_t* sB, const XRegs<Cfg>& xr, int k, int kcol0,
                                              int it) {
    const int q = it * kThreads + static_cast<int>(threadIdx.x);
    if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) return;
    uint32_t out[4];
    shift_halves(xr.w[it], xr.shift[it], k - (kcol0 + x_chunk_col(q)), out);
    *reinterpret_cast<uint4*>(sB + x_chunk_dst(q)) = make_uint4(out[0], out[1], out[2], out[3]);
}

// x[n0 .. n0+TN, kcol0 .. kcol0+64) -> swizzled [TN][64] tile; zeros past N and K.
// Aligned path: cp.async. Otherwise each 16-byte chunk (8 halves) of a row is cut from the (at
// most two) aligned 16-byte blocks that hold it; a block is read only if it holds a half the
// chunk needs, so no read leaves x's allocation.
template <class Cfg>
__device__ __forceinline__ void load_x_tile(uint16_t* sB, XRegs<Cfg>& xr, const KernelParams& p,
                                            int n0, int kcol0, int tid) {
#pragma unroll
    for (int it = 0; it < Cfg::kXIters; ++it) {
        const int q = it * kThreads + tid;
        if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) break;
        const int n = n0 + x_chunk_row(q);
        const int kcol = kcol0 + x_chunk_col(q);
        const bool valid = n < p.n && kcol < p.k;
        const size_t e0 = static_cast<size_t>(n) * p.k + kcol;
        if (p.x_aligned) {
            // k % 8 == 0 here, so a chunk is entirely inside or entirely past K.
            ptx::cp_async_16_zfill(ptx::smem_addr(sB + x_chunk_dst(q)), valid ? p.x + e0 : p.x, valid);
        } else {
            const uintptr_t addr = reinterpret_cast<uintptr_t>(p.x) + 2 * e0;
            const uint4* blk = reinterpret_cast<const uint4*>(addr & ~static_cast<uintptr_t>(15));
            const int shift = static_cast<int>((addr & 15u) >> 1);
            uint4 lo = make_uint4(0u, 0u, 0u, 0u), hi = lo;
            if (valid) lo = __ldg(blk);
            if (valid && shift > 0 && kcol + 8 - shift < p.k) hi = __ldg(blk + 1);
            uint32_t* w = xr.w[it];
            w[0] = lo.x, w[1] = lo.y, w[2] = lo.z, w[3] = lo.w;
            w[4] = hi.x, w[5] = hi.y, w[6] = hi.z, w[7] = hi.w;
            xr.shift[it] = shift;
            if constexpr (!Cfg::kXRegsAcrossCompute) store_x_chunk<Cfg>(sB, xr, p.k, kcol0, it);
        }
    }
}

template <class Cfg>
__device__ __forceinline__ void store_x_tile(uint16_t* sB, const XRegs<Cfg>& xr, const KernelParams& p,
                                             int kcol0) {
    if constexpr (Cfg::kXRegsAcrossCompute) {
        if (!p.x_aligned) {
#pragma unroll
            for (int it = 0; it < Cfg::kXIters; ++it) store_x_chunk<Cfg>(sB, xr, p.k, kcol0, it);
        }
    }
}

// One 64-deep k step of the warp's 64 x kWarpN output on tensor cores. a_addr[kk] / b_addr[kk]:
// this lane's ldmatrix addresses (bytes) in stage 0 for k step kk of its first m16 / n16 tile;
// the m16 tiles and n16 pairs are constant offsets from them (their rows are congruent mod 8).
template <class Cfg, bool kBF16>
__device__ __forceinline__ void compute_stage(float (&acc)[Cfg::kWarpMTiles][Cfg::kWarpNTiles][4],
                                              const uint32_t (&a_addr)[kTileK / 16],
                                              const uint32_t (&b_addr)[kTileK / 16], uint32_t stage) {
    constexpr int MT = Cfg::kWarpMTiles;
    constexpr int NT = Cfg::kWarpNTiles;
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
        uint32_t a[MT][4];
#pragma unroll
        for (int mi = 0; mi < MT; ++mi)
            ptx::ldmatrix_x4(a[mi], a_addr[kk] + stage + 2u * (mi * 16 * kTileK));
        uint32_t b[NT][2];
        if constexpr (NT == 1) {
            ptx::ldmatrix_x2(b[0], b_addr[kk] + stage);
        } else {
#pragma unroll
            for (int pj = 0; pj < NT / 2; ++pj) {
                uint32_t r[4];
                ptx::ldmatrix_x4(r, b_addr[kk] + stage + 2u * (pj * 16 * kTileK));
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

    // The storage tile this thread stages (tiles of a storage row past M are empty).
    const int sub = tile_of_thread<Cfg>(tid);
    const int htid = thread_in_tile<Cfg>(tid);
    const int mt = blockIdx.y * Cfg::kStorageTiles + sub;
    const bool tile_valid = mt < p.m_tiles;
    // Entries [t, t+1] of tile t = mt * k_tiles + kt; only tiles of this block's k range are
    // read, so the largest index is t_last + 1 <= #tiles (the array has #tiles + 2 entries).
    const int32_t* offs = p.tile_offsets + (static_cast<size_t>(tile_valid ? mt : 0) * p.k_tiles + kt0);

    const int row0 = warp_row0<Cfg>(warp);
    const int col0 = warp_col0<Cfg>(warp);
    // Warps whose rows are all past M or whose columns are all past N have nothing to compute.
    const bool warp_active = m0 + row0 < p.m && n0 + col0 < p.n;

    const uint32_t smem_base = ptx::smem_addr(smem);
    constexpr uint32_t kStageBytes = 2u * Cfg::kStageElems;
    const uint32_t a_sub = smem_base + 2u * (sub * kStorageTileElems);  // + stage: scatter base
    uint32_t a_addr[kTileK / 16], b_addr[kTileK / 16];
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
        a_addr[kk] = smem_base + 2u * a_ldsm_offset(row0, kk, lane);
        b_addr[kk] = smem_base + 2u * (Cfg::kAElems + (Cfg::kWarpNTiles == 1 ? b_ldsm_x2_offset(col0, kk, lane)
                                                                          : b_ldsm_x4_offset(col0, kk, lane)));
    }

    float acc[Cfg::kWarpMTiles][Cfg::kWarpNTiles][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::kWarpMTiles; ++mi)
#pragma unroll
        for (int nj = 0; nj < Cfg::kWarpNTiles; ++nj)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][nj][r] = 0.f;

    if (num_iter > 0) {
        uint4 regs[Cfg::kVectorsPerThread];
        XRegs<Cfg> xr;
        TileSlice ts = tile_slice<Cfg>(offs, tile_valid, p.words, p.num_vectors, 0, htid);
        zero_a_tile<Cfg>(smem, tid);
        load_x_tile<Cfg>(smem + Cfg::kAElems, xr, p, n0, kt0 * kTileK, tid);
        ptx::cp_async_commit();
        load_chunk<Cfg>(regs, ts);
        TileSlice ts_next = ts;
        if (num_iter > 1) ts_next = tile_slice<Cfg>(offs, tile_valid, p.words, p.num_vectors, 1, htid);
        __syncthreads();  // the zeroed A tile is complete before anyone scatters into it
        scatter_chunk<Cfg>(a_sub, regs, ts.rem);
        store_x_tile<Cfg>(smem + Cfg::kAElems, xr, p, kt0 * kTileK);
        ptx::cp_async_wait_all();
        __syncthreads();

#pragma unroll 1
        for (int i = 0; i < num_iter; ++i) {
            const uint32_t cur = (i & 1) * kStageBytes;
            const uint32_t nxt_off = ((i + 1) & 1) * kStageBytes;
            uint16_t* nxt = smem + nxt_off / 2;
            const bool has_next = i + 1 < num_iter;  // uniform over the block
            if (has_next) {
                ts = ts_next;
                // nxt was last read by step i-1's compute, which ended with a barrier.
                zero_a_tile<Cfg>(nxt, tid);
                load_x_tile<Cfg>(nxt + Cfg::kAElems, xr, p, n0, (kt0 + i + 1) * kTileK, tid);
                ptx::cp_async_commit();
                load_chunk<Cfg>(regs, ts);
                if (i + 2 < num_iter) ts_next = tile_slice<Cfg>(offs, tile_valid, p.words, p.num_vectors, i + 2, htid);
            }
            if (warp_active) compute_stage<Cfg, kBF16>(acc, a_addr, b_addr, cur);
            if (has_next) {
                __syncthreads();  // every thread's zeroing of nxt is done
                scatter_chunk<Cfg>(a_sub + nxt_off, regs, ts.rem);
                store_x_tile<Cfg>(nxt + Cfg::kAElems, xr, p, (kt0 + i + 1) * kTileK);
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
    if (p.split > 1) {
        // Publish this split's partial sums; the last block of this output tile to arrive sums
        // all splits in split order (the same order whoever arrives last: deterministic) and
        // resets the counter for the next launch.
        const size_t mn = static_cast<size_t>(p.n) * p.m;
        float* out = p.workspace + blockIdx.z * mn + static_cast<size_t>(n0) * p.m + m0;
#pragma unroll 1
        for (int idx = tid; idx < cols * TM; idx += kThreads) {
            const int n_l = idx / TM;
            const int m_l = idx % TM;
            if (m_l < rows) out[static_cast<size_t>(n_l) * p.m + m_l] = sC[n_l * Cfg::kCStride + m_l];
        }
        __threadfence();
        __syncthreads();
        __shared__ int s_last;
        int* const counter = p.counters + blockIdx.y * gridDim.x + blockIdx.x;
        if (tid == 0) s_last = atomicAdd(counter, 1) == p.split - 1;
        __syncthreads();
        if (!s_last) return;
        __threadfence();
        const float* ws = p.workspace + static_cast<size_t>(n0) * p.m + m0;
        uint16_t* y = p.y + static_cast<size_t>(n0) * p.m + m0;
#pragma unroll 1
        for (int idx = tid; idx < cols * TM; idx += kThreads) {
            const int n_l = idx / TM;
            const int m_l = idx % TM;
            if (m_l >= rows) continue;
            const size_t o = static_cast<size_t>(n_l) * p.m + m_l;
            float v = 0.f;
#pragma unroll 1
            for (int z = 0; z < p.split; ++z) v += __ldcg(ws + z * mn + o);
            if (p.bias != nullptr) v += Elem<kBF16>::to_float(p.bias[m0 + m_l]);
            y[o] = Elem<kBF16>::from_float(v);
        }
        if (tid == 0) *counter = 0;
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

// --- host side -----------------------------------------------------------------------------
// Dynamic shared memory above 48 KiB: each configuration opts in once per device at its first
// use there, after checking that it fits the device (smem_opt_in.cuh).
template <class Cfg, bool kBF16>
cudaError_t opt_in() {
    static SmemOptIn state;
    return state.ensure(tiled_csl_spmm_kernel<Cfg, kBF16>, Cfg::kSmemBytes);
}

template <class Cfg, bool kBF16>
cudaError_t max_active_blocks(int* blocks) {
    const cudaError_t ready = opt_in<Cfg, kBF16>();
    if (ready == cudaErrorInvalidConfiguration) {
        *blocks = 0;  // does not fit this device
        return cudaSuccess;
    }
    if (ready != cudaSuccess) return ready;
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, tiled_csl_spmm_kernel<Cfg, kBF16>,
                                                         kThreads, Cfg::kSmemBytes);
}

template <class Cfg, bool kBF16>
cudaError_t launch_spmm(const TiledCslProblem& pr, cudaStream_t stream) {
    const int k_tiles = k_tiles_of(pr.k);
    const int split = tiled_csl_effective_split(pr.k, pr.split_k);
    const int grid_y = ceil_div(pr.m, Cfg::kTileM);
    if (grid_y > kMaxGridY) return cudaErrorInvalidValue;
    if (split > 1 && (pr.workspace == nullptr || pr.counters == nullptr)) return cudaErrorInvalidValue;
    const cudaError_t ready = opt_in<Cfg, kBF16>();
    if (ready != cudaSuccess) return ready;

    KernelParams kp;
    kp.x = static_cast<const uint16_t*>(pr.x);
    kp.words = static_cast<const uint4*>(pr.words);
    kp.tile_offsets = pr.tile_offsets;
    kp.bias = static_cast<const uint16_t*>(pr.bias);
    kp.y = static_cast<uint16_t*>(pr.y);
    kp.workspace = split > 1 ? pr.workspace : nullptr;
    kp.counters = split > 1 ? pr.counters : nullptr;
    kp.split = split;
    kp.m = pr.m;
    kp.k = pr.k;
    kp.num_vectors = pr.num_vectors;
    kp.n = pr.n;
    kp.k_tiles = k_tiles;
    kp.m_tiles = ceil_div(pr.m, kStorageTileM);
    kp.tiles_per_split = tiles_per_split(k_tiles, split);
    kp.x_aligned = (pr.k % 8 == 0) && (reinterpret_cast<uintptr_t>(pr.x) % 16 == 0);

    const dim3 grid(static_cast<unsigned>(ceil_div(pr.n, Cfg::kTileN)), static_cast<unsigned>(grid_y),
                    static_cast<unsigned>(split));
    tiled_csl_spmm_kernel<Cfg, kBF16><<<grid, kThreads, Cfg::kSmemBytes, stream>>>(kp);
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
