"""Pruned benchmark weights: a uniform random mask, or a row-skewed one shaped like the masks
Wanda/SparseGPT produce on real LLMs (per-row rates spread around the target, a few outlier
input columns kept dense), and 2:4 pruning for the semi-structured baseline."""

from __future__ import annotations

import torch

MASKS = ("uniform", "row-skewed")

# Fraction of input columns kept dense by the row-skewed mask (outlier features) and the
# standard deviation of its per-row sparsity around the target.
OUTLIER_COLUMNS = 0.01
ROW_SPREAD = 0.08

# Rows generated per step so that float32 temporaries stay near 64 Mi elements.
_CHUNK_ELEMENTS = 1 << 26


def make_weight(
    m: int,
    k: int,
    sparsity: float,
    dtype: torch.dtype,
    device: torch.device | str,
    mask: str = "uniform",
    *,
    seed: int = 0,
) -> torch.Tensor:
    """A ``[m, k]`` weight with N(0, 1) nonzeros and about ``sparsity`` zeros laid out by ``mask``.

    ``uniform``: every element is zero with probability ``sparsity``.
    ``row-skewed``: ``max(1, 1 %)`` of the columns stay dense; row ``i`` zeroes its
    ``round(r_i * (other columns))`` smallest-magnitude entries, ``r_i`` drawn from
    N(target', 0.08) clipped to [0, 1], target' chosen so the mean matches ``sparsity``.
    """
    if mask not in MASKS:
        raise ValueError(f"mask must be one of {', '.join(MASKS)}; got {mask!r}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(m, k, dtype=dtype, device=device)
    outliers = rates = None
    if mask == "row-skewed":
        n_out = max(1, round(OUTLIER_COLUMNS * k)) if k > 1 else 0
        perm = torch.randperm(k, generator=gen, device=device)
        outliers = torch.zeros(k, dtype=torch.bool, device=device)
        outliers[perm[:n_out]] = True
        target = min(1.0, sparsity * k / (k - n_out)) if k > n_out else 0.0
        rates = (target + ROW_SPREAD * torch.randn(m, generator=gen, device=device)).clamp(0, 1)
        counts = (rates * (k - n_out)).round().long()
    rows = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        w = torch.randn(stop - start, k, generator=gen, device=device)
        if mask == "uniform":
            keep = torch.rand(stop - start, k, generator=gen, device=device) >= sparsity
        else:
            # Rank each entry by |w| within its row, outliers last, and keep the top of the row.
            score = w.abs().masked_fill(outliers, float("inf"))
            rank = score.argsort(dim=1).argsort(dim=1)
            keep = rank >= counts[start:stop, None]
        out[start:stop] = torch.where(keep, w, 0.0).to(dtype)  # +0.0, never -0.0
    return out


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the two smallest-magnitude entries of every 4 consecutive along K zeroed."""
    m, k = w.shape
    if k % 4:
        raise ValueError(f"2:4 pruning needs K divisible by 4, got K={k}")
    groups = w.reshape(m, k // 4, 4)
    drop = groups.abs().float().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, drop, 0).reshape(m, k)
