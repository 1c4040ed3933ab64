// CUDA SpMM for bitmap (layout 2) weights that decodes each thread's share of a tile straight
// into its mma.m16n8k16 A-fragment registers: no dense tile in shared memory, no zero-fill,
// no scatter. Index and decode math: bitmap_layout.cuh (shared with the host emulator).
//
// Block: 4 warps, a 64-row tile row of the weight x tile_n (8/16/32) tokens, over the k tiles
// of its split (blockIdx.z). Per k tile, a 3-stage cp.async pipeline stages the tile's 64 row
// masks, its packed values (16-byte chunks tile_offsets[t] .. tile_offsets[t+1]) and the x
// tile [tile_n][64] (zero-filled past N and K) in shared memory. Per stage, each warp
//   1. scans the 64 row popcounts (lane l: rows 2l, 2l+1) -> the start of every row;
//   2. per thread: rows g and g+8 of its 16 rows, chunk t (columns 16t..16t+15) of each mask
//      and the chunk's first value;
//   3. per k-step j (4 per tile): two nibbles -> prmt-expanded A registers, one 8-byte x load
//      per n8 tile, mma.sync (fp32 accumulators).
// Split-K: every CTA of a split > 1 launch writes fp32 partial sums to `partials`; the
// last CTA to arrive at an output tile (atomic counter, reset by it) adds the partials in
// split order (deterministic) plus the bias, and writes y. One launch per call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bitmap_api.cuh"
#include "bitmap_layout.cuh"
#include "ptx.cuh"

namespace flashsparse {
namespace bmp {

struct Params {
    const uint16_t* x;
    const uint8_t* masks;   // bytes of the uint64 row masks
    const uint8_t* values;  // bytes of the 16-bit values
    const int32_t* tile_offsets;
    const uint16_t* bias;  // may be null
    uint16_t* y;
    int32_t* counters;  // split > 1: one arrival counter per output tile
    float* partial;     // split > 1: [split][n][m]
    int m, k, n;
    int k_tiles, tiles_per_split, split;
    int value_chunks;  // 16-byte chunks in `values`: malformed offsets are clamped to it
};

using ptx::cp_async_16;
using ptx::cp_async_16_zfill;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::Elem;
using ptx::mma_16816;
using ptx::pin;
using ptx::smem_addr;

// Per-thread copy state of a CTA, set up once; loading the stage of the CTA's k tile s only
// adds constant strides (pointers advance 512 mask bytes and 64 x columns per k tile), and the
// end offset of tile s is carried over as the start of tile s + 1 (one offsets load per tile).
// kXAligned: x rows 16-byte aligned and k % 8 == 0 (cp.async x); else 16-bit loads.
template <int TN, bool kXAligned>
struct StageLoader {
    static constexpr int kXChunks = TN * 8;
    static constexpr int kXIters = ceil_div(kXChunks, kThreads);
    const uint8_t* mask_src;    // this thread's 16 mask bytes (tid < 32) of tile s = 0
    const int32_t* offs;        // tile_offsets entry of tile s = 0
    const uint8_t* value_src;   // values + 16 * tid
    int next_start;             // offs[s] for the next load
    const uint16_t* x_src[kXIters];
    int x_room[kXIters];        // columns of x left from the chunk's start in tile 0 (<= 0: row past N)
    uint32_t x_dst[kXIters];    // shared byte offsets in a stage

    __device__ __forceinline__ void init(const Params& p, int mt, int kt0, int n0, int tid) {
        const size_t tile0 = static_cast<size_t>(mt) * p.k_tiles + kt0;
        mask_src = p.masks + tile0 * kMaskBytes + tid * 16;
        offs = p.tile_offsets + tile0;
        value_src = p.values + tid * 16;
        pin(mask_src);
        pin(value_src);
        next_start = __ldg(offs);
#pragma unroll
        for (int it = 0; it < kXIters; ++it) {
            const int q = it * kThreads + tid;
            const int nn = n0 + x_chunk_row(q);
            const int kk = kt0 * kTile + x_chunk_col(q);
            x_room[it] = nn < p.n ? p.k - kk : 0;
            x_src[it] = p.x + static_cast<size_t>(nn < p.n ? nn : 0) * p.k + kk;
            x_dst[it] = kMaskBytes + kValueBytes + kValueSlack + 2 * x_elem_offset(x_chunk_row(q), x_chunk_col(q));
            pin(x_src[it]);
            pin(x_dst[it]);
        }
    }

