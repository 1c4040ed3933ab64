"""Model coverage beyond nn.Linear: GPT-2's Conv1D and transformers' fused MoE experts
(``SparseExperts``), the grouped op, the warning about projections left dense, save/load,
torch.compile and the ``flashsparse sparsify`` command on tiny random models (offline)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from conftest import RTOL, rel_err
from helpers import random_weight
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers

import flashsparse as fs
from flashsparse import SparseExperts, SparseLinear
from flashsparse.cli import main
from flashsparse.nn import dense_projections, is_conv1d
from flashsparse.nn.experts import expert_projections, is_fused_experts
from flashsparse.ops import grouped_linear
from flashsparse.serialization import empty_weights

transformers.logging.set_verbosity_error()

VOCAB = 128
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Generic tiny overrides, applied where the config has the attribute.
_MOE = dict(
    _COMMON,
    intermediate_size=48,
    moe_intermediate_size=24,
    head_dim=8,
    num_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    shared_expert_intermediate_size=40,
    first_k_dense_replace=0,
)
# Families whose dense eager experts loop is the one SparseExperts runs: exactly equal there.
EXACT = ("mixtral", "qwen2_moe", "qwen3_moe")
OTHERS = ("olmoe", "granitemoe", "glm4_moe", "minimax", "hunyuan_v1_moe", "ernie4_5_moe", "gpt_oss")


def tiny_moe(model_type: str, dtype=torch.float32, impl="eager", sparsity=0.5, seed=0, meta=False):
    """A random tiny MoE causal LM with every projection (each expert matrix too) pruned."""
    config = transformers.AutoConfig.for_model(model_type)
    config = type(config)(**{k: v for k, v in _MOE.items() if hasattr(config, k)})
    config._experts_implementation = impl
    if meta:
        with empty_weights():
            return transformers.AutoModelForCausalLM.from_config(config).eval()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not head:
                module.weight.copy_(fs.prune(module.weight, sparsity))
            elif is_fused_experts(module):
                for _, weight, _ in expert_projections(module):
                    for e in range(weight.shape[0]):
                        weight[e].copy_(fs.prune(weight[e], sparsity))
    return model


def tiny_gpt2(dtype=torch.float32, sparsity=0.5, seed=0):
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if is_conv1d(module):
                module.weight.copy_(fs.prune(module.weight, sparsity))
    return model


def input_ids(batch=2, length=7, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


GENERATE = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def sparsify_quietly(model, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fs.sparsify_(model, *args, **kwargs)
    # The projections-left-dense warning (the reference-path and size notices are issue 15's).
    return [str(w.message) for w in caught if "projection(s) dense" in str(w.message)]


def routers(model) -> list[str]:
    """The routers' weights: the only projections sparsify_ leaves dense by default."""
    return [n for n in dense_projections(model) if n.endswith((".gate.weight", ".router.weight"))]


