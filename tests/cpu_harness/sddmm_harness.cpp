// Torch-free check of the CPU weight-gradient kernels (sddmm_scalar / _avx2 / _avx512, fp32 and
// the AVX-512 bf16 operands) against float64 dot products, on random masks over odd shapes:
// every stored position of a tile (rows and columns past m and k hold none), padding slots 0.
// Every buffer is a heap block of exactly its size, so that built with -fsanitize=address a read
// past one is reported where it happens; outputs are NaN before the kernels write them. Row
// strides are wider than the elements the kernels read, as the glue makes them.
//
// Prints one line per failing check, then "N passed, N failed"; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/bitmap_cpu.h"
#include "cpu/bitmap_sddmm_cpu.h"

namespace fc = flashsparse::cpu;

namespace {

uint32_t state = 7;
uint32_t next_random() {
    state = state * 1664525u + 1013904223u;
    return state >> 8;
}

float small_value() { return static_cast<float>(static_cast<int>(next_random() % 255) - 127) / 64.0f; }  // exact in bf16

uint16_t to_bf16(float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return static_cast<uint16_t>(u >> 16);
}

// rows x ld elements (fp32 or bf16), zero past n; also the values as doubles [rows][n].
void* operand(int64_t rows, int64_t n, int64_t ld, bool bf16, std::vector<double>& ref) {
    ref.assign(rows * n, 0.0);
    char* p = static_cast<char*>(std::malloc(rows * ld * (bf16 ? 2 : 4) + 1));
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < ld; ++j) {
            const float v = j < n ? small_value() : 0.0f;
            if (j < n) ref[i * n + j] = v;
            if (bf16)
                reinterpret_cast<uint16_t*>(p)[i * ld + j] = to_bf16(v);
            else
                reinterpret_cast<float*>(p)[i * ld + j] = v;
        }
    return p;
}

}  // namespace

int main() {
    const bool avx2 = fc::bitmap_cpu_isa_supported(fc::kAvx2);
    const bool avx512 = fc::bitmap_cpu_isa_supported(fc::kAvx512);
    std::printf("paths: scalar%s%s\n", avx2 ? " avx2" : "", avx512 ? " avx512" : "");
    int passed = 0, failed = 0;
    for (int64_t m : {1, 65, 130})
        for (int64_t k : {1, 33, 64, 97, 200})
            for (int64_t n : {1, 7, 64, 65, 130})
                for (double density : {0.05, 0.5, 1.0}) {
                    const int64_t mt = (m + 63) / 64, kt = (k + 63) / 64, tiles = mt * kt;
                    uint64_t* masks = static_cast<uint64_t*>(std::malloc(tiles * 64 * 8));
                    int32_t* offsets = static_cast<int32_t*>(std::malloc((tiles + 1) * 4));
                    std::vector<int64_t> row_of, col_of;  // per packed slot; -1: padding
                    offsets[0] = 0;
                    for (int64_t t = 0; t < tiles; ++t) {
                        const int64_t r0 = t / kt * 64, c0 = t % kt * 64;
                        int64_t count = 0;
                        for (int64_t r = 0; r < 64; ++r) {
                            uint64_t mask = 0;
                            for (int64_t c = 0; c < 64; ++c)
                                if (r0 + r < m && c0 + c < k && next_random() % 1000 < density * 1000) {
                                    mask |= uint64_t{1} << c;
                                    row_of.push_back(r0 + r);
                                    col_of.push_back(c0 + c);
                                    ++count;
                                }
                            masks[t * 64 + r] = mask;
                        }
                        for (; count % 8; ++count) {
                            row_of.push_back(-1);
                            col_of.push_back(-1);
                        }
                        offsets[t + 1] = offsets[t] + static_cast<int32_t>(count / 8);
                    }
                    const int64_t ldn = (n + fc::kSddmmAlign - 1) / fc::kSddmmAlign * fc::kSddmmAlign;
                    const int64_t ld = ldn + 16;
                    const int64_t slots = static_cast<int64_t>(row_of.size());
                    for (bool bf16 : {false, true}) {
                        if (bf16 && !avx512) continue;
                        std::vector<double> g, x;
                        void* gt = operand(m, n, ld, bf16, g);
                        void* xt = operand(k, n, ld, bf16, x);
                        const fc::SddmmProblem p{masks, offsets, m, k, gt, xt, ldn, ld,
                                                 bf16 ? fc::SddmmOperand::BF16 : fc::SddmmOperand::F32};
                        struct Path {
                            const char* name;
                            fc::SddmmFn fn;
                            bool on;
                        };
                        const Path paths[] = {{"scalar", fc::sddmm_scalar, !bf16},
                                              {"avx2", fc::sddmm_avx2, avx2 && !bf16},
                                              {"avx512", fc::sddmm_avx512, avx512}};
                        for (const Path& path : paths) {
                            if (!path.on) continue;
                            float* out = static_cast<float*>(std::malloc((slots ? slots : 1) * 4));
                            for (int64_t s = 0; s < slots; ++s) out[s] = NAN;
                            const bool ok = path.fn(p, out, 0, mt);
                            double num = 0, den = 0;
                            for (int64_t s = 0; s < slots; ++s) {
                                double ref = 0;
                                if (row_of[s] >= 0)
                                    for (int64_t j = 0; j < n; ++j) ref += g[row_of[s] * n + j] * x[col_of[s] * n + j];
                                num += (out[s] - ref) * (out[s] - ref);  // NaN stays NaN
                                den += ref * ref;
                            }
                            const double err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
                            if (ok && err < 1e-5) {
                                ++passed;
                            } else {
                                std::printf("FAIL %s%s m=%lld k=%lld n=%lld density=%.2f: %s, relative error %.3g\n",
                                            path.name, bf16 ? " bf16" : "", static_cast<long long>(m),
                                            static_cast<long long>(k), static_cast<long long>(n), density,
                                            ok ? "ok" : "returned false", err);
                                ++failed;
                            }
                            std::free(out);
                        }
                        std::free(gt);
                        std::free(xt);
                    }
                    std::free(masks);
                    std::free(offsets);
                }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
