// Host emulator of the Tiled-CSL SpMM kernel (tiled_csl_kernel.cuh), for machines without a GPU.
//
// Plain C++ (build: g++ -std=c++17 -O2 -x c++ tiled_csl_emulator.cu; nvcc compiles it too, as
// host code). It replays the kernel's block schedule -- zeroing, per-storage-tile word staging
// and scatter, the x tile copy (cp.async and the aligned-vector path for unaligned rows),
// ldmatrix + mma.m16n8k16, the shared memory epilogue, split-K with its in-kernel reduction by
// the last block to arrive (blocks run in a shuffled order) -- with the index functions of
// tiled_csl_layout.cuh, while ldmatrix and mma are modelled from the PTX ISA's fragment
// definitions (written independently of the layout helpers). On top of the arithmetic it
// checks what compute-sanitizer would: every global access in bounds (TileOffsets included),
// cp.async/ldmatrix alignment, shared-memory accesses in bounds, no two threads touching the
// same shared element between two barriers unless both only read, every output written once,
// the split-K counters back at zero. It also counts the shared-memory wavefronts of every
// warp-wide 16-bit scatter store and the words whose location had to be masked into the tile
// (PROBLEM.stats: "scatter_stores N wavefronts W bad_locations B").
//
// Usage: tiled_csl_emulator --configs
//        tiled_csl_emulator --plan N K SPLIT   (prints "tile_n tile_m effective_split")
//        tiled_csl_emulator PROBLEM... (each PROBLEM file gets PROBLEM.out: float32 y[n][m],
//        the kernel's fp32 value before the final rounding). Exit 0 on success, 2 on a check
//        failure (message on stderr), 3 when the glue's size checks (problem_size_error) reject
//        the problem. File format: see read_problem().
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tiled_csl_layout.cuh"

using namespace flashsparse::tcsl;

