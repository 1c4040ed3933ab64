"""Static kernel report: GPU speed from the compiled machine code, without a GPU.

    python bench/kernel_report.py [--json PATH] [--kernels a,b] [--no-plans] [--gpu h100|h200]

The entry point CI and the GPU run script call; the report itself lives in the package
``bench/sass_report/`` (its docstring describes what is counted and how).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
for path in (BENCH, BENCH.parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from sass_report.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
