"""Sparse fine-tuning: trainable bitmap layers (packed nonzeros as an nn.Parameter, mask fixed).

Gradients against a float64 dense model with the mask applied; optimizers, gradient
accumulation, autocast, torch.compile, save/load; gradcheck and opcheck of the ops; errors.
These run on the active backend (``auto``: the C++ CPU kernel here when it builds); the kernel
files have their own tests (test_bitmap_sddmm_cpu.py, test_bitmap_sddmm_triton.py).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import RTOL, rel_err
from helpers import random_weight
from torch import nn

import flashsparse as fs
from flashsparse.ops import bitmap_gather_stored, bitmap_linear, bitmap_sddmm

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _stored(layer: fs.SparseLinear) -> torch.Tensor:
    """Bool over the packed slots: True where a weight is stored, False in the padding."""
    masks, values, offsets = layer.sparse_weight.tensors
    ones = torch.ones(layer.out_features, layer.in_features, device=values.device)
    return bitmap_gather_stored(ones, masks, offsets, values.numel()) != 0


def _reference_grads(w, bias, x, grad_y):
    """Float64 dense model with the mask applied: dL/dW at the stored positions, dL/dx, dL/db."""
    mask = w != 0
    wd = (w.double() * mask).requires_grad_()
    xd = x.detach().double().requires_grad_()
    bd = bias.detach().double().requires_grad_() if bias is not None else None
    F.linear(xd, wd, bd).backward(grad_y.double())
    return wd.grad * mask, xd.grad, None if bd is None else bd.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,x_shape,sparsity,kind,with_bias",
    [
        (70, 130, (1, 130), 0.7, "uniform", True),  # N = 1
        (131, 200, (37, 200), 0.7, "row_skewed", False),
        (129, 67, (2, 3, 67), 0.9, "dense_column", True),  # 3-D x
        (150, 260, (17, 260), 0.7, "dense_tiles", False),  # a fully dense tile
        (200, 333, (4, 5, 333), 0.5, "empty_tiles", True),  # empty tiles, 3-D x
        (96, 4, (33, 4), 0.8, "dense_rows", False),
        (1, 1, (3, 1), 0.0, "uniform", True),
        (64, 64, (700, 64), 0.3, "uniform", True),  # large N
    ],
)
def test_gradients_match_the_masked_dense_model(dtype, m, k, x_shape, sparsity, kind, with_bias):
    w = random_weight(m, k, sparsity, dtype, kind, seed=m + k)
    g = torch.Generator().manual_seed(len(x_shape) * 1000 + m)
    bias = torch.randn(m, generator=g).to(dtype).requires_grad_() if with_bias else None
    layer = fs.SparseLinear.from_dense(w, bias, trainable=True)  # bias trains as it says
    x = torch.randn(x_shape, generator=g).to(dtype).requires_grad_()
    grad_y = torch.randn(*x_shape[:-1], m, generator=g).to(dtype)
    assert layer.values.grad is None
    layer(x).backward(grad_y)
    ref_w, ref_x, ref_b = _reference_grads(w, bias, x, grad_y)
    sw = layer.sparse_weight
    expected = bitmap_gather_stored(ref_w, sw.tensors[0], sw.tensors[2], sw.tensors[1].numel())
    got = layer.values.grad
    assert got.dtype == dtype and got.shape == layer.values.shape
    assert rel_err(got, expected) < RTOL[dtype]
    assert not got[~_stored(layer)].any(), "a padding slot got a gradient"
    assert rel_err(x.grad, ref_x) < RTOL[dtype]
    if with_bias:
        assert rel_err(layer.bias.grad, ref_b) < RTOL[dtype]


def test_all_zero_weight_and_empty_batch():
    layer = fs.SparseLinear.from_dense(torch.zeros(70, 130), trainable=True)
    assert layer.values.numel() == 0
    layer(torch.randn(4, 130)).sum().backward()
    assert layer.values.grad.shape == (0,)
    dense = fs.SparseLinear.from_dense(random_weight(70, 130, 0.5, seed=3), trainable=True)
    dense(torch.randn(0, 130)).sum().backward()
    assert dense.values.grad is not None and not dense.values.grad.any()


def _pruned_mlp(seed: int = 0, sparsity: float = 0.7) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(96, 130), nn.GELU(), nn.Linear(130, 33, bias=False))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(fs.prune(layer.weight, sparsity))
    return model


def _mask_grads(model: nn.Module) -> list:
    """The dense baseline: weight gradients multiplied by the fixed mask (a hook per weight)."""
    handles = []
    for layer in model:
        if isinstance(layer, nn.Linear):
            mask = layer.weight.detach() != 0
            handles.append(layer.weight.register_hook(lambda grad, mask=mask: grad * mask))
    return handles


OPTIMIZERS = {
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "adam_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_training_matches_dense_with_a_mask_hook_and_keeps_the_mask(name):
    """Many steps of each optimizer: the sparse model follows the dense masked one, the mask,
    offsets and padding never move, and optimizer state has the nonzeros' size."""
    dense = _pruned_mlp()
    sparse = fs.sparsify_(copy.deepcopy(dense), trainable=True)
    _mask_grads(dense)
    layers = [m for m in sparse if isinstance(m, fs.SparseLinear)]
    fixed = [(layer.masks.clone(), layer.tile_offsets.clone()) for layer in layers]
    padding = [~_stored(layer) for layer in layers]
    nnz = [layer.sparse_weight.nnz for layer in layers]
    opt_dense, opt_sparse = (
        OPTIMIZERS[name](dense.parameters()),
        OPTIMIZERS[name](sparse.parameters()),
    )
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        x = torch.randn(8, 96, generator=g)
        target = torch.randn(8, 33, generator=g)
        for model, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            loss = F.mse_loss(model(x), target)
            loss.backward()
            opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    for layer, ref, (masks, offsets), pad, count in zip(
        layers, [dense[0], dense[2]], fixed, padding, nnz, strict=True
    ):
        assert torch.equal(layer.masks, masks) and torch.equal(layer.tile_offsets, offsets)
        assert layer.sparse_weight.nnz == count  # the sparsity is exactly the same
        assert torch.equal(layer.values.detach()[pad], torch.zeros(int(pad.sum())))
        for value in opt_sparse.state[layer.values].values():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                assert value.shape == layer.values.shape  # nonzero-sized state
                assert not value[pad].any(), "optimizer state grew in a padding slot"
        assert rel_err(layer.weight.to_dense(), ref.weight) < 1e-5
        assert not ref.weight[layer.weight.to_dense() == 0].any()


