// CUDA SpMM for bitmap (layout 2) weights that decodes each thread's share of a tile straight
// into its mma.m16n8k16 A-fragment registers: no dense tile in shared memory, no zero-fill,
// no scatter. Index and decode math: bitmap_layout.cuh (shared with the host emulator).
//
// Block: 4 warps, a 64-row tile row of the weight x tile_n (8/16/32) tokens, over the k tiles
// of its split (blockIdx.z). A pipeline stage holds FOUR consecutive k tiles -- warp w decodes
// tile 4s + w, so the 64-row scan is paid once per 4096 elements -- in a double buffer: the 4
// tiles' row masks (2 KiB) and packed values (contiguous in memory: tile_offsets[4s] ..
// tile_offsets[4s + 4]), copied on sm_90 by ONE thread as two cp.async.bulk on the buffer's
// mbarrier and before sm_90 by all threads with cp.async, and the x tile [tile_n][256]
// (cp.async by all threads; zeros past the split's columns and K: the next split's x must not
// meet this split's all-zero masks of absent tiles, since 0 x Inf = NaN), masks of tiles past
// the split's end zeroed. The main loop runs two stages per trip so buffers and barriers are
// compile-time constants.
// Shared memory: 76-101 KiB dynamic (opt-in above 48 KiB) + 4 KiB static decode tables: two
// CTAs (8 warps) per H100 SM; on a GPU with 99 KiB per block (sm_86/89/120) the 32-wide tile
// does not fit and the host picks 16 (bitmap_choose_tile_n). Per stage, each warp
//   1. scans its tile's 64 row popcounts (lane l: rows 2l, 2l+1) -> packed row starts;
//   2. per thread (g, t): rows 8g .. 8g+7, chunk t (columns 16t..16t+15) of each mask, the row
//      starts of lane 4g + b (one in-group shuffle per row pair) and the chunks' ranks (a 4-lane
//      scan of packed popcounts) -> the chunks' first values;
//   3. per k-step j (4 per tile): per m16 block b, two nibbles -> prmt-expanded A registers;
//      one 8-byte x load per n8 tile serves all 4 blocks; mma.sync (fp32 accumulators).
// Each warp accumulates the whole 64 x tile_n block tile over its own tiles; at the end the
// four partials are added in warp order through shared memory (deterministic).
// Split-K: every CTA of a split > 1 launch writes fp32 partial sums to `partials`; the
// last CTA to arrive at an output tile (atomic counter, reset by it) adds the partials in
// split order (deterministic) plus the bias, and writes y. One launch per call.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "bitmap_api.cuh"
#include "bitmap_layout.cuh"
#include "ptx.cuh"
#include "smem_opt_in.cuh"

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
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::Elem;
using ptx::mma_16816;
using ptx::pin;
using ptx::smem_addr;

// Copies are predicated per thread: a valid chunk is a cp.async, an invalid one a 16-byte zero
// store to the same place (no pointer select, and no address is formed past an array's end).
__device__ __forceinline__ void st_shared_zero16(uint32_t dst) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0u) : "memory");
}

