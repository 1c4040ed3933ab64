#!/usr/bin/env bash
# Everything a lent GPU machine should do, in one call (docs/gpu_runbook.md).
#
#   bash bench/gpu_check.sh --budget [OUTDIR]              # at most 9 minutes, most important first
#   bash bench/gpu_check.sh --rerun SUMMARY.json [OUTDIR]  # at most 4 minutes: only what failed
#   bash bench/gpu_check.sh [--steps a,b] [OUTDIR]         # the full checks (about 25 minutes)
#   bash bench/gpu_check.sh --budget --dry-run             # the plan: steps, limits, commands
#
# OUTDIR defaults to $OUT (the device machine's return folder), else ./gpu_check_out. The steps,
# their limits and what comes back are described in bench/gpu_check.py (`--help`), which runs
# them with the standard library alone, so that it starts even where torch is broken.
cd "$(dirname "$0")/.." || exit 2
runner=${GPU_CHECK_RUNNER:-$(command -v python3 || command -v python)}
if [ -z "$runner" ]; then
    echo "gpu_check: no python3 on PATH (set GPU_CHECK_RUNNER)" >&2
    exit 2
fi
exec "$runner" bench/gpu_check.py "$@"
