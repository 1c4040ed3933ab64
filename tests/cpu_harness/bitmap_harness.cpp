// Torch-free check of every CPU bitmap kernel path this machine runs, against a float64
// reference: scalar plus AVX2/AVX-512 on x86, scalar plus every NEON variant (rebuild and
// gather forms, BFDOT/FMLAL where the CPU has them, the convert code always) on aarch64, where it
// also runs under qemu-user with CPU models that have or lack FEAT_FP16/FHM/BF16 (and on x86
// under qemu-x86_64 with CPU models from before AVX to AVX2-only Zen 3). Built and run by
// tests/test_bitmap_cpu_harness.py from the same sources the extension compiles.
//
//   bitmap_harness [--expect fp16=1,fhm=1,bf16=0 | --expect avx2=1,avx512=0] [--quick]
// --expect: the features the detection must find (aarch64: NEON extensions; x86: the paths);
// --quick: the smaller shapes only.
//
// Prints one line per path and dtype, then "N passed, N failed"; exits 1 on any failure.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "cpu/bitmap_cpu.h"
#if defined(__aarch64__)
#include "cpu/bitmap_neon.h"
#endif

namespace fc = flashsparse::cpu;

namespace {

uint64_t rng_state = 0x9e3779b97f4a7c15ull;
uint64_t next_u64() {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
double uniform() { return (next_u64() >> 11) * (1.0 / 9007199254740992.0); }

float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
uint32_t float_to_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
uint16_t to_bf16(float f) {  // round to nearest even (finite and Inf inputs; NaN kept quiet)
    const uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }
float fp16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        const float f = static_cast<float>(man) * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
uint16_t to_fp16(float f) {  // nearest of all fp16 values by search on the bit pattern (test data only)
    if (std::isnan(f)) return 0x7e00;
    if (std::isinf(f)) return f > 0 ? 0x7c00 : 0xfc00;
    const uint16_t sign = f < 0 ? 0x8000 : 0;
    const float a = std::fabs(f);
    uint16_t lo = 0, hi = 0x7c00;  // largest finite is 0x7bff
    while (hi - lo > 1) {
        const uint16_t mid = static_cast<uint16_t>((lo + hi) / 2);
        (fp16_to_float(mid) <= a ? lo : hi) = mid;
    }
    const float dl = a - fp16_to_float(lo), dh = fp16_to_float(hi) - a;
    const uint16_t pick = (dh < dl || (dh == dl && (hi & 1) == 0)) ? hi : lo;
    return static_cast<uint16_t>(sign | pick);
}

const char* dtype_name(fc::Dtype d) { return d == fc::Dtype::F32 ? "fp32" : d == fc::Dtype::BF16 ? "bf16" : "fp16"; }
double tolerance(fc::Dtype d) { return d == fc::Dtype::F32 ? 1e-5 : d == fc::Dtype::BF16 ? 1e-2 : 2e-3; }

// A weight in one dtype: its dense values as floats (exactly representable) and raw bits.
struct Case {
    std::string name;
    int64_t m, k, n;
    fc::Dtype dtype;
    std::vector<float> w;      // [m][k], in-dtype values
    std::vector<float> x;      // [n][k]
    std::vector<float> bias;   // [m] or empty
    bool nonfinite;            // some weights are Inf / NaN
};

float round_to(fc::Dtype d, float v) {
    if (d == fc::Dtype::BF16) return bf16_to_float(to_bf16(v));
    if (d == fc::Dtype::F16) return fp16_to_float(to_fp16(v));
    return v;
}

float random_value(fc::Dtype d) {
    float v;
    do {
        v = round_to(d, static_cast<float>((uniform() * 2.0 - 1.0) * (0.5 + uniform())));
    } while (v == 0.0f);
    return v;
}

// Mask kinds: uniform density, or skewed (dense rows, empty rows, a dense tile, an empty tile,
// dense columns, rows of varied density).
bool keep(const std::string& kind, int64_t r, int64_t c) {
    if (kind == "dense") return true;
    if (kind == "empty") return false;
    if (kind == "s50") return uniform() >= 0.5;
    if (kind == "s70") return uniform() >= 0.7;
    if (kind == "s90") return uniform() >= 0.9;
    // skewed
    if (r < 64 && c < 64) return true;                 // a dense tile
    if (r < 64 && c >= 64 && c < 128) return false;    // an empty tile next to it
    if (c % 97 == 5) return true;                      // dense columns
    switch (r % 7) {
        case 0: return true;                           // dense rows
        case 1: return false;                          // empty rows
        case 2: return uniform() >= 0.97;
        case 3: return uniform() >= 0.3;
        default: return uniform() >= 0.8;
    }
}

Case make_case(const std::string& kind, int64_t m, int64_t k, int64_t n, fc::Dtype d, bool bias, bool nonfinite) {
    Case cs{kind, m, k, n, d, std::vector<float>(m * k, 0.0f), std::vector<float>(n * k), {}, nonfinite};
    for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < k; ++c)
            if (keep(kind, r, c)) cs.w[r * k + c] = random_value(d);
    if (nonfinite) {
        const float specials[3] = {INFINITY, -INFINITY, NAN};
        for (int i = 0; i < 3; ++i) {
            int64_t tries = 0;
            while (tries++ < 1000) {
                const int64_t j = static_cast<int64_t>(uniform() * m * k);
                if (cs.w[j] != 0.0f && std::isfinite(cs.w[j])) {
                    cs.w[j] = specials[i];
                    break;
                }
            }
        }
    }
    for (auto& v : cs.x) v = random_value(d);
    if (bias) {
        cs.bias.resize(m);
        for (auto& v : cs.bias) v = random_value(d);
    }
    return cs;
}

// The values end where a page ends, and the next page is unreadable: a load past the last value
// faults (natively and under qemu).
struct Encoded {
    std::vector<uint64_t> masks;
    std::vector<int32_t> offsets;
    uint8_t* values = nullptr;
    void* mapping = nullptr;
    size_t mapped = 0;
    int64_t num_values = 0;
    fc::BitmapWeight w{};
    ~Encoded() {
        if (mapping) munmap(mapping, mapped);
    }
};

uint8_t* guarded_bytes(size_t bytes, Encoded& e) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    e.mapped = (bytes + page - 1) / page * page + page;
    e.mapping = mmap(nullptr, e.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (e.mapping == MAP_FAILED) {
        std::perror("mmap");
        std::exit(2);
    }
    uint8_t* guard = static_cast<uint8_t*>(e.mapping) + e.mapped - page;
    if (mprotect(guard, page, PROT_NONE) != 0) {
        std::perror("mprotect");
        std::exit(2);
    }
    return guard - bytes;
}

// The layout of flashsparse/formats/bitmap.py.
void encode(const Case& cs, Encoded& e) {
    const int64_t mt = (cs.m + 63) / 64, kt = (cs.k + 63) / 64, esize = cs.dtype == fc::Dtype::F32 ? 4 : 2;
    e.masks.assign(mt * kt * 64, 0);
    e.offsets.assign(mt * kt + 1, 0);
    std::vector<float> vals;
    for (int64_t t = 0; t < mt * kt; ++t) {
        const int64_t tr = t / kt, tc = t % kt;
        for (int64_t r = 0; r < 64; ++r)
            for (int64_t c = 0; c < 64; ++c) {
                const int64_t gr = tr * 64 + r, gc = tc * 64 + c;
                if (gr >= cs.m || gc >= cs.k) continue;
                const float v = cs.w[gr * cs.k + gc];
                if (v == 0.0f) continue;
                e.masks[t * 64 + r] |= 1ull << c;
                vals.push_back(v);
            }
        while (vals.size() % 8) vals.push_back(0.0f);
        e.offsets[t + 1] = static_cast<int32_t>(vals.size() / 8);
    }
    e.num_values = static_cast<int64_t>(vals.size());
    e.values = guarded_bytes(e.num_values * esize, e);
    for (int64_t i = 0; i < e.num_values; ++i) {
        if (esize == 4) {
            std::memcpy(e.values + 4 * i, &vals[i], 4);
        } else {
            const uint16_t h = cs.dtype == fc::Dtype::BF16 ? to_bf16(vals[i]) : to_fp16(vals[i]);
            std::memcpy(e.values + 2 * i, &h, 2);
        }
    }
    e.w = fc::BitmapWeight{e.masks.data(), e.values, e.offsets.data(), e.num_values, cs.m, cs.k, cs.dtype};
}

using Spmm = std::function<void(const fc::BitmapWeight&, const void*, int64_t, int64_t, const float*, float*,
                                int64_t, int64_t, int64_t)>;
struct Path {
    std::string name;
    Spmm spmm;
    fc::DecodeFn decode;  // null: same decode as another path
    int isa;
};

// y = x W^T + bias through a path, the way bitmap_cpu.cpp calls it: x zero-padded to whole
// tiles (bf16 bits where the ISA wants them), groups of kMaxSpmmRows rows of x, tile rows split
// into uneven ranges (the threads of at::parallel_for).
std::vector<float> run_spmm(const Path& p, const Case& cs, const Encoded& e) {
    const int64_t kp = ((cs.k + 63) / 64) * 64, mt = (cs.m + 63) / 64;
    const bool bf16_x = fc::bitmap_x_is_bf16(p.isa, cs.dtype);
    std::vector<float> xf(cs.n * kp, 0.0f);
    std::vector<uint16_t> xh(cs.n * kp, 0);
    for (int64_t i = 0; i < cs.n; ++i)
        for (int64_t c = 0; c < cs.k; ++c) {
            xf[i * kp + c] = cs.x[i * cs.k + c];
            xh[i * kp + c] = to_bf16(cs.x[i * cs.k + c]);
        }
    std::vector<float> y(cs.n * cs.m, NAN);  // poisoned
    const float* bias = cs.bias.empty() ? nullptr : cs.bias.data();
    const int64_t cuts[3] = {0, mt > 2 ? mt / 3 : 0, mt};
    for (int s = 0; s < 2; ++s) {
        if (cuts[s] == cuts[s + 1]) continue;
        for (int64_t i = 0; i < cs.n; i += fc::kMaxSpmmRows) {
            const int64_t rows = cs.n - i < fc::kMaxSpmmRows ? cs.n - i : fc::kMaxSpmmRows;
            const void* xi = bf16_x ? static_cast<const void*>(xh.data() + i * kp)
                                    : static_cast<const void*>(xf.data() + i * kp);
            p.spmm(e.w, xi, rows, kp, bias, y.data() + i * cs.m, cs.m, cuts[s], cuts[s + 1]);
        }
    }
    return y;
}

struct Tally {
    int cases = 0, failed = 0;
    double worst = 0.0;
};

// Relative Frobenius error over the finite reference entries; non-finite ones must match in
// kind (NaN, +Inf, -Inf) as F.linear gives them.
std::vector<double> reference(const Case& cs) {
    std::vector<double> ref(cs.n * cs.m);
    for (int64_t i = 0; i < cs.n; ++i)
        for (int64_t r = 0; r < cs.m; ++r) {
            double acc = cs.bias.empty() ? 0.0 : cs.bias[r];
            for (int64_t c = 0; c < cs.k; ++c)
                acc += static_cast<double>(cs.w[r * cs.k + c]) * static_cast<double>(cs.x[i * cs.k + c]);
            ref[i * cs.m + r] = acc;
        }
    return ref;
}

bool check(const Case& cs, const std::vector<double>& refs, const std::vector<float>& y, double& err,
           std::string& why) {
    double num = 0.0, den = 0.0;
    for (int64_t i = 0; i < cs.n; ++i)
        for (int64_t r = 0; r < cs.m; ++r) {
            const double ref = refs[i * cs.m + r];
            const double got = y[i * cs.m + r];
            if (!std::isfinite(ref) || !std::isfinite(got)) {
                const bool same = (std::isnan(ref) && std::isnan(got)) || (std::isinf(ref) && got == ref);
                if (!same) {
                    char buf[160];
                    std::snprintf(buf, sizeof buf, "y[%lld][%lld] = %g, reference %g", static_cast<long long>(i),
                                  static_cast<long long>(r), got, ref);
                    why = buf;
                    return false;
                }
                continue;
            }
            num += (got - ref) * (got - ref);
            den += ref * ref;
        }
    err = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
    if (!(err < tolerance(cs.dtype))) {
        char buf[120];
        std::snprintf(buf, sizeof buf, "relative error %.3g >= %.0e", err, tolerance(cs.dtype));
        why = buf;
        return false;
    }
    return true;
}

bool check_decode(fc::DecodeFn decode, const Case& cs, const Encoded& e, std::string& why) {
    const int64_t esize = cs.dtype == fc::Dtype::F32 ? 4 : 2, mt = (cs.m + 63) / 64;
    std::vector<uint8_t> out(cs.m * cs.k * esize, 0xa5);
    const int64_t cut = mt / 2;
    decode(e.w, out.data(), cs.k, 0, cut);
    decode(e.w, out.data() + cut * 64 * cs.k * esize, cs.k, cut, mt);
    for (int64_t j = 0; j < cs.m * cs.k; ++j) {
        const float v = cs.w[j];
        uint8_t want[4];
        if (esize == 4) {
            std::memcpy(want, &v, 4);
        } else {
            const uint16_t h = v == 0.0f ? 0 : cs.dtype == fc::Dtype::BF16 ? to_bf16(v) : to_fp16(v);
            std::memcpy(want, &h, 2);
        }
        if (std::memcmp(want, out.data() + j * esize, esize) != 0) {
            why = "decode differs at element " + std::to_string(j);
            return false;
        }
    }
    return true;
}

// The paths for one dtype: each ISA's entry point, and on aarch64 every NEON variant that
// changes the code this dtype runs (the form, and BFDOT / FMLAL against the convert code).
std::vector<Path> paths(fc::Dtype d) {
    std::vector<Path> out;
    out.push_back({"scalar", fc::spmm_scalar, fc::decode_scalar, fc::kScalar});
#if defined(__x86_64__) || defined(__i386__)
    if (fc::bitmap_cpu_isa_supported(fc::kAvx2)) out.push_back({"avx2", fc::spmm_avx2, fc::decode_avx2, fc::kAvx2});
    if (fc::bitmap_cpu_isa_supported(fc::kAvx512))
        out.push_back({"avx512", fc::spmm_avx512, fc::decode_avx512, fc::kAvx512});
#endif
#if defined(__aarch64__)
    const fc::NeonFeatures f = fc::bitmap_neon_features();
    out.push_back({"neon", fc::spmm_neon, fc::decode_neon, fc::kNeon});
    const bool has = d == fc::Dtype::BF16 ? f.bf16 : d == fc::Dtype::F16 ? f.fhm : false;
    const char* fast = d == fc::Dtype::BF16 ? "+bfdot" : "+fmlal";
    for (int form : {fc::kNeonFormRebuild, fc::kNeonFormGather})
        for (int use = 0; use <= (has ? 1 : 0); ++use) {
            std::string name = std::string("neon/") + (form == fc::kNeonFormRebuild ? "rebuild" : "gather");
            if (d != fc::Dtype::F32) name += use ? fast : "+convert";
            Spmm fn = [=](const fc::BitmapWeight& w, const void* x, int64_t n, int64_t ldx, const float* b, float* y,
                          int64_t ldy, int64_t tr0, int64_t tr1) {
                fc::spmm_neon_variant(use != 0, use != 0, form, w, x, n, ldx, b, y, ldy, tr0, tr1);
            };
            out.push_back({name, fn, nullptr, fc::kNeon});
        }
#else
    (void)d;
#endif
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    int passed = 0, failed = 0;
    char got[64] = "";
#if defined(__aarch64__)
    const fc::NeonFeatures f = fc::bitmap_neon_features();
    std::snprintf(got, sizeof got, "fp16=%d,fhm=%d,bf16=%d", f.fp16, f.fhm, f.bf16);
    std::printf("aarch64 features: %s\n", got);
#elif defined(__x86_64__) || defined(__i386__)
    std::snprintf(got, sizeof got, "avx2=%d,avx512=%d", fc::bitmap_cpu_isa_supported(fc::kAvx2) ? 1 : 0,
                  fc::bitmap_cpu_isa_supported(fc::kAvx512) ? 1 : 0);
    std::printf("x86 paths: %s\n", got);
#endif
    for (int a = 1; a + 1 < argc; ++a) {
        if (std::strcmp(argv[a], "--expect") != 0) continue;
        const std::string want = argv[a + 1];
        if (want == got) {
            ++passed;
        } else {
            std::printf("FAIL feature detection: expected %s, got %s\n", want.c_str(), got);
            ++failed;
        }
    }
    struct Shape {
        int64_t m, k, n;
    };
    // 1, odd sizes, partial tiles both ways, n past kMaxSpmmRows, and n = 1 (decode step) with
    // enough tile rows (1600: a range of 17) for spmm_neon to pick the gather form by itself.
    const Shape shapes[] = {{1, 1, 1},    {1, 70, 1},    {70, 130, 1},   {131, 197, 3}, {64, 64, 2},
                            {65, 127, 8}, {100, 150, 9}, {300, 200, 1},  {520, 330, 1}, {130, 1100, 1},
                            {97, 200, 5},  {1600, 130, 1}};
    bool quick = false;
    for (int a = 1; a < argc; ++a) quick |= std::strcmp(argv[a], "--quick") == 0;
    const size_t shape_count = quick ? 6 : sizeof(shapes) / sizeof(shapes[0]);
    const char* kinds[] = {"s50", "s70", "s90", "dense", "empty", "skewed"};
    const fc::Dtype dtypes[] = {fc::Dtype::F32, fc::Dtype::BF16, fc::Dtype::F16};
    for (fc::Dtype d : dtypes) {
        const std::vector<Path> all = paths(d);
        std::vector<Tally> tally(all.size());
        std::vector<std::string> first_failure(all.size());
        int variant = 0;
        for (size_t si = 0; si < shape_count; ++si) {
            const Shape& s = shapes[si];
            for (const char* kind : kinds) {
                ++variant;
                const bool nonfinite = variant % 5 == 0 && std::string(kind) != "empty";
                const Case cs = make_case(kind, s.m, s.k, s.n, d, variant % 2 == 0, nonfinite);
                Encoded e;
                encode(cs, e);
                const std::vector<double> refs = reference(cs);
                for (size_t p = 0; p < all.size(); ++p) {
                    double err = 0.0;
                    std::string why;
                    bool ok = check(cs, refs, run_spmm(all[p], cs, e), err, why);
                    if (ok && all[p].decode) ok = check_decode(all[p].decode, cs, e, why);
                    ++tally[p].cases;
                    if (err > tally[p].worst) tally[p].worst = err;
                    if (!ok) {
                        ++tally[p].failed;
                        if (first_failure[p].empty()) {
                            char buf[160];
                            std::snprintf(buf, sizeof buf, " (first: %s %lldx%lld n=%lld%s: ", kind,
                                          static_cast<long long>(s.m), static_cast<long long>(s.k),
                                          static_cast<long long>(s.n), nonfinite ? " inf/nan" : "");
                            first_failure[p] = buf + why + ")";
                        }
                    }
                }
            }
        }
        for (size_t p = 0; p < all.size(); ++p) {
            const bool ok = tally[p].failed == 0;
            std::printf("%s %-22s %s: %d cases, %d failed, worst relative error %.2e (tolerance %.0e)%s\n",
                        ok ? "PASS" : "FAIL", all[p].name.c_str(), dtype_name(d), tally[p].cases, tally[p].failed,
                        tally[p].worst, tolerance(d), first_failure[p].c_str());
            (ok ? passed : failed) += 1;
        }
    }
    std::printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