namespace {

[[noreturn]] void fail(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    std::fprintf(stderr, "emulator check failed: ");
    std::vfprintf(stderr, fmt, args);
    std::fprintf(stderr, "\n");
    va_end(args);
    std::exit(2);
}

struct U4 {
    uint32_t x = 0, y = 0, z = 0, w = 0;
};

struct Problem {
    int m = 0, k = 0, n = 0, tile_n = 0, split_k = 1, misaligned_x = 0, bf16 = 1, has_bias = 0;
    unsigned order_seed = 0;  // block execution order (split-K arrival order)
    std::vector<int32_t> offsets;
    std::vector<uint32_t> words;
    std::vector<uint16_t> x, bias;
};

float bf16_to_float(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

float f16_to_float(uint16_t h) {
    const int sign = (h >> 15) & 1, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float v;
    if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
    else if (exp == 31) v = man ? NAN : INFINITY;
    else v = std::ldexp(static_cast<float>(man | 0x400), exp - 25);
    return sign ? -v : v;
}

// --- global memory with bounds checks ----------------------------------------------------------
template <class T>
struct Global {
    const char* name;
    const std::vector<T>* data;
    T load(size_t i) const {
        if (i >= data->size()) fail("%s read at %zu, size %zu", name, i, data->size());
        return (*data)[i];
    }
};

// --- shared memory with a barrier-phase race check ---------------------------------------------
// TCSL_EMU_ALLOW_RACES=1: malformed inputs (e.g. overlapping tile ranges) make threads write
// the same element; that is wrong data, not a memory error, so bounds checks can go on.
const bool g_allow_races = std::getenv("TCSL_EMU_ALLOW_RACES") != nullptr;

struct Shared {
    std::vector<uint16_t> mem;  // 16-bit elements
    std::vector<int> w_phase, w_tid, r_phase, r_tid;
    int phase = 0;
    explicit Shared(int bytes)
        : mem(bytes / 2, 0xFFFF), w_phase(bytes / 2, -1), w_tid(bytes / 2, -1),
          r_phase(bytes / 2, -1), r_tid(bytes / 2, -1) {}
    void check(int e) const {
        if (e < 0 || e >= static_cast<int>(mem.size())) fail("shared access at element %d, size %zu", e, mem.size());
    }
    void note_write(int e, int tid) {
        check(e);
        if (g_allow_races) return;
        if (w_phase[e] == phase && w_tid[e] != tid)
            fail("shared write-write race at element %d (threads %d, %d, phase %d)", e, w_tid[e], tid, phase);
        if (r_phase[e] == phase && r_tid[e] != tid)
            fail("shared read-write race at element %d (threads %d, %d, phase %d)", e, r_tid[e], tid, phase);
        w_phase[e] = phase;
        w_tid[e] = tid;
    }
    void note_read(int e, int tid) {
        check(e);
        if (g_allow_races) return;
        if (w_phase[e] == phase && w_tid[e] != tid)
            fail("shared write-read race at element %d (threads %d, %d, phase %d)", e, w_tid[e], tid, phase);
        r_tid[e] = (r_phase[e] == phase && r_tid[e] != tid) ? -2 : tid;
        r_phase[e] = phase;
    }
    void write16(int e, uint16_t v, int tid) {
        note_write(e, tid);
        mem[e] = v;
    }
    uint16_t read16(int e, int tid) {
        note_read(e, tid);
        return mem[e];
    }
    void write_f32(int f, float v, int tid) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        write16(2 * f, static_cast<uint16_t>(u & 0xFFFF), tid);
        write16(2 * f + 1, static_cast<uint16_t>(u >> 16), tid);
    }
    float read_f32(int f, int tid) {
        const uint32_t u = read16(2 * f, tid) | (static_cast<uint32_t>(read16(2 * f + 1, tid)) << 16);
        float v;
        std::memcpy(&v, &u, 4);
        return v;
    }
    void barrier() { ++phase; }
};

struct PendingCopy {
    int dst;  // element offset
    uint16_t data[8];
    int tid;
};

// --- PTX models (from the PTX ISA fragment figures) --------------------------------------------
// ldmatrix .m8n8 .b16: lanes 8i..8i+7 give the row addresses of matrix i; lane l receives row
// l/4, elements 2*(l%4) and 2*(l%4)+1 of every matrix (lower index in the low half).
void ldmatrix(Shared& sm, const int addr[32], int num, uint32_t out[32][4], int warp) {
    for (int i = 0; i < num; ++i) {
        for (int r = 0; r < 8; ++r) {
            const int src_lane = i * 8 + r;
            const int base = addr[src_lane];
            if (base % 8 != 0) fail("ldmatrix row address not 16-byte aligned (element %d)", base);
            uint16_t row[8];
            for (int e = 0; e < 8; ++e) row[e] = sm.read16(base + e, warp * 32 + src_lane);
            for (int l = 0; l < 32; ++l)
                if (l / 4 == r)
                    out[l][i] = row[2 * (l % 4)] | (static_cast<uint32_t>(row[2 * (l % 4) + 1]) << 16);
        }
    }
}

// mma.m16n8k16 .row.col, f32 accumulators. A (16x16): a0,a1 row g col 2t+{0,1}; a2,a3 row g+8;
// a4,a5 row g col 2t+8+{0,1}; a6,a7 row g+8 col 2t+8+{0,1}. B (16x8): b0,b1 row 2t+{0,1} col g;
// b2,b3 row 2t+8+{0,1}. C: c0,c1 row g col 2t+{0,1}; c2,c3 row g+8. g = lane/4, t = lane%4.
void mma(float d[32][4], const uint32_t a[32][4], const uint32_t b[32][2], bool bf16) {
    auto val = [&](uint32_t reg, int hi) {
        const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xFFFF);
        return static_cast<double>(bf16 ? bf16_to_float(bits) : f16_to_float(bits));
    };
    double A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; ++h) {
            A[g][2 * t + h] = val(a[l][0], h);
            A[g + 8][2 * t + h] = val(a[l][1], h);
            A[g][2 * t + 8 + h] = val(a[l][2], h);
            A[g + 8][2 * t + 8 + h] = val(a[l][3], h);
            B[2 * t + h][g] = val(b[l][0], h);
            B[2 * t + 8 + h][g] = val(b[l][1], h);
        }
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; ++r) {
            const int row = g + (r >= 2 ? 8 : 0), col = 2 * t + (r & 1);
            double s = 0;
            for (int kk = 0; kk < 16; ++kk) s += A[row][kk] * B[kk][col];
            d[l][r] = static_cast<float>(d[l][r] + s);
        }
    }
}

// --- the kernel, block by block ----------------------------------------------------------------

