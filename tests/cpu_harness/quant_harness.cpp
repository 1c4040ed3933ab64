// Torch-free check of every quantized CPU kernel entry point this machine runs (scalar, AVX2,
// AVX-512: n = 1 with fp32 and bf16 x, the fused and blocked kernels, the decode) on weights
// encoded by flashsparse and written to a folder by tests/test_bitmap_cpu_harness.py, against
// the float64 product with the reference decode. Every buffer a kernel reads is a heap block of
// exactly its size, so that under -fsanitize=address a read past one (a scale column that does
// not exist, a code past the values) is reported where it happens, not only when the memory
// after it holds a NaN. Outputs are NaN before the kernels write them.
//
//   quant_harness FOLDER     (FOLDER/manifest.txt: "name m k groups group_size quant" lines,
//                             FOLDER/name.{masks,values,offsets,scales,dense}: raw arrays)
//
// Prints one line per failing check, then "N passed, N failed"; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cpu/bitmap_cpu.h"
#include "cpu/bitmap_quant.h"

namespace fc = flashsparse::cpu;

namespace {

// The file's bytes in a heap block of exactly that size (at least 1 byte).
template <class T>
T* read_exact(const std::string& path, int64_t& count) {
    std::ifstream f(path, std::ios::binary | std::ios::ate);
    if (!f) {
        std::fprintf(stderr, "cannot read %s\n", path.c_str());
        std::exit(2);
    }
    const std::streamsize bytes = f.tellg();
    f.seekg(0);
    T* p = static_cast<T*>(std::malloc(bytes > 0 ? bytes : 1));
    f.read(reinterpret_cast<char*>(p), bytes);
    count = bytes / static_cast<int64_t>(sizeof(T));
    return p;
}

uint16_t to_bf16(float v) {  // x values here are exact in bf16
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return static_cast<uint16_t>(u >> 16);
}

double rel_err(const float* y, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double d = y[i] - ref[i];
        num += d * d;
        den += ref[i] * ref[i];
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

enum Entry { kScalar, kAvx2, kAvx2Blocked, kAvx512, kAvx512Blocked, kAvx512Bf16x };
const char* const kNames[] = {"scalar", "avx2", "avx2-blocked", "avx512", "avx512-blocked", "avx512-bf16x"};

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: quant_harness FOLDER\n");
        return 2;
    }
    const std::string dir = argv[1];
    const bool avx2 = fc::bitmap_cpu_isa_supported(fc::kAvx2);
    const bool avx512 = fc::bitmap_cpu_isa_supported(fc::kAvx512);
    std::printf("paths: scalar%s%s\n", avx2 ? " avx2" : "", avx512 ? " avx512" : "");
    std::ifstream manifest(dir + "/manifest.txt");
    std::string line;
    int passed = 0, failed = 0;
    uint32_t seed = 1;
    while (std::getline(manifest, line)) {
        std::istringstream fields(line);
        std::string name;
        int64_t m, k, groups, group_size, quant;
        if (!(fields >> name >> m >> k >> groups >> group_size >> quant)) continue;
        const std::string base = dir + "/" + name;
        int64_t nmasks, nvalues, noffsets, nscales, ndense;
        uint64_t* masks = read_exact<uint64_t>(base + ".masks", nmasks);
        uint8_t* values = read_exact<uint8_t>(base + ".values", nvalues);
        int32_t* offsets = read_exact<int32_t>(base + ".offsets", noffsets);
        float* scales = read_exact<float>(base + ".scales", nscales);
        double* dense = read_exact<double>(base + ".dense", ndense);
        if (nscales != m * groups || ndense != m * k) {
            std::printf("FAIL %s: file sizes do not match the manifest\n", name.c_str());
            ++failed;
            continue;
        }
        const fc::QuantBitmapWeight w{masks, values, offsets, scales, nvalues, m, k, groups, group_size,
                                      quant ? fc::QuantType::Fp8E4M3 : fc::QuantType::Int8};
        const int64_t kp = (k + 63) / 64 * 64, tile_rows = (m + 63) / 64;
        for (int64_t n : {1, 3, 8, 11}) {
            // x zero-padded to kp columns (the glue's contract), values exact in bf16 (8 bits)
            float* x = static_cast<float*>(std::malloc(n * kp * 4));
            uint16_t* xb = static_cast<uint16_t*>(std::malloc(n * kp * 2));
            for (int64_t i = 0; i < n * kp; ++i) {
                seed = seed * 1664525u + 1013904223u;
                const float v = i % kp < k ? static_cast<float>(static_cast<int>(seed >> 24) - 128) / 64.0f : 0.0f;
                x[i] = v;
                xb[i] = to_bf16(v);
            }
            std::vector<double> ref(n * m);
            for (int64_t i = 0; i < n; ++i)
                for (int64_t r = 0; r < m; ++r) {
                    double s = 0;
                    for (int64_t c = 0; c < k; ++c) s += dense[r * k + c] * x[i * kp + c];
                    ref[i * m + r] = s;
                }
            std::vector<Entry> entries = {kScalar};
            if (avx2) entries.push_back(kAvx2Blocked);
            if (avx2 && n <= fc::kQuantMaxRows) entries.push_back(kAvx2);
            if (avx512) entries.push_back(kAvx512Blocked);
            if (avx512 && n <= fc::kQuantMaxRows) entries.push_back(kAvx512);
            if (avx512 && n == 1) entries.push_back(kAvx512Bf16x);
            for (Entry e : entries) {
                if (e == kScalar && n > fc::kQuantMaxRows) continue;
                float* y = static_cast<float*>(std::malloc(n * m * 4));
                for (int64_t i = 0; i < n * m; ++i) y[i] = NAN;
                void* scratch = std::malloc(fc::quant_blocked_scratch_bytes(n));
                switch (e) {
                    case kScalar: fc::quant_spmm_scalar(w, x, n, kp, nullptr, y, m, 0, tile_rows); break;
                    case kAvx2: fc::quant_spmm_avx2(w, x, n, kp, nullptr, y, m, 0, tile_rows); break;
                    case kAvx2Blocked:
                        fc::quant_spmm_blocked_avx2(w, x, n, kp, nullptr, y, m, 0, tile_rows, scratch);
                        break;
                    case kAvx512: fc::quant_spmm_avx512(w, x, n, kp, nullptr, y, m, 0, tile_rows); break;
                    case kAvx512Blocked:
                        fc::quant_spmm_blocked_avx512(w, x, n, kp, nullptr, y, m, 0, tile_rows, scratch);
                        break;
                    case kAvx512Bf16x: fc::quant_spmm_n1_bf16x_avx512(w, x, xb, nullptr, y, 0, tile_rows); break;
                }
                const double err = rel_err(y, ref);  // fp32 accumulation of exact products
                if (err < 1e-5) {
                    ++passed;
                } else {
                    std::printf("FAIL %s %s n=%lld: relative error %.3g\n", name.c_str(), kNames[e],
                                static_cast<long long>(n), err);
                    ++failed;
                }
                std::free(y);
                std::free(scratch);
            }
            std::free(x);
            std::free(xb);
        }
        using Decode = void (*)(const fc::QuantBitmapWeight&, float*, int64_t, int64_t, int64_t);
        std::vector<std::pair<const char*, Decode>> decodes = {{"scalar", fc::quant_decode_scalar}};
        if (avx2) decodes.push_back({"avx2", fc::quant_decode_avx2});
        if (avx512) decodes.push_back({"avx512", fc::quant_decode_avx512});
        for (const auto& d : decodes) {
            float* out = static_cast<float*>(std::malloc(m * k * 4 > 0 ? m * k * 4 : 1));
            d.second(w, out, k, 0, tile_rows);
            int64_t bad = -1;
            for (int64_t i = 0; i < m * k && bad < 0; ++i)
                if (out[i] != static_cast<float>(dense[i])) bad = i;
            if (bad < 0) {
                ++passed;
            } else {
                std::printf("FAIL %s decode %s: element %lld differs\n", name.c_str(), d.first, static_cast<long long>(bad));
                ++failed;
            }
            std::free(out);
        }
        std::free(masks);
        std::free(values);
        std::free(offsets);
        std::free(scales);
        std::free(dense);
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
