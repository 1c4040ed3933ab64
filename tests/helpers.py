"""Test data: pruned weights with uniform and deliberately skewed masks."""

from __future__ import annotations

import torch

MASK_KINDS = ("uniform", "dense_rows", "dense_tiles", "dense_column", "empty_tiles", "row_skewed")


def random_weight(
    m: int,
    k: int,
    sparsity: float,
    dtype: torch.dtype = torch.float32,
    kind: str = "uniform",
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """A random ``[m, k]`` weight with about ``sparsity`` zeros, laid out as ``kind`` says.

    Skewed kinds mimic real pruned masks: some rows or whole 64x64/128x64 tiles fully dense,
    others empty, outlier columns kept dense, per-row rates drawn around the target.
    """
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, k, generator=g) + 0.1  # never exactly zero in practice
    u = torch.rand(m, k, generator=g)
    if kind == "uniform":
        keep = u >= sparsity
    elif kind == "dense_rows":
        keep = u >= sparsity
        keep[:: max(1, m // 5)] = True
    elif kind == "dense_tiles":
        keep = u >= sparsity
        keep[: min(m, 128), : min(k, 64)] = True  # one fully dense tile of either format
    elif kind == "dense_column":
        keep = u >= sparsity
        keep[:, k // 2] = True
    elif kind == "empty_tiles":
        keep = u >= sparsity
        keep[: min(m, 64), :] = False
        keep[:, : min(k, 64)] = False
    elif kind == "row_skewed":
        rates = (sparsity + 0.3 * (torch.rand(m, 1, generator=g) - 0.5)).clamp(0, 1)
        keep = u >= rates
        keep[:, torch.randperm(k, generator=g)[: max(1, k // 50)]] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return (w * keep).to(dtype=dtype, device=device)


def check_exact(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """An emulated kernel's output: fp32 accumulation of exact 16-bit products, so every
    output is within 1e-5 of its magnitude scale of the float64 reference."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    if bias is not None:
        ref = ref + bias.double()
        scale = scale + bias.double().abs()
    assert torch.isfinite(y).all(), "NaN/Inf in the emulated output (a poisoned byte was selected)"
    bad = (y.double() - ref).abs() > 1e-5 * scale + 1e-30
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} outputs wrong, first at {bad.nonzero()[0].tolist()}"
    )


def linear_problem(
    m: int, k: int, n: int, sparsity: float, kind: str, dtype: torch.dtype, seed: int
):
    """``(w, x, bias)`` for one kernel test: a pruned weight of ``kind`` and random x and bias."""
    w = random_weight(m, k, sparsity, dtype, kind, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(m, generator=g).to(dtype)
    return w, x, bias
