"""SparseLinear and sparsify_: equivalence with nn.Linear, state_dict, conversions, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, reference_linear, rel_err
from safetensors.torch import load_file, save_file
from torch import nn

import flashsparse as fs
from flashsparse import SparseLinear

FORMATS = ("tiled_csl", "bitmap")


def _linear(in_f, out_f, sparsity, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(fs.prune(layer.weight, sparsity))
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("format", [*FORMATS, "auto"])
def test_from_linear_matches_linear(format, dtype):
    dense = _linear(100, 70, 0.6, dtype)
    sparse = SparseLinear.from_linear(dense, format)
    x = torch.randn(3, 4, 100).to(dtype)
    assert rel_err(sparse(x), reference_linear(x, dense.weight, dense.bias)) < RTOL[dtype]
    assert (sparse.in_features, sparse.out_features) == (100, 70)
    assert torch.equal(sparse.weight.to_dense(), dense.weight)
    assert sparse.dtype == dtype


def test_from_dense_and_repr():
    w = fs.prune(torch.randn(64, 48, dtype=torch.float16), 0.75)
    layer = SparseLinear.from_dense(w, None, format="tiled_csl")
    text = repr(layer)
    assert "format=tiled_csl" in text and "sparsity=75.0%" in text and "bias=False" in text
    assert f"bytes={layer.weight.nbytes}" in text and f"dense {64 * 48 * 2}" in text
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        SparseLinear.from_linear(w)
    with pytest.raises(ValueError, match="bias must have shape"):
        SparseLinear.from_dense(w, torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear.from_dense(w, format="dense")


@pytest.mark.parametrize("format", FORMATS)
def test_forward_rejects_bad_input(format):
    layer = SparseLinear.from_linear(_linear(20, 10, 0.5), format)
    with pytest.raises(ValueError, match="in_features=20"):
        layer(torch.randn(2, 21))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 20, dtype=torch.bfloat16))


@pytest.mark.parametrize("format", FORMATS)
def test_state_dict_round_trip_through_safetensors(format, tmp_path):
    source = SparseLinear.from_linear(_linear(150, 90, 0.7, torch.bfloat16, seed=1), format)
    state = source.state_dict()
    assert all(type(t) is torch.Tensor for t in state.values())
    path = tmp_path / "layer.safetensors"
    save_file(state, str(path))
    # A layer of the same shape but another sparsity: every component changes length.
    target = SparseLinear.from_linear(_linear(150, 90, 0.2, torch.bfloat16, seed=2), format)
    target.load_state_dict(load_file(str(path)))
    assert torch.equal(target.weight.to_dense(), source.weight.to_dense())
    assert torch.equal(target.bias, source.bias)
    assert target.weight.nnz == source.weight.nnz
    x = torch.randn(5, 150, dtype=torch.bfloat16)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


@pytest.mark.parametrize("format", FORMATS)
def test_load_state_dict_rejects_inconsistent_components(format):
    layer = SparseLinear.from_linear(_linear(150, 90, 0.5), format)
    state = layer.state_dict()
    state["tile_offsets"] = state["tile_offsets"][:-1].clone()
    before = layer.weight.to_dense()
    with pytest.raises(RuntimeError, match="tile_offsets"):
        layer.load_state_dict(state)
    assert torch.equal(layer.weight.to_dense(), before)  # untouched


@pytest.mark.parametrize("format", FORMATS)
def test_dtype_conversion_re_encodes(format):
    dense = _linear(80, 60, 0.5, torch.float32)
    layer = SparseLinear.from_linear(dense, format)
    layer = layer.to(torch.bfloat16)
    assert layer.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight.to_dense(), dense.weight.to(torch.bfloat16))
    layer.half()  # from bf16: the values pass through bf16 on the way
    w16 = dense.weight.to(torch.bfloat16).half()
    assert layer.dtype == torch.float16
    assert torch.equal(layer.weight.to_dense(), w16)
    x = torch.randn(3, 80, dtype=torch.float16)
    assert rel_err(layer(x), reference_linear(x, w16, layer.bias)) < 2e-3
    layer.float()
    assert layer.weight.state()[layer.weight.components[0]].device.type == "cpu"
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        layer.double()
    layer.to("meta")
    assert layer.weight.device.type == "meta" and layer.bias.device.type == "meta"


def test_sparsify_small_mlp_gives_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Sequential(nn.Linear(128, 128), nn.Tanh()),
        nn.Linear(128, 10),
    )
    with torch.no_grad():
        for i, layer in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)):
            layer.weight.copy_(fs.prune(layer.weight, [0.5, 0.8, 0.1][i]))
    x = torch.randn(6, 64)
    expected = model(x)
    returned = fs.sparsify_(model, min_sparsity=0.4)
    assert returned is model
    kinds = [type(m).__name__ for m in (model[0], model[2][0], model[3])]
    assert kinds == ["SparseLinear", "SparseLinear", "Linear"]  # the 10 % layer stays dense
    assert rel_err(model(x), expected) < 1e-5


def test_sparsify_filter_fn_and_format():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    seen = []

    def only_second(module, fqn):
        seen.append(fqn)
        return fqn == "1"

    fs.sparsify_(model, only_second, format="tiled_csl")
    assert seen == ["0", "1"]
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], SparseLinear)
    assert model[1].format == "tiled_csl"


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"format": "coo"}, ValueError),
        ({"min_sparsity": 1.5}, ValueError),
        ({"min_sparsity": "high"}, TypeError),
        ({"filter_fn": 3}, TypeError),
    ],
)
def test_sparsify_rejects_bad_arguments(kwargs, error):
    with pytest.raises(error):
        fs.sparsify_(nn.Sequential(nn.Linear(4, 4)), **kwargs)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fs.sparsify_("model")
