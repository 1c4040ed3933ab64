"""The torch.library ops: opcheck, autograd and torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import random_weight
from torch import nn

import flashsparse as fs
from flashsparse.ops import OPS

FORMATS = ("tiled_csl", "bitmap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("format", FORMATS)
def test_opcheck(format, dtype):
    w = random_weight(70, 130, 0.6, dtype, "dense_tiles", seed=0)
    sw = fs.encode(w, format)
    x = torch.randn(3, 5, 130).to(dtype)
    bias = torch.randn(70).to(dtype)
    op = OPS[format]
    torch.library.opcheck(op, (x, *sw.tensors, 70, 130, bias))
    torch.library.opcheck(op, (x[0], *sw.tensors, 70, 130, None))
    assert getattr(torch.ops.flashsparse, f"{format}_linear").default is op._opoverload


@pytest.mark.parametrize("format", FORMATS)
def test_gradients_for_x_and_bias(format):
    w = random_weight(40, 50, 0.5, seed=1)
    sw = fs.encode(w, format)
    x = torch.randn(2, 3, 50, dtype=torch.float64).float().requires_grad_()
    bias = torch.randn(40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = bias.detach().clone().requires_grad_()
    grad = torch.randn(2, 3, 40)
    fs.linear(x, sw, bias).backward(grad)
    F.linear(x_ref, w, bias_ref).backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, bias_ref.grad)


def _pruned_mlp(sparsity: float = 0.5) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 130), nn.GELU(), nn.Linear(130, 33, bias=False))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(fs.prune(layer.weight, sparsity))
    return model


@pytest.mark.slow
@pytest.mark.parametrize("format", FORMATS)
def test_compile_fullgraph_has_no_graph_breaks(format):
    torch._dynamo.reset()
    model = _pruned_mlp()
    x = torch.randn(4, 96)
    expected = model(x)
    fs.sparsify_(model, format=format)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        x5 = torch.randn(5, 2, 96)  # another batch shape and rank
        torch.testing.assert_close(compiled(x5), _pruned_mlp()(x5), rtol=1e-5, atol=1e-5)