    // stage: shared address (cvta) of the stage.
    __device__ __forceinline__ void load(uint32_t stage, const Params& p, int s, int tid) {
        if (tid < kMaskBytes / 16) cp_async_16(stage + tid * 16, mask_src + s * kMaskBytes);

        // Malformed offsets must not read outside `values` nor overflow the stage.
        const int end = __ldg(offs + s + 1);
        const int start = min(max(next_start, 0), p.value_chunks);
        const int count = min(min(end - next_start, kMaxValueChunks), p.value_chunks - start);
        next_start = end;
        const uint8_t* vsrc = value_src + static_cast<size_t>(start) * 16;
        uint32_t vdst = stage + kMaskBytes + tid * 16;
#pragma unroll 1
        for (int c = tid; c < count; c += kThreads) {
            cp_async_16(vdst, vsrc);
            vsrc += kThreads * 16;
            vdst += kThreads * 16;
        }

#pragma unroll
        for (int it = 0; it < kXIters; ++it) {
            const int q = it * kThreads + tid;
            if (kXChunks % kThreads != 0 && q >= kXChunks) break;
            const int room = x_room[it] - s * kTile;  // x columns left from this chunk
            if constexpr (kXAligned) {
                // k % 8 == 0: a chunk is wholly inside or wholly past K.
                const bool valid = room > 0;
                cp_async_16_zfill(stage + x_dst[it], valid ? x_src[it] + s * kTile : p.x, valid);
            } else {
                const uint16_t* src = x_src[it] + s * kTile;
                uint32_t w[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const uint32_t lo = 2 * e < room ? src[2 * e] : 0u;
                    const uint32_t hi = 2 * e + 1 < room ? src[2 * e + 1] : 0u;
                    w[e] = lo | (hi << 16);
                }
                asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(stage + x_dst[it]), "r"(w[0]), "r"(w[1]),
                             "r"(w[2]), "r"(w[3])
                             : "memory");
            }
        }
    }
};

// A registers of one row for k-step j: nibble j of the row's chunk (the nibble table is at the
// start of shared memory), its values from shared byte `fb`; advances fb to the next nibble.
__device__ __forceinline__ void decode_row(const uint8_t* smem, uint32_t chunk, uint32_t& fb, int j, uint32_t& lo,
                                           uint32_t& hi) {
    const NibbleEntry e = *reinterpret_cast<const NibbleEntry*>(smem + nibble_entry_byte(chunk, j));
    const uint32_t* w = reinterpret_cast<const uint32_t*>(smem + value_byte(fb));
    expand_nibble(e, w[0], w[1], w[2], value_shift(fb), lo, hi);
    fb += e.bytes;
}

// Inclusive warp scan step: v += v of lane - d (when that lane exists), via the shuffle's
// in-range predicate (no compare/select).
template <int D>
__device__ __forceinline__ void scan_step(uint32_t& v) {
    asm volatile(
        "{\n .reg .pred p;\n .reg .u32 r;\n"
        " shfl.sync.up.b32 r|p, %0, %1, 0, -1;\n"
        " @p add.u32 %0, %0, r;\n}\n"
        : "+r"(v)
        : "n"(D));
}

// The same within segments of 4 lanes (shfl.up's segment mask (32 - 4) << 8).
template <int D>
__device__ __forceinline__ void scan4_step(uint32_t& v) {
    asm volatile(
        "{\n .reg .pred p;\n .reg .u32 r;\n"
        " shfl.sync.up.b32 r|p, %0, %1, 0x1c00, -1;\n"
        " @p add.u32 %0, %0, r;\n}\n"
        : "+r"(v)
        : "n"(D));
}

// Per-thread constants of compute_stage, computed once and pinned in registers (ptxas would
// rederive them from %tid in every iteration).
struct ThreadConsts {
    uint32_t scan_byte;    // lane * 16: rows 2l, 2l+1 of the stage's masks
    uint32_t chunk0_byte;  // chunk t of rows r0 = 16w + g and r0 + 8
    uint32_t chunk1_byte;
    uint32_t src0, src1;   // lanes holding the starts of rows r0, r0 + 8
    uint32_t start_sel;    // row_start_selector(r0)
    uint32_t b_byte;       // x tile row g, column b_col(t, 0), from the stage start
};

__device__ __forceinline__ ThreadConsts thread_consts(int warp, int lane) {
    const int g = lane >> 2;
    const int t = lane & 3;
    const int r0 = 16 * warp + g;
    ThreadConsts c;
    c.scan_byte = lane * 16;
    c.chunk0_byte = chunk_byte(r0, t);
    c.chunk1_byte = chunk_byte(r0 + 8, t);
    c.src0 = r0 >> 1;
    c.src1 = (r0 + 8) >> 1;
    c.start_sel = row_start_selector(r0);
    c.b_byte = kMaskBytes + kValueBytes + kValueSlack + 2 * x_elem_offset(g, b_col(t, 0));
    pin(c.scan_byte);
    pin(c.chunk0_byte);
    pin(c.chunk1_byte);
    pin(c.src0);
    pin(c.src1);
    pin(c.start_sel);
    pin(c.b_byte);
    return c;
}

template <bool kBF16, int NT>
__device__ __forceinline__ void compute_stage(float (&acc)[NT][4], const uint8_t* smem, uint32_t stage_byte,
                                              const ThreadConsts& tc) {
    const uint8_t* stage = smem + stage_byte;
    // 1. Row starts: lane l counts rows 2l, 2l+1; inclusive scan over the warp.
    const uint4 pair = *reinterpret_cast<const uint4*>(stage + tc.scan_byte);
    const uint32_t c_even = row_count(pair.x, pair.y);
    const uint32_t c_pair = c_even + row_count(pair.z, pair.w);
    uint32_t pincl = c_pair;
    scan_step<1>(pincl);
    scan_step<2>(pincl);
    scan_step<4>(pincl);
    scan_step<8>(pincl);
    scan_step<16>(pincl);
    const uint32_t packed = pack_row_starts(pincl, c_pair, c_even);
    // 2. This thread's rows r0 = 16w + g and r0 + 8: starts (packed halves), chunk t of each
    //    mask, and the chunks' ranks from a 4-lane scan (packed halves too).
    const uint32_t starts = byte_perm(__shfl_sync(0xFFFFFFFFu, packed, tc.src0),
                                      __shfl_sync(0xFFFFFFFFu, packed, tc.src1), tc.start_sel);
    const uint32_t chunk0 = *reinterpret_cast<const uint16_t*>(stage + tc.chunk0_byte);
    const uint32_t chunk1 = *reinterpret_cast<const uint16_t*>(stage + tc.chunk1_byte);
    const uint32_t counts = pack_chunk_counts(chunk0, chunk1);
    uint32_t incl = counts;
    scan4_step<1>(incl);
    scan4_step<2>(incl);
    const uint32_t firsts = starts + (incl - counts);  // no carry: both halves < 2^13
    uint32_t fb0 = chunk_first_byte(stage_byte + kMaskBytes, firsts & 0xFFFFu, 0);
    uint32_t fb1 = chunk_first_byte(stage_byte + kMaskBytes, firsts >> 16, 0);
    const uint8_t* xs = stage + tc.b_byte;
    // 3. Four k-steps of 16.
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) {
        uint32_t a[4];
        decode_row(smem, chunk0, fb0, j, a[0], a[2]);
        decode_row(smem, chunk1, fb1, j, a[1], a[3]);
#pragma unroll
        for (int nb = 0; nb < NT; ++nb) {
            // x tile row nb*8 + g, column b_col(t, j) = b_col(t, 0) + 4j.
            const uint2 b = *reinterpret_cast<const uint2*>(xs + 2 * x_elem_offset(nb * 8, 4 * j));
            mma_16816<kBF16>(acc[nb], a, b.x, b.y);
        }
    }
}