// sm_90: the stage's masks and values are two contiguous runs of bytes, so ONE thread copies
// them with two bulk copies (cp.async.bulk, completion counted in bytes on an mbarrier) instead
// of every thread issuing 16-byte cp.async copies in a loop.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FS_BMP_BULK 1
#else
#define FS_BMP_BULK 0
#endif

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
#if FS_BMP_BULK
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Orders this thread's earlier generic-proxy shared accesses (e.g. a zero store a stage got in
// an earlier use) before its later bulk copies (async proxy).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile(
        "{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
        : "memory");
}
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
        "l"(src), "r"(bytes), "r"(bar)
        : "memory");
}
#endif
// Waits until phase `parity` of the mbarrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n .reg .pred p;\n"
        "WAIT:\n"
        " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        " @!p bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Per-thread copy state of a CTA, set up once; each load() advances it by one stage (constant
// strides: 2048 mask bytes, 4 offsets and 256 x columns), and the end offset of stage s is
// carried over as the start of stage s + 1 (two offsets loads per stage: the end and the start
// of this warp's tile).
// kXAligned: x rows 16-byte aligned and k % 8 == 0 (cp.async x); else 16-bit loads.
template <int TN, bool kXAligned>
struct StageLoader {
    static constexpr int kXIters = x_chunks_per_thread(TN);
    static constexpr int kCopyUnroll = 8;
    static constexpr int kCopyChunks = kCopyUnroll * kThreads;  // value chunks per copy trip
    const uint8_t* mask_src;    // this thread's 16 mask bytes of the next stage
    const int32_t* offs;        // tile_offsets entry of the next stage's first tile
    const uint8_t* value_src;   // values + 16 * value_first + 2048 (see load)
    uint32_t value_dst;         // 16 * value_first
    int value_first;            // 256 * warp + lane: this thread's first value chunk of a trip
    int next_start;             // offs[0]: the next stage's first value chunk
    int tiles_left;             // k tiles of the split from the next stage on
    int warp;
    const uint16_t* x_src;      // x row of this thread's chunks, first chunk column, next stage
    int x_room;                 // split columns left from that chunk (<= 0: row past N)
    int cols_left;              // split columns from the next stage's first column
    uint32_t x_dst;             // shared byte offset of the first chunk in a stage

    __device__ __forceinline__ void init(const Params& p, int mt, int kt0, int num_tiles, int n0, int tid) {
        const size_t tile0 = static_cast<size_t>(mt) * p.k_tiles + kt0;
        warp = tid >> 5;
        mask_src = p.masks + tile0 * kMaskBytes + tid * 16;
        offs = p.tile_offsets + tile0;
        value_first = warp * (kCopyChunks / kWarps) + (tid & 31);
        value_dst = 16 * value_first;
        value_src = p.values + value_dst + 2048;
        next_start = __ldg(offs);
        tiles_left = num_tiles;
        const int row = x_chunk_row(TN, tid);
        const int nn = n0 + row;
        const int kk = kt0 * kTile + x_chunk_col(TN, tid, 0);
        // x is staged up to the end of this split's columns, not up to K (split_k_end).
        const int k_end = split_k_end(p.k, kt0, num_tiles);
        x_room = nn < p.n ? k_end - kk : 0;
        cols_left = k_end - kt0 * kTile;
        x_src = p.x + static_cast<size_t>(nn < p.n ? nn : 0) * p.k + kk;
        x_dst = stage_x_byte() + 2 * x_elem_offset(row, x_chunk_col(TN, tid, 0));
        pin(value_src);
        pin(value_dst);
        pin(x_dst);
    }

    // Loads the next stage into the stage at shared address `stage` (sm_90: masks and values
    // complete on mbarrier `bar`; x, and everything before sm_90, through cp.async groups).
    // Returns where this warp's tile's values start in the stage (bytes), from offsets read now
    // so their latency hides behind a compute.
    __device__ __forceinline__ int load(uint32_t stage, const Params& p, int tid, uint32_t bar) {
        // The 4 tiles' masks are 2 KiB of contiguous bytes: one copy per thread (tile = warp). A
        // tile past the split's end gets all-zero masks: its warp decodes zeros instead of
        // branching around the warp-collective scan (x past the split's end is zero too).
        const bool mask_valid = warp < tiles_left;
        if (!mask_valid) st_shared_zero16(stage + tid * 16);
#if !FS_BMP_BULK
        if (mask_valid) cp_async_16(stage + tid * 16, mask_src);
#endif

        const int end = __ldg(offs + min(kTilesPerStage, tiles_left));
        const int tile_start = __ldg(offs + min(warp, tiles_left));
        const int start = clamp_start(next_start, p.value_chunks);
        const int count = stage_value_count(next_start, end, p.value_chunks);
#if FS_BMP_BULK
        if (tid == 0) {
            // Masks of the stage's tiles in the split, then its values: bytes counted on `bar`.
            const uint32_t mask_bytes = kMaskBytes * min(kTilesPerStage, tiles_left);
            const uint32_t value_bytes = count > 0 ? 16u * count : 0u;
            fence_proxy_async();
            mbar_expect_tx(bar, mask_bytes + value_bytes);
            bulk_copy(stage, mask_src, mask_bytes, bar);
            if (value_bytes != 0) bulk_copy(stage + kStageMaskBytes, p.values + static_cast<size_t>(start) * 16, value_bytes, bar);
        }
#else
        // Warp w copies chunks 256w .. 256w + 255 of every 1024 (8 x 512 contiguous bytes, lane
        // l at 16l): the 8 copies' offsets fit the load's signed 12-bit immediate from a pointer
        // 2 KiB into the warp's segment, so each costs a compare and the predicated cp.async.
        const uint8_t* vsrc = value_src + static_cast<size_t>(start) * 16;
        uint32_t vdst = stage + kStageMaskBytes + value_dst;
#pragma unroll 1
        for (int rem = count - value_first; rem > 0; rem -= kCopyChunks) {
#pragma unroll
            for (int u = 0; u < kCopyUnroll; ++u)
                if (rem > 32 * u) cp_async_16(vdst + 512 * u, vsrc + 512 * u - 2048);
            vsrc += kCopyChunks * 16;
            vdst += kCopyChunks * 16;
        }
#endif

        // x: this thread's chunks sit in one row, x_chunk_stride() columns apart. (Zero stores
        // first, then the copies back to back: ptxas pads every cp.async that follows another
        // kind of memory instruction with filler instructions.)
        uint32_t x_stage = stage + x_dst;
        pin(x_stage);  // one address, the chunks at immediate offsets
        // A stage whose 256 columns all belong to the split (the same for the whole CTA) copies x
        // without predicates or zero stores. One that reaches past the split's end (or past K)
        // zeroes those columns: the next split's x would meet this split's all-zero masks of
        // absent tiles, and 0 x Inf = NaN where F.linear has no such product.
        const bool full = kXAligned && cols_left >= kXCols;
        if (full) {
            // A row past N reads x row 0 (x_src points there): its columns of y are never written.
#pragma unroll
            for (int u = 0; u < kXIters; ++u)
                cp_async_16(x_stage + 2 * u * x_chunk_stride(TN), x_src + u * x_chunk_stride(TN));
        } else if constexpr (kXAligned) {
            // k % 8 == 0 (and a split ends at a multiple of 64): an x chunk is wholly inside or
            // wholly past the split's columns (rows past N: x_room 0).
#pragma unroll
            for (int u = 0; u < kXIters; ++u)
                if (x_room <= u * x_chunk_stride(TN)) st_shared_zero16(x_stage + 2 * u * x_chunk_stride(TN));
#pragma unroll
            for (int u = 0; u < kXIters; ++u)
                if (x_room > u * x_chunk_stride(TN))
                    cp_async_16(x_stage + 2 * u * x_chunk_stride(TN), x_src + u * x_chunk_stride(TN));
        }
#pragma unroll
        for (int u = 0; u < kXIters; ++u) {
            const int off = u * x_chunk_stride(TN);
            const uint32_t dst = x_stage + 2 * off;
            if constexpr (!kXAligned) {
                const uint16_t* src = x_src + off;
                uint32_t w[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const uint32_t lo = 2 * e + off < x_room ? src[2 * e] : 0u;
                    const uint32_t hi = 2 * e + 1 + off < x_room ? src[2 * e + 1] : 0u;
                    w[e] = lo | (hi << 16);
                }
                asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]),
                             "r"(w[3])
                             : "memory");
            }
        }
        // This warp's tile's values in the stage (bytes from the stage start).
        const int values_off = kStageMaskBytes + 16 * tile_rel_chunk(tile_start, next_start);
        // Advance to the next stage.
        next_start = end;
        tiles_left -= kTilesPerStage;
        mask_src += kStageMaskBytes;
        offs += kTilesPerStage;
        x_src += kXCols;
        x_room -= kXCols;
        cols_left -= kXCols;
        return values_off;
    }
};