# -- GPT-2 Conv1D ----------------------------------------------------------------------------------
def test_from_linear_takes_conv1d():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(37, 29)  # nf=37 out, nx=29 in; weight [29, 37]
    with torch.no_grad():
        conv.weight.copy_(random_weight(29, 37, 0.6, seed=3))
        conv.bias.normal_()
    layer = SparseLinear.from_linear(conv)
    assert (layer.out_features, layer.in_features) == (37, 29)
    x = torch.randn(2, 5, 29, dtype=torch.float64)
    expected = x @ conv.weight.double() + conv.bias.double()
    assert rel_err(layer(x.float()), expected) < RTOL[torch.float32]
    with pytest.raises(TypeError, match=r"nn\.Linear or a transformers Conv1D"):
        SparseLinear.from_linear(nn.Conv1d(3, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpt2_conv1d_converted_logits_generation_save_load(dtype, tmp_path):
    model = tiny_gpt2(dtype)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    seen = []
    fs.sparsify_(model, lambda module, fqn: seen.append(fqn) or fqn != "lm_head")
    convs = [
        f"transformer.h.{i}.{p}"
        for i in range(2)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert seen == [*convs, "lm_head"]  # filter_fn sees every Conv1D
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in convs)
    assert not any(is_conv1d(m) for m in model.modules())
    summary = fs.sparsify_summary(model)
    assert summary.sparse_layers == 8 and summary.dense_projections == ("lm_head",)
    with torch.no_grad():
        got = model(ids).logits
    # Conv1D runs addmm(bias, x, W), the sparse layer F.linear(x, W.T, bias): the same products
    # summed by another kernel, so bf16 may round differently in the last place.
    assert rel_err(got, expected) < (0 if dtype == torch.float32 else RTOL[dtype]) + 1e-6
    assert torch.equal(
        model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE), generated
    )
    fs.save_sparse(model, tmp_path)
    with torch.device("meta"):
        loaded = transformers.AutoModelForCausalLM.from_config(model.config).eval()
    fs.load_sparse(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


# -- the grouped op --------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["tiled_csl", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_linear_matches_float64_reference(format, dtype):
    m, k = 45, 70
    counts = torch.tensor([3, 0, 11, 1, 0])  # skewed, with empty groups
    weights = [
        random_weight(m, k, s, dtype, kind, seed=g)
        for g, (s, kind) in enumerate(
            [
                (0.5, "uniform"),
                (0.9, "uniform"),
                (0.7, "dense_tiles"),
                (0.3, "uniform"),
                (0.6, "uniform"),
            ]
        )
    ]
    sws = [fs.encode(w, format) for w in weights]
    tensors = [t for sw in sws for t in sw.tensors]
    x = torch.randn(int(counts.sum()), k).to(dtype)
    bias = torch.randn(len(weights), m).to(dtype)
    got = grouped_linear(format, x, counts, tensors, m, k, bias)
    rows = torch.repeat_interleave(torch.arange(len(weights)), counts)
    expected = torch.stack(
        [
            x[i].double() @ weights[g].double().T + bias[g].double()
            for i, g in enumerate(rows.tolist())
        ]
    )
    assert got.shape == (x.shape[0], m) and got.dtype == dtype
    assert rel_err(got, expected) < RTOL[dtype]
    # gradients for x and bias (the weights are constants), against float64
    x_grad = x.detach().clone().requires_grad_()
    bias_grad = bias.detach().clone().requires_grad_()
    upstream = torch.randn(x.shape[0], m).to(dtype)
    grouped_linear(format, x_grad, counts, tensors, m, k, bias_grad).backward(upstream)
    expected_gx = torch.stack(
        [upstream[i].double() @ weights[g].double() for i, g in enumerate(rows.tolist())]
    )
    expected_gb = torch.zeros(len(weights), m, dtype=torch.float64).index_add_(
        0, rows, upstream.double()
    )
    assert rel_err(x_grad.grad, expected_gx) < RTOL[dtype]
    assert rel_err(bias_grad.grad, expected_gb) < RTOL[dtype]
    x_grad.grad = None  # without a bias (an explicit None): the same x gradient
    grouped_linear(format, x_grad, counts, tensors, m, k, None).backward(upstream)
    assert rel_err(x_grad.grad, expected_gx) < RTOL[dtype]
    torch.library.opcheck(grouped_linear, (format, x, counts, tensors, m, k, bias))
    torch.library.opcheck(grouped_linear, (format, x_grad, counts, tensors, m, k, bias_grad))
    torch.library.opcheck(grouped_linear, (format, x, counts, tensors, m, k, None))
    with pytest.raises(ValueError, match="counts sum to"):
        grouped_linear(format, x[:-1], counts, tensors, m, k, None)
    with pytest.raises(ValueError, match="tensors must hold"):
        grouped_linear(format, x, counts, tensors[:-1], m, k, None)


def test_grouped_linear_runs_every_expert_in_one_triton_launch(backend, monkeypatch):
    """Under the Triton backend (the interpreter on a CPU) the bitmap grouped op is one launch of
    the grouped kernel, never a per-expert launch; outputs poisoned first, checked in float64."""
    from flashsparse import backends
    from flashsparse.kernels.triton import bitmap_spmm as bs

    backend("triton")
    m, k = 70, 130
    counts = [2, 0, 9, 1]
    calls = []

    def grouped(x2d, counts_, weights_, m_, k_, bias_):
        out = torch.full((x2d.shape[0], m_), float("nan"), dtype=x2d.dtype)  # poisoned
        calls.append(counts_)
        return bs.launch_grouped(x2d, counts_, weights_, m_, k_, bias_, out=out)

    monkeypatch.setitem(backends._GROUPED, ("bitmap", "triton"), grouped)
    monkeypatch.setattr(bs, "launch", lambda *a, **kw: pytest.fail("a per-expert launch ran"))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        weights = [
            random_weight(m, k, s, dtype, kind, seed=g)
            for g, (s, kind) in enumerate(
                [(0.5, "uniform"), (0.9, "empty_tiles"), (0.7, "dense_tiles"), (0.0, "uniform")]
            )
        ]
        tensors = [t for w in weights for t in fs.encode(w, "bitmap").tensors]
        x = torch.randn(sum(counts), k).to(dtype)
        bias = torch.randn(len(weights), m).to(dtype)
        calls.clear()
        got = grouped_linear("bitmap", x, torch.tensor(counts), tensors, m, k, bias)
        assert calls == [counts]
        rows = torch.repeat_interleave(torch.arange(len(weights)), torch.tensor(counts))
        expected = torch.stack(
            [
                x[i].double() @ weights[g].double().T + bias[g].double()
                for i, g in enumerate(rows.tolist())
            ]
        )
        assert rel_err(got, expected) < RTOL[dtype], dtype
    assert backends.select_grouped("bitmap", x) is grouped
    backend("reference")
    assert backends.select_grouped("bitmap", x) is None
    with pytest.raises(ValueError, match="counts must be >= 0"):
        grouped_linear("bitmap", x, torch.tensor([2, -1, 9, 2]), tensors, m, k, None)


@pytest.mark.gpu
def test_gpu_grouped_linear_under_auto_is_one_triton_launch(backend):
    """On a GPU, auto picks the CUDA bitmap kernel for single weights but the Triton grouped
    kernel for experts (CUDA has no grouped kernel yet)."""
    from flashsparse import backends
    from flashsparse.kernels.triton import bitmap_spmm as bs

    backend("auto")
    m, k, counts = 130, 200, [3, 0, 17, 1]
    weights = [random_weight(m, k, 0.7, torch.float16, seed=g).cuda() for g in range(4)]
    tensors = [t for w in weights for t in fs.encode(w, "bitmap").tensors]
    x = torch.randn(sum(counts), k, device="cuda").half()
    assert backends.select_grouped("bitmap", x) is bs.launch_grouped
    got = grouped_linear("bitmap", x, torch.tensor(counts, device="cuda"), tensors, m, k, None)
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(counts)).tolist()
    expected = torch.stack([x[i].double() @ weights[g].double().T for i, g in enumerate(rows)])
    assert rel_err(got, expected) < RTOL[torch.float16]


def test_moe_model_runs_the_grouped_triton_kernel(backend, monkeypatch):
    """A whole sparse MoE model (transformers' grouped_mm experts) on the Triton grouped kernel:
    one launch per projection and layer."""
    from flashsparse import backends

    model = tiny_moe("qwen3_moe", impl="grouped_mm")
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    sparsify_quietly(model, format="bitmap")
    backend("triton")
    real = backends._GROUPED[("bitmap", "triton")]
    launches = []
    monkeypatch.setitem(
        backends._GROUPED, ("bitmap", "triton"), lambda *a: launches.append(a[1]) or real(*a)
    )
    with torch.no_grad():
        got = model(ids).logits
    assert len(launches) == 2 * 2  # 2 layers x (gate_up, down)
    assert rel_err(got, expected.double()) < 1e-5


# -- fused MoE experts -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_type", EXACT)
def test_moe_experts_converted_and_exact(model_type, dtype, monkeypatch):
    model = tiny_moe(model_type, dtype)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE)
    assert len(set(generated[:, 7:].flatten().tolist())) > 2
    messages = sparsify_quietly(model)
    experts = [m for m in model.modules() if isinstance(m, SparseExperts)]
    assert len(experts) == 2 and not any(is_fused_experts(m) for m in model.modules())
    assert all(sum(isinstance(m, SparseLinear) for m in x.modules()) == 2 * 4 for x in experts)
    # Only the routers (and the tied-or-not LM head) stay dense, and the warning says so once.
    left = dense_projections(model)
    assert left == [*routers(model), "lm_head"] and len(routers(model)) == 2
    assert len(messages) == 1 and all(name in messages[0] for name in routers(model))
    assert "lm_head" not in messages[0]
    with torch.no_grad():  # the default backend: the C++ kernel on a CPU (its own summation order)
        got = model(ids).logits
    assert rel_err(got, expected.double()) < {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "reference")
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, expected)  # same products, same order: bit for bit
    assert torch.equal(
        model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE), generated
    )