def test_gradient_accumulation_sums_the_micro_batches():
    w = random_weight(70, 130, 0.7, seed=5)
    layer = fs.SparseLinear.from_dense(w, trainable=True)
    x1, x2 = torch.randn(3, 130), torch.randn(5, 130)
    layer(x1).square().sum().backward()
    layer(x2).square().sum().backward()
    accumulated = layer.values.grad.clone()
    layer.values.grad = None
    layer(torch.cat([x1, x2])).square().sum().backward()
    assert rel_err(accumulated, layer.values.grad) < 1e-6


def test_autocast_trains_fp32_master_values_in_bf16():
    """Under CPU bf16 autocast the product runs in bf16 (as F.linear does) and the fp32
    values get fp32 gradients, like a dense nn.Linear under autocast."""
    w = random_weight(131, 200, 0.7, seed=2)
    bias = torch.randn(131, requires_grad=True)
    layer = fs.SparseLinear.from_dense(w, bias, trainable=True)
    dense = nn.Linear(200, 131)
    with torch.no_grad():
        dense.weight.copy_(w)
        dense.bias.copy_(bias)
    x = torch.randn(2, 9, 200)
    grad_y = torch.randn(2, 9, 131)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_dense = dense(x)
    assert y.dtype == torch.bfloat16 == y_dense.dtype
    y.float().backward(grad_y)
    y_dense.float().backward(grad_y)
    assert layer.values.dtype == layer.values.grad.dtype == torch.float32
    sw = layer.sparse_weight
    expected = bitmap_gather_stored(
        dense.weight.grad, sw.tensors[0], sw.tensors[2], sw.tensors[1].numel()
    )
    assert rel_err(layer.values.grad, expected) < RTOL[torch.bfloat16]
    assert rel_err(layer.bias.grad, dense.bias.grad) < RTOL[torch.bfloat16]
    # fs.linear takes the same path
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fs.linear(x, sw, layer.bias).dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_training_step_has_no_graph_break():
    torch._dynamo.reset()
    model = fs.sparsify_(_pruned_mlp(), trainable=True)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 96)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    compiled = torch.compile(model, fullgraph=True)
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        assert rel_err(a.grad, b.grad) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and under autocast
        compiled(x).float().square().sum().backward()