// 32-bit shared load at a shared-window byte address (no generic-to-shared base add).
__device__ __forceinline__ uint32_t lds32(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ uint32_t lds_u16(uint32_t addr) {
    uint16_t v;
    asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr));
    return v;
}
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
    return v;
}
__device__ __forceinline__ uint2 lds64(uint32_t addr) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
    return v;
}

// A registers of one chunk for k-step j from its table entry (`table` + byte `eb`) and its
// values at shared-window byte `fb`.
__device__ __forceinline__ NibbleEntry decode_nibble(const uint8_t* table, uint32_t eb, uint32_t fb, uint32_t& lo,
                                                     uint32_t& hi) {
    const NibbleEntry e = *reinterpret_cast<const NibbleEntry*>(table + eb);
    const uint32_t w = value_byte(fb);
    expand_nibble(e, lds32(w), lds32(w + 4), lds32(w + 8), fb, lo, hi);
    return e;
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

// The word of lane 4g + B of the caller's 4-lane group.
template <int B>
__device__ __forceinline__ uint32_t group_shfl(uint32_t v) {
    uint32_t r;
    asm volatile("shfl.sync.idx.b32 %0, %1, %2, %3, -1;\n" : "=r"(r) : "r"(v), "n"(B), "n"(kGroupShflC));
    return r;
}

// Per-thread constants of compute_stage, computed once and pinned in registers (ptxas would
// rederive them from %tid in every iteration).
struct ThreadConsts {
    uint32_t scan_byte;   // warp * 512 + lane * 16: rows 2l, 2l+1 of the warp's tile masks
    uint32_t chunk_byte;  // warp * 512 + chunk t of row 8g: rows 8g + r at + 8r
    uint32_t b_byte;      // x tile row g, column b_col(warp, t, 0), from the stage start
};

__device__ __forceinline__ ThreadConsts thread_consts(int warp, int lane) {
    const int g = lane >> 2;
    const int t = lane & 3;
    ThreadConsts c;
    c.scan_byte = warp * kMaskBytes + lane * 16;
    c.chunk_byte = warp * kMaskBytes + chunk_byte(thread_row(g, 0), t);
    c.b_byte = stage_x_byte() + 2 * x_elem_offset(g, b_col(warp, t, 0));
    pin(c.scan_byte);
    pin(c.chunk_byte);
    pin(c.b_byte);
    return c;
}

// One warp, one 64x64 tile: the stage at shared-window byte `stage`, the tile's values from
// shared-window byte `values`; `table`: the decode tables (static shared memory, so their base
// folds into the loads' immediate offsets).
template <bool kBF16, int NT>
__device__ __forceinline__ void compute_tile(float (&acc)[4][NT][4], const uint8_t* table, uint32_t stage,
                                             uint32_t values, const ThreadConsts& tc) {
    // 1. Row starts: lane l counts rows 2l, 2l+1; inclusive scan over the warp.
    const uint4 pair = lds128(stage + tc.scan_byte);
    const uint32_t c_even = row_count(pair.x, pair.y);
    const uint32_t c_pair = c_even + row_count(pair.z, pair.w);
    uint32_t pincl = c_pair;
    scan_step<1>(pincl);
    scan_step<2>(pincl);
    scan_step<4>(pincl);
    scan_step<8>(pincl);
    scan_step<16>(pincl);
    const uint32_t packed = pack_row_starts(pincl, c_pair, c_even);
    // 2. Rows 8g + r (r = 0..7): chunk t, table addresses, first value byte.
    uint32_t a01[8], a23[8], fb[8];
    uint32_t counts[4], incl[4];
    const uint32_t chunks = stage + tc.chunk_byte;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        const uint32_t c = lds_u16(chunks + 8 * r);
        a01[r] = chunk_addr01(c);
        a23[r] = chunk_addr23(c);
        fb[r] = c;  // for the popcounts; fb is set from the scan
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        counts[b] = pack_chunk_counts(fb[2 * b], fb[2 * b + 1]);
        incl[b] = counts[b];
        scan4_step<1>(incl[b]);
        scan4_step<2>(incl[b]);
    }
    uint32_t starts[4];
    starts[0] = group_shfl<0>(packed);
    starts[1] = group_shfl<1>(packed);
    starts[2] = group_shfl<2>(packed);
    starts[3] = group_shfl<3>(packed);
#pragma unroll
    for (int b = 0; b < 4; ++b) {
        const uint32_t firsts = starts[b] + (incl[b] - counts[b]);  // no carry: both halves < 2^13
        fb[2 * b] = first_byte_lo(values, firsts);
        fb[2 * b + 1] = first_byte_hi(values, firsts);
    }
    const uint32_t xs = stage + tc.b_byte;
    // 3. Four k-steps of 16.
#pragma unroll
    for (int j = 0; j < kTile / 16; ++j) {
        uint32_t bx[NT][2];
#pragma unroll
        for (int nb = 0; nb < NT; ++nb) {
            // x tile row nb*8 + g, column b_col(warp, t, j) = b_col(warp, t, 0) + 4j.
            const uint2 v = lds64(xs + 2 * x_elem_offset(nb * 8, 4 * j));
            bx[nb][0] = v.x;
            bx[nb][1] = v.y;
        }
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            uint32_t a[4];
            const NibbleEntry e0 = decode_nibble(table, table_byte(a01[2 * b], a23[2 * b], j), fb[2 * b], a[0], a[2]);
            const NibbleEntry e1 =
                decode_nibble(table, table_byte(a01[2 * b + 1], a23[2 * b + 1], j), fb[2 * b + 1], a[1], a[3]);
            if (j < 3) {
                fb[2 * b] += entry_bytes(e0);
                fb[2 * b + 1] += entry_bytes(e1);
            }
#pragma unroll
            for (int nb = 0; nb < NT; ++nb) mma_16816<kBF16>(acc[b][nb], a, bx[nb][0], bx[nb][1]);
        }
    }
}

