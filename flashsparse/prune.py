"""Unstructured pruning of dense weights (to make sparse weights to encode)."""

from __future__ import annotations

import torch

METHODS = ("magnitude", "random")


def prune(
    w: torch.Tensor,
    sparsity: float,
    method: str = "magnitude",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A copy of ``w`` (same shape and dtype) with ``round(sparsity * w.numel())`` entries zeroed.

    ``magnitude`` zeroes the smallest ``|w|`` (ties broken by position, NaN kept as largest);
    ``random`` zeroes a uniformly random subset (pass ``generator`` for reproducibility).
    Entries that are already zero stay zero, so the result may hold more zeros than asked.
    ``sparsity=1.0`` zeroes every entry (allowed, for tests of the edge case, but it warns:
    such a layer computes nothing).
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1], got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if float(sparsity) == 1.0 and w.numel():
        import warnings

        from .notices import FlashsparseWarning

        warnings.warn(
            "prune(w, sparsity=1.0) zeroes every weight: the layer's output will be its bias alone",
            FlashsparseWarning,
            stacklevel=2,
        )
    n_zero = round(float(sparsity) * w.numel())
    flat = w.detach().reshape(-1)
    out = flat.clone()
    if n_zero == 0:
        return out.view(w.shape)
    if method == "random":
        order = torch.randperm(flat.numel(), generator=generator, device="cpu").to(w.device)
        out[order[:n_zero]] = 0
        return out.view(w.shape)
    # The n_zero-th smallest score splits the weights; ties at it go in positional order.
    score = flat.abs().float().nan_to_num(nan=float("inf"))
    threshold = score.kthvalue(n_zero).values
    below = score < threshold
    ties = (score == threshold).nonzero().squeeze(1)
    out[below] = 0
    out[ties[: n_zero - int(below.sum())]] = 0
    return out.view(w.shape)