template <bool kBF16, int NT, bool kXAligned>
__global__ void __launch_bounds__(kThreads) bitmap_spmm_kernel(const Params p) {
    constexpr int TN = NT * 8;
    constexpr int kStage = stage_bytes(TN);
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ int s_last;
    NibbleEntry* const table = reinterpret_cast<NibbleEntry*>(smem);

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n0 = blockIdx.x * TN;
    const int mt = blockIdx.y;
    const int kt0 = blockIdx.z * p.tiles_per_split;
    const int rest = p.k_tiles - kt0;
    const int num = rest < p.tiles_per_split ? rest : p.tiles_per_split;  // >= 1 (effective split)

    if (tid < 16) table[tid] = nibble_entry(static_cast<uint32_t>(tid));
    uint32_t smem_base = smem_addr(smem);
    pin(smem_base);
    StageLoader<TN, kXAligned> loader;
    loader.init(p, mt, kt0, n0, tid);
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < num) loader.load(smem_base + kNibbleTableBytes + s * kStage, p, s, tid);
        cp_async_commit();  // empty groups keep the wait count uniform
    }

    float acc[NT][4];
#pragma unroll
    for (int nb = 0; nb < NT; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[nb][r] = 0.f;

    const ThreadConsts tc = thread_consts(warp, lane);
    // Shared byte offsets of the stage read (tile i) and written (tile i + kStages - 1).
    uint32_t read_byte = kNibbleTableBytes;
    uint32_t write_byte = kNibbleTableBytes + (kStages - 1) * kStage;
    constexpr uint32_t kStagesEnd = kNibbleTableBytes + kStages * kStage;
#pragma unroll 1
    for (int i = 0; i < num; ++i) {
        cp_async_wait<kStages - 2>();  // this thread's copies of tile i have landed
        __syncthreads();               // everyone's have; stage (i-1) % kStages is free
        const int ahead = i + kStages - 1;
        if (ahead < num) loader.load(smem_base + write_byte, p, ahead, tid);
        cp_async_commit();
        compute_stage<kBF16, NT>(acc, smem, read_byte, tc);
        read_byte = read_byte + kStage == kStagesEnd ? kNibbleTableBytes : read_byte + kStage;
        write_byte = write_byte + kStage == kStagesEnd ? kNibbleTableBytes : write_byte + kStage;
    }
    cp_async_wait<0>();

    const int g = lane >> 2;
    const int t = lane & 3;
    const int m0 = mt * kTileM;
    if (p.split == 1) {
#pragma unroll
        for (int nb = 0; nb < NT; ++nb)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int row = m0 + c_row(warp, g, r);
                const int col = n0 + c_col(nb, t, r);
                if (row < p.m && col < p.n) {
                    float v = acc[nb][r];
                    if (p.bias != nullptr) v += Elem<kBF16>::to_float(p.bias[row]);
                    p.y[static_cast<size_t>(col) * p.m + row] = Elem<kBF16>::from_float(v);
                }
            }
        return;
    }

    const size_t mn = static_cast<size_t>(p.n) * p.m;
    float* const mine = p.partial + blockIdx.z * mn;
