"""``flashsparse.linear`` on the active backend against a float64 reference, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, reference_linear, rel_err
from helpers import MASK_KINDS, random_weight
from hypothesis import given, settings
from hypothesis import strategies as st

import flashsparse as fs
from flashsparse.backends import BackendUnavailableError

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FORMATS = ("tiled_csl", "bitmap")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("x_shape", [(200,), (7, 200), (2, 3, 200)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_reference(dtype, format, x_shape, with_bias):
    w = random_weight(131, 200, 0.7, dtype, "row_skewed", seed=11)
    x = torch.randn(x_shape).to(dtype)
    bias = torch.randn(131).to(dtype) if with_bias else None
    y = fs.linear(x, fs.encode(w, format), bias)
    assert y.shape == (*x_shape[:-1], 131) and y.dtype == dtype
    assert rel_err(y, reference_linear(x, w, bias)) < RTOL[dtype]


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 300),
    k=st.integers(1, 300),
    n=st.integers(1, 40),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
    kind=st.sampled_from(MASK_KINDS),
    dtype=st.sampled_from(DTYPES),
    format=st.sampled_from(FORMATS),
)
def test_random_shapes_and_masks(m, k, n, sparsity, kind, dtype, format):
    w = random_weight(m, k, sparsity, dtype, kind, seed=m * 1000 + k)
    x = torch.randn(n, k).to(dtype)
    y = fs.linear(x, fs.encode(w, format))
    ref = reference_linear(x, w)
    if not w.any():  # skewed kinds keep dense rows/tiles even at 100 %
        assert not y.any()
    else:
        assert rel_err(y, ref) < RTOL[dtype]


@pytest.mark.parametrize("format", FORMATS)
def test_unusual_inputs(format):
    w = random_weight(65, 129, 0.5, seed=1)
    sw = fs.encode(w, format)
    x = torch.randn(129, 9).T  # non-contiguous
    assert rel_err(fs.linear(x, sw), reference_linear(x, w)) < 1e-5
    empty = fs.linear(torch.randn(0, 129), sw)
    assert empty.shape == (0, 65)
    empty3 = fs.linear(torch.randn(2, 0, 129), sw)
    assert empty3.shape == (2, 0, 65)
    for shape in [(1, 1), (1, 77), (77, 1)]:
        w1 = random_weight(*shape, 0.3, seed=2)
        x1 = torch.randn(4, shape[1])
        assert rel_err(fs.linear(x1, fs.encode(w1, format)), reference_linear(x1, w1)) < 1e-5


@pytest.mark.parametrize("format", FORMATS)
def test_nan_and_inf_propagate_like_f_linear(format):
    w = random_weight(70, 66, 0.5, seed=3)
    w[3, 5] = float("nan")
    w[10, 7] = float("inf")
    x = torch.randn(5, 66)
    x[1, 20] = float("nan")
    x[2, 7] = 0.0  # inf * 0 = nan in row 2, column 10
    y = fs.linear(x, fs.encode(w, format))
    expected = F.linear(x, w)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert torch.allclose(y[finite], expected[finite], rtol=1e-5, atol=1e-5)


def _sw(dtype=torch.float32, format="bitmap"):
    return fs.encode(random_weight(10, 12, 0.5, dtype, seed=0), format)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: fs.linear(torch.tensor(1.0), _sw()), ValueError, "at least 1 dimension"),
        (lambda: fs.linear(torch.randn(3, 13), _sw()), ValueError, "in_features=12"),
        (lambda: fs.linear(torch.randn(3, 12, dtype=torch.float16), _sw()), TypeError, "dtype"),
        (lambda: fs.linear(torch.randn(3, 12, dtype=torch.float64), _sw()), TypeError, "x must be"),
        (lambda: fs.linear(torch.randn(3, 12, device="meta"), _sw()), ValueError, "meta"),
        (lambda: fs.linear(torch.randn(3, 12), torch.randn(10, 12)), TypeError, "SparseWeight"),
        (lambda: fs.linear([[1.0] * 12], _sw()), TypeError, "x must be a torch.Tensor"),
        (lambda: fs.linear(torch.randn(3, 12), _sw(), torch.randn(11)), ValueError, "bias"),
        (lambda: fs.linear(torch.randn(3, 12), _sw(), torch.randn(10).half()), TypeError, "bias"),
        (
            lambda: fs.linear(torch.randn(3, 12), _sw(), torch.randn(10, device="meta")),
            ValueError,
            "bias",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_backend_variable_is_read_per_call(monkeypatch):
    sw, x = _sw(), torch.randn(2, 12)
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="FLASHSPARSE_BACKEND"):
        fs.linear(x, sw)
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "reference")
    assert rel_err(fs.linear(x, sw), reference_linear(x, sw.to_dense())) < 1e-5
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "REFERENCE")
    assert rel_err(fs.linear(x, sw), reference_linear(x, sw.to_dense())) < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize("format", FORMATS)
def test_forced_cuda_backend_refuses_cpu_tensors(monkeypatch, format):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError, match="FLASHSPARSE_BACKEND=cuda"):
        fs.linear(torch.randn(2, 12), _sw(format=format))


def test_available_backends_lists_reference():
    backends = fs.available_backends()
    assert backends[0] == "reference"
    assert set(backends) <= {"reference", "triton", "cuda", "cpu"}
    if not torch.cuda.is_available():
        assert "cuda" not in backends
