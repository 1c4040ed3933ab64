"""Real linear-layer shapes ``(M, K)`` = ``(out_features, in_features)`` (the benchmark shapes of docs/performance.md).

Fused projections are listed the way inference engines run them: q/k/v as one GEMM, gate and up
as one GEMM. The OPT set is Flash-LLM's (hidden h: qkv 3h x h, out h x h, fc1 4h x h,
fc2 h x 4h).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One weight to benchmark: ``label`` names it in tables (``model:layer`` or ``MxK``)."""

    label: str
    m: int
    k: int


def _opt(name: str, h: int) -> tuple[Shape, ...]:
    return (
        Shape(f"{name}:qkv", 3 * h, h),
        Shape(f"{name}:out", h, h),
        Shape(f"{name}:fc1", 4 * h, h),
        Shape(f"{name}:fc2", h, 4 * h),
    )


def _llama(name: str, qkv: int, hidden: int, gate_up: int, inter: int) -> tuple[Shape, ...]:
    return (
        Shape(f"{name}:qkv", qkv, hidden),
        Shape(f"{name}:o", hidden, hidden),
        Shape(f"{name}:gate_up", gate_up, hidden),
        Shape(f"{name}:down", hidden, inter),
    )


PRESETS: dict[str, tuple[Shape, ...]] = {
    "opt-30b": _opt("opt-30b", 7168),
    "opt-66b": _opt("opt-66b", 9216),
    "opt-175b": _opt("opt-175b", 12288),
    "llama2-7b": _llama("llama2-7b", 12288, 4096, 22016, 11008),
    "llama3-8b": _llama("llama3-8b", 6144, 4096, 28672, 14336),
    "llama2-70b": _llama("llama2-70b", 10240, 8192, 57344, 28672),
    # Small shapes that the CPU reference path times in seconds, not minutes (the CPU default).
    "cpu-small": (Shape("cpu-small:qkv", 1536, 512), Shape("cpu-small:down", 512, 1536)),
    # One odd-sized shape (no tile multiple) for smoke tests (--quick).
    "tiny": (Shape("tiny", 200, 136),),
}

# Shorthands that expand to several presets.
GROUPS: dict[str, tuple[str, ...]] = {
    "opt": ("opt-30b", "opt-66b", "opt-175b"),
    "llama": ("llama2-7b", "llama3-8b", "llama2-70b"),
    "all": ("opt-30b", "opt-66b", "opt-175b", "llama2-7b", "llama3-8b", "llama2-70b"),
}

PRESET_NAMES = (*PRESETS, *GROUPS)


def expand_presets(names: list[str]) -> list[Shape]:
    """Shapes of the named presets/groups in order, without duplicates."""
    out: list[Shape] = []
    for name in names:
        if name in GROUPS:
            shapes = [s for preset in GROUPS[name] for s in PRESETS[preset]]
        elif name in PRESETS:
            shapes = list(PRESETS[name])
        else:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESET_NAMES)}")
        out.extend(s for s in shapes if s not in out)
    return out


def parse_shape(text: str) -> Shape:
    """``"M,K"`` (or ``"MxK"``) with positive integers -> :class:`Shape`."""
    parts = text.replace("x", ",").replace("X", ",").split(",")
    if len(parts) != 2:
        raise ValueError(f"expected M,K (two positive integers, e.g. 4096,11008), got {text!r}")
    try:
        m, k = (int(p.strip()) for p in parts)
    except ValueError:
        raise ValueError(
            f"expected M,K (two positive integers, e.g. 4096,11008), got {text!r}"
        ) from None
    if m <= 0 or k <= 0:
        raise ValueError(f"M and K must be positive integers, got {text!r}")
    return Shape(f"{m}x{k}", m, k)