@pytest.mark.parametrize("model_type", EXACT)
def test_moe_grouped_forward(model_type):
    """transformers' default (grouped_mm) runs the grouped op: one call per projection."""
    model = tiny_moe(model_type, impl="grouped_mm")
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    sparsify_quietly(model)
    calls = []
    real = torch.ops.flashsparse.grouped_linear

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    import flashsparse.nn.experts as experts_module

    experts_module.grouped_linear, saved = counting, experts_module.grouped_linear
    try:
        with torch.no_grad():
            got = model(ids).logits
    finally:
        experts_module.grouped_linear = saved
    assert len(calls) == 2 * 2  # two MoE layers, two projections each
    # Dense grouped_mm sums each row's products in its own blocking; per-group matmuls may
    # round differently in the last bits of fp32.
    assert rel_err(got, expected) < 1e-6


@pytest.mark.parametrize("model_type", OTHERS)
def test_other_moe_families(model_type, tmp_path):
    model = tiny_moe(model_type)
    ids = input_ids(length=5)
    with torch.no_grad():
        expected = model(ids).logits
    sparsify_quietly(model)
    assert any(isinstance(m, SparseExperts) for m in model.modules())
    assert not any(is_fused_experts(m) for m in model.modules())
    assert set(dense_projections(model)) <= {*routers(model), "lm_head"}
    with torch.no_grad():
        got = model(ids).logits
    # Families whose own eager loop differs in op order (gpt_oss: clamped gate in its loop).
    assert rel_err(got, expected) < 1e-6
    fs.save_sparse(model, tmp_path)
    loaded = tiny_moe(model_type, meta=True)
    fs.load_sparse(loaded, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_save_load_under_empty_weights(dtype, tmp_path):
    model = tiny_moe("qwen2_moe", dtype)
    sparsify_quietly(model)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    fs.save_sparse(model, tmp_path)
    loaded = tiny_moe("qwen2_moe", meta=True)
    dense_experts = [p for p in loaded.parameters() if p.dim() == 3]
    assert dense_experts and all(p.device.type == "meta" for p in dense_experts)  # never allocated
    fs.load_sparse(loaded, tmp_path)
    assert not any(p.dim() == 3 or p.device.type == "meta" for p in loaded.parameters())
    assert not any(b.device.type == "meta" for b in loaded.buffers())
    assert sum(isinstance(m, SparseExperts) for m in loaded.modules()) == 2
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
    assert torch.equal(
        loaded.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE),
        model.generate(ids, attention_mask=torch.ones_like(ids), **GENERATE),
    )
    assert fs.sparsify_summary(loaded).as_dict() == fs.sparsify_summary(model).as_dict()
    # into a model that is sparse already: its SparseExperts' layers are replaced in place
    again = tiny_moe("qwen2_moe", dtype, seed=5)
    sparsify_quietly(again)
    fs.load_sparse(again, tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)


