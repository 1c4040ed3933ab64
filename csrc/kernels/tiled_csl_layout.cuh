// Index math of the Tiled-CSL SpMM kernel, shared by the CUDA kernel and the host emulator.
//
// Plain C++ (no CUDA headers): every function is __host__ __device__ under nvcc and inline
// under a host compiler, so tiled_csl_emulator.cu can replay the kernel's addressing on the
// CPU with exactly these definitions (tests/test_tiled_csl_cuda.py runs it).
//
// Shared-memory tiles are 64 halves (128 bytes) wide. Element (row, col) lives at
//   row * 64 + (((col / 8) ^ (row % 8)) * 8) + col % 8
// i.e. the 16-byte chunk col/8 is XORed with row%8. The Tiled-CSL word locations are already
// in this form (flashsparse/formats/tiled_csl.py), and ldmatrix reads 8 consecutive rows of one
// logical chunk from 8 different bank groups.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define FS_HD __host__ __device__ __forceinline__
#else
#define FS_HD inline
#endif

namespace flashsparse {
namespace tcsl {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = 4;
constexpr int kStorageTileM = 128;  // rows of a Tiled-CSL storage tile
constexpr int kTileK = 64;          // k extent of a storage tile and of one pipeline step
constexpr int kStorageTileElems = kStorageTileM * kTileK;      // 8192
constexpr int kMaxTileVectors = kStorageTileElems / 4;          // a 100 %-dense tile
// A warp's 16-bit shared store instruction covers 32 consecutive 16-byte vectors of one storage
// tile, starting at a multiple of 32 from the tile's first vector; the encoder orders each
// such group's words so that these stores are bank-conflict free.
constexpr int kWarpVectors = 32;
constexpr int kMaxGridY = 65535;
constexpr int kMaxSplitK = 65535;
// Largest N and K the host accepts (problem_size_error): a block's first token or k column plus
// a tile-local offset (< 128), and K rounded up to whole k tiles, stay below 2^31.
constexpr int kMaxExtent = 0x7FFFFFFF - 255;

// a >= 0, b >= 1; never overflows (a + b - 1 would for a near 2^31).
FS_HD constexpr int ceil_div(int a, int b) { return a / b + (a % b != 0 ? 1 : 0); }

// Block tile configuration: TM x TN outputs per block, warps arranged BR x BC, each warp
// computing 64 rows (four m16 tiles) x TN/BC columns (n8 tiles). The block's threads are split
// evenly over its storage tiles (all 128 threads for a 128-row block, 64 per tile for a 256-row
// block); each thread stages V 16-byte word vectors of its tile in registers per chunk, so a
// chunk is kThreadsPerTile * V vectors of each storage tile. The kernel requires a whole dense
// tile to fit in one chunk (kOneChunk), so the scatter never waits for a second load.
template <int TM, int TN, int BR, int BC, int V>
struct TileConfig {
    static constexpr int kTileM = TM;
    static constexpr int kTileN = TN;
    static constexpr int kWarpRows = BR;
    static constexpr int kWarpCols = BC;
    static constexpr int kWarpM = TM / BR;
    static constexpr int kWarpN = TN / BC;
    static constexpr int kWarpMTiles = kWarpM / 16;
    static constexpr int kWarpNTiles = kWarpN / 8;
    static constexpr int kStorageTiles = TM / kStorageTileM;
    static constexpr int kThreadsPerTile = kThreads / kStorageTiles;
    static constexpr int kVectorsPerThread = V;
    static constexpr int kChunkVectors = kThreadsPerTile * V;  // per storage tile
    static constexpr bool kOneChunk = kChunkVectors >= kMaxTileVectors;
    static constexpr int kAElems = TM * kTileK;
    static constexpr int kBElems = TN * kTileK;
    static constexpr int kStageElems = kAElems + kBElems;
    static constexpr int kCStride = TM + 4;  // floats; +4 makes fragment stores conflict free
    static constexpr int kPipelineBytes = 2 * kStageElems * 2;
    static constexpr int kCStageBytes = TN * kCStride * 4;
    static constexpr int kSmemBytes = kPipelineBytes > kCStageBytes ? kPipelineBytes : kCStageBytes;
    static constexpr int kXChunks = TN * (kTileK / 8);  // 16-byte chunks of one x tile
    static constexpr int kXIters = (kXChunks + kThreads - 1) / kThreads;
    // Unaligned x rows: hold the raw loads across the compute (latency hidden) when that costs
    // 9 registers (one chunk per thread, tile_n <= 16); wider tiles, whose accumulators leave
    // no room (256x32 would spill on sm_80), store them before the compute.
    static constexpr bool kXRegsAcrossCompute = kXIters <= 1;

