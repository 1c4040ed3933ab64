// Host emulator of the CUDA bitmap SpMM kernel (bitmap_kernel.cuh), for machines without a GPU.
//
// Plain C++ (build: g++ -std=c++17 -O2 -x c++ bitmap_emulator.cu). It replays every CTA of the
// launch -- the stage copies (masks, clamped value chunks, x with zero-fill or the scalar path),
// the per-warp row-start scan, the per-thread nibble decode, the B loads, mma.m16n8k16 and the
// split-K epilogue with its arrival counters -- calling the kernel's own functions from
// bitmap_layout.cuh. The mma fragment layouts are modelled from the PTX ISA (written here,
// independently of the layout helpers):
//   A (row): lane = 4g + t; reg0 = (row g, k 2t, 2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..),
//            reg3 = (g+8, 2t+8..); low halfword first.
//   B (col): reg0 = (k 2t, 2t+1; col g), reg1 = (k 2t+8, 2t+9; col g).
//   C: c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g+8, same cols).
// Every stage buffer is poisoned with NaN before each refill, so a decode that selected a byte
// it should not (stale data, the slack past a run) turns the result into NaN. It also checks
// global reads in bounds, shared reads inside the stage, every output written exactly once and
// the split-K counters back at zero.
//
// Usage: bitmap_emulator --plan N K SPLIT   (prints "tile_n effective_split tiles_per_split")
//        bitmap_emulator PROBLEM...  (PROBLEM.out: float32 y[n][m], the kernel's fp32 value
//        before the final rounding). Exit 0 ok, 2 on a failed check. Format: read_problem().
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "bitmap_layout.cuh"

using namespace flashsparse::bmp;

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

float half_to_float(uint16_t h) {
    const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 31u, man = h & 1023u;
    float v;
    if (exp == 0) {
        v = std::ldexp(static_cast<float>(man), -24);
    } else if (exp == 31) {
        v = man ? NAN : INFINITY;
    } else {
        v = std::ldexp(static_cast<float>(man | 1024u), static_cast<int>(exp) - 25);
    }
    return sign ? -v : v;
}

