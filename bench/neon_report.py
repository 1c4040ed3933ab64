"""Static cost of the aarch64 NEON bitmap kernel (csrc/cpu/bitmap_neon.cpp), without ARM hardware.

A model estimate, not a measurement: the kernel is cross-compiled with the flags the extension
gets on aarch64 (``-O3``, baseline armv8-a, ``-DFLASHSPARSE_NEON_MCA`` adds marked regions) and
``llvm-mca`` predicts the cycles of each region on its Neoverse-V1 and Apple-M1 scheduling
models, next to a dense NEON GEMV compiled the same way. Reported per 64-weight row segment at
n = 1 (the decode step), for 50 / 70 / 90 % sparsity, along the path a uniform random mask takes:
the form and the chunk count the kernel picks for such a tile (gather_chunks in the source), the
hot path only (a row with more values than the chunks hold, or one at the end of the values
buffer, branches off; with a uniform mask that is rare). The x-table the gather builds per
k-tile is amortized over one pass of kGatherBlockTileRows tile rows.

What the model leaves out: memory (DRAM bandwidth, which bounds a dense GEMV on real machines,
and the stores the gather reloads: a load spanning two stores waits for them on real cores),
branch mispredictions, and the frequency. Nothing here ran on ARM hardware.

A second reading adds memory as a roofline, also a model: with b bytes of DRAM bandwidth per
core and cycle, a row segment takes max(llvm-mca cycles, bytes / b), dense and sparse alike.
Rather than assume a b, the report gives the largest b at which the 70 % target still holds
(``roofline_max_bytes_per_cycle``: 0.5 x dense bytes / sparse cycles when the compute-only
ratio misses it) and the ratio at a few values of b. b is what one core gets while all cores
stream: a many-core server part divides its DRAM bandwidth among many cores.

    python bench/neon_report.py            # writes bench/results/neon-mca-<date>.{json,md}

Needs aarch64-linux-gnu-g++ (Debian g++-aarch64-linux-gnu) and llvm-mca (Debian llvm; a newer
llvm-mca-NN is preferred: LLVM 14 has no Neoverse-V1 model of its own).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cpu" / "bitmap_neon.cpp"
RESULTS = ROOT / "bench" / "results"
CROSS_CXX = "aarch64-linux-gnu-g++"
# What the extension's build passes (plus -fopenmp, irrelevant here).
CXXFLAGS = ["-std=c++17", "-O3"]
SPARSITIES = (0.5, 0.7, 0.9)
ITERATIONS = 200
TARGET_RATIO = 0.5
# Bytes per core and cycle at which the roofline ratio is printed.
ROOFLINE_BYTES_PER_CYCLE = (2, 4, 8, 16)


def roofline_ratio(
    cycles: float, nbytes: float, dense_cycles: float, dense_bytes: float, b: float
) -> float:
    """Sparse / dense time per row segment when each is max(compute, bytes / b)."""
    return max(cycles, nbytes / b) / max(dense_cycles, dense_bytes / b)


def roofline_max_bandwidth(
    cycles: float, nbytes: float, dense_cycles: float, dense_bytes: float
) -> float:
    """The largest bytes per core and cycle at which roofline_ratio <= TARGET_RATIO (inf: at
    any; 0: at none). The ratio rises with b from the byte ratio (both memory-bound) to the
    compute ratio, and crosses the target where the sparse side is compute-bound and the dense
    side still memory-bound: cycles / (dense_bytes / b) = TARGET_RATIO."""
    if cycles / dense_cycles <= TARGET_RATIO:
        return math.inf
    if nbytes / dense_bytes > TARGET_RATIO:
        return 0.0
    return TARGET_RATIO * dense_bytes / cycles


# Kernel kinds (enum Kind in bitmap_neon.cpp) and what each model's CPU runs: Neoverse-V1
# (Graviton3) has FEAT_BF16 and FEAT_FHM; Apple M1 has FEAT_FHM but not FEAT_BF16.
KINDS = {"fp32": 0, "bf16-bfdot": 1, "bf16-convert": 2, "fp16-fmlal": 3, "fp16-convert": 4}
MODELS = {
    "neoverse-v1": {"fp32": "fp32", "bf16": "bf16-bfdot", "fp16": "fp16-fmlal"},
    "apple-m1": {"fp32": "fp32", "bf16": "bf16-convert", "fp16": "fp16-fmlal"},
}
VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# A dense NEON GEMV: four weight rows at a time (x loaded once for them), 64 columns per
# region, independent accumulators so that FMA latency does not bind.
DENSE_SOURCE = r"""
#include <arm_neon.h>
#include <cstdint>