template <bool kBF16, int NT, bool kXAligned>
__global__ void __launch_bounds__(kThreads) bitmap_spmm_kernel(const Params p) {
    constexpr int TN = NT * 8;
    constexpr int kStage = stage_bytes(TN);
    extern __shared__ __align__(16) uint8_t smem[];
    __shared__ __align__(16) NibbleEntry s_table[2 * kTableEntries];  // 8-byte entries
    __shared__ int s_last;
    __shared__ __align__(16) uint64_t s_bar[kStages];  // sm_90: bulk copies of stage buffer b

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int n0 = blockIdx.x * TN;
    const int mt = blockIdx.y;
    const int kt0 = blockIdx.z * p.tiles_per_split;
    const int rest = p.k_tiles - kt0;
    const int num = rest < p.tiles_per_split ? rest : p.tiles_per_split;  // >= 1 (effective split)
    const int stages = stages_of(num);

#pragma unroll
    for (int e = tid; e < 2 * kTableEntries; e += kThreads) s_table[e] = table_entry(e);
    uint32_t smem_base = smem_addr(smem);
    pin(smem_base);
    const uint32_t bar0 = smem_addr(s_bar);
#if FS_BMP_BULK
    if (tid == 0) {
        for (int b = 0; b < kStages; ++b) mbar_init(bar0 + 8 * b, 1);
        mbar_init_fence();
    }
    __syncthreads();  // the barriers are initialised before anyone waits on them
#endif
    StageLoader<TN, kXAligned> loader;
    loader.init(p, mt, kt0, num, n0, tid);
    int values_off = loader.load(smem_base, p, tid, bar0);  // stage 0 into buffer 0
    cp_async_commit();

    float acc[4][NT][4];
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int nb = 0; nb < NT; ++nb)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[b][nb][r] = 0.f;

    const ThreadConsts tc = thread_consts(warp, lane);
    const uint8_t* const table = reinterpret_cast<const uint8_t*>(s_table);
    // Stage i lives in buffer i % 2. One step: wait for stage i, load stage i + 1 into the other
    // buffer, decode stage i. The loop runs two steps per trip so that the buffers, their
    // barriers and their addresses are compile-time constants.
    uint32_t parity = 0;  // phase of both barriers in this trip
    auto step = [&](int i, auto buffer) {
        constexpr int kB = decltype(buffer)::value;
#if FS_BMP_BULK
        mbar_wait(bar0 + 8 * kB, parity);  // stage i's masks and values have landed
#endif
        cp_async_wait<0>();  // this thread's copies of stage i have landed
        __syncthreads();     // everyone's have; the other buffer is free
        const int my_values = values_off;
        if (i + 1 < stages) values_off = loader.load(smem_base + (1 - kB) * kStage, p, tid, bar0 + 8 * (1 - kB));
        cp_async_commit();
        compute_tile<kBF16, NT>(acc, table, smem_base + kB * kStage, smem_base + kB * kStage + my_values, tc);
    };
