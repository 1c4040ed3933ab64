"""Sanitizer steps of ``bench/gpu_check.sh --budget``: ``bench/sanitize_driver.py`` on a handful of
its odd shapes per kernel, so that a sanitizer run fits in about a minute.

    compute-sanitizer --tool memcheck  --error-exitcode 3 python bench/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 3 python bench/gpu_sanitize.py --racecheck

memcheck: Tiled-CSL cases N = 1, forced split-K, N = 300 with K % 8 != 0, an unaligned x with
split-K, 1x1x1 and the widest block tile; bitmap cases N = 1, split-K 4, N = 300 with K % 8 != 0,
unaligned x with split-K, 1x1x1 and split-K 5 on the 32-wide tile (each twice, so the reused
split-K counters are exercised); plus the driver's reused Tiled-CSL workspace, malformed tile
offsets and one ``flashsparse.linear`` call per kernel. racecheck (shared-memory hazards): the
bitmap kernel (mbarriers, split-K counters) on its split-K cases only, plus the same fixed part.
``--all`` runs every case of the driver. Exit status as the driver's (0 clean and correct,
1 a mismatch, 2 the CUDA backend is unavailable); the sanitizer's own ``--error-exitcode``
reports what it found.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

# Indices into sanitize_driver.CASES / BITMAP_CASES (see that file for each case).
MEMCHECK_TILED_CSL = (0, 1, 2, 3, 5, 10)
MEMCHECK_BITMAP = (0, 1, 2, 3, 5, 8)
RACECHECK_TILED_CSL: tuple[int, ...] = ()
RACECHECK_BITMAP = (1, 3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--racecheck", action="store_true", help="the racecheck subset")
    mode.add_argument("--all", action="store_true", help="every case of sanitize_driver.py")
    args = ap.parse_args(argv)

    import sanitize_driver as driver

    if not args.all:
        tiled, bitmap = (
            (RACECHECK_TILED_CSL, RACECHECK_BITMAP)
            if args.racecheck
            else (MEMCHECK_TILED_CSL, MEMCHECK_BITMAP)
        )
        driver.CASES = [driver.CASES[i] for i in tiled]
        driver.BITMAP_CASES = [driver.BITMAP_CASES[i] for i in bitmap]
    print(
        f"gpu_sanitize: {len(driver.CASES)} Tiled-CSL and {len(driver.BITMAP_CASES)} bitmap "
        "cases (x fp16, bf16), plus the driver's fixed checks",
        flush=True,
    )
    return driver.main()


if __name__ == "__main__":
    sys.exit(main())