struct Slice {  // TileSlice: this thread's first vector (index into the words, in vectors), rem
    long long vec = 0;
    int rem = 0;
};

struct ScatterStats {
    long long stores = 0, wavefronts = 0;
    long long bad_locations = 0;  // scattered words whose location was past the tile (masked)
};

template <class Cfg>
struct BlockEmu {
    static constexpr int V = Cfg::kVectorsPerThread;
    const Problem& pr;
    Global<int32_t> offsets;
    Global<uint32_t> words;
    Global<uint16_t> x, bias;
    std::vector<float>* y;  // pre-rounding floats
    std::vector<float>* ws;  // split-K partial sums
    std::vector<int>* counters;
    std::vector<int>* written;
    ScatterStats* stats;
    int split, k_tiles, m_tiles, tiles_per, x_aligned, x_base;

    Shared sm{Cfg::kSmemBytes};
    std::vector<PendingCopy> pending;
    U4 regs[kThreads][V];
    uint32_t xw[kThreads][Cfg::kXIters][8];
    int xshift[kThreads][Cfg::kXIters];

    BlockEmu(const Problem& p, std::vector<float>* y_, std::vector<float>* ws_, std::vector<int>* cnt,
             std::vector<int>* wr, ScatterStats* st, int split_, int per)
        : pr(p),
          offsets{"tile_offsets", &p.offsets},
          words{"words", &p.words},
          x{"x", &p.x},
          bias{"bias", &p.bias},
          y(y_), ws(ws_), counters(cnt), written(wr), stats(st), split(split_), k_tiles(k_tiles_of(p.k)),
          m_tiles(ceil_div(p.m, kStorageTileM)), tiles_per(per),
          // An unaligned x starts one element (2 bytes) past a 16-byte boundary.
          x_aligned(p.k % 8 == 0 && !p.misaligned_x), x_base(p.misaligned_x ? 1 : 0) {}

    Slice tile_slice(size_t offs, bool valid, int i, int htid) {
        int start = 0, count = 0;
        if (valid)
            tile_range(offsets.load(offs + i), offsets.load(offs + i + 1),
                       static_cast<int>(pr.words.size() / 4), &start, &count);
        Slice s;
        s.vec = static_cast<long long>(start) + htid;
        s.rem = count - htid;
        return s;
    }

    U4 load_vec(long long vec) {
        if (vec < 0) fail("words read at vector %lld", vec);
        U4 v;
        v.x = words.load(4 * vec);
        v.y = words.load(4 * vec + 1);
        v.z = words.load(4 * vec + 2);
        v.w = words.load(4 * vec + 3);
        return v;
    }

    void load_chunk(int tid, const Slice& s, int base) {
        for (int i = 0; i < V; ++i) {
            if (base + i * Cfg::kThreadsPerTile >= s.rem) break;
            regs[tid][i] = load_vec(s.vec + base + i * Cfg::kThreadsPerTile);
        }
    }

    // Slot i of a chunk for every thread, word by word, as the warps issue them (for the
    // wavefront count); rem[tid] is the thread's remaining vector count from the chunk start.
    void scatter_chunk(int a_base, const int rem[kThreads]) {
        for (int i = 0; i < V; ++i) {
            for (int e = 0; e < 4; ++e) {
                for (int warp = 0; warp < kWarps; ++warp) {
                    int words_in_bank[32] = {0};
                    int seen[32][32];
                    bool any = false;
                    for (int lane = 0; lane < 32; ++lane) {
                        const int tid = warp * 32 + lane;
                        if (i * Cfg::kThreadsPerTile >= rem[tid]) continue;
                        const U4& r = regs[tid][i];
                        const uint32_t w = e == 0 ? r.x : e == 1 ? r.y : e == 2 ? r.z : r.w;
                        // The kernel's address: the masked location (word_byte_offset / 2).
                        const uint32_t loc = word_byte_offset(w) / 2;
                        if (loc != word_location(w) || loc >= static_cast<uint32_t>(kStorageTileElems))
                            fail("word location %u escapes the storage tile", loc);
                        stats->bad_locations += !word_location_valid(w);
                        const int el = a_base + tile_of_thread<Cfg>(tid) * kStorageTileElems + static_cast<int>(loc);
                        sm.write16(el, word_value(w), tid);
                        const int word32 = el >> 1, bank = word32 & 31;
                        bool dup = false;
                        for (int q = 0; q < words_in_bank[bank]; ++q) dup |= seen[bank][q] == word32;
                        if (!dup) seen[bank][words_in_bank[bank]++] = word32;
                        any = true;
                    }
                    if (!any) continue;
                    int wf = 0;
                    for (int b = 0; b < 32; ++b) wf = words_in_bank[b] > wf ? words_in_bank[b] : wf;
                    stats->stores += 1;
                    stats->wavefronts += wf;
                }
            }
        }
    }