static inline float32x4_t bfdot(float32x4_t acc, uint16x8_t a, uint16x8_t b) {
    __asm__(".arch_extension bf16\n\tbfdot %0.4s, %1.8h, %2.8h" : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}
static inline float32x4_t fmlal_both(float32x4_t acc, uint16x8_t a, uint16x8_t b) {
    __asm__(".arch armv8.2-a+fp16fml\n\tfmlal %0.4s, %1.4h, %2.4h\n\tfmlal2 %0.4s, %1.4h, %2.4h"
            : "+w"(acc) : "w"(a), "w"(b));
    return acc;
}

// KIND: 0 fp32, 1 bf16 BFDOT, 2 bf16 widened (SHLL) + FMLA, 3 fp16 FMLAL, 4 fp16 FCVTL + FMLA.
template <int KIND>
__attribute__((noipa)) void dense(const uint8_t* w, int64_t ldw, const uint8_t* x, float32x4_t* acc) {
    float32x4_t a[4][2];
    for (int r = 0; r < 4; ++r) a[r][0] = acc[2 * r], a[r][1] = acc[2 * r + 1];
    __asm__ volatile("// MCA-BEGIN dense %0" ::"i"(KIND));
    if (KIND == 0) {
        const float* xf = reinterpret_cast<const float*>(x);
#pragma GCC unroll 16
        for (int c = 0; c < 64; c += 4) {
            const float32x4_t xv = vld1q_f32(xf + c);
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
                const float* wr = reinterpret_cast<const float*>(w + r * ldw);
                a[r][(c / 4) & 1] = vfmaq_f32(a[r][(c / 4) & 1], vld1q_f32(wr + c), xv);
            }
        }
    } else {
        const uint16_t* xh = reinterpret_cast<const uint16_t*>(x);
        const float* xf = reinterpret_cast<const float*>(x);
#pragma GCC unroll 8
        for (int c = 0; c < 64; c += 8) {
#pragma GCC unroll 4
            for (int r = 0; r < 4; ++r) {
                const uint16x8_t wv = vld1q_u16(reinterpret_cast<const uint16_t*>(w + r * ldw) + c);
                float32x4_t& s = a[r][(c / 8) & 1];
                if (KIND == 1) {
                    s = bfdot(s, wv, vld1q_u16(xh + c));
                } else if (KIND == 3) {
                    s = fmlal_both(s, wv, vld1q_u16(xh + c));
                } else {
                    float32x4_t lo, hi;
                    if (KIND == 2) {
                        lo = vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(wv), 16));
                        hi = vreinterpretq_f32_u32(vshll_high_n_u16(wv, 16));
                    } else {
                        lo = vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(wv)));
                        hi = vcvt_high_f32_f16(vreinterpretq_f16_u16(wv));
                    }
                    s = vfmaq_f32(vfmaq_f32(s, lo, vld1q_f32(xf + c)), hi, vld1q_f32(xf + c + 4));
                }
            }
        }
    }
    __asm__ volatile("// MCA-END" ::: "memory");
    for (int r = 0; r < 4; ++r) acc[2 * r] = a[r][0], acc[2 * r + 1] = a[r][1];
}