def test_save_and_load_of_a_trained_model_are_exact(tmp_path):
    model = fs.sparsify_(_pruned_mlp(), trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 96)).square().mean().backward()
        opt.step()
    fs.save_sparse(model, tmp_path)
    fresh = _pruned_mlp(seed=7)  # dense, other weights: everything comes from the file
    fs.load_sparse(fresh, tmp_path)
    assert isinstance(fresh[0], fs.SparseLinear) and not fresh[0].trainable
    loaded = fresh.state_dict()
    assert sorted(loaded) == sorted(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded[name]), name
    into_trainable = fs.sparsify_(_pruned_mlp(seed=7), trainable=True)
    fs.load_sparse(into_trainable, tmp_path)  # a model being fine-tuned stays trainable
    assert into_trainable[0].trainable and into_trainable[2].trainable
    assert torch.equal(into_trainable[0].values, model[0].values)
    # load_state_dict copies into the same Parameter (an optimizer built before keeps it)
    target = fs.sparsify_(_pruned_mlp(), trainable=True)
    param = target[0].values
    target.load_state_dict(model.state_dict())
    assert target[0].values is param and torch.equal(param, model[0].values)


def test_trainable_toggle_keeps_state_dict_names_and_tensor():
    layer = fs.SparseLinear.from_dense(random_weight(70, 130, 0.7, seed=1), torch.randn(70))
    keys = list(layer.state_dict())
    values = layer.values
    assert not layer.trainable and [n for n, _ in layer.named_parameters()] == ["bias"]
    assert layer.trainable_() is layer and layer.trainable
    assert isinstance(layer.values, nn.Parameter) and layer.values.requires_grad
    assert layer.values.data_ptr() == values.data_ptr()
    assert sorted(layer.state_dict()) == sorted(keys)
    assert [n for n, _ in layer.named_parameters()] == ["bias", "values"]
    layer.trainable_(False)
    assert not layer.trainable and not isinstance(layer.values, nn.Parameter)
    assert sorted(layer.state_dict()) == sorted(keys)
    layer(torch.randn(2, 130, requires_grad=True)).sum().backward()  # x and bias only


def test_dtype_change_casts_the_values_parameter_and_keeps_the_mask():
    w = random_weight(70, 130, 0.7, seed=4)
    w[3, 5] = 1e-30  # underflows in bf16: stays a stored (zero-valued) position
    layer = fs.SparseLinear.from_dense(w, trainable=True)
    param, masks = layer.values, layer.masks.clone()
    layer.to(torch.bfloat16)
    assert layer.values is param and param.dtype == torch.bfloat16 == layer.dtype
    assert torch.equal(layer.masks, masks) and layer.sparse_weight.nnz == int((w != 0).sum())
    y = layer(torch.randn(2, 130, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        layer.double()


def test_sparsify_trainable_builds_nonzero_sized_optimizer_state():
    model = fs.sparsify_(_pruned_mlp(), trainable=True)
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.bias", "0.values", "2.values"]
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 96)).sum().backward()
    opt.step()
    state = opt.state[model[0].values]
    assert state["exp_avg"].numel() == model[0].values.numel() < 0.4 * 96 * 130