    void scatter_tile(int a_base, const Slice (&sl)[kThreads]) {
        static_assert(Cfg::kOneChunk, "a dense storage tile fits in one chunk of registers");
        int rem[kThreads];
        for (int tid = 0; tid < kThreads; ++tid) rem[tid] = sl[tid].rem;
        scatter_chunk(a_base, rem);
    }

    void zero_a(int a_base, int tid) {
        constexpr int kVecs = Cfg::kAElems / 8;
        for (int i = 0; i < kVecs / kThreads; ++i)
            for (int e = 0; e < 8; ++e) sm.write16(a_base + (i * kThreads + tid) * 8 + e, 0, tid);
    }

    // An aligned 16-byte block of x (8 elements from element 8 * blk - x_base): legal only if it
    // holds an element of x, i.e. it lies inside x's allocation; elements outside x read as a
    // NaN pattern, which must never reach the output.
    void load_block(long long blk, uint32_t out[4]) {
        const long long first = 8 * blk - x_base, total = static_cast<long long>(pr.n) * pr.k;
        if (first + 7 < 0 || first >= total) fail("x vector load outside x (block %lld)", blk);
        uint16_t h[8];
        for (int e = 0; e < 8; ++e) {
            const long long el = first + e;
            h[e] = (el >= 0 && el < total) ? x.load(static_cast<size_t>(el)) : 0x7E00;
        }
        for (int q = 0; q < 4; ++q) out[q] = h[2 * q] | (static_cast<uint32_t>(h[2 * q + 1]) << 16);
    }