template void dense<0>(const uint8_t*, int64_t, const uint8_t*, float32x4_t*);
template void dense<1>(const uint8_t*, int64_t, const uint8_t*, float32x4_t*);
template void dense<2>(const uint8_t*, int64_t, const uint8_t*, float32x4_t*);
template void dense<3>(const uint8_t*, int64_t, const uint8_t*, float32x4_t*);
template void dense<4>(const uint8_t*, int64_t, const uint8_t*, float32x4_t*);
"""


def find_mca() -> str | None:
    for version in range(25, 14, -1):
        for candidate in (f"llvm-mca-{version}", f"/usr/lib/llvm-{version}/bin/llvm-mca"):
            found = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
            if found:
                return found
    return shutil.which("llvm-mca")


def tool_version(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if line.strip()), "?")


def source_constant(name: str) -> int:
    match = re.search(rf"constexpr (?:int|int64_t) {name} = (\d+);", SOURCE.read_text())
    if not match:
        sys.exit(f"neon_report: {name} not found in {SOURCE}")
    return int(match.group(1))


def max_chunks_by_kind() -> dict[int, int]:
    """kGatherMaxChunks<K> of bitmap_neon.cpp, per kind."""
    pattern = r"kGatherMaxChunks = K == kF16Fhm \? (\d+) : K == kF16Cvt \? (\d+) : (\d+);"
    match = re.search(pattern, SOURCE.read_text())
    if not match:
        sys.exit(f"neon_report: kGatherMaxChunks not found in {SOURCE}")
    fhm, f16cvt, other = (int(g) for g in match.groups())
    return {0: other, 1: other, 2: other, 3: fhm, 4: f16cvt}


def gather_chunks(values: int, max_chunks: int) -> int:
    """Mirror of gather_chunks() in bitmap_neon.cpp (0: the tile is rebuilt)."""
    avg = (values + 63) // 64
    room = avg + avg // 4 + 6
    c = (room + 7) // 8
    return 0 if c > max_chunks else c


def tile_values(sparsity: float) -> int:
    """A uniform random mask's values per 64 x 64 tile, padded to a multiple of 8."""
    return math.ceil(4096 * (1.0 - sparsity) / 8.0) * 8


def overfull_rows(sparsity: float, chunks: int) -> float:
    """Share of rows of a uniform mask with more than 8 * chunks values (they branch off)."""
    if chunks == 0:
        return 0.0
    p = 1.0 - sparsity
    return sum(math.comb(64, j) * p**j * (1 - p) ** (64 - j) for j in range(8 * chunks + 1, 65))


def compile_asm(source: Path, out: Path, defines: tuple[str, ...] = ()) -> None:
    cmd = [CROSS_CXX, *CXXFLAGS, *defines, f"-I{ROOT / 'csrc'}", "-S", str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"neon_report: {' '.join(cmd)} failed:\n{done.stderr}")


def regions(asm: str) -> dict[str, list[str]]:
    """Instructions between '// MCA-BEGIN name' and '// MCA-END', without comments, labels and
    directives (the optional extensions are enabled on llvm-mca's command line)."""
    found: dict[str, list[str]] = {}
    name = None
    for line in asm.splitlines():
        text = line.strip()
        if "MCA-BEGIN" in text:
            name = text.split("MCA-BEGIN", 1)[1].strip()
            found[name] = []
        elif "MCA-END" in text:
            name = None
        elif name is not None:
            if not text or text.startswith(("//", "#", ".")) or text.endswith(":"):
                continue
            found[name].append(text)
    return found


