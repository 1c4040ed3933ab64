"""``bench/e2e.py``'s sliced model (issue 16): a Llama shrunk to the sparse model's stored weight
count, timed next to it. A tiny run on the CPU, and the parameter arithmetic against a real
``transformers`` model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.slow  # the end-to-end benchmark on a model

pytest.importorskip("transformers")

E2E_PATH = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("flashsparse_bench_e2e", E2E_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def projection_weights_of(model: nn.Module) -> int:
    head = model.get_output_embeddings()
    return sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
    )


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_sliced_config_builds_a_llama_with_the_target_count(e2e, sparsity):
    config = dict(e2e.TINY, hidden_size=208, intermediate_size=552)  # head_dim 26
    full = e2e.projection_params(config)
    dense = e2e.build_model(config, torch.float32, torch.device("cpu"), seed=0)
    assert projection_weights_of(dense) == full
    target = round((1 - sparsity) * full)
    cfg = e2e.sliced_config(config, target, align=8)
    assert cfg["hidden_size"] % 8 == 0 and cfg["intermediate_size"] % 8 == 0
    assert cfg["head_dim"] == 26 and cfg["num_attention_heads"] == config["num_attention_heads"]
    model = e2e.build_model(cfg, torch.float32, torch.device("cpu"), seed=0)
    assert projection_weights_of(model) == e2e.projection_params(cfg)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (8 * 26, cfg["hidden_size"])
    # Rounding the sizes to multiples of 8 moves the count a few percent at this toy size.
    assert abs(e2e.projection_params(cfg) / target - 1) < 0.06
    with torch.no_grad():
        logits = model(torch.tensor([[3, 5, 7]])).logits
    assert logits.shape == (1, 3, config["vocab_size"]) and torch.isfinite(logits).all()


@pytest.mark.parametrize("sparsity", [0.5, 0.7, 0.9])
def test_sliced_config_at_llama3_8b_size(e2e, sparsity):
    full = e2e.projection_params(e2e.LLAMA3_8B)
    assert full == 32 * (4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336)
    target = round((1 - sparsity) * full)
    cfg = e2e.sliced_config(e2e.LLAMA3_8B, target, align=64)
    assert cfg["hidden_size"] < 4096 and cfg["intermediate_size"] < 14336
    assert abs(e2e.projection_params(cfg) / target - 1) < 0.02
    # One factor for both sizes (up to the rounding to 64).
    f = cfg["hidden_size"] / 4096
    assert abs(cfg["intermediate_size"] / 14336 - f) < 64 / 4096


def test_sliced_config_rejects_bad_targets(e2e):
    with pytest.raises(ValueError, match="target_params must be in"):
        e2e.sliced_config(e2e.TINY, 0, align=8)
    with pytest.raises(ValueError, match="target_params must be in"):
        e2e.sliced_config(e2e.TINY, e2e.projection_params(e2e.TINY) + 1, align=8)
    with pytest.raises(ValueError, match="align must be a positive integer"):
        e2e.sliced_config(e2e.TINY, 1000, align=0)


def test_tiny_e2e_run_times_the_sliced_model(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    args = ["--tiny", "--sparsities", "0.6", "--batches", "1", "--modes", "eager"]
    args += ["--repeats", "1", "--new-tokens", "3", "--prompt", "4", "--out", str(out), "--fresh"]
    result = e2e.main(args)
    text = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    models = [r["model"] for r in result["rows"]]
    assert models[0] == "dense" and models[1].startswith("flashsparse-") and models[2] == "sliced"
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["tokens_per_s"] > 0
    sliced = result["rows"][2]
    assert sliced["hidden_size"] < e2e.TINY["hidden_size"]
    assert sliced["intermediate_size"] < e2e.TINY["intermediate_size"]
    # The sparse model stores 40 % of the projection weights (each of the 14 linears pruned to
    # a whole number); the sliced one holds as many, up to rounding its sizes to multiples of 8.
    full = e2e.projection_params(e2e.TINY)
    assert abs(sliced["sparse_stored_weights"] - 0.4 * full) <= 14
    assert abs(sliced["params_vs_sparse"] - 1) < 0.06
    assert sliced["projection_params"] == e2e.projection_params(
        dict(e2e.TINY, hidden_size=sliced["hidden_size"],
             intermediate_size=sliced["intermediate_size"], head_dim=32)
    )  # fmt: skip
    assert result["checks"][0]["sliced"]["projection_params"] == sliced["projection_params"]
    assert "| 60% | sliced | eager | 1 |" in text and "sliced vs sparse" in text


def test_no_sliced_leaves_it_out(e2e, tmp_path, capsys):
    args = ["--tiny", "--sparsities", "0.5", "--batches", "1", "--modes", "eager", "--no-sliced"]
    args += ["--repeats", "1", "--new-tokens", "2", "--prompt", "3"]
    result = e2e.main([*args, "--out", str(tmp_path / "e.json"), "--fresh"])
    capsys.readouterr()
    assert len(result["rows"]) == 2
    assert not any(r["model"] == "sliced" for r in result["rows"])
    assert "sliced" not in result["checks"][0]