    void load_x_tile(int b_base, int n0, int kcol0, int tid) {
        for (int it = 0; it < Cfg::kXIters; ++it) {
            const int q = it * kThreads + tid;
            if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) break;
            const int n = n0 + x_chunk_row(q);
            const int kcol = kcol0 + x_chunk_col(q);
            const int dst = b_base + x_chunk_dst(q);
            if (dst % 8 != 0) fail("x tile destination not 16-byte aligned");
            const bool valid = n < pr.n && kcol < pr.k;
            if (x_aligned) {
                PendingCopy c;
                c.dst = dst;
                c.tid = tid;
                for (int e = 0; e < 8; ++e) c.data[e] = 0;
                if (valid) {
                    const size_t src = static_cast<size_t>(n) * pr.k + kcol;
                    if (src % 8 != 0) fail("cp.async source not 16-byte aligned (element %zu)", src);
                    for (int e = 0; e < 8; ++e) c.data[e] = x.load(src + e);
                }
                for (int e = 0; e < 8; ++e) sm.note_write(dst + e, tid);  // in flight from now
                pending.push_back(c);
            } else {
                const long long addr = x_base + static_cast<long long>(n) * pr.k + kcol;  // elements
                const long long blk = addr >> 3;
                const int shift = static_cast<int>(addr & 7);
                uint32_t* w = xw[tid][it];
                for (int e = 0; e < 8; ++e) w[e] = 0;
                if (valid) load_block(blk, w);
                if (valid && shift > 0 && kcol + 8 - shift < pr.k) load_block(blk + 1, w + 4);
                xshift[tid][it] = shift;
                if (!Cfg::kXRegsAcrossCompute) store_x_chunk(b_base, kcol0, tid, it);
            }
        }
    }

    void store_x_chunk(int b_base, int kcol0, int tid, int it) {
        const int q = it * kThreads + tid;
        if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) return;
        uint32_t out[4];
        shift_halves(xw[tid][it], xshift[tid][it], pr.k - (kcol0 + x_chunk_col(q)), out);
        const int dst = b_base + x_chunk_dst(q);
        for (int e = 0; e < 8; ++e) sm.write16(dst + e, static_cast<uint16_t>(out[e / 2] >> (16 * (e & 1))), tid);
    }

    void store_x_tile(int b_base, int kcol0, int tid) {
        if (Cfg::kXRegsAcrossCompute && !x_aligned)
            for (int it = 0; it < Cfg::kXIters; ++it) store_x_chunk(b_base, kcol0, tid, it);
    }

    void cp_async_wait_all() {  // every thread waits for its own copies; they land now
        for (const PendingCopy& c : pending)
            for (int e = 0; e < 8; ++e) sm.write16(c.dst + e, c.data[e], c.tid);
        pending.clear();
    }

    void compute(float acc[kWarps][Cfg::kWarpMTiles][Cfg::kWarpNTiles][32][4], int a_base, int b_base,
                 const bool active[kWarps]) {
        constexpr int MT = Cfg::kWarpMTiles, NT = Cfg::kWarpNTiles;
        for (int warp = 0; warp < kWarps; ++warp) {
            if (!active[warp]) continue;
            const int row0 = warp_row0<Cfg>(warp), col0 = warp_col0<Cfg>(warp);
            for (int kk = 0; kk < kTileK / 16; ++kk) {
                static uint32_t a[MT][32][4];
                int addr[32];
                for (int mi = 0; mi < MT; ++mi) {
                    for (int l = 0; l < 32; ++l) addr[l] = a_base + a_ldsm_offset(row0 + mi * 16, kk, l);
                    ldmatrix(sm, addr, 4, a[mi], warp);
                }
                static uint32_t b[NT][32][2];
                if (NT == 1) {
                    uint32_t r[32][4];
                    for (int l = 0; l < 32; ++l) addr[l] = b_base + b_ldsm_x2_offset(col0, kk, l);
                    ldmatrix(sm, addr, 2, r, warp);
                    for (int l = 0; l < 32; ++l) {
                        b[0][l][0] = r[l][0];
                        b[0][l][1] = r[l][1];
                    }
                } else {
                    for (int pj = 0; pj < NT / 2; ++pj) {
                        uint32_t r[32][4];
                        for (int l = 0; l < 32; ++l) addr[l] = b_base + b_ldsm_x4_offset(col0 + pj * 16, kk, l);
                        ldmatrix(sm, addr, 4, r, warp);
                        for (int l = 0; l < 32; ++l) {
                            b[2 * pj][l][0] = r[l][0];
                            b[2 * pj][l][1] = r[l][1];
                            b[2 * pj + 1][l][0] = r[l][2];
                            b[2 * pj + 1][l][1] = r[l][3];
                        }
                    }
                }
                for (int mi = 0; mi < MT; ++mi)
                    for (int nj = 0; nj < NT; ++nj) mma(acc[warp][mi][nj], a[mi], b[nj], pr.bf16 != 0);
            }
        }
    }

    void run(int bx, int by, int bz, int grid_x) {
        constexpr int TM = Cfg::kTileM, TN = Cfg::kTileN;
        const int n0 = bx * TN, m0 = by * TM, kt0 = bz * tiles_per;
        const int rest = k_tiles - kt0;
        const int num_iter = rest < tiles_per ? (rest > 0 ? rest : 0) : tiles_per;

        size_t offs[kThreads];
        bool tile_valid[kThreads];
        for (int tid = 0; tid < kThreads; ++tid) {
            const int mt = by * Cfg::kStorageTiles + tile_of_thread<Cfg>(tid);
            tile_valid[tid] = mt < m_tiles;
            offs[tid] = static_cast<size_t>(tile_valid[tid] ? mt : 0) * k_tiles + kt0;
        }
        auto slices = [&](Slice (&sl)[kThreads], int i) {
            for (int tid = 0; tid < kThreads; ++tid)
                sl[tid] = tile_slice(offs[tid], tile_valid[tid], i, thread_in_tile<Cfg>(tid));
        };

        bool active[kWarps];
        for (int w = 0; w < kWarps; ++w) active[w] = m0 + warp_row0<Cfg>(w) < pr.m && n0 + warp_col0<Cfg>(w) < pr.n;
        static float acc[kWarps][Cfg::kWarpMTiles][Cfg::kWarpNTiles][32][4];
        std::memset(acc, 0, sizeof(acc));

        if (num_iter > 0) {
            static Slice ts[kThreads], ts_next[kThreads];
            slices(ts, 0);
            for (int tid = 0; tid < kThreads; ++tid) zero_a(0, tid);
            for (int tid = 0; tid < kThreads; ++tid) load_x_tile(Cfg::kAElems, n0, kt0 * kTileK, tid);
            for (int tid = 0; tid < kThreads; ++tid) load_chunk(tid, ts[tid], 0);
            for (int tid = 0; tid < kThreads; ++tid) ts_next[tid] = ts[tid];
            if (num_iter > 1) slices(ts_next, 1);
            sm.barrier();
            scatter_tile(0, ts);
            for (int tid = 0; tid < kThreads; ++tid) store_x_tile(Cfg::kAElems, kt0 * kTileK, tid);
            cp_async_wait_all();
            sm.barrier();
            for (int i = 0; i < num_iter; ++i) {
                const int cur = (i & 1) * Cfg::kStageElems;
                const int nxt = ((i + 1) & 1) * Cfg::kStageElems;
                const bool has_next = i + 1 < num_iter;
                if (has_next) {
                    for (int tid = 0; tid < kThreads; ++tid) ts[tid] = ts_next[tid];
                    for (int tid = 0; tid < kThreads; ++tid) zero_a(nxt, tid);
                    for (int tid = 0; tid < kThreads; ++tid) load_x_tile(nxt + Cfg::kAElems, n0, (kt0 + i + 1) * kTileK, tid);
                    for (int tid = 0; tid < kThreads; ++tid) load_chunk(tid, ts[tid], 0);
                    if (i + 2 < num_iter) slices(ts_next, i + 2);
                }
                compute(acc, cur, cur + Cfg::kAElems, active);
                if (has_next) {
                    sm.barrier();
                    scatter_tile(nxt, ts);
                    for (int tid = 0; tid < kThreads; ++tid) store_x_tile(nxt + Cfg::kAElems, (kt0 + i + 1) * kTileK, tid);
                }
                cp_async_wait_all();
                sm.barrier();
            }
        }
        if (!pending.empty()) fail("cp.async still in flight at the epilogue");

        for (int warp = 0; warp < kWarps; ++warp)
            for (int mi = 0; mi < Cfg::kWarpMTiles; ++mi)
                for (int nj = 0; nj < Cfg::kWarpNTiles; ++nj)
                    for (int l = 0; l < 32; ++l)
                        for (int r = 0; r < 4; ++r) {
                            const int m_l = warp_row0<Cfg>(warp) + mi * 16 + c_frag_row(l, r);
                            const int n_l = warp_col0<Cfg>(warp) + nj * 8 + c_frag_col(l, r);
                            if (m_l >= TM || n_l >= TN) fail("accumulator fragment outside the block tile");
                            sm.write_f32(n_l * Cfg::kCStride + m_l, acc[warp][mi][nj][l][r], warp * 32 + l);
                        }
        sm.barrier();
        const int rows = pr.m - m0 < TM ? pr.m - m0 : TM;
        const int cols = pr.n - n0 < TN ? pr.n - n0 : TN;
        const size_t mn = static_cast<size_t>(pr.n) * pr.m;
        auto bias_of = [&](int m_l) {
            const uint16_t bb = bias.load(m0 + m_l);
            return pr.bf16 ? bf16_to_float(bb) : f16_to_float(bb);
        };
        auto store = [&](std::vector<float>& dst, size_t o, float v, size_t written_base) {
            if (o >= dst.size()) fail("output write at %zu, size %zu", o, dst.size());
            dst[o] = v;
            (*written)[written_base + o] += 1;
        };
        if (split > 1) {
            for (int tid = 0; tid < kThreads; ++tid)
                for (int idx = tid; idx < cols * TM; idx += kThreads) {
                    const int n_l = idx / TM, m_l = idx % TM;
                    if (m_l >= rows) continue;
                    const size_t o = bz * mn + static_cast<size_t>(n0 + n_l) * pr.m + m0 + m_l;
                    store(*ws, o, sm.read_f32(n_l * Cfg::kCStride + m_l, tid), mn);
                }
            // __threadfence; barrier; thread 0's atomicAdd on the tile's counter.
            const size_t c = static_cast<size_t>(by) * grid_x + bx;
            if (c >= counters->size()) fail("split-K counter %zu out of range", c);
            const int prev = (*counters)[c]++;
            if (prev != split - 1) return;  // not the last to arrive
            for (int tid = 0; tid < kThreads; ++tid)
                for (int idx = tid; idx < cols * TM; idx += kThreads) {
                    const int n_l = idx / TM, m_l = idx % TM;
                    if (m_l >= rows) continue;
                    const size_t o = static_cast<size_t>(n0 + n_l) * pr.m + m0 + m_l;
                    float v = 0.f;
                    for (int z = 0; z < split; ++z) {
                        const float part = (*ws)[z * mn + o];
                        if (std::isnan(part) && (*written)[mn + z * mn + o] != 1)
                            fail("split %d's partial sum read before it was written", z);
                        v += part;
                    }
                    if (pr.has_bias) v += bias_of(m_l);
                    store(*y, o, v, 0);
                }
            (*counters)[c] = 0;
        } else {
            for (int tid = 0; tid < kThreads; ++tid) {
                for (int idx = tid; idx < cols * TM; idx += kThreads) {
                    const int n_l = idx / TM, m_l = idx % TM;
                    if (m_l >= rows) continue;
                    float v = sm.read_f32(n_l * Cfg::kCStride + m_l, tid);
                    if (pr.has_bias) v += bias_of(m_l);
                    store(*y, static_cast<size_t>(n0 + n_l) * pr.m + m0 + m_l, v, 0);
                }
            }
        }
    }
};