#pragma unroll 1
    for (int i = 0; i < stages; i += 2) {
        step(i, std::integral_constant<int, 0>());
        if (i + 1 == stages) break;
        step(i + 1, std::integral_constant<int, 1>());
        parity ^= 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // every warp is done with the stages: reuse them for the reduction

    const int g = lane >> 2;
    const int t = lane & 3;
    float* const red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int b = 0; b < 4; ++b)
#pragma unroll
        for (int nb = 0; nb < NT; ++nb)
#pragma unroll
            for (int r = 0; r < 4; ++r) red[red_index(warp, TN, c_row(g, b, r), c_col(nb, t, r))] = acc[b][nb][r];
    __syncthreads();

    // Thread tid owns outputs e = tid + 128 q of the block tile (row e % 64, column e / 64):
    // consecutive threads write consecutive rows of y[n][m].
    constexpr int kOuts = kTileM * TN / kThreads;
    const int m0 = mt * kTileM;
    float out[kOuts];
#pragma unroll
    for (int q = 0; q < kOuts; ++q) {
        const int e = tid + q * kThreads;
        const int row = e % kTileM, col = e / kTileM;
        float v = red[red_index(0, TN, row, col)];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) v += red[red_index(w, TN, row, col)];
        out[q] = v;
    }
    if (p.split == 1) {
#pragma unroll
        for (int q = 0; q < kOuts; ++q) {
            const int e = tid + q * kThreads;
            const int row = m0 + e % kTileM, col = n0 + e / kTileM;
            if (row < p.m && col < p.n) {
                float v = out[q];
                if (p.bias != nullptr) v += Elem<kBF16>::to_float(p.bias[row]);
                p.y[static_cast<size_t>(col) * p.m + row] = Elem<kBF16>::from_float(v);
            }
        }
        return;
    }

    const size_t mn = static_cast<size_t>(p.n) * p.m;
    float* const mine = p.partial + blockIdx.z * mn;
