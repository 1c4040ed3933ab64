// Host emulator of the Tiled-CSL SpMM kernel (tiled_csl_kernel.cuh), for machines without a GPU.
//
// Plain C++ (build: g++ -std=c++17 -O2 -x c++ tiled_csl_emulator.cu; nvcc compiles it too, as
// host code). It replays the kernel's block schedule -- zeroing, chunked word staging and
// scatter, the x tile copy (cp.async and scalar paths), ldmatrix + mma.m16n8k16, the shared
// memory epilogue, split-K and its reduction -- with the index functions of
// tiled_csl_layout.cuh, while ldmatrix and mma are modelled from the PTX ISA's fragment
// definitions (written independently of the layout helpers). On top of the arithmetic it
// checks what compute-sanitizer would: every global access in bounds (TileOffsets included),
// cp.async/ldmatrix alignment, shared-memory accesses in bounds, no two threads touching the
// same shared element between two barriers unless both only read, every output written once.
//
// Usage: tiled_csl_emulator --configs
//        tiled_csl_emulator --plan N K SPLIT   (prints "tile_n tile_m effective_split")
//        tiled_csl_emulator PROBLEM... (each PROBLEM file gets PROBLEM.out: float32 y[n][m],
//        the kernel's fp32 value before the final rounding). Exit 0 on success, 2 on a check
//        failure (message on stderr). File format: see read_problem().
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
        if (w_phase[e] == phase && w_tid[e] != tid)
            fail("shared write-write race at element %d (threads %d, %d, phase %d)", e, w_tid[e], tid, phase);
        if (r_phase[e] == phase && r_tid[e] != tid)
            fail("shared read-write race at element %d (threads %d, %d, phase %d)", e, r_tid[e], tid, phase);
        w_phase[e] = phase;
        w_tid[e] = tid;
    }
    void note_read(int e, int tid) {
        check(e);
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
struct Tw {
    int start1 = 0, count1 = 0, start2 = 0, count2 = 0;
};

int clamp_count(int c) { return c < 0 ? 0 : (c > kMaxTileVectors ? kMaxTileVectors : c); }

template <class Cfg>
struct BlockEmu {
    static constexpr int V = Cfg::kVectorsPerThread;
    const Problem& pr;
    Global<int32_t> offsets;
    Global<uint32_t> words;
    Global<uint16_t> x, bias;
    std::vector<float>* out;  // y (pre-rounding floats) or workspace
    std::vector<int>* written;
    bool to_workspace;
    int k_tiles, m_tiles, tiles_per, x_aligned;

    Shared sm{Cfg::kSmemBytes};
    std::vector<PendingCopy> pending;
    U4 regs[kThreads][V];

    BlockEmu(const Problem& p, std::vector<float>* o, std::vector<int>* wr, bool ws, int per)
        : pr(p),
          offsets{"tile_offsets", &p.offsets},
          words{"words", &p.words},
          x{"x", &p.x},
          bias{"bias", &p.bias},
          out(o), written(wr), to_workspace(ws), k_tiles(k_tiles_of(p.k)), m_tiles(ceil_div(p.m, kStorageTileM)),
          tiles_per(per), x_aligned(p.k % 8 == 0 && !p.misaligned_x) {}

    Tw tile_words(size_t base, bool has2, int i) {
        Tw tw;
        tw.start1 = offsets.load(base + i);
        tw.count1 = clamp_count(offsets.load(base + i + 1) - tw.start1);
        if (Cfg::kStorageTiles == 2 && has2) {
            tw.start2 = offsets.load(base + k_tiles + i);
            tw.count2 = clamp_count(offsets.load(base + k_tiles + i + 1) - tw.start2);
        }
        return tw;
    }

    U4 load_vec(size_t vec) {
        U4 v;
        v.x = words.load(4 * vec);
        v.y = words.load(4 * vec + 1);
        v.z = words.load(4 * vec + 2);
        v.w = words.load(4 * vec + 3);
        return v;
    }

    void load_chunk(int tid, const Tw& tw, int base) {
        for (int i = 0; i < V; ++i) {
            const int j = chunk_vector(base, i, tid);
            U4 v;
            if (j < tw.count1) {
                v = load_vec(static_cast<size_t>(tw.start1) + j);
            } else if (Cfg::kStorageTiles == 2 && j < tw.count1 + tw.count2) {
                v = load_vec(static_cast<size_t>(tw.start2) + (j - tw.count1));
                v.x |= kSecondTileFlag;
                v.y |= kSecondTileFlag;
                v.z |= kSecondTileFlag;
                v.w |= kSecondTileFlag;
            }
            regs[tid][i] = v;
        }
    }

    void scatter_chunk(int a_base, int tid, int total, int base) {
        for (int i = 0; i < V; ++i) {
            if (chunk_vector(base, i, tid) < total) {
                const uint32_t ws[4] = {regs[tid][i].x, regs[tid][i].y, regs[tid][i].z, regs[tid][i].w};
                for (uint32_t w : ws)
                    sm.write16(a_base + static_cast<int>(word_location(w, Cfg::kLocationMask)), word_value(w), tid);
            }
        }
    }

    void scatter_tile(int a_base, int tid, const Tw& tw) {
        const int total = tw.count1 + tw.count2;
        scatter_chunk(a_base, tid, total, 0);
        for (int base = Cfg::kChunkVectors; base < total; base += Cfg::kChunkVectors) {
            load_chunk(tid, tw, base);
            scatter_chunk(a_base, tid, total, base);
        }
    }

    void zero_a(int a_base, int tid) {
        constexpr int kVecs = Cfg::kAElems / 8;
        for (int i = 0; i < kVecs / kThreads; ++i)
            for (int e = 0; e < 8; ++e) sm.write16(a_base + (i * kThreads + tid) * 8 + e, 0, tid);
    }

    void load_x_tile(int b_base, int n0, int kcol0, int tid) {
        constexpr int kIters = ceil_div(Cfg::kXChunks, kThreads);
        for (int it = 0; it < kIters; ++it) {
            const int q = it * kThreads + tid;
            if (Cfg::kXChunks % kThreads != 0 && q >= Cfg::kXChunks) break;
            const int n = n0 + x_chunk_row(q);
            const int kcol = kcol0 + x_chunk_col(q);
            const int dst = b_base + x_chunk_dst(q);
            if (dst % 8 != 0) fail("x tile destination not 16-byte aligned");
            PendingCopy c;
            c.dst = dst;
            c.tid = tid;
            if (x_aligned) {
                const bool valid = n < pr.n && kcol < pr.k;
                for (int e = 0; e < 8; ++e) c.data[e] = 0;
                if (valid) {
                    const size_t src = static_cast<size_t>(n) * pr.k + kcol;
                    if (src % 8 != 0) fail("cp.async source not 16-byte aligned (element %zu)", src);
                    for (int e = 0; e < 8; ++e) c.data[e] = x.load(src + e);
                }
                for (int e = 0; e < 8; ++e) sm.note_write(dst + e, tid);  // in flight from now
                pending.push_back(c);
            } else {
                const size_t row = static_cast<size_t>(n < pr.n ? n : 0) * pr.k;
                for (int e = 0; e < 8; ++e) {
                    const int col = kcol + e;
                    const uint16_t v = (n < pr.n && col < pr.k) ? x.load(row + col) : 0;
                    sm.write16(dst + e, v, tid);
                }
            }
        }
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

    void run(int bx, int by, int bz) {
        constexpr int TM = Cfg::kTileM, TN = Cfg::kTileN;
        const int n0 = bx * TN, m0 = by * TM, kt0 = bz * tiles_per;
        const int rest = k_tiles - kt0;
        const int num_iter = rest < tiles_per ? (rest > 0 ? rest : 0) : tiles_per;
        const int mt1 = by * Cfg::kStorageTiles;
        const bool has2 = Cfg::kStorageTiles == 2 && mt1 + 1 < m_tiles;
        const size_t offs1 = static_cast<size_t>(mt1) * k_tiles + kt0;

        bool active[kWarps];
        for (int w = 0; w < kWarps; ++w) active[w] = m0 + warp_row0<Cfg>(w) < pr.m && n0 + warp_col0<Cfg>(w) < pr.n;
        static float acc[kWarps][Cfg::kWarpMTiles][Cfg::kWarpNTiles][32][4];
        std::memset(acc, 0, sizeof(acc));

        if (num_iter > 0) {
            Tw tw = tile_words(offs1, has2, 0);
            for (int tid = 0; tid < kThreads; ++tid) zero_a(0, tid);
            for (int tid = 0; tid < kThreads; ++tid) load_x_tile(Cfg::kAElems, n0, kt0 * kTileK, tid);
            for (int tid = 0; tid < kThreads; ++tid) load_chunk(tid, tw, 0);
            Tw tw_next = tw;
            if (num_iter > 1) tw_next = tile_words(offs1, has2, 1);
            sm.barrier();
            for (int tid = 0; tid < kThreads; ++tid) scatter_tile(0, tid, tw);
            cp_async_wait_all();
            sm.barrier();
            for (int i = 0; i < num_iter; ++i) {
                const int cur = (i & 1) * Cfg::kStageElems;
                const int nxt = ((i + 1) & 1) * Cfg::kStageElems;
                const bool has_next = i + 1 < num_iter;
                if (has_next) {
                    tw = tw_next;
                    for (int tid = 0; tid < kThreads; ++tid) zero_a(nxt, tid);
                    for (int tid = 0; tid < kThreads; ++tid) load_x_tile(nxt + Cfg::kAElems, n0, (kt0 + i + 1) * kTileK, tid);
                    for (int tid = 0; tid < kThreads; ++tid) load_chunk(tid, tw, 0);
                    if (i + 2 < num_iter) tw_next = tile_words(offs1, has2, i + 2);
                }
                compute(acc, cur, cur + Cfg::kAElems, active);
                if (has_next) {
                    sm.barrier();
                    for (int tid = 0; tid < kThreads; ++tid) scatter_tile(nxt, tid, tw);
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
        for (int tid = 0; tid < kThreads; ++tid) {
            for (int idx = tid; idx < cols * TM; idx += kThreads) {
                const int n_l = idx / TM, m_l = idx % TM;
                if (m_l >= rows) continue;
                float v = sm.read_f32(n_l * Cfg::kCStride + m_l, tid);
                size_t o;
                if (to_workspace) {
                    o = (static_cast<size_t>(bz) * pr.n + n0 + n_l) * pr.m + m0 + m_l;
                } else {
                    if (pr.has_bias) {
                        const uint16_t bb = bias.load(m0 + m_l);
                        v += pr.bf16 ? bf16_to_float(bb) : f16_to_float(bb);
                    }
                    o = static_cast<size_t>(n0 + n_l) * pr.m + m0 + m_l;
                }
                if (o >= out->size()) fail("output write at %zu, size %zu", o, out->size());
                (*out)[o] = v;
                (*written)[o] += 1;
            }
        }
    }
};

template <class Cfg>
std::vector<float> run_problem(const Problem& pr) {
    const int k_tiles = k_tiles_of(pr.k);
    int split = pr.split_k < 1 ? 1 : pr.split_k;
    if (split > kMaxSplitK) split = kMaxSplitK;
    split = effective_split(k_tiles, split);
    const int per = tiles_per_split(k_tiles, split);
    if (split < 1 || split > k_tiles || (split - 1) * per >= k_tiles) fail("bad effective split %d", split);
    const size_t mn = static_cast<size_t>(pr.n) * pr.m;
    std::vector<float> y(mn, NAN), ws(split > 1 ? split * mn : 0, NAN);
    std::vector<int> written(split > 1 ? ws.size() : mn, 0);
    const int gx = ceil_div(pr.n, Cfg::kTileN), gy = ceil_div(pr.m, Cfg::kTileM);
    for (int bz = 0; bz < split; ++bz)
        for (int by = 0; by < gy; ++by)
            for (int bx = 0; bx < gx; ++bx) {
                auto* block = new BlockEmu<Cfg>(pr, split > 1 ? &ws : &y, &written, split > 1, per);
                block->run(bx, by, bz);
                delete block;
            }
    for (size_t i = 0; i < written.size(); ++i)
        if (written[i] != 1) fail("output element %zu written %d times", i, written[i]);
    if (split > 1) {  // the reduction kernel, same order
        for (size_t i = 0; i < mn; ++i) {
            float s = 0.f;
            for (int z = 0; z < split; ++z) s += ws[static_cast<size_t>(z) * mn + i];
            if (pr.has_bias) {
                const uint16_t bb = pr.bias[i % pr.m];
                s += pr.bf16 ? bf16_to_float(bb) : f16_to_float(bb);
            }
            y[i] = s;
        }
    }
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
    if (p.m < 1 || p.k < 1 || p.n < 1) fail("%s: sizes must be >= 1", path.c_str());
    const int mt = ceil_div(p.m, kStorageTileM), kt = k_tiles_of(p.k);
    if (h[9] != mt * kt + 2) fail("%s: expected %d tile offsets, got %d", path.c_str(), mt * kt + 2, h[9]);
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
        switch (tile_n) {
            case 8: y = run_problem<Config256x8>(p); break;
            case 16: y = run_problem<Config256x16>(p); break;
            case 32: y = run_problem<Config256x32>(p); break;
            case 64: y = run_problem<Config128x64>(p); break;
            case 128: y = run_problem<Config128x128>(p); break;
            default: fail("%s: tile_n %d is not a kernel configuration", argv[i], tile_n);
        }
        const std::string out = std::string(argv[i]) + ".out";
        FILE* f = std::fopen(out.c_str(), "wb");
        if (!f || std::fwrite(y.data(), 4, y.size(), f) != y.size()) fail("cannot write %s", out.c_str());
        std::fclose(f);
    }
    return 0;
}