template <class Cfg>
std::vector<float> run_problem(const Problem& pr, ScatterStats* stats) {
    const int k_tiles = k_tiles_of(pr.k);
    int split = pr.split_k < 1 ? 1 : pr.split_k;
    if (split > kMaxSplitK) split = kMaxSplitK;
    split = effective_split(k_tiles, split);
    const int per = tiles_per_split(k_tiles, split);
    if (split < 1 || split > k_tiles || (split - 1) * per >= k_tiles) fail("bad effective split %d", split);
    const size_t mn = static_cast<size_t>(pr.n) * pr.m;
    const int gx = ceil_div(pr.n, Cfg::kTileN), gy = ceil_div(pr.m, Cfg::kTileM);
    std::vector<float> y(mn, NAN), ws(split > 1 ? split * mn : 0, NAN);
    std::vector<int> counters(static_cast<size_t>(gx) * gy, 0);  // zero before the launch
    // written[0 .. mn): y; written[mn ..): workspace
    std::vector<int> written(mn + ws.size(), 0);
    // Blocks run in a shuffled order: the last split to arrive differs from tile to tile.
    std::vector<long long> order;
    for (int bz = 0; bz < split; ++bz)
        for (int by = 0; by < gy; ++by)
            for (int bx = 0; bx < gx; ++bx) order.push_back((static_cast<long long>(bz) * gy + by) * gx + bx);
    unsigned state = 0x9E3779B9u ^ static_cast<unsigned>(pr.m * 131 + pr.k * 7 + pr.n);
    for (size_t i = order.size(); i > 1; --i) {
        state = state * 1664525u + 1013904223u;
        std::swap(order[i - 1], order[(state >> 8) % i]);
    }
    for (long long b : order) {
        const int bx = static_cast<int>(b % gx), by = static_cast<int>((b / gx) % gy), bz = static_cast<int>(b / (static_cast<long long>(gx) * gy));
        auto* block = new BlockEmu<Cfg>(pr, &y, &ws, &counters, &written, stats, split, per);
        block->run(bx, by, bz, gx);
        delete block;
    }
    for (size_t i = 0; i < written.size(); ++i)
        if (written[i] != 1) fail("%s element %zu written %d times", i < mn ? "output" : "workspace", i < mn ? i : i - mn, written[i]);
    for (size_t c = 0; c < counters.size(); ++c)
        if (counters[c] != 0) fail("split-K counter %zu left at %d", c, counters[c]);
    return y;
}