    static_assert(BR * BC == kWarps, "4 warps per block");
    static_assert(kWarpM == 64, "each warp computes four m16 tiles");
    static_assert(kWarpN % 8 == 0 && (kWarpNTiles == 1 || kWarpNTiles % 2 == 0),
                  "warp columns are one n8 tile or pairs of them (ldmatrix.x4)");
    static_assert(TM == 128 || TM == 256, "a block covers one or two storage tiles");
    static_assert(kThreadsPerTile % kWarpVectors == 0, "a warp stages one storage tile");
    static_assert(kChunkVectors % kWarpVectors == 0, "chunks start at warp-group boundaries");
};

// Block tiles chosen by N (as in Flash-LLM, plus 256x8 for N <= 8, which halves the x traffic
// and tensor-core work of single-token decode). Index = config id used across the host API.
using Config256x8 = TileConfig<256, 8, 4, 1, 32>;
using Config256x16 = TileConfig<256, 16, 4, 1, 32>;
using Config256x32 = TileConfig<256, 32, 4, 1, 32>;
using Config128x64 = TileConfig<128, 64, 2, 2, 16>;
using Config128x128 = TileConfig<128, 128, 2, 2, 16>;

FS_HD constexpr int default_tile_n(int n) {
    return n <= 8 ? 8 : n <= 16 ? 16 : n <= 32 ? 32 : n <= 64 ? 64 : 128;
}
FS_HD constexpr int tile_m_for(int tile_n) { return tile_n <= 32 ? 256 : 128; }
FS_HD constexpr bool valid_tile_n(int tile_n) {
    return tile_n == 8 || tile_n == 16 || tile_n == 32 || tile_n == 64 || tile_n == 128;
}

// Split-K: split s handles k tiles [s * per, min((s + 1) * per, k_tiles)). The effective split
// drops trailing empty splits, so every split owns at least one k tile.
FS_HD constexpr int k_tiles_of(int k) { return ceil_div(k, kTileK); }
FS_HD constexpr int tiles_per_split(int k_tiles, int split) {
    return ceil_div(k_tiles, split < 1 ? 1 : (split > k_tiles ? k_tiles : split));
}
FS_HD constexpr int effective_split(int k_tiles, int split) {
    return ceil_div(k_tiles, tiles_per_split(k_tiles, split));
}

// --- shared-memory addressing (element offsets into a 64-wide swizzled tile) -----------------
FS_HD constexpr int swizzle(int row, int col) {
    return row * kTileK + ((((col >> 3) ^ (row & 7)) << 3) | (col & 7));
}

// Where a stored word goes in its storage tile's 128 x 64 part of the A tile (a 256-row block's
// second storage tile starts kStorageTileElems further). The encoder writes locations below
// 8192; the mask keeps a malformed or foreign word (location up to 65535) inside its own tile's
// buffer -- wrong data, never a write into other shared memory. The kernel forms the byte
// offset 2 * location as (word & kLocationBits) >> 15: one LOP3 folded into the address LEA.
static_assert((kStorageTileElems & (kStorageTileElems - 1)) == 0, "locations are masked");
constexpr uint32_t kLocationBits = static_cast<uint32_t>(kStorageTileElems - 1) << 16;
FS_HD constexpr uint32_t word_location(uint32_t word) { return (word & kLocationBits) >> 16; }
FS_HD constexpr uint32_t word_byte_offset(uint32_t word) { return (word & kLocationBits) >> 15; }
// Whether a word's location is inside its storage tile (the encoder's output always is).
FS_HD constexpr bool word_location_valid(uint32_t word) {
    return (word >> 16) < static_cast<uint32_t>(kStorageTileElems);
}
FS_HD constexpr uint16_t word_value(uint32_t word) { return static_cast<uint16_t>(word & 0xFFFFu); }

// --- host checks ------------------------------------------------------------------------------
// Why a problem with these sizes cannot run (empty: it can), from the sizes alone: what the torch
// glue checks before every launch (no device access, so the words' locations themselves are not
// read: the kernel masks them), and what the host emulator checks on its input. `words`,
// `offsets`: element counts of the weight's two tensors; n may be 0.
inline std::string problem_size_error(int64_t m, int64_t k, int64_t n, int64_t words, int64_t offsets,
                                      int64_t split_k, int64_t tile_n) {
    using std::to_string;
    if (m < 1 || k < 1) return "m and k must be >= 1, got m=" + to_string(m) + ", k=" + to_string(k);
    if (m > static_cast<int64_t>(kMaxGridY) * kStorageTileM)
        return "m=" + to_string(m) + " exceeds the kernel's grid (at most 65535 blocks of 128 rows)";
    if (k > kMaxExtent) return "k=" + to_string(k) + " exceeds " + to_string(kMaxExtent);
    if (n < 0 || n > kMaxExtent) return "x has " + to_string(n) + " rows; at most " + to_string(kMaxExtent);
    const int64_t tiles = ((m + kStorageTileM - 1) / kStorageTileM) * ((k + kTileK - 1) / kTileK);
    if (offsets != tiles + 2)
        return "tile_offsets must have " + to_string(tiles + 2) + " entries for a " + to_string(m) + "x" +
               to_string(k) + " weight, got " + to_string(offsets);
    if (words % 4 != 0) return "words must hold whole 4-word vectors, got " + to_string(words) + " words";
    if (words / 4 > 0x7FFFFFFF) return "words has " + to_string(words) + " entries; at most 2^31 4-word vectors";
    if (words / 4 > tiles * kMaxTileVectors)
        return "words has " + to_string(words) + " entries, more than " + to_string(tiles) +
               " dense 128x64 tiles hold: not this weight's words";
    if (split_k < 1) return "split_k must be >= 1, got " + to_string(split_k);
    if (tile_n != 0 && !(tile_n == 8 || tile_n == 16 || tile_n == 32 || tile_n == 64 || tile_n == 128))
        return "tile_n must be 0 (by N), 8, 16, 32, 64 or 128, got " + to_string(tile_n);
    return std::string();
}

// A tile's vector range [start, start + count) from its TileOffsets entries, clamped to the
// words (num_vectors) and to a dense tile, so malformed offsets never read out of bounds.
FS_HD void tile_range(int begin, int end, int num_vectors, int* start, int* count) {
    begin = begin < 0 ? 0 : (begin > num_vectors ? num_vectors : begin);
    end = end < begin ? begin : (end > num_vectors ? num_vectors : end);
    *start = begin;
    *count = end - begin > kMaxTileVectors ? kMaxTileVectors : end - begin;
}

// Which storage tile of the block a thread stages, and its index among that tile's threads.
template <class Cfg>
FS_HD constexpr int tile_of_thread(int tid) { return tid / Cfg::kThreadsPerTile; }
template <class Cfg>
FS_HD constexpr int thread_in_tile(int tid) { return tid % Cfg::kThreadsPerTile; }

// Vector of its storage tile a thread handles at slot i of the chunk starting at vector `base`.
template <class Cfg>
FS_HD constexpr int chunk_vector(int base, int i, int htid) {
    return base + i * Cfg::kThreadsPerTile + htid;
}

// 8 halves starting `shift` (0..7) halves into the 16 halves of two consecutive aligned 16-byte
// blocks w[0..3], w[4..7]; halves at or past `limit` (the row's end) are zeroed. Selects only,
// so the registers stay registers (no dynamic indexing).
FS_HD void shift_halves(const uint32_t (&w)[8], int shift, int limit, uint32_t (&out)[4]) {
    uint32_t a[6], b[5];
    const bool s4 = (shift & 4) != 0, s2 = (shift & 2) != 0, s1 = (shift & 1) != 0;
    for (int q = 0; q < 6; ++q) a[q] = s4 ? w[q + 2] : w[q];
    for (int q = 0; q < 5; ++q) b[q] = s2 ? a[q + 1] : a[q];
    for (int q = 0; q < 4; ++q) {
        uint32_t v = s1 ? ((b[q] >> 16) | (b[q + 1] << 16)) : b[q];
        if (2 * q >= limit) v = 0u;
        else if (2 * q + 1 >= limit) v &= 0xFFFFu;
        out[q] = v;
    }
}

// ldmatrix.x4 of the A tile (m16 x k16 at rows row0.., k step kk): the element whose address
// this lane supplies. Lanes 0-15 give rows 0-15 of k 0-7, lanes 16-31 rows 0-15 of k 8-15, so
// the four 8x8 matrices are the mma A fragment registers a0 (rows 0-7, k 0-7), a1 (rows 8-15,
// k 0-7), a2 (rows 0-7, k 8-15), a3 (rows 8-15, k 8-15).
FS_HD constexpr int a_ldsm_offset(int row0, int kk, int lane) {
    return swizzle(row0 + (lane & 15), kk * 16 + ((lane >> 4) << 3));
}

// ldmatrix.x4 of the x tile (stored [n][k], i.e. the mma's column-major B) for two n8 tiles at
// columns col0..col0+15: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15) = b0, b1 of the first n8 tile, then of the second.
FS_HD constexpr int b_ldsm_x4_offset(int col0, int kk, int lane) {
    return swizzle(col0 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + (((lane >> 3) & 1) << 3));
}

// ldmatrix.x2 for a single n8 tile: lanes 0-7 (k 0-7) and 8-15 (k 8-15); lanes 16-31 repeat
// lanes 0-15 (their addresses are not used, but stay in bounds).
FS_HD constexpr int b_ldsm_x2_offset(int col0, int kk, int lane) {
    return swizzle(col0 + (lane & 7), kk * 16 + (((lane >> 3) & 1) << 3));
}

// x tile copy: 16-byte chunk q of a TN x 64 tile is row q/8 (a token), k chunk q%8.
FS_HD constexpr int x_chunk_row(int q) { return q >> 3; }
FS_HD constexpr int x_chunk_col(int q) { return (q & 7) << 3; }
FS_HD constexpr int x_chunk_dst(int q) { return swizzle(x_chunk_row(q), x_chunk_col(q)); }

// mma.m16n8k16 accumulator register r (0..3) of `lane`: row (m) and column (n) in the 16x8 tile.
FS_HD constexpr int c_frag_row(int lane, int r) { return (lane >> 2) + ((r >> 1) << 3); }
FS_HD constexpr int c_frag_col(int lane, int r) { return ((lane & 3) << 1) + (r & 1); }

// Warp placement in the block tile.
template <class Cfg>
FS_HD constexpr int warp_row0(int warp) { return (warp / Cfg::kWarpCols) * Cfg::kWarpM; }
template <class Cfg>
FS_HD constexpr int warp_col0(int warp) { return (warp % Cfg::kWarpCols) * Cfg::kWarpN; }

}  // namespace tcsl
}  // namespace flashsparse
