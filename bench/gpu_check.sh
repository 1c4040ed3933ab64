#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (DESIGN §7): environment info, install,
# JIT build of every CUDA kernel, `pytest -m gpu`, compute-sanitizer (memcheck, racecheck) on
# bench/sanitize_driver.py, the benchmark sweep (Llama-3-8B + OPT-66B, N 1..512, sparsity
# 0.5..0.9, fp16 + bf16, every method and baseline), the static kernel report (predicted
# speed-ups to set next to the measured ones) and the end-to-end decode benchmark.
#
# Usage: bench/gpu_check.sh [--dry-run] [--steps a,b,...] [OUTDIR]
#   OUTDIR defaults to $OUT (the device machine's return folder), else ./gpu_check_out.
#   --dry-run   print every step (name, time limit, command) and exit without running anything.
#   --steps     run only these steps (names as printed by --dry-run), in the usual order.
# Each step runs under `timeout` with its own log; a failing step does not stop the others.
# Only 8 files come back from a device run, so OUTDIR holds exactly these: summary.txt (each
# step's status and time), logs.tar.gz (every step's log, refreshed after each step, so a run
# cut short still returns what it did), bench.json, bench.md, bench.csv, bench.png,
# kernel_report.json, e2e.json. The logs themselves live in $GPU_CHECK_LOGS (default: a
# temporary folder).
# Step limits (seconds) sum to about 25 minutes (the sweep times 40 ms per measurement after a
# 10 ms warm-up, about 2700 measurements); override one with GPU_CHECK_TIMEOUT_<STEP>
# (e.g. GPU_CHECK_TIMEOUT_SWEEP=900). Where one command may run at most 10 minutes, split the
# run with --steps (e.g. "env,install,build,pytest,sanitize" then "sweep" then "report,e2e").
# Exit status: 0 every step passed, 1 some step failed or timed out, 2 bad arguments.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STEPS=""
DEST=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --steps) shift; STEPS=${1:-} ;;
        --steps=*) STEPS=${1#--steps=} ;;
        -h|--help) sed -n '2,/^set /{/^set /!p}' "$0"; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
        *) DEST=$1 ;;
    esac
    shift
done
DEST=${DEST:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python}

ALL_STEPS=(env install build pytest sanitize sweep report e2e)
if [ -n "$STEPS" ]; then
    for s in ${STEPS//,/ }; do
        case " ${ALL_STEPS[*]} " in *" $s "*) ;; *) echo "gpu_check: unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 2 ;; esac
    done
fi

# step name -> default limit (s) and command. Commands run from the repository root.
declare -A LIMIT=([env]=60 [install]=180 [build]=300 [pytest]=300 [sanitize]=240 [sweep]=480 [report]=120 [e2e]=300)
declare -A CMD
CMD[env]="nvidia-smi; nvcc --version; $PY -c 'import sys, torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name(0)); print(\"triton\", triton.__version__)'; git log -1 --oneline || true"
CMD[install]="$PY -m pip install --no-deps --no-build-isolation -e ."
CMD[build]="FLASHSPARSE_VERBOSE_BUILD=1 $PY -c 'from flashsparse.kernels.cuda import bitmap, tiled_csl; r = tiled_csl.available() or bitmap.available(); print(\"CUDA kernels (Tiled-CSL, bitmap):\", r or \"built and self-checked\"); raise SystemExit(1 if r else 0)'"
CMD[pytest]="$PY -m pytest -m gpu -q -p no:cacheprovider"
# compute-sanitizer is often not on PATH: look next to CUDA too.
CS_FIND='cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1); [ -n "$cs" ] || { echo "compute-sanitizer not found"; exit 1; }; echo "using $cs"'
CMD[sanitize]="$CS_FIND; \$cs --tool memcheck --error-exitcode 3 $PY bench/sanitize_driver.py && \$cs --tool racecheck --error-exitcode 3 $PY bench/sanitize_driver.py"
CMD[sweep]="$PY -m flashsparse.cli bench --preset llama3-8b,opt-66b --n 1,8,16,32,128,512 --sparsity 0.5,0.7,0.8,0.9 --dtype fp16,bf16 --format all --backend all --baseline csr,2:4 --warmup-ms 10 --rep-ms 40 --no-progress --json '$DEST/bench.json' --csv '$DEST/bench.csv' --plot '$DEST/bench.png' | tee '$DEST/bench.md'"
CMD[report]="gpu=h100; nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | grep -qi h200 && gpu=h200; $PY bench/kernel_report.py --gpu \$gpu --json '$DEST/kernel_report.json'"
CMD[e2e]="$PY bench/e2e.py --sparsities 0.5,0.7 --batches 1,8,32 --modes eager --fresh --out '$DEST/e2e.json'"

selected() {
    [ -z "$STEPS" ] && return 0
    case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

limit_of() {
    local var="GPU_CHECK_TIMEOUT_${1^^}"
    echo "${!var:-${LIMIT[$1]}}"
}

if [ "$DRY" = 1 ]; then
    echo "gpu_check (dry run): output folder $DEST"
    for s in "${ALL_STEPS[@]}"; do
        selected "$s" || continue
        printf 'step %-9s limit %4ss  log %s.log\n    %s\n' "$s" "$(limit_of "$s")" "$s" "${CMD[$s]}"
    done
    echo "then: $DEST/summary.txt and $DEST/logs.tar.gz"
    exit 0
fi

mkdir -p "$DEST"
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d)/logs}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
: >"$DEST/summary.txt"
failed=0
start_all=$(date +%s)
for s in "${ALL_STEPS[@]}"; do
    selected "$s" || continue
    log="$LOGS/$s.log"
    t0=$(date +%s)
    echo "== $s (limit $(limit_of "$s") s): ${CMD[$s]}" | tee "$log"
    timeout --kill-after=10 "$(limit_of "$s")" bash -c "${CMD[$s]}" >>"$log" 2>&1
    rc=$?
    dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT" ; failed=1 ;;
        *) status="FAILED (exit $rc)" ; failed=1 ;;
    esac
    echo "-- $s: $status in ${dt}s" | tee -a "$log"
    tail -n 5 "$log" | sed 's/^/   | /'
    printf '%-9s %-18s %5ss\n' "$s" "$status" "$dt" >>"$DEST/summary.txt"
    cp "$DEST/summary.txt" "$LOGS/summary.txt"
    tar -czf "$DEST/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null || true
done
printf 'total %ss on %s\n' "$(( $(date +%s) - start_all ))" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$DEST/summary.txt"
cp "$DEST/summary.txt" "$LOGS/summary.txt"
tar -czf "$DEST/logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" 2>/dev/null || true
echo "== summary ($DEST/summary.txt)"
cat "$DEST/summary.txt"
exit $failed