// File: int32 header [magic 0x4C534354, m, k, n, tile_n, split_k, misaligned_x, bf16, has_bias,
// num_offsets, num_words], then int32 offsets, uint32 words, uint16 x[n*k], uint16 bias[m].
Problem read_problem(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("cannot open %s", path.c_str());
    int32_t h[11];
    if (std::fread(h, 4, 11, f) != 11 || h[0] != 0x4C534354) fail("%s: bad header", path.c_str());
    Problem p;
    p.m = h[1], p.k = h[2], p.n = h[3], p.tile_n = h[4], p.split_k = h[5];
    p.misaligned_x = h[6], p.bf16 = h[7], p.has_bias = h[8];
    // The torch glue's size checks, before any array is read (a test feeds malformed sizes).
    const std::string error = problem_size_error(p.m, p.k, p.n, h[10], h[9], p.split_k, p.tile_n);
    if (!error.empty()) {
        std::fprintf(stderr, "invalid problem: %s\n", error.c_str());
        std::exit(3);
    }
    if (p.n < 1) fail("%s: n must be >= 1", path.c_str());
    p.offsets.resize(h[9]);
    p.words.resize(h[10]);
    p.x.resize(static_cast<size_t>(p.n) * p.k);
    p.bias.resize(p.has_bias ? p.m : 0);
    bool ok = std::fread(p.offsets.data(), 4, p.offsets.size(), f) == p.offsets.size() &&
              std::fread(p.words.data(), 4, p.words.size(), f) == p.words.size() &&
              std::fread(p.x.data(), 2, p.x.size(), f) == p.x.size() &&
              std::fread(p.bias.data(), 2, p.bias.size(), f) == p.bias.size();
    std::fclose(f);
    if (!ok) fail("%s: truncated", path.c_str());
    return p;
}