#pragma unroll
    for (int nb = 0; nb < NT; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = m0 + c_row(warp, g, r);
            const int col = n0 + c_col(nb, t, r);
            if (row < p.m && col < p.n) __stcg(mine + static_cast<size_t>(col) * p.m + row, acc[nb][r]);
        }
    __threadfence();  // partials visible device-wide before the arrival is counted
    __syncthreads();
    if (tid == 0) {
        int32_t* counter = p.counters + static_cast<size_t>(blockIdx.y) * gridDim.x + blockIdx.x;
        const int arrived = atomicAdd(counter, 1);
        s_last = arrived == p.split - 1;
        if (s_last) *counter = 0;  // every split has arrived: ready for the next call
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
#pragma unroll
    for (int nb = 0; nb < NT; ++nb)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = m0 + c_row(warp, g, r);
            const int col = n0 + c_col(nb, t, r);
            if (row < p.m && col < p.n) {
                const size_t idx = static_cast<size_t>(col) * p.m + row;
                float v = 0.f;
#pragma unroll 1
                for (int z = 0; z < p.split; ++z) v += __ldcg(p.partial + z * mn + idx);
                if (p.bias != nullptr) v += Elem<kBF16>::to_float(p.bias[row]);
                p.y[idx] = Elem<kBF16>::from_float(v);
            }
        }
}

