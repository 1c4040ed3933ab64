#!/usr/bin/env bash
# Compile every torch-free CUDA source in csrc/kernels/ with plain nvcc for sm_80, sm_86 and sm_90a,
# failing on any error or warning (host, device or ptxas) and on any register spill; print the
# ptxas resource report (registers, spills, static shared memory) per kernel and arch, and the
# dynamic shared memory of each block-tile configuration.
#
# Usage: .ci/compile_kernels.sh [OUTDIR]
#   OUTDIR receives report.tsv (arch, kernel, registers, spill stores, spill loads, static smem),
#   summary.txt and the nvcc logs.
# A passing result is cached per hash of (this script, csrc/kernels/*, nvcc version, archs), so
# running it again (the test suite runs it too) costs nothing; failures are never cached.
# Env: NVCC (default nvcc), FLASHSPARSE_CI_ARCHS (default "80 86 90a"), JOBS (default nproc),
#      FLASHSPARSE_KERNEL_CACHE (cache root), FLASHSPARSE_NO_KERNEL_CACHE=1 (always compile).
# Exit: 0 ok (or nvcc absent: skipped with a message), 1 compile error, warning or spill.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
    echo "compile_kernels: nvcc not found; skipping the CUDA kernel compile check"
    exit 0
fi
ARCHS=${FLASHSPARSE_CI_ARCHS:-"80 86 90a"}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
DEST=${1:-}

shopt -s nullglob
SOURCES=()
for src in csrc/kernels/*.cu; do
    # The host emulator (a test tool, plain C++) is built separately below.
    case "$src" in *_emulator.cu) ;; *) SOURCES+=("$src") ;; esac
done
if [ ${#SOURCES[@]} -eq 0 ]; then
    echo "compile_kernels: no csrc/kernels/*.cu to compile"
    exit 0
fi

# The flags torch's extension build adds (half/bf16 operators off), so the CI check and the
# real build see the same code; warnings are errors everywhere; spills are warnings.
FLAGS=(-std=c++17 -O3 -c -Xptxas -v -Xptxas -warn-spills -Xptxas -Werror -Werror all-warnings
       -Xcompiler -Wall,-Wextra,-Werror
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)

hash=$({ cat "$0" csrc/kernels/*; "$NVCC" --version; echo "$ARCHS ${FLAGS[*]}"; } | sha256sum | cut -c1-16)
CACHE_ROOT=${FLASHSPARSE_KERNEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flashsparse/compile_kernels}
WORK="$CACHE_ROOT/$hash"

finish() {  # copy the results to OUTDIR
    if [ -n "$DEST" ]; then
        mkdir -p "$DEST"
        cp "$WORK"/report.tsv "$WORK"/summary.txt "$DEST"/ 2>/dev/null || true
        cp "$WORK"/*.log "$DEST"/ 2>/dev/null || true
    fi
}

if [ -f "$WORK/passed" ] && [ -z "${FLASHSPARSE_NO_KERNEL_CACHE:-}" ]; then
    echo "compile_kernels: cached result for these sources, flags and nvcc ($WORK)"
    cat "$WORK/summary.txt"
    finish
    exit 0
fi
rm -rf "$WORK"
mkdir -p "$WORK"
"$NVCC" --version | tail -1

compile_one() {  # source arch
    local src=$1 arch=$2 base
    base=$(basename "$src" .cu)
    if "$NVCC" "${FLAGS[@]}" "-gencode=arch=compute_${arch},code=sm_${arch}" "$src" \
        -o "$WORK/${base}.sm_${arch}.o" >"$WORK/${base}.sm_${arch}.log" 2>&1; then
        echo ok >"$WORK/${base}.sm_${arch}.status"
    else
        echo failed >"$WORK/${base}.sm_${arch}.status"
    fi
}

build_emulator() {  # host program; prints the dynamic shared memory table
    local cxx
    cxx=$(command -v g++ || command -v c++ || true)
    if [ -n "$cxx" ]; then
        "$cxx" -std=c++17 -O1 -Wall -Wextra -Werror -x c++ csrc/kernels/tiled_csl_emulator.cu \
            -o "$WORK/tiled_csl_emulator" >"$WORK/emulator_build.log" 2>&1
    else
        "$NVCC" -std=c++17 -O1 csrc/kernels/tiled_csl_emulator.cu -o "$WORK/tiled_csl_emulator" \
            >"$WORK/emulator_build.log" 2>&1
    fi
}

# One job per (source, arch), JOBS at a time.
running=0
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        compile_one "$src" "$arch" &
        running=$((running + 1))
        if [ "$running" -ge "$JOBS" ]; then
            wait -n
            running=$((running - 1))
        fi
    done
done
emulator_ok=1
build_emulator || emulator_ok=0
wait

status=0
demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }
: >"$WORK/report.tsv"
{
printf '%-7s %-66s %5s %13s %12s\n' arch kernel regs "spill st/ld" "static smem"
for src in "${SOURCES[@]}"; do
    for arch in $ARCHS; do
        base=$(basename "$src" .cu)
        log="$WORK/${base}.sm_${arch}.log"
        if [ "$(cat "$WORK/${base}.sm_${arch}.status")" != ok ]; then
            echo "FAILED: $src for sm_${arch}:"
            cat "$log"
            status=1
            continue
        fi
        # Anything nvcc printed besides the ptxas -v report is a diagnostic: fail on it.
        if grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame|^$' "$log" >/dev/null; then
            echo "FAILED: unexpected compiler output for $src (sm_${arch}):"
            grep -v -E '^ptxas info|^ +[0-9]+ bytes stack frame|^$' "$log"
            status=1
        fi
        while IFS=$'\t' read -r name regs st ld smem; do
            pretty=$(echo "$name" | demangle | sed -e 's/flashsparse::tcsl:://g' -e 's/^void //' \
                -e 's/(KernelParams)$//' -e 's/(float const\*.*)$//')
            printf 'sm_%s\t%s\t%s\t%s\t%s\t%s\n' "$arch" "$pretty" "$regs" "$st" "$ld" "$smem" >>"$WORK/report.tsv"
            printf '%-7s %-66s %5s %6s/%-6s %10s B\n' "sm_$arch" "$pretty" "$regs" "$st" "$ld" "$smem"
            if [ "$st" != 0 ] || [ "$ld" != 0 ]; then
                echo "FAILED: $pretty spills on sm_$arch ($st bytes stored, $ld bytes loaded)"
                status=1
            fi
        done < <(awk '
            /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes spill stores/ { st = $5; ld = $9 }
            /Used [0-9]+ registers/ {
                regs = $5; smem = 0
                if (match($0, /[0-9]+ bytes smem/)) { split(substr($0, RSTART, RLENGTH), a, " "); smem = a[1] }
                if (name != "") { print name "\t" regs "\t" st "\t" ld "\t" smem; name = "" }
            }' "$log")
    done
done
if [ "$emulator_ok" = 1 ]; then
    echo "dynamic shared memory per block tile:"
    "$WORK/tiled_csl_emulator" --configs
else
    echo "FAILED: building the host emulator:"
    cat "$WORK/emulator_build.log"
    status=1
fi
} | tee "$WORK/summary.txt"
# The pipeline ran in a subshell: recompute the verdict from what it wrote.
if grep -q '^FAILED' "$WORK/summary.txt"; then
    status=1
fi

finish
if [ "$status" -ne 0 ]; then
    echo "compile_kernels: FAILED"
    exit 1
fi
touch "$WORK/passed"
echo "compile_kernels: all kernels compiled for: $ARCHS (no warnings, no spills)"