def mca(tool: str, cpu: str, body: list[str]) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(body) + "\n")
        path = f.name
    cmd = [
        tool,
        "-mtriple=aarch64",
        f"-mcpu={cpu}",
        "-mattr=+neon,+fullfp16,+fp16fml,+bf16",
        f"-iterations={ITERATIONS}",
        path,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    Path(path).unlink()
    if done.returncode != 0:
        sys.exit(f"neon_report: {' '.join(cmd)} failed:\n{done.stderr}")

    def field(label: str) -> float:
        match = re.search(rf"^{label}:\s+([\d.]+)", done.stdout, re.M)
        return float(match.group(1)) if match else float("nan")

    iterations = field("Iterations")
    return {
        "instructions": field("Instructions") / iterations,
        "cycles": field("Total Cycles") / iterations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown"
    )
    args = parser.parse_args()
    tool = find_mca()
    if shutil.which(CROSS_CXX) is None or tool is None:
        sys.exit(
            "neon_report: needs aarch64-linux-gnu-g++ (apt-get install g++-aarch64-linux-gnu) "
            "and llvm-mca (apt-get install llvm, or llvm-19 for a Neoverse-V1 model)"
        )
    max_chunks = max_chunks_by_kind()
    block_rows = source_constant("kGatherBlockTileRows") * 64
    with tempfile.TemporaryDirectory() as tmp:
        kernel_asm, dense_cpp, dense_asm = Path(tmp) / "k.s", Path(tmp) / "d.cpp", Path(tmp) / "d.s"
        compile_asm(SOURCE, kernel_asm, ("-DFLASHSPARSE_NEON_MCA",))
        dense_cpp.write_text(DENSE_SOURCE)
        compile_asm(dense_cpp, dense_asm)
        found = regions(kernel_asm.read_text())
        found.update(regions(dense_asm.read_text()))

    rows = []
    for cpu, kinds in MODELS.items():
        for dtype, kind_name in kinds.items():
            kind = KINDS[kind_name]
            dense = mca(tool, cpu, found[f"dense {kind}"])
            dense_row = {k: v / 4 for k, v in dense.items()}  # the region is four rows
            xtable = mca(tool, cpu, found[f"xtable {kind}"])
            entry_cycles = xtable["cycles"] / 8  # eight entries per region
            rebuild = {k: v / 4 for k, v in mca(tool, cpu, found[f"rows {kind} 0"]).items()}
            for s in SPARSITIES:
                chunks = gather_chunks(tile_values(s), max_chunks[kind])
                if chunks:
                    hot = {
                        k: v / 4 for k, v in mca(tool, cpu, found[f"rows {kind} {chunks}"]).items()
                    }
                    table = 8 * 256 * entry_cycles / block_rows
                else:
                    hot, table = rebuild, 0.0
                total = hot["cycles"] + table
                vb = VALUE_BYTES[dtype]
                nbytes, dense_bytes = 64 * (1 - s) * vb + 8, 64 * vb
                roof = (total, nbytes, dense_row["cycles"], dense_bytes)
                rows.append(
                    {
                        "model": cpu,
                        "dtype": dtype,
                        "kernel": kind_name,
                        "sparsity": s,
                        "form": f"gather, {chunks} chunks of 8" if chunks else "rebuild",
                        "overfull_row_share": overfull_rows(s, chunks),
                        "instructions_per_row": hot["instructions"],
                        "cycles_per_row_hot": hot["cycles"],
                        "xtable_cycles_per_row": table,
                        "cycles_per_row": total,
                        "rebuild_cycles_per_row": rebuild["cycles"],
                        "dense_instructions_per_row": dense_row["instructions"],
                        "dense_cycles_per_row": dense_row["cycles"],
                        "ratio_to_dense": total / dense_row["cycles"],
                        "bytes_per_row": nbytes,
                        "dense_bytes_per_row": dense_bytes,
                        "roofline_ratio": {
                            str(b): roofline_ratio(*roof, b) for b in ROOFLINE_BYTES_PER_CYCLE
                        },
                        "roofline_max_bytes_per_cycle": roofline_max_bandwidth(*roof),
                    }
                )

    date = dt.datetime.now(dt.timezone.utc)
    meta = {
        "what": "llvm-mca model estimate per 64-weight row segment, n = 1; not a measurement",
        "date_utc": date.isoformat(timespec="minutes"),
        "compiler": tool_version([CROSS_CXX, "--version"]),
        "compile_flags": " ".join(CXXFLAGS),
        "llvm_mca": tool_version([tool, "--version"]) + f" ({tool})",
        "iterations": ITERATIONS,
        "xtable_amortized_over_rows": block_rows,
        "target": "Neoverse-V1, 70 %: cycles per row <= 0.5x dense GEMV, fp32 and bf16",
    }
    v1 = {r["dtype"]: r for r in rows if r["model"] == "neoverse-v1" and r["sparsity"] == 0.7}
    meta["target_met"] = {d: v1[d]["ratio_to_dense"] <= TARGET_RATIO for d in ("fp32", "bf16")}
    meta["roofline_target_holds_up_to_bytes_per_cycle"] = {
        d: v1[d]["roofline_max_bytes_per_cycle"] for d in ("fp32", "bf16")
    }

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"neon-mca-{date:%Y-%m-%d-%H%Mutc}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# NEON bitmap kernel: llvm-mca model estimate (no ARM hardware)",
        "",
        f"{meta['date_utc']}; {meta['compiler']} `{meta['compile_flags']}`; {meta['llvm_mca']}.",
        "Per 64-weight row segment at n = 1 (decode step), the path a uniform random mask takes;",
        "hot path only, x-table build amortized over one pass of "
        f"{block_rows} rows; dense = a NEON GEMV of four rows at a time. Memory, branch",
        "mispredictions and store-to-load forwarding are not modelled. Produced by "
        "bench/neon_report.py.",
        "",
        "| model | dtype | kernel | sparsity | form | instr/row | cycles/row (hot + x-table) "
        "| rebuild cycles/row | dense instr/row | dense cycles/row | ratio to dense | bytes ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['kernel']} | {r['sparsity']:.0%} | {r['form']} "
            f"| {r['instructions_per_row']:.1f} | {r['cycles_per_row']:.2f} "
            f"({r['cycles_per_row_hot']:.2f} + {r['xtable_cycles_per_row']:.2f}) "
            f"| {r['rebuild_cycles_per_row']:.2f} | {r['dense_instructions_per_row']:.1f} "
            f"| {r['dense_cycles_per_row']:.2f} | {r['ratio_to_dense']:.2f} "
            f"| {r['bytes_per_row'] / r['dense_bytes_per_row']:.2f} |"
        )
    met = ", ".join(f"{d}: {'met' if ok else 'NOT met'}" for d, ok in meta["target_met"].items())
    lines += ["", f"Target ({meta['target']}), compute-only model: {met}.", ""]
    bws = ROOFLINE_BYTES_PER_CYCLE
    lines += [
        "## With memory: a roofline reading (a model too)",
        "",
        "Time per row segment = max(the cycles above, bytes / b) for sparse and dense alike, b",
        "= DRAM bytes per core and cycle while every core streams (the bytes: values + the",
        "8-byte row mask; dense: 64 weights). The last column is the largest b at which the",
        "ratio stays <= 0.5 (inf: at any b; 0: at none).",
        "",
        "| model | dtype | sparsity | bytes/row | dense bytes/row | "
        + " | ".join(f"ratio at b = {b}" for b in bws)
        + " | ratio <= 0.5 while b <= |",
        "|---|---|---|---|---|" + "---|" * len(bws) + "---|",
    ]
    for r in rows:
        cells = " | ".join(f"{r['roofline_ratio'][str(b)]:.2f}" for b in bws)
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['sparsity']:.0%} | {r['bytes_per_row']:.1f} "
            f"| {r['dense_bytes_per_row']} | {cells} | {r['roofline_max_bytes_per_cycle']:.2f} |"
        )
    holds = ", ".join(
        f"{d}: b <= {bw:.2f}"
        for d, bw in meta["roofline_target_holds_up_to_bytes_per_cycle"].items()
    )
    lines += [
        "",
        f"Roofline reading of the target (Neoverse-V1, 70 %): the ratio is <= 0.5 while {holds}",
        "bytes per core and cycle; above that the kernel's instructions bound it. Both readings",
        "are models; nothing here ran on ARM hardware.",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