// --- host side -----------------------------------------------------------------------------
template <bool kBF16, int NT>
cudaError_t launch(const BitmapProblem& pr, cudaStream_t stream) {
    constexpr int TN = NT * 8;
    const int k_tiles = k_tiles_of(pr.k);
    const int split = effective_split(k_tiles, pr.split_k);
    const int grid_x = ceil_div(pr.n, TN);
    const int grid_y = ceil_div(pr.m, kTileM);
    if (grid_y > kMaxGridY || split > kMaxSplitK) return cudaErrorInvalidValue;
    if (split > 1 && (pr.counters == nullptr || pr.partials == nullptr)) return cudaErrorInvalidValue;
    Params p;
    p.x = static_cast<const uint16_t*>(pr.x);
    p.masks = reinterpret_cast<const uint8_t*>(pr.masks);
    p.values = static_cast<const uint8_t*>(pr.values);
    p.tile_offsets = pr.tile_offsets;
    p.bias = static_cast<const uint16_t*>(pr.bias);
    p.y = static_cast<uint16_t*>(pr.y);
    p.counters = split > 1 ? pr.counters : nullptr;
    p.partial = split > 1 ? pr.partials : nullptr;
    p.m = pr.m;
    p.k = pr.k;
    p.n = pr.n;
    p.k_tiles = k_tiles;
    p.tiles_per_split = tiles_per_split(k_tiles, split);
    p.split = split;
    p.value_chunks = pr.value_chunks;
    const bool x_aligned = (pr.k % 8 == 0) && (reinterpret_cast<uintptr_t>(pr.x) % 16 == 0);
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), static_cast<unsigned>(split));
    if (x_aligned)
        bitmap_spmm_kernel<kBF16, NT, true><<<grid, kThreads, smem_bytes(TN), stream>>>(p);
    else
        bitmap_spmm_kernel<kBF16, NT, false><<<grid, kThreads, smem_bytes(TN), stream>>>(p);
    return cudaGetLastError();
}

template <bool kBF16>
struct TypedOps {
    static cudaError_t run(const BitmapProblem& pr, cudaStream_t stream) {
        switch (pr.tile_n == 0 ? default_tile_n(pr.n) : pr.tile_n) {
            case 8: return launch<kBF16, 1>(pr, stream);
            case 16: return launch<kBF16, 2>(pr, stream);
            case 32: return launch<kBF16, 4>(pr, stream);
            default: return cudaErrorInvalidValue;
        }
    }
    static cudaError_t occupancy(int tile_n, int* blocks) {
        switch (tile_n) {
            case 8:
                return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, bitmap_spmm_kernel<kBF16, 1, true>, kThreads,
                                                                     smem_bytes(8));
            case 16:
                return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, bitmap_spmm_kernel<kBF16, 2, true>, kThreads,
                                                                     smem_bytes(16));
            case 32:
                return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, bitmap_spmm_kernel<kBF16, 4, true>, kThreads,
                                                                     smem_bytes(32));
            default: return cudaErrorInvalidValue;
        }
    }
};

}  // namespace bmp
}  // namespace flashsparse
