// Host emulator of the CUDA bitmap SpMM kernel (bitmap_kernel.cuh), for machines without a GPU.
//
// Plain C++ (build: g++ -std=c++17 -O2 -x c++ bitmap_emulator.cu). It replays every CTA of the
// launch -- per pipeline stage the 128 threads' copies (masks of the stage's 4 k tiles or zeros
// past the split, the stage's clamped value chunks in the kernel's per-warp copy order, x with
// zero stores past the split's columns and K, or the scalar path), then per warp its tile's
// row-start scan, the per-thread chunk scan and nibble decode, the B loads, mma.m16n8k16, and
// at the end the cross-warp reduction in warp order and the split-K epilogue with its arrival
// counters -- calling the
// kernel's own functions from bitmap_layout.cuh. The mma fragment layouts are modelled from the
// PTX ISA (written here, independently of the layout helpers):
//   A (row): lane = 4g + t; reg0 = (row g, k 2t, 2t+1), reg1 = (g+8, 2t..), reg2 = (g, 2t+8..),
//            reg3 = (g+8, 2t+8..); low halfword first.
//   B (col): reg0 = (k 2t, 2t+1; col g), reg1 = (k 2t+8, 2t+9; col g).
//   C: c0, c1 = (row g, cols 2t, 2t+1); c2, c3 = (row g+8, same cols).
// Every stage buffer is poisoned with NaN before each refill, so a decode that selected a byte
// it should not (stale data, the slack past a run, the values of an absent tile) turns the
// result into NaN. It also checks global reads in bounds, every stage byte the kernel reads
// written by this stage's copies (each exactly once), shared reads inside their regions, every
// output written exactly once and the split-K counters back at zero. Shared addresses are
// modelled as the kernel forms them (absolute, from a 16-byte aligned dynamic base that is not
// 0, stages back to back, the decode tables elsewhere).
//
// Usage: bitmap_emulator --plan N K SPLIT   (prints "tile_n effective_split tiles_per_split")
//        bitmap_emulator PROBLEM...  (PROBLEM.out: float32 y[n][m], the kernel's fp32 value
//        before the final rounding). Exit 0 ok, 2 on a failed check, 3 when the glue's size
//        checks (problem_size_error) reject the problem. Format: read_problem().
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
    // The torch glue's size checks, before any array is read (a test feeds malformed sizes).
    const std::string error = problem_size_error(p.m, p.k, p.n, static_cast<int64_t>(p.tiles) * kTile, n_offsets,
                                                 static_cast<int64_t>(p.value_chunks) * 8, p.split_k, p.tile_n);
    if (!error.empty()) {
        std::fprintf(stderr, "invalid problem: %s\n", error.c_str());
        std::exit(3);
    }
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
    static constexpr uint32_t kDynBase = 0x410;  // a 16-byte aligned, non-zero dynamic smem base

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
        for (int e = 0; e < 2 * kTableEntries; ++e) table.push_back(table_entry(e));
        if (x_chunks_per_thread(tn) * kThreads * 8 != tn * kXCols) fail("x chunks do not cover the x tile");
    }

    float elem(uint16_t b) const { return p.bf16 ? bf16_to_float(b) : half_to_float(b); }
    int32_t offset(size_t i) const {
        if (i >= p.offsets.size()) fail("tile_offsets read past the end (entry %zu)", i);
        return p.offsets[i];
    }

    struct Stage {
        std::vector<uint8_t> bytes;
        std::vector<uint8_t> written;  // per byte: copies that wrote it
        int start = 0;                 // value chunk of the stage's first tile (offsets units)
        int tile_start[kWarps] = {};   // per warp: its tile's start as StageLoader::load read it
    };

    void write16(Stage& st, size_t byte, const uint8_t* src) const {
        if (byte % 16 != 0 || byte + 16 > st.bytes.size()) fail("16-byte stage write at %zu", byte);
        std::memcpy(&st.bytes[byte], src, 16);
        for (int i = 0; i < 16; ++i) ++st.written[byte + i];
    }

    // StageLoader::load of stage s (tiles 4s .. 4s + 3 of the split starting at tile0) by the 128
    // threads, into a poisoned stage.
    void load_stage(Stage& st, size_t tile0, int num, int s, int n0, int kt0) const {
        std::fill(st.bytes.begin(), st.bytes.end(), kPoison);
        std::fill(st.written.begin(), st.written.end(), 0);
        const int tiles_left = num - s * kTilesPerStage;
        const size_t first = tile0 + static_cast<size_t>(s) * kTilesPerStage;  // offsets index
        static const uint8_t zero[16] = {};
        for (int tid = 0; tid < kThreads; ++tid) {
            const int warp = tid >> 5;
            if (warp < tiles_left) {
                const size_t src = first * kMaskBytes + tid * 16;
                if (src + 16 > p.masks.size() * 8) fail("mask read past the end");
                write16(st, tid * 16, reinterpret_cast<const uint8_t*>(p.masks.data()) + src);
            } else {
                write16(st, tid * 16, zero);
            }
        }
        const int next_start = offset(first);
        const int end = offset(first + std::min(kTilesPerStage, tiles_left));
        for (int w = 0; w < kWarps; ++w) st.tile_start[w] = offset(first + std::min(w, tiles_left));
        st.start = next_start;
        const int start = clamp_start(next_start, p.value_chunks);
        const int count = stage_value_count(next_start, end, p.value_chunks);
        if (count > kStageValueChunks) fail("stage value count %d over the buffer", count);
        // The kernel's copy loop: thread f = 256 warp + lane copies chunks f + 32u + 1024 trip.
        for (int tid = 0; tid < kThreads; ++tid) {
            const int f = (tid >> 5) * (kThreads * 8 / kWarps) + (tid & 31);
            for (int trip = 0, rem = count - f; rem > 0; ++trip, rem -= kThreads * 8)
                for (int u = 0; u < 8; ++u) {
                    if (rem <= 32 * u) continue;
                    const int c = f + 32 * u + kThreads * 8 * trip;
                    const size_t src = (static_cast<size_t>(start) + c) * 16;
                    if (src + 16 > p.values.size() * 2) fail("value read past the end");
                    write16(st, kStageMaskBytes + static_cast<size_t>(c) * 16,
                            reinterpret_cast<const uint8_t*>(p.values.data()) + src);
                }
        }
        const int x_aligned = (p.k % 8 == 0) && !p.misaligned_x;
        // StageLoader: a stage whose 256 columns all belong to the split copies without checks, and
        // a row past N reads x row 0 (its columns of y are never written); otherwise zeros past N
        // and past the split's columns (split_k_end), which end at a multiple of 64 or at K.
        const int col0 = (kt0 + s * kTilesPerStage) * kTile;
        const int k_end = split_k_end(p.k, kt0, num);
        const bool full = x_aligned && k_end - col0 >= kXCols;
        for (int tid = 0; tid < kThreads; ++tid) {
            const int r = x_chunk_row(tn, tid), nn = n0 + r;
            for (int u = 0; u < x_chunks_per_thread(tn); ++u) {
                const int c = x_chunk_col(tn, tid, u);
                const int kk = col0 + c;
                uint16_t chunk[8];
                for (int e = 0; e < 8; ++e) {
                    if (full) {
                        chunk[e] = p.x[static_cast<size_t>(nn < p.n ? nn : 0) * p.k + kk + e];
                        continue;
                    }
                    const bool valid = x_aligned ? (nn < p.n && kk < k_end) : (nn < p.n && kk + e < k_end);
                    if (x_aligned && valid && kk + e >= k_end) fail("x chunk straddles the split's end on the aligned path");
                    chunk[e] = valid ? p.x[static_cast<size_t>(nn) * p.k + kk + e] : 0;
                }
                write16(st, stage_x_byte() + 2 * static_cast<size_t>(x_elem_offset(r, c)),
                        reinterpret_cast<const uint8_t*>(chunk));
            }
        }
        // Coverage: masks and the x tile fully written once; values: exactly the copied chunks.
        for (size_t b = 0; b < static_cast<size_t>(kStageMaskBytes); ++b)
            if (st.written[b] != 1) fail("mask byte %zu written %d times", b, st.written[b]);
        for (int r = 0; r < tn; ++r)
            for (int c = 0; c < kXCols * 2; ++c) {
                const size_t b = stage_x_byte() + 2 * static_cast<size_t>(x_elem_offset(r, 0)) + c;
                if (st.written[b] != 1) fail("x byte %zu written %d times", b, st.written[b]);
            }
        for (int c = 0; c < kStageValueChunks; ++c)
            if (st.written[kStageMaskBytes + 16 * c] != (c < count ? 1 : 0)) fail("value chunk %d copy count", c);
    }

    // A shared read the kernel does: `addr` is absolute (kDynBase + stage offset).
    uint32_t lds32(const Stage& st, uint32_t stage_base, uint32_t addr, size_t lo, size_t hi) const {
        if (addr % 4 != 0 || addr < stage_base) fail("shared 32-bit read at %u", addr);
        const size_t byte = addr - stage_base;
        if (byte < lo || byte + 4 > hi) fail("shared 32-bit read at stage byte %zu outside [%zu, %zu)", byte, lo, hi);
        uint32_t v;
        std::memcpy(&v, &st.bytes[byte], 4);
        return v;
    }

    void run_cta(int bx, int by, int bz) {
        const int n0 = bx * tn, mt = by, kt0 = bz * per_split;
        const int num = std::min(per_split, k_tiles - kt0);
        if (num < 1) fail("empty split %d", bz);
        const size_t tile0 = static_cast<size_t>(mt) * k_tiles + kt0;
        // acc[warp][lane][b][nb][r]
        std::vector<float> acc(static_cast<size_t>(kThreads) * 4 * nt * 4, 0.f);
        auto A_ = [&](int warp, int lane, int b, int nb, int r) -> float& {
            return acc[((((warp * 32 + lane) * 4 + b) * nt + nb) * 4) + r];
        };
        Stage st;
        st.bytes.resize(stage_bytes(tn));
        st.written.resize(stage_bytes(tn));
        const size_t vb = kStageMaskBytes, ve = kStageMaskBytes + kValueBytes + kValueSlack;
        for (int s = 0; s < stages_of(num); ++s) {
            load_stage(st, tile0, num, s, n0, kt0);
            const uint32_t stage_base = kDynBase + static_cast<uint32_t>((s % kStages) * stage_bytes(tn));
            for (int warp = 0; warp < kWarps; ++warp) {
                const bool present = s * kTilesPerStage + warp < num;
                const uint32_t values = stage_base + kStageMaskBytes + 16u * tile_rel_chunk(st.tile_start[warp], st.start);
                if (present && st.tile_start[warp] - st.start != tile_rel_chunk(st.tile_start[warp], st.start) &&
                    p.offsets.back() == p.value_chunks)
                    fail("a well-formed tile start was clamped");
                const size_t mbase = static_cast<size_t>(warp) * kMaskBytes;
                auto mask_word = [&](int row, int h) {
                    return lds32(st, stage_base, stage_base + static_cast<uint32_t>(mbase + row * 8 + 4 * h), mbase,
                                 mbase + kMaskBytes);
                };
                // Step 1: lanes' pair counts and the warp's inclusive scan (lane l: rows 2l, 2l+1).
                uint32_t packed[32];
                uint32_t running = 0;
                for (int lane = 0; lane < 32; ++lane) {
                    const uint32_t c_even = row_count(mask_word(2 * lane, 0), mask_word(2 * lane, 1));
                    const uint32_t c_pair = c_even + row_count(mask_word(2 * lane + 1, 0), mask_word(2 * lane + 1, 1));
                    running += c_pair;
                    packed[lane] = pack_row_starts(running, c_pair, c_even);
                }
                uint32_t row_start[kTile + 1] = {0};  // independent: from the full masks
                for (int q = 0; q < kTile; ++q) row_start[q + 1] = row_start[q] + row_count(mask_word(q, 0), mask_word(q, 1));
                // Step 2: per lane, chunk t of rows 8g .. 8g+7; packed popcounts per row pair.
                uint32_t chunks[32][8], counts[32][4];
                for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane >> 2, t = lane & 3;
                    for (int r = 0; r < 8; ++r) {
                        const int cb = chunk_byte(thread_row(g, r), t);
                        if (cb % 2 != 0 || cb < 0 || cb + 2 > kMaskBytes) fail("chunk read at byte %d", cb);
                        uint16_t c;
                        std::memcpy(&c, &st.bytes[mbase + cb], 2);
                        chunks[lane][r] = c;
                    }
                    for (int b = 0; b < 4; ++b) counts[lane][b] = pack_chunk_counts(chunks[lane][2 * b], chunks[lane][2 * b + 1]);
                }
                // Step 3 per lane: A registers per k-step and m16 block.
                uint32_t a[4][4][32][4];  // [j][b][lane][reg]
                for (int lane = 0; lane < 32; ++lane) {
                    const int g = lane >> 2, t = lane & 3;
                    uint32_t fb[8], first[8];
                    for (int b = 0; b < 4; ++b) {
                        uint32_t ranks = 0;  // the 4-lane exclusive scan
                        for (int u = 4 * g; u < lane; ++u) ranks += counts[u][b];
                        const uint32_t starts = packed[row_pair_lane(g, b)];
                        const uint32_t firsts = starts + ranks;
                        fb[2 * b] = first_byte_lo(values, firsts);
                        fb[2 * b + 1] = first_byte_hi(values, firsts);
                        for (int h = 0; h < 2; ++h) {
                            const int row = thread_row(g, 2 * b + h);
                            // Independent cross-checks against the full masks.
                            if (unpack_row_start(starts, h) != row_start[row]) fail("row start of row %d", row);
                            const uint32_t lo = mask_word(row, 0), hi = mask_word(row, 1);
                            if (chunks[lane][2 * b + h] != chunk_bits(lo, hi, t)) fail("chunk load disagrees with the mask");
                            const uint32_t rank = chunk_rank(lo, hi, below_lo_mask(t), below_hi_mask(t));
                            if (((ranks >> (16 * h)) & 0xFFFFu) != rank) fail("chunk rank scan disagrees with the mask");
                            first[2 * b + h] = row_start[row] + rank;
                            if (fb[2 * b + h] != chunk_first_byte(values, first[2 * b + h])) fail("first value byte");
                        }
                    }
                    for (int j = 0; j < 4; ++j)
                        for (int r = 0; r < 8; ++r) {
                            const uint32_t c = chunks[lane][r];
                            const uint32_t eb = table_byte(chunk_addr01(c), chunk_addr23(c), j);
                            if (eb % 8 != 0 || eb >= static_cast<uint32_t>(kTableBytes)) fail("table read at byte %u", eb);
                            const NibbleEntry e = table[eb / 8];
                            const NibbleEntry want = nibble_entry((c >> (4 * j)) & 15u);
                            if (std::memcmp(&e, &want, sizeof e) != 0) fail("table entry of nibble %d", j);
                            // The kernel's running byte offset vs the rank from the mask.
                            if (fb[r] != values + 2 * (first[r] + nibble_rank(c, j))) fail("running value offset drifted");
                            const uint32_t w = value_byte(fb[r]);
                            // Chunk r: block b = r / 2, A row g (+8 for odd r): regs (r%2) and (r%2)+2.
                            expand_nibble(e, lds32(st, stage_base, w, vb, ve), lds32(st, stage_base, w + 4, vb, ve),
                                          lds32(st, stage_base, w + 8, vb, ve), fb[r], a[j][r / 2][lane][r % 2],
                                          a[j][r / 2][lane][r % 2 + 2]);
                            if (entry_bytes(e) != 2 * popc32((c >> (4 * j)) & 15u)) fail("entry byte count");
                            fb[r] += entry_bytes(e);
                        }
                }
                for (int j = 0; j < 4; ++j)
                    for (int nb = 0; nb < nt; ++nb) {
                        float B[16][8];
                        for (int lane = 0; lane < 32; ++lane) {
                            const int g = lane >> 2, t = lane & 3;
                            // The kernel's split: per-thread b_byte + per-(nb, j) constant.
                            const size_t bb = stage_x_byte() + 2 * x_elem_offset(g, b_col(warp, t, 0)) +
                                              2 * x_elem_offset(nb * 8, 4 * j);
                            if (bb != stage_x_byte() + 2 * static_cast<size_t>(x_elem_offset(nb * 8 + g, b_col(warp, t, j))))
                                fail("B address split is wrong");
                            if (bb % 8 != 0) fail("B load not 8-byte aligned");
                            const uint32_t b0 = lds32(st, stage_base, stage_base + bb, stage_x_byte(), st.bytes.size());
                            const uint32_t b1 = lds32(st, stage_base, stage_base + bb + 4, stage_x_byte(), st.bytes.size());
                            B[2 * t][g] = elem(b0 & 0xFFFFu);
                            B[2 * t + 1][g] = elem(b0 >> 16);
                            B[2 * t + 8][g] = elem(b1 & 0xFFFFu);
                            B[2 * t + 9][g] = elem(b1 >> 16);
                        }
                        for (int b = 0; b < 4; ++b) {
                            // PTX fragments -> 16x16 A (k = mma k-slot).
                            float Am[16][16];
                            for (int lane = 0; lane < 32; ++lane) {
                                const int g = lane >> 2, t = lane & 3;
                                const int rows[4] = {g, g + 8, g, g + 8}, ks[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
                                for (int r = 0; r < 4; ++r) {
                                    Am[rows[r]][ks[r]] = elem(a[j][b][lane][r] & 0xFFFFu);
                                    Am[rows[r]][ks[r] + 1] = elem(a[j][b][lane][r] >> 16);
                                }
                            }
                            for (int lane = 0; lane < 32; ++lane) {
                                const int g = lane >> 2, t = lane & 3;
                                for (int r = 0; r < 4; ++r) {
                                    const int row = g + 8 * (r >> 1), col = 2 * t + (r & 1);
                                    double sum = 0.0;
                                    for (int kk = 0; kk < 16; ++kk) sum += static_cast<double>(Am[row][kk]) * B[kk][col];
                                    float& c = A_(warp, lane, b, nb, r);
                                    c = static_cast<float>(c + sum);
                                }
                            }
                        }
                    }
            }
        }
        // Cross-warp reduction through the (poisoned) stage memory, then the epilogue.
        std::vector<float> red(static_cast<size_t>(kStages) * stage_bytes(tn) / 4, NAN);
        std::vector<int> red_writes(red.size(), 0);
        for (int warp = 0; warp < kWarps; ++warp)
            for (int lane = 0; lane < 32; ++lane) {
                const int g = lane >> 2, t = lane & 3;
                for (int b = 0; b < 4; ++b)
                    for (int nb = 0; nb < nt; ++nb)
                        for (int r = 0; r < 4; ++r) {
                            const size_t i = red_index(warp, tn, c_row(g, b, r), c_col(nb, t, r));
                            if (i >= red.size()) fail("reduction write out of the stages");
                            red[i] = A_(warp, lane, b, nb, r);
                            ++red_writes[i];
                        }
            }
        for (int warp = 0; warp < kWarps; ++warp)
            for (int row = 0; row < kTileM; ++row)
                for (int col = 0; col < tn; ++col)
                    if (red_writes[red_index(warp, tn, row, col)] != 1) fail("reduction slot written %d times",
                                                                             red_writes[red_index(warp, tn, row, col)]);
        const int m0 = mt * kTileM;
        const size_t mn = static_cast<size_t>(p.n) * p.m;
        std::vector<size_t> outs;
        std::vector<float> vals;
        for (int tid = 0; tid < kThreads; ++tid)
            for (int q = 0; q < kTileM * tn / kThreads; ++q) {
                const int e = tid + q * kThreads;
                const int lrow = e % kTileM, lcol = e / kTileM;
                float v = red[red_index(0, tn, lrow, lcol)];
                for (int w = 1; w < kWarps; ++w) v += red[red_index(w, tn, lrow, lcol)];
                const int row = m0 + lrow, col = n0 + lcol;
                if (row >= p.m || col >= p.n) continue;
                const size_t idx = static_cast<size_t>(col) * p.m + row;
                if (split == 1) {
                    ++writes[idx];
                    y[idx] = p.has_bias ? v + elem(p.bias[row]) : v;
                } else {
                    partial[bz * mn + idx] = v;
                    outs.push_back(idx);
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