def test_plain_models_convert_everything_without_a_warning():
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    assert sparsify_quietly(model) == []
    assert fs.sparsify_summary(model).dense_projections == ()
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))
    model.register_parameter("scale", nn.Parameter(torch.ones(1, 8)))  # a vector stored [1, n]
    model.register_parameter(
        "mix", nn.Parameter(torch.ones(8, 8))
    )  # a matrix flashsparse does not convert
    messages = sparsify_quietly(model, lambda module, fqn: fqn != "2")
    assert (
        len(messages) == 1
        and "left 2 projection(s) dense: 1 rejected by filter_fn: '2'; 1 of a kind sparsify_ does not convert: 'mix'."
        in messages[0]
    )


def test_warning_names_every_projection_left_dense_once():
    model = tiny_moe("mixtral")
    keep = "model.layers.1.mlp.experts"
    messages = sparsify_quietly(
        model, lambda module, fqn: fqn != keep and not fqn.endswith("q_proj")
    )
    assert isinstance(model.lm_head, SparseLinear)  # a filter_fn decides about the head too
    assert len(messages) == 1
    names = [
        keep,
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        *routers(model),
    ]
    assert (
        all(name in messages[0] for name in names) and "left 5 projection(s) dense" in messages[0]
    )
    summary = fs.sparsify_summary(model)
    assert summary.dense_linear_layers == 5 and set(summary.dense_projections) == set(names)
    assert keep in str(summary) or "..." in str(summary)
    # min_sparsity leaves the experts dense too, and says so
    model = tiny_moe("mixtral", sparsity=0.3)
    messages = sparsify_quietly(model, min_sparsity=0.4)
    assert "model.layers.0.mlp.experts" in messages[0] and summary.sparse_layers > 0
    assert fs.sparsify_summary(model).sparse_layers == 0


