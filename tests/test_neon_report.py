"""The roofline reading of bench/neon_report.py (pure arithmetic; the llvm-mca part needs the
cross compiler and is run by hand)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from neon_report import TARGET_RATIO, roofline_max_bandwidth, roofline_ratio

# (sparse cycles, sparse bytes, dense cycles, dense bytes) per row segment.
CASES = [
    (26.18, 84.8, 8.02, 256),  # fp32 70 %: compute-only misses, memory-bound meets
    (13.05, 46.4, 4.69, 128),  # bf16 70 %
    (3.0, 84.8, 8.02, 256),  # compute-only already meets: any bandwidth
    (26.18, 136.0, 8.02, 256),  # 50 %: the byte ratio itself is above the target
]


@pytest.mark.parametrize("case", CASES)
def test_max_bandwidth_is_where_the_ratio_crosses_the_target(case):
    b_max = roofline_max_bandwidth(*case)
    grid = [2.0**e for e in range(-4, 9)]
    ratios = [roofline_ratio(*case, b) for b in grid]
    assert ratios == sorted(ratios), "the ratio must not fall as bandwidth grows"
    if math.isinf(b_max):
        assert all(r <= TARGET_RATIO for r in ratios)
    elif b_max == 0.0:
        assert all(r > TARGET_RATIO for r in ratios)
    else:
        assert roofline_ratio(*case, b_max) == pytest.approx(TARGET_RATIO)
        assert roofline_ratio(*case, b_max * 0.99) <= TARGET_RATIO
        assert roofline_ratio(*case, b_max * 1.01) > TARGET_RATIO


def test_both_memory_bound_gives_the_byte_ratio():
    assert roofline_ratio(26.18, 84.8, 8.02, 256, 0.5) == pytest.approx(84.8 / 256)