template <class Cfg>
void print_config(const char* name) {
    std::printf("%-14s block %3dx%-3d warps %dx%d  warp tile %dx%-3d  vectors/thread %2d  "
                "chunk %5d entries  dynamic smem %6d B\n",
                name, Cfg::kTileM, Cfg::kTileN, Cfg::kWarpRows, Cfg::kWarpCols, Cfg::kWarpM, Cfg::kWarpN,
                Cfg::kVectorsPerThread, Cfg::kChunkVectors * 4, Cfg::kSmemBytes);
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s --configs | PROBLEM...\n", argv[0]);
        return 1;
    }
    if (std::string(argv[1]) == "--configs") {
        print_config<Config256x8>("Config256x8");
        print_config<Config256x16>("Config256x16");
        print_config<Config256x32>("Config256x32");
        print_config<Config128x64>("Config128x64");
        print_config<Config128x128>("Config128x128");
        return 0;
    }
    if (std::string(argv[1]) == "--plan") {
        if (argc != 5) fail("--plan takes N K SPLIT");
        const int n = std::atoi(argv[2]), k = std::atoi(argv[3]), split = std::atoi(argv[4]);
        if (n < 1 || k < 1) fail("--plan: N and K must be >= 1");
        const int tile_n = default_tile_n(n);
        std::printf("%d %d %d\n", tile_n, tile_m_for(tile_n),
                    effective_split(k_tiles_of(k), split > kMaxSplitK ? kMaxSplitK : split));
        return 0;
    }
    for (int i = 1; i < argc; ++i) {
        const Problem p = read_problem(argv[i]);
        const int tile_n = p.tile_n == 0 ? default_tile_n(p.n) : p.tile_n;
        std::vector<float> y;
        ScatterStats stats;
        switch (tile_n) {
            case 8: y = run_problem<Config256x8>(p, &stats); break;
            case 16: y = run_problem<Config256x16>(p, &stats); break;
            case 32: y = run_problem<Config256x32>(p, &stats); break;
            case 64: y = run_problem<Config128x64>(p, &stats); break;
            case 128: y = run_problem<Config128x128>(p, &stats); break;
            default: fail("%s: tile_n %d is not a kernel configuration", argv[i], tile_n);
        }
        const std::string out = std::string(argv[i]) + ".out";
        FILE* f = std::fopen(out.c_str(), "wb");
        if (!f || std::fwrite(y.data(), 4, y.size(), f) != y.size()) fail("cannot write %s", out.c_str());
        std::fclose(f);
        const std::string st = std::string(argv[i]) + ".stats";
        f = std::fopen(st.c_str(), "w");
        if (!f) fail("cannot write %s", st.c_str());
        std::fprintf(f, "scatter_stores %lld wavefronts %lld bad_locations %lld\n", stats.stores, stats.wavefronts,
                     stats.bad_locations);
        std::fclose(f);
    }
    return 0;
}