#pragma unroll
    for (int q = 0; q < kOuts; ++q) {
        const int e = tid + q * kThreads;
        const int row = m0 + e % kTileM, col = n0 + e / kTileM;
        if (row < p.m && col < p.n) __stcg(mine + static_cast<size_t>(col) * p.m + row, out[q]);
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
    for (int q = 0; q < kOuts; ++q) {
        const int e = tid + q * kThreads;
        const int row = m0 + e % kTileM, col = n0 + e / kTileM;
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
// Dynamic shared memory above 48 KiB: each instantiation opts in once per device at its first
// use there, after checking that it fits the device (smem_opt_in.cuh).
template <bool kBF16, int NT, bool kXAligned>
cudaError_t opt_in() {
    static SmemOptIn state;
    return state.ensure(bitmap_spmm_kernel<kBF16, NT, kXAligned>, smem_bytes(NT * 8));
}

template <bool kBF16, int NT>
cudaError_t launch(const BitmapProblem& pr, cudaStream_t stream) {
    constexpr int TN = NT * 8;
    const int k_tiles = k_tiles_of(pr.k);
    const int split = effective_split(k_tiles, pr.split_k);
    const int grid_x = ceil_div(pr.n, TN);
    const int grid_y = ceil_div(pr.m, kTileM);
    if (grid_y > kMaxGridY || split > kMaxSplitK) return cudaErrorInvalidValue;
    if (split > 1 && (pr.counters == nullptr || pr.partials == nullptr)) return cudaErrorInvalidValue;
    const bool x_aligned = (pr.k % 8 == 0) && (reinterpret_cast<uintptr_t>(pr.x) % 16 == 0);
    const cudaError_t ready = x_aligned ? opt_in<kBF16, NT, true>() : opt_in<kBF16, NT, false>();
    if (ready != cudaSuccess) return ready;
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
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), static_cast<unsigned>(split));
    if (x_aligned)
        bitmap_spmm_kernel<kBF16, NT, true><<<grid, kThreads, smem_bytes(TN), stream>>>(p);
    else
        bitmap_spmm_kernel<kBF16, NT, false><<<grid, kThreads, smem_bytes(TN), stream>>>(p);
    return cudaGetLastError();
}

