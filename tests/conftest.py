"""Shared test setup: float64 references, tolerances, GPU skipping, backend switching."""

from __future__ import annotations

import os

import pytest
import torch

# The Triton interpreter must be chosen before triton kernels are defined (at import).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Relative-error bounds against a float64 reference (CONTRIBUTING.md, "Testing").
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-5}

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in float64 (NaN if y has NaN where ref has none)."""
    y, ref = y.detach().double(), ref.detach().double()
    denom = ref.norm()
    if denom == 0:
        return float((y - ref).norm())
    return float((y - ref).norm() / denom)


def reference_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    y = x.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return y


@pytest.fixture
def backend(monkeypatch):
    """Call ``backend("triton")`` to set FLASHSPARSE_BACKEND for this test only."""

    def use(name: str) -> None:
        monkeypatch.setenv("FLASHSPARSE_BACKEND", name)

    return use
