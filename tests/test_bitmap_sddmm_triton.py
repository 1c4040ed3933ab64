"""The Triton weight-gradient kernel of trainable bitmap layers against a float64 reference.

Without a GPU it runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1) at small
odd shapes (slow: each program is interpreted); the ``gpu`` tests run the compiled kernel at
model sizes and a training step under ``auto``; one test compiles it for sm_80 and sm_90.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, rel_err
from helpers import random_weight

import flashsparse as fs
from flashsparse import backends
from flashsparse.ops import bitmap_gather_stored

pytest.importorskip("flashsparse.kernels.triton", reason="triton is not installed")
from flashsparse.kernels.triton import bitmap_sddmm as ts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _problem(m, k, n, sparsity, kind, dtype, seed, device=DEVICE):
    w = random_weight(m, k, sparsity, dtype, kind, seed=seed, device=device)
    masks, values, offsets = fs.encode(w, "bitmap").tensors
    g = torch.Generator().manual_seed(seed + 1)
    grad = torch.randn(n, m, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(n, k, generator=g).to(device=device, dtype=dtype)
    return w, (grad, x, masks, offsets, m, k, values.numel())


def _check(out, w, args):
    grad, x, masks, offsets, _, _, num_values = args
    dense = (grad.double().T @ x.double()) * (w != 0)
    ref = bitmap_gather_stored(dense, masks, offsets, num_values)
    padding = bitmap_gather_stored(torch.ones_like(dense), masks, offsets, num_values) == 0
    assert out.shape == (num_values,) and out.dtype == grad.dtype
    assert torch.isfinite(out).all(), "a slot was never written (NaN poison left)"
    assert not out[padding].any()
    if ref.any():
        assert rel_err(out, ref) < RTOL[grad.dtype]
    else:
        assert not out.any()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m,k,n,sparsity,kind",
    [
        (1, 1, 1, 0.0, "uniform"),
        (70, 130, 1, 0.5, "uniform"),
        (130, 200, 37, 0.7, "dense_tiles"),  # a dense tile; n over one BLOCK_N step
        (65, 129, 33, 0.8, "empty_tiles"),  # empty tiles return at once
        (96, 4, 5, 0.9, "row_skewed"),
    ],
)
def test_kernel_matches_float64(dtype, m, k, n, sparsity, kind):
    w, args = _problem(m, k, n, sparsity, kind, dtype, seed=m + k + n)
    out = torch.full((args[-1],), float("nan"), dtype=dtype, device=DEVICE)
    assert ts.bitmap_sddmm(*args, out=out) is out
    _check(out, w, args)


@pytest.mark.slow
def test_training_a_layer_on_the_triton_backend(backend):
    """FLASHSPARSE_BACKEND=triton runs the forward and the weight gradient in Triton."""
    backend("triton")
    backends._selected.clear()
    try:
        w = random_weight(70, 130, 0.7, torch.float16, "row_skewed", seed=8, device=DEVICE)
        layer = fs.SparseLinear.from_dense(w, trainable=True)
        x = torch.randn(2, 3, 130, device=DEVICE).half()
        grad_y = torch.randn(2, 3, 70, device=DEVICE).half()
        layer(x).backward(grad_y)
        assert backends.select("bitmap_sddmm", x).backend == "triton"
    finally:
        backends._selected.clear()
    masks, values, offsets = layer.sparse_weight.tensors
    _check(
        layer.values.grad,
        w,
        (grad_y.view(6, 70), x.view(6, 130), masks, offsets, 70, 130, values.numel()),
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,k,n", [(4096, 4096, 512), (11008, 4096, 2048), (130, 200, 1)])
def test_gpu_kernel_at_model_sizes(dtype, m, k, n):
    w, args = _problem(m, k, n, 0.7, "row_skewed", dtype, seed=1, device="cuda")
    out = torch.full((args[-1],), float("nan"), dtype=dtype, device="cuda")
    ts.bitmap_sddmm(*args, out=out)
    _check(out, w, args)


@pytest.mark.gpu
def test_gpu_training_step_under_auto(monkeypatch):
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "auto")
    backends._selected.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)
    )
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.copy_(fs.prune(layer.weight, 0.7))
    model = fs.sparsify_(model.cuda().bfloat16(), trainable=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    masks = model[0].masks.clone()
    for _ in range(3):
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
    assert backends.select("bitmap_sddmm", x).backend == "triton"
    assert torch.equal(model[0].masks, masks)
    assert torch.isfinite(model[0].values).all()


_COMPILE_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from flashsparse.kernels.triton import bitmap_sddmm as ts
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for arch, dt in ((90, "bf16"), (90, "fp16"), (90, "fp32"), (80, "bf16")):
    sig = {"grad_ptr": f"*{dt}", "x_ptr": f"*{dt}", "masks_ptr": "*i64", "tile_offsets_ptr": "*i32",
           "out_ptr": f"*{dt}", **{a: "i32" for a in ("n", "m", "k", "stride_g", "stride_x", "k_tiles")},
           "BLOCK_N": "constexpr", "UPCAST": "constexpr", "DOT_PRECISION": "constexpr"}
    src = ASTSource(ts._bitmap_sddmm_kernel, sig, constexprs=dict(
        BLOCK_N=ts.BLOCK_N, UPCAST=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32"))
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    regs, stack = (int(v) for v in re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups())
    results.append(dict(arch=arch, dtype=dt, regs=regs, stack=stack))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_kernel_compiles_for_sm80_and_sm90_without_spills():
    import json
    import os
    import subprocess
    import sys

    import triton

    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 3):
        pytest.skip("ASTSource signature format of triton >= 3.3")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for r in results:
        assert r["stack"] == 0, r