def test_gradcheck_through_the_float32_op():
    """The formats store no float64, so gradcheck runs the op in float32: the product is linear
    in each input, so a central difference with a large step is exact up to float32 rounding."""
    w = random_weight(37, 70, 0.6, seed=9)
    masks, values, offsets = fs.encode(w, "bitmap").tensors
    x = torch.randn(3, 70, requires_grad=True)
    v = values.clone().requires_grad_()
    b = torch.randn(37, requires_grad=True)

    def f(x, v, b):
        return bitmap_linear(x, masks, v, offsets, 37, 70, b)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Input #", UserWarning)  # "not double precision"
        assert torch.autograd.gradcheck(f, (x, v, b), eps=0.5, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_of_the_weight_gradient_op_and_the_trainable_linear(dtype):
    w = random_weight(70, 130, 0.6, dtype, "dense_tiles", seed=0)
    masks, values, offsets = fs.encode(w, "bitmap").tensors
    g = torch.Generator().manual_seed(3)
    grad = torch.randn(5, 70, generator=g).to(dtype)
    x = torch.randn(5, 130, generator=g).to(dtype)
    torch.library.opcheck(bitmap_sddmm, (grad, x, masks, offsets, 70, 130, values.numel()))
    v = values.clone().requires_grad_()
    xx = torch.randn(2, 5, 130, generator=g).to(dtype).requires_grad_()
    torch.library.opcheck(bitmap_linear, (xx, masks, v, offsets, 70, 130, None))


def test_bad_input_is_a_clear_error():
    w = random_weight(70, 130, 0.7, seed=1)
    lin = nn.Linear(130, 70)
    with pytest.raises(ValueError, match=r"trainable=True needs format='bitmap'.*tiled_csl"):
        fs.SparseLinear.from_dense(w, format="tiled_csl", trainable=True)
    with pytest.raises(ValueError, match=r"format='bitmap'"):
        fs.SparseLinear.from_linear(lin, "tiled_csl", trainable=True)
    with pytest.raises(ValueError, match=r"format='bitmap'"):
        fs.sparsify_(_pruned_mlp(), format="tiled_csl", trainable=True)
    csl = fs.SparseLinear.from_dense(w, format="tiled_csl")
    with pytest.raises(ValueError, match=r"tiled_csl weight, which cannot be trained.*bitmap"):
        csl.trainable_()
    assert csl.trainable_(False) is csl and not csl.trainable
    layer = fs.SparseLinear.from_dense(w, trainable=True)
    with pytest.raises(TypeError, match="mode must be a bool"):
        layer.trainable_("yes")
    with pytest.raises(TypeError, match="trainable must be a bool"):
        fs.sparsify_(_pruned_mlp(), trainable=1)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        layer(torch.randint(0, 3, (2, 130)))
    masks, values, offsets = layer.sparse_weight.tensors
    grad, x = torch.randn(4, 70), torch.randn(4, 130)
    n = values.numel()
    with pytest.raises(TypeError, match="grad must be float16, bfloat16 or float32"):
        bitmap_sddmm(grad.long(), x.long(), masks, offsets, 70, 130, n)
    with pytest.raises(TypeError, match=r"x has dtype torch\.float16 but grad is torch\.float32"):
        bitmap_sddmm(grad, x.half(), masks, offsets, 70, 130, n)
    with pytest.raises(ValueError, match=r"x must be 2-D \[N=4, k=130\]"):
        bitmap_sddmm(grad, x[:3], masks, offsets, 70, 130, n)
    with pytest.raises(ValueError, match=r"grad must be 2-D \[N, m=70\]"):
        bitmap_sddmm(grad[:, :69], x, masks, offsets, 70, 130, n)
    with pytest.raises(ValueError, match="masks must be int64"):
        bitmap_sddmm(grad, x, masks.int(), offsets, 70, 130, n)
    with pytest.raises(ValueError, match="num_values must be a multiple of 8"):
        bitmap_sddmm(grad, x, masks, offsets, 70, 130, n + 1)


class _FakeExperts(nn.Module):
    """What sparsify_ recognises as transformers' fused MoE experts (3-D weights)."""

    is_transposed = False
    has_gate = True

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(fs.prune(torch.randn(2, 16, 8), 0.5))
        self.down_proj = nn.Parameter(fs.prune(torch.randn(2, 8, 8), 0.5))


def test_trainable_fused_experts_are_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 8), _FakeExperts())
    with pytest.raises(ValueError, match=r"cannot train fused MoE experts yet.*'1'"):
        fs.sparsify_(model, trainable=True)
    assert isinstance(model[0], nn.Linear)  # nothing was converted


@pytest.mark.slow
def test_the_example_recovers_and_keeps_the_sparsity():
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers")
    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "finetune_sparse.py"), "--steps", "10"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if "stored nonzeros before" in x)
    before, after = (part.split()[0] for part in line.split("fine-tuning ")[1].split("after "))
    assert before.rstrip(",;") == after.rstrip(",;")
