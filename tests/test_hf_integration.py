"""sparsify_ on Hugging Face transformers models (tiny configs, random weights, offline):
logits, greedy generation, the default filter, the summary, torch.compile graph breaks and the
``flashsparse sparsify`` command."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import RTOL, rel_err
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers

import flashsparse as fs
from flashsparse import SparseLinear
from flashsparse.cli import main
from flashsparse.nn import default_skipped_linears

PROJECTIONS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}


def tiny_config(arch: str, tie: bool = True):
    common = dict(
        vocab_size=192, max_position_embeddings=64, num_hidden_layers=2, num_attention_heads=4
    )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=64, ffn_dim=144, word_embed_proj_dim=64, tie_word_embeddings=tie, **common
        )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }[arch]
    return cls(
        hidden_size=64,
        intermediate_size=144,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
        **common,
    )


def tiny_model(arch: str, dtype=torch.float32, sparsity=0.6, tie=True, seed=0):
    """A random tiny causal LM whose projections are magnitude-pruned (embeddings and head dense)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, tie)).to(dtype).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS[arch]:
                module.weight.copy_(fs.prune(module.weight, sparsity))
    return model


def input_ids(batch=2, length=9, seed=1):
    return torch.randint(3, 192, (batch, length), generator=torch.Generator().manual_seed(seed))


def kinds(model):
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, SparseLinear))
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("arch", list(PROJECTIONS))
def test_sparsified_logits_match_dense_pruned(arch, dtype):
    model = tiny_model(arch, dtype)
    ids = input_ids()
    with torch.no_grad():
        expected = model(ids).logits
        returned = fs.sparsify_(model)
        got = model(ids).logits
    assert returned is model
    layer_kinds = kinds(model)
    projections = {
        n: k for n, k in layer_kinds.items() if n.rsplit(".", 1)[-1] in PROJECTIONS[arch]
    }
    assert len(projections) == 2 * len(PROJECTIONS[arch])
    assert set(projections.values()) == {"SparseLinear"}
    assert layer_kinds["lm_head"] == "Linear"  # tied to the embedding: stays dense
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert got.dtype == dtype
    assert rel_err(got, expected) < RTOL[dtype]


@pytest.mark.parametrize("format", ["tiled_csl", "bitmap"])
def test_sparsified_logits_each_format_fp32(format):
    model = tiny_model("llama", sparsity=0.7, tie=False)
    ids = input_ids(batch=3, length=5)
    with torch.no_grad():
        expected = model(ids).logits
        fs.sparsify_(model, format=format)
        got = model(ids).logits
    assert {m.format for m in model.modules() if isinstance(m, SparseLinear)} == {format}
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize(
    ("arch", "dtype"), [("llama", torch.float32), ("opt", torch.bfloat16)], ids=str
)
def test_generate_gives_the_same_greedy_tokens(arch, dtype):
    # Untied: a random model with a tied head mostly repeats its last input token.
    model = tiny_model(arch, dtype, tie=False)
    ids = input_ids(batch=2, length=6, seed=3)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    assert len(set(expected[:, 6:].flatten().tolist())) > 8  # a test that can tell models apart
    fs.sparsify_(model)
    got = model.generate(ids, **kwargs)
    assert got.shape == (2, 6 + 12)
    assert torch.equal(got, expected)


def test_default_filter_keeps_embeddings_and_head_dense():
    untied = tiny_model("llama", tie=False)
    assert default_skipped_linears(untied) == {"lm_head"}  # the output embedding, even untied
    fs.sparsify_(untied)
    assert type(untied.lm_head) is nn.Linear
    # An explicit filter decides for itself: this one converts the head too.
    model = tiny_model("qwen2", tie=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    fs.sparsify_(model, lambda module, fqn: True)
    assert isinstance(model.lm_head, SparseLinear)
    assert torch.equal(model.lm_head.weight.to_dense(), model.get_input_embeddings().weight)
    # A plain nn.Module keeps the contract: every nn.Linear, even one tied to an embedding.
    plain = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10, bias=False))
    plain[1].weight = plain[0].weight
    assert default_skipped_linears(plain) == set()
    fs.sparsify_(plain)
    assert isinstance(plain[1], SparseLinear)


def test_summary_counts_layers_and_bytes():
    model = tiny_model("opt", torch.bfloat16, sparsity=0.5, tie=True)
    assert fs.sparsify_summary(model).sparse_layers == 0
    dense_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: once
    fs.sparsify_(
        model, lambda m, fqn: not fqn.endswith("fc2") and fqn != "lm_head", format="tiled_csl"
    )
    summary = fs.sparsify_summary(model)
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert summary.sparse_layers == len(sparse) == 2 * 5
    assert summary.dense_linear_layers == 2 + 1  # the two fc2 and the head
    assert summary.formats == {"tiled_csl": 10}
    assert summary.linear_nbytes == sum(m.weight.nbytes for m in sparse)
    assert summary.linear_dense_nbytes == sum(m.in_features * m.out_features * 2 for m in sparse)
    assert summary.model_dense_nbytes == dense_bytes
    assert summary.model_nbytes == dense_bytes - summary.linear_dense_nbytes + summary.linear_nbytes
    assert summary.sparsity == pytest.approx(0.5, abs=1e-3)
    text = str(summary)
    assert "10 (tiled_csl: 10)" in text and "3 projection(s) left dense" in text and "50.0%" in text
    assert json.loads(json.dumps(summary.as_dict()))["sparse_layers"] == 10
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fs.sparsify_summary("model")