float bf16_to_float(uint16_t b) {
    const uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct Problem {
    int m = 0, k = 0, n = 0, tile_n = 0, split_k = 1, misaligned_x = 0, bf16 = 0, has_bias = 0;
    int tiles = 0, value_chunks = 0;
    std::vector<int32_t> offsets;
    std::vector<uint64_t> masks;
    std::vector<uint16_t> values, x, bias;
};

// Header: 12 little-endian int32 (magic 'BMP2', m, k, n, tile_n, split_k, misaligned_x, bf16,
// has_bias, tiles, offsets entries, value chunks), then int32 offsets, uint64 masks
// [tiles * 64], uint16 values [chunks * 8], uint16 x [n * k], uint16 bias [m] if has_bias.
Problem read_problem(const char* path) {
    FILE* f = std::fopen(path, "rb");
    if (!f) fail("cannot open %s", path);
    int32_t h[12];
    if (std::fread(h, 4, 12, f) != 12 || h[0] != 0x32504D42) fail("%s: bad header", path);
    Problem p;
    p.m = h[1], p.k = h[2], p.n = h[3], p.tile_n = h[4], p.split_k = h[5], p.misaligned_x = h[6];
    p.bf16 = h[7], p.has_bias = h[8], p.tiles = h[9];
    const int n_offsets = h[10];
    p.value_chunks = h[11];
    auto read = [&](void* dst, size_t size, size_t count) {
        if (count && std::fread(dst, size, count, f) != count) fail("%s: truncated", path);
    };
    p.offsets.resize(n_offsets);
    read(p.offsets.data(), 4, p.offsets.size());
    p.masks.resize(static_cast<size_t>(p.tiles) * kTile);
    read(p.masks.data(), 8, p.masks.size());
    p.values.resize(static_cast<size_t>(p.value_chunks) * 8);
    read(p.values.data(), 2, p.values.size());
    p.x.resize(static_cast<size_t>(p.n) * p.k);
    read(p.x.data(), 2, p.x.size());
    if (p.has_bias) {
        p.bias.resize(p.m);
        read(p.bias.data(), 2, p.bias.size());
    }
    std::fclose(f);
    return p;
}

constexpr uint8_t kPoison = 0xFF;  // 0xFFFF is NaN in fp16 and bf16

struct Emulator {
    const Problem& p;
    int tn, nt, k_tiles, split, per_split, grid_x, grid_y;
    std::vector<float> y, partial;
    std::vector<int> writes;
    std::vector<int32_t> counters;
    std::vector<NibbleEntry> table;

    explicit Emulator(const Problem& pr) : p(pr) {
        tn = p.tile_n == 0 ? default_tile_n(p.n) : p.tile_n;
        if (!valid_tile_n(tn)) fail("tile_n %d", tn);
        nt = tn / 8;
        k_tiles = k_tiles_of(p.k);
        split = effective_split(k_tiles, p.split_k);
        per_split = tiles_per_split(k_tiles, split);
        grid_x = ceil_div(p.n, tn);
        grid_y = ceil_div(p.m, kTileM);
        if (p.tiles != grid_y * k_tiles) fail("tiles %d != %d", p.tiles, grid_y * k_tiles);
        if (static_cast<int>(p.offsets.size()) != p.tiles + 1) fail("offsets entries");
        y.assign(static_cast<size_t>(p.n) * p.m, NAN);
        writes.assign(y.size(), 0);
        if (split > 1) partial.assign(static_cast<size_t>(split) * y.size(), NAN);
        counters.assign(static_cast<size_t>(grid_x) * grid_y, 0);
        for (uint32_t v = 0; v < 16; ++v) table.push_back(nibble_entry(v));
    }

    float elem(uint16_t b) const { return p.bf16 ? bf16_to_float(b) : half_to_float(b); }

    // load_stage(): what the 128 threads' copies leave in the stage.
    void load_stage(std::vector<uint8_t>& stage, int mt, int kt, int n0) const {
        std::fill(stage.begin(), stage.end(), kPoison);
        const size_t tile = static_cast<size_t>(mt) * k_tiles + kt;
        if (tile + 1 >= p.offsets.size()) fail("tile_offsets read past the end (tile %zu)", tile);
        for (int tid = 0; tid < kMaskBytes / 16; ++tid) {
            const size_t src = tile * kMaskBytes + tid * 16;
            if (src + 16 > p.masks.size() * 8) fail("mask read past the end");
            std::memcpy(&stage[tid * 16], reinterpret_cast<const uint8_t*>(p.masks.data()) + src, 16);
        }
        // StageLoader::load: the previous tile's end is this tile's start.
        const int next_start = p.offsets[tile], end = p.offsets[tile + 1];
        const int start = std::min(std::max(next_start, 0), p.value_chunks);
        const int count = std::min(std::min(end - next_start, kMaxValueChunks), p.value_chunks - start);
        for (int c = 0; c < count; ++c) {
            const size_t src = (static_cast<size_t>(start) + c) * 16;
            if (src + 16 > p.values.size() * 2) fail("value read past the end");
            std::memcpy(&stage[kMaskBytes + c * 16], reinterpret_cast<const uint8_t*>(p.values.data()) + src, 16);
        }
        const int x_aligned = (p.k % 8 == 0) && !p.misaligned_x;
        uint8_t* xs = &stage[kMaskBytes + kValueBytes + kValueSlack];
        for (int q = 0; q < tn * 8; ++q) {
            const int r = x_chunk_row(q), c = x_chunk_col(q), nn = n0 + r, kk = kt * kTile + c;
            uint16_t chunk[8];
            for (int e = 0; e < 8; ++e) {
                const bool valid = x_aligned ? (nn < p.n && kk < p.k) : (nn < p.n && kk + e < p.k);
                if (x_aligned && valid && kk + e >= p.k) fail("x chunk straddles K on the aligned path");
                chunk[e] = valid ? p.x[static_cast<size_t>(nn) * p.k + kk + e] : 0;
            }
            const int off = x_elem_offset(r, c) * 2;
            if (off % 16 != 0) fail("x chunk destination not 16-byte aligned");
            std::memcpy(xs + off, chunk, 16);
        }
    }

    uint32_t lds32(const std::vector<uint8_t>& stage, size_t byte, size_t lo, size_t hi) const {
        if (byte % 4 != 0 || byte < lo || byte + 4 > hi) fail("shared 32-bit read at %zu outside [%zu, %zu)", byte, lo, hi);
        uint32_t v;
        std::memcpy(&v, &stage[byte], 4);
        return v;
    }

    void run_cta(int bx, int by, int bz) {
        const int n0 = bx * tn, mt = by, kt0 = bz * per_split;
        const int num = std::min(per_split, k_tiles - kt0);
        if (num < 1) fail("empty split %d", bz);
        std::vector<float> acc(static_cast<size_t>(kThreads) * nt * 4, 0.f);
        std::vector<uint8_t> stage(stage_bytes(tn));
        const size_t xbase = kMaskBytes + kValueBytes + kValueSlack;
        for (int i = 0; i < num; ++i) {
            load_stage(stage, mt, kt0 + i, n0);
            for (int warp = 0; warp < kWarps; ++warp) {
                // Step 1: lanes' pair counts and the warp's inclusive scan.
                uint32_t packed[32];
                uint32_t running = 0;
                for (int lane = 0; lane < 32; ++lane) {
                    const uint32_t* pr = reinterpret_cast<const uint32_t*>(&stage[lane * 16]);
                    const uint32_t c_even = row_count(pr[0], pr[1]);
                    const uint32_t c_pair = c_even + row_count(pr[2], pr[3]);
                    running += c_pair;
                    packed[lane] = pack_row_starts(running, c_pair, c_even);
                }
                // Step 2: per lane, the two rows' chunks; the 4-lane exclusive scan of their packed
                // popcounts (lanes 4g .. 4g+3) gives the chunk ranks.
                uint32_t chunks[32][2], counts[32];
                for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane >> 2, t = lane & 3, r0 = 16 * warp + g;
                    for (int h = 0; h < 2; ++h) {
                        const int cb = chunk_byte(r0 + 8 * h, t);
                        if (cb % 2 != 0 || cb < 0 || cb + 2 > kMaskBytes) fail("chunk read at byte %d", cb);
                        uint16_t c;
                        std::memcpy(&c, &stage[cb], 2);
                        chunks[lane][h] = c;
                    }
                    counts[lane] = pack_chunk_counts(chunks[lane][0], chunks[lane][1]);
                }
                // Step 3 per lane: A registers per k-step.
                uint32_t a[4][32][4];
                for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane >> 2, t = lane & 3, r0 = 16 * warp + g;
                    uint32_t ranks = 0;
                    for (int u = 4 * g; u < lane; ++u) ranks += counts[u];
                    const uint32_t starts = byte_perm(packed[r0 >> 1], packed[(r0 + 8) >> 1], row_start_selector(r0));
                    const uint32_t start0 = starts & 0xFFFFu, start1 = starts >> 16;
                    if (start0 != unpack_row_start(packed[r0 >> 1], r0) || start1 != unpack_row_start(packed[(r0 + 8) >> 1], r0 + 8))
                        fail("packed row starts disagree");
                    const uint32_t m0x = lds32(stage, r0 * 8, 0, kMaskBytes), m0y = lds32(stage, r0 * 8 + 4, 0, kMaskBytes);
                    const uint32_t m1x = lds32(stage, (r0 + 8) * 8, 0, kMaskBytes),
                                   m1y = lds32(stage, (r0 + 8) * 8 + 4, 0, kMaskBytes);
                    const uint32_t mlo = below_lo_mask(t), mhi = below_hi_mask(t);
                    const uint32_t chunk[2] = {chunks[lane][0], chunks[lane][1]};
                    // Independent cross-checks of the chunk loads and of the scan against the full masks.
                    if (chunk[0] != chunk_bits(m0x, m0y, t) || chunk[1] != chunk_bits(m1x, m1y, t))
                        fail("chunk load disagrees with the row mask");
                    if ((ranks & 0xFFFFu) != chunk_rank(m0x, m0y, mlo, mhi) || (ranks >> 16) != chunk_rank(m1x, m1y, mlo, mhi))
                        fail("chunk rank scan disagrees with the row mask");
                    const uint32_t first[2] = {start0 + (ranks & 0xFFFFu), start1 + (ranks >> 16)};
                    // fb counts from the start of the CTA's shared memory (table, then stages).
                    const uint32_t values_byte = kNibbleTableBytes + (i % kStages) * stage_bytes(tn) + kMaskBytes;
                    const uint32_t firsts = starts + ranks;
                    uint32_t fb[2] = {chunk_first_byte(values_byte, firsts & 0xFFFFu, 0),
                                      chunk_first_byte(values_byte, firsts >> 16, 0)};
                    for (int j = 0; j < 4; ++j)
                        for (int h = 0; h < 2; ++h) {
                            const uint32_t eb = nibble_entry_byte(chunk[h], j);
                            if (eb % 16 != 0 || eb >= kNibbleTableBytes) fail("nibble table read at byte %u", eb);
                            const NibbleEntry e = table[eb / 16];
                            // The kernel's running byte offset vs the rank from the mask.
                            if (fb[h] != values_byte + 2 * (first[h] + nibble_rank(chunk[h], j)))
                                fail("running value offset drifted");
                            const size_t vb = kMaskBytes, ve = kMaskBytes + kValueBytes + kValueSlack;
                            const size_t w = vb + value_byte(fb[h]) - values_byte;
                            expand_nibble(e, lds32(stage, w, vb, ve), lds32(stage, w + 4, vb, ve), lds32(stage, w + 8, vb, ve),
                                          value_shift(fb[h]), a[j][lane][h], a[j][lane][h + 2]);
                            fb[h] += e.bytes;
                        }
                }
                for (int j = 0; j < 4; ++j)
                    for (int nb = 0; nb < nt; ++nb) {
                        // PTX fragments -> 16x16 A, 16x8 B (k = mma k-slot).
                        float A[16][16], B[16][8];
                        for (int lane = 0; lane < 32; ++lane) {
                            const int g = lane >> 2, t = lane & 3;
                            const int rows[4] = {g, g + 8, g, g + 8}, ks[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
                            for (int r = 0; r < 4; ++r) {
                                A[rows[r]][ks[r]] = elem(a[j][lane][r] & 0xFFFFu);
                                A[rows[r]][ks[r] + 1] = elem(a[j][lane][r] >> 16);
                            }
                            // The kernel's split: per-thread b_byte + per-(nb, j) constant.
                            const size_t bb = kMaskBytes + kValueBytes + kValueSlack + 2 * x_elem_offset(g, b_col(t, 0)) +
                                              2 * x_elem_offset(nb * 8, 4 * j);
                            if (bb != xbase + 2 * static_cast<size_t>(x_elem_offset(nb * 8 + g, b_col(t, j))))
                                fail("B address split is wrong");
                            if (bb % 8 != 0) fail("B load not 8-byte aligned");
                            const uint32_t b0 = lds32(stage, bb, xbase, stage.size());
                            const uint32_t b1 = lds32(stage, bb + 4, xbase, stage.size());
                            B[2 * t][g] = elem(b0 & 0xFFFFu);
                            B[2 * t + 1][g] = elem(b0 >> 16);
                            B[2 * t + 8][g] = elem(b1 & 0xFFFFu);
                            B[2 * t + 9][g] = elem(b1 >> 16);
                        }
                        for (int lane = 0; lane < 32; ++lane) {
                            const int g = lane >> 2, t = lane & 3;
                            for (int r = 0; r < 4; ++r) {
                                const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
                                double s = 0.0;
                                for (int kk = 0; kk < 16; ++kk) s += static_cast<double>(A[row][kk]) * B[kk][col];
                                float& c = acc[((warp * 32 + lane) * nt + nb) * 4 + r];
                                c = static_cast<float>(c + s);
                            }
                        }
                    }
            }
        }
        // Epilogue.
        const int m0 = mt * kTileM;
        const size_t mn = static_cast<size_t>(p.n) * p.m;
        std::vector<size_t> outs;
        for (int tid = 0; tid < kThreads; ++tid) {
            const int warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
            for (int nb = 0; nb < nt; ++nb)
                for (int r = 0; r < 4; ++r) {
                    const int row = m0 + c_row(warp, g, r), col = n0 + c_col(nb, t, r);
                    if (row >= p.m || col >= p.n) continue;
                    const size_t idx = static_cast<size_t>(col) * p.m + row;
                    const float v = acc[(tid * nt + nb) * 4 + r];
                    if (split == 1) {
                        ++writes[idx];
                        y[idx] = p.has_bias ? v + elem(p.bias[row]) : v;
                    } else {
                        partial[bz * mn + idx] = v;
                        outs.push_back(idx);
                    }
                }
        }
        if (split == 1) return;
        int32_t& counter = counters[static_cast<size_t>(by) * grid_x + bx];
        const int arrived = counter++;
        if (arrived != split - 1) return;
        counter = 0;
        for (size_t idx : outs) {
            float v = 0.f;
            for (int z = 0; z < split; ++z) v += partial[z * mn + idx];
            if (p.has_bias) v += elem(p.bias[idx % p.m]);
            ++writes[idx];
            y[idx] = v;
        }
    }

    void run() {
        // Arrival order must not matter: run the splits last-to-first.
        for (int bz = split - 1; bz >= 0; --bz)
            for (int by = 0; by < grid_y; ++by)
                for (int bx = 0; bx < grid_x; ++bx) run_cta(bx, by, bz);
        for (size_t i = 0; i < writes.size(); ++i)
            if (writes[i] != 1) fail("output %zu written %d times", i, writes[i]);
        for (int32_t c : counters)
            if (c != 0) fail("a split-K counter was left at %d", c);
    }
};

}  // namespace

int main(int argc, char** argv) {
    if (argc == 5 && std::string(argv[1]) == "--plan") {
        const int n = std::atoi(argv[2]), k = std::atoi(argv[3]), s = std::atoi(argv[4]);
        const int kt = k_tiles_of(k), split = effective_split(kt, s);
        std::printf("%d %d %d\n", default_tile_n(n), split, tiles_per_split(kt, split));
        return 0;
    }
    if (argc < 2) {
        std::fprintf(stderr, "usage: bitmap_emulator --plan N K SPLIT | PROBLEM...\n");
        return 1;
    }
    for (int i = 1; i < argc; ++i) {
        const Problem p = read_problem(argv[i]);
        Emulator emu(p);
        emu.run();
        const std::string out = std::string(argv[i]) + ".out";
        FILE* f = std::fopen(out.c_str(), "wb");
        if (!f || std::fwrite(emu.y.data(), 4, emu.y.size(), f) != emu.y.size()) fail("cannot write %s", out.c_str());
        std::fclose(f);
    }
    return 0;
}