template <bool kBF16>
struct TypedOps {
    // tile_n must be 8, 16 or 32 (bitmap_spmm resolves 0 first).
    static cudaError_t run(const BitmapProblem& pr, cudaStream_t stream) {
        switch (pr.tile_n) {
            case 8: return launch<kBF16, 1>(pr, stream);
            case 16: return launch<kBF16, 2>(pr, stream);
            case 32: return launch<kBF16, 4>(pr, stream);
            default: return cudaErrorInvalidValue;
        }
    }
    // cudaSuccess if the tile width's kernel fits the current device (and is opted in),
    // cudaErrorInvalidConfiguration if its shared memory does not fit.
    static cudaError_t fits(int tile_n) {
        switch (tile_n) {
            case 8: return opt_in<kBF16, 1, true>();
            case 16: return opt_in<kBF16, 2, true>();
            case 32: return opt_in<kBF16, 4, true>();
            default: return cudaErrorInvalidValue;
        }
    }
    static cudaError_t footprint(int tile_n, int* need, int* limit) {
        switch (tile_n) {
            case 8: return SmemOptIn::footprint(bitmap_spmm_kernel<kBF16, 1, true>, smem_bytes(8), need, limit);
            case 16: return SmemOptIn::footprint(bitmap_spmm_kernel<kBF16, 2, true>, smem_bytes(16), need, limit);
            case 32: return SmemOptIn::footprint(bitmap_spmm_kernel<kBF16, 4, true>, smem_bytes(32), need, limit);
            default: return cudaErrorInvalidValue;
        }
    }
    template <int NT>
    static cudaError_t occupancy_of(int* blocks) {
        const cudaError_t ready = opt_in<kBF16, NT, true>();
        if (ready == cudaErrorInvalidConfiguration) {
            *blocks = 0;  // does not fit this device
            return cudaSuccess;
        }
        if (ready != cudaSuccess) return ready;
        return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, bitmap_spmm_kernel<kBF16, NT, true>, kThreads,
                                                             smem_bytes(NT * 8));
    }
    static cudaError_t occupancy(int tile_n, int* blocks) {
        switch (tile_n) {
            case 8: return occupancy_of<1>(blocks);
            case 16: return occupancy_of<2>(blocks);
            case 32: return occupancy_of<4>(blocks);
            default: return cudaErrorInvalidValue;
        }
    }
};

}  // namespace bmp
}  // namespace flashsparse