def test_progress_bar(capsys):
    model = tiny_model("llama")
    fs.sparsify_(model, progress=True)
    err = capsys.readouterr().err
    assert "sparsify" in err and "14/14" in err
    model = tiny_model("llama")
    fs.sparsify_(model)  # auto: a tiny model shows nothing
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress"):
        fs.sparsify_(model, progress="yes")


def test_progress_without_tqdm(capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # import fails: plain lines instead
    fs.sparsify_(tiny_model("opt"), progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "flashsparse: sparsify 12/12 layers" and len(lines) == 12


def test_torch_compile_adds_no_graph_breaks():
    model = tiny_model("llama", tie=True)
    ids = input_ids(batch=1, length=7)
    dense = torch._dynamo.explain(model)(ids)
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids).logits
    fs.sparsify_(model)
    sparse = torch._dynamo.explain(model)(ids)
    assert sparse.graph_break_count == dense.graph_break_count
    assert sparse.graph_count == dense.graph_count
    assert sparse.graph_break_count == 0, [str(r.reason) for r in sparse.break_reasons]
    ops = [n for g in sparse.graphs for n in g.graph.nodes if "flashsparse" in str(n.target)]
    assert len(ops) == 14  # every projection runs the custom op inside the graph
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, expected) < 1e-5
    torch._dynamo.reset()


# -- the command ------------------------------------------------------------------------------------
def _prune_projections(model, sparsity):
    skipped = default_skipped_linears(model)
    with torch.no_grad():
        for fqn, m in model.named_modules():
            if isinstance(m, nn.Linear) and fqn not in skipped:
                m.weight.copy_(fs.prune(m.weight, sparsity))


def test_cli_sparsify_dense_checkpoint_then_load(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama", tie=False))
    model = model.to(torch.bfloat16).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    (src / "tokenizer_config.json").write_text("{}")
    assert main(["sparsify", str(src), str(out), "--sparsity", "0.5", "--format", "tiled_csl"]) == 0
    printed = capsys.readouterr().out
    assert "14 (tiled_csl: 14)" in printed and "50.0% sparsity" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "flashsparse.safetensors",
        "generation_config.json",
        "tokenizer_config.json",
    ]
    _prune_projections(model, 0.5)  # what the command did, done to the dense model
    config = transformers.AutoConfig.from_pretrained(out)
    with torch.device("meta"):
        loaded = transformers.AutoModelForCausalLM.from_config(config)
    fs.load_sparse(loaded, out)
    loaded.eval()
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
    ids = input_ids(batch=1, length=5)
    kwargs = dict(
        attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
    )
    expected = model.generate(ids, **kwargs)
    assert len(set(expected[0, 5:].tolist())) > 4
    assert torch.equal(loaded.generate(ids, **kwargs), expected)
    assert (
        main(["sparsify", str(src), str(tmp_path / "json"), "--json", "--min-sparsity", "0.9"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (
        report["sparse_layers"] == 0 and report["dense_linear_layers"] == 15
    )  # nothing is 90 % sparse
    assert main(["sparsify", str(src), str(tmp_path / "unpruned")]) == 0  # converts, but says so
    assert "their dense size" in capsys.readouterr().err


def test_cli_sparsify_rejects_bad_input(tmp_path, capsys):
    assert main(["sparsify", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
    src = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_config(tiny_config("opt")).save_pretrained(src)
    assert main(["sparsify", str(src), str(src)]) == 2
    assert "must differ" in capsys.readouterr().err
    assert main(["sparsify", str(src), str(tmp_path / "o"), "--sparsity", "1.5"]) == 2
    assert "--sparsity must be in [0, 1)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sparsify", str(src), str(tmp_path / "o"), "--format", "coo"])


def test_e2e_benchmark_runs_its_cpu_smoke_config(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "e2e.py"
    spec = importlib.util.spec_from_file_location("bench_e2e", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    out = tmp_path / "e2e.json"
    argv = [
        "--sparsities",
        "0.5",
        "--batches",
        "1,2",
        "--modes",
        "eager",
        "--new-tokens",
        "2",
        "--prompt",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    result = e2e.main(argv)
    printed = capsys.readouterr().out
    assert "TINY Llama config" in printed and "not a measurement" in printed
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["model"], r["batch"]) for r in result["rows"]] == [
        ("dense", 1),
        ("dense", 2),
        ("flashsparse-bitmap", 1),
        ("flashsparse-bitmap", 2),
        ("sliced", 1),
        ("sliced", 2),
    ]
    assert all(r["tokens_per_s"] > 0 and "error" not in r for r in result["rows"])
    (check,) = result["checks"]
    assert check["logits_rel_err"] < RTOL[torch.bfloat16]
    assert check["greedy_tokens_equal_fraction"] == {"eager/b1": 1.0, "eager/b2": 1.0}
    from flashsparse.kernels.cpu import bitmap as cpu_kernels

    kernel = "bitmap/cpu" if cpu_kernels._available() is None else "bitmap/reference"
    assert check["summary"]["sparse_layers"] == 14 and check["kernel"] == kernel
    # A second run at another sparsity merges into the same file; dense is not timed again.
    result = e2e.main([*argv[:1], "0.7", argv[2], "1", *argv[4:]])
    assert sorted(
        (r["model"], r.get("sparsity") if r["model"] != "dense" else None, r["batch"])
        for r in result["rows"]
    ) == sorted(
        [
            ("dense", None, 1),
            ("dense", None, 2),
            ("flashsparse-bitmap", 0.5, 1),
            ("flashsparse-bitmap", 0.5, 2),
            ("flashsparse-bitmap", 0.7, 1),
            ("sliced", 0.5, 1),
            ("sliced", 0.5, 2),
            ("sliced", 0.7, 1),
        ]
    )
    assert [c["sparsity"] for c in result["checks"]] == [0.5, 0.7]