def test_experts_to_dtype_and_grad():
    model = tiny_moe("mixtral")
    sparsify_quietly(model)
    ids = input_ids()
    model.to(torch.bfloat16)
    assert all(e.dtype == torch.bfloat16 for e in model.modules() if isinstance(e, SparseLinear))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    model.float()
    # Gradients reach the inputs through the sparse experts (for adapters on a sparse model).
    emb = model.get_input_embeddings()
    emb.weight.requires_grad_(True)
    model(ids).logits.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_eager_experts_add_no_graph_break():
    """transformers' eager experts loop breaks the graph on its own data-dependent control flow;
    the sparse loop adds no break of its own (the expert is picked by a tensor, not an int)."""
    model = tiny_moe("mixtral")
    ids = input_ids()
    dense = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    sparsify_quietly(model)
    sparse = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    assert sparse.graph_break_count == dense.graph_break_count, [
        str(r.reason) for r in sparse.break_reasons
    ]


def test_torch_compile_no_new_graph_breaks():
    model = tiny_moe("qwen3_moe", impl="grouped_mm")
    ids = input_ids(batch=1)
    dense = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    sparsify_quietly(model)
    with torch.no_grad():
        expected = model(ids).logits
    sparse = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    assert sparse.graph_break_count == dense.graph_break_count == 0, [
        str(r.reason) for r in sparse.break_reasons
    ]
    ops = [
        str(n.target)
        for g in sparse.graphs
        for n in g.graph.nodes
        if "flashsparse" in str(n.target)
    ]
    assert ops.count("flashsparse.grouped_linear.default") == 4
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(ids).logits, expected)
    torch._dynamo.reset()


def test_cli_sparsify_prunes_experts(tmp_path, monkeypatch):
    model = tiny_moe("mixtral", sparsity=0.0)
    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["sparsify", str(src), str(out), "--sparsity", "0.5"]) == 0
    config = transformers.AutoConfig.from_pretrained(out)
    config._experts_implementation = "eager"
    with empty_weights():
        loaded = transformers.AutoModelForCausalLM.from_config(config).eval()
    fs.load_sparse(loaded, out)
    experts = [m for m in loaded.modules() if isinstance(m, SparseExperts)]
    assert len(experts) == 2
    layers = [m for x in experts for m in x.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 2 * 2 * 4 and all(abs(m.weight.sparsity - 0.5) < 0.01 for m in layers)
    # the dense model pruned the same way gives the same logits
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module is not model.lm_head:
                module.weight.copy_(fs.prune(module.weight, 0.5))
            elif is_fused_experts(module):
                for _, weight, _ in expert_projections(module):
                    for e in range(weight.shape[0]):
                        weight[e].copy_(fs.prune(weight[e], 0.5))
    ids = input_ids()
    monkeypatch.setenv("FLASHSPARSE_BACKEND", "reference")  # the same products as the dense model
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
