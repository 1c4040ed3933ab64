"""Reading compressed-tensors ``sparse-bitmask`` checkpoints, written here by the test writer
(tests/compressed_tensors_writer.py: the layout compressed-tensors 0.9-0.14 write, step by
step, without the package, which dropped the sparse formats). Quantized checkpoints:
test_bitmap_quant_checkpoints.py."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import RTOL, rel_err
from helpers import random_weight
from safetensors.torch import save_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers
from compressed_tensors_writer import bitmask_compress, compress_state, write_checkpoint

import flashsparse as fs
from flashsparse import SparseLinear
from flashsparse.cli import main
from flashsparse.serialization import empty_weights
from flashsparse.serialization.compressed_tensors import (
    bitmask_to_bitmap,
    bitmask_to_dense,
    convert_bitmask,
    is_compressed_tensors_checkpoint,
    load_compressed_tensors,
)

pytestmark = pytest.mark.slow  # transformers models

SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")


def compress(w: torch.Tensor) -> list[torch.Tensor]:
    """``w`` as compressed-tensors stores it: [shape, compressed, bitmask, row_offsets]."""
    state = bitmask_compress(w)
    assert set(state) == set(SUFFIXES)
    return [state[s] for s in SUFFIXES]


CASES = [
    (1, 1, 0.0, "uniform"),
    (1, 77, 0.5, "uniform"),
    (130, 1, 0.5, "uniform"),
    (70, 100, 0.0, "uniform"),
    (70, 100, 1.0, "uniform"),
    (150, 203, 0.6, "dense_tiles"),
    (129, 65, 0.7, "empty_tiles"),
    (200, 130, 0.8, "row_skewed"),
    (64, 64, 0.5, "dense_column"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "k", "sparsity", "kind"), CASES)
def test_conversion_matches_the_layout(m, k, sparsity, kind, dtype):
    w = random_weight(m, k, sparsity, dtype, kind, seed=m * 1000 + k)
    parts = compress(w)
    assert torch.equal(bitmask_to_dense(*parts), w)
    direct = bitmask_to_bitmap(*parts)
    reference = fs.Bitmap.encode(w)
    for name, tensor in reference.state().items():
        assert torch.equal(direct.state()[name], tensor), name
    assert direct.nnz == reference.nnz
    for format in ("tiled_csl", "bitmap", "auto"):
        sw = convert_bitmask(*parts, format=format)
        assert sw.shape == (m, k) and sw.dtype == dtype
        sw.validate()
        assert torch.equal(sw.to_dense(), w)


def test_nan_and_negative_zero_follow_the_layout():
    w = random_weight(40, 90, 0.5, torch.float16, seed=3)
    w[0, 0], w[1, 5], w[2, 7] = float("nan"), -0.0, float("-inf")
    parts = compress(w)
    for sw in (
        convert_bitmask(*parts, format="bitmap"),
        convert_bitmask(*parts, format="tiled_csl"),
    ):
        dense = sw.to_dense()
        assert torch.isnan(dense[0, 0]) and dense[2, 7] == float("-inf")
        assert dense[1, 5] == 0 and sw.nnz == int((w != 0).sum())
        assert torch.equal(dense.nan_to_num(0.0), w.nan_to_num(0.0))


def test_inconsistent_tensors_are_refused():
    shape, values, bitmask, offsets = compress(random_weight(20, 30, 0.5, seed=1))
    cases = [
        (
            (shape, values[:-1], bitmask, offsets),
            ValueError,
            "marks .* nonzeros but compressed holds",
        ),
        ((shape, values, bitmask, offsets + 1), ValueError, "row_offsets do not match"),
        (
            (shape, values, bitmask[:, :-1], offsets),
            ValueError,
            r"must be uint8 of shape \(20, 4\)",
        ),
        ((torch.tensor([20, 33]), values, bitmask, offsets), ValueError, r"shape \(20, 5\)"),
        ((torch.tensor([20.0, 30.0]), values, bitmask, offsets), ValueError, "integer tensor"),
        (
            (shape, values.to(torch.float8_e4m3fn), bitmask, offsets),
            ValueError,
            "codes but the checkpoint has no weight_scale",
        ),
        (
            (shape, values.to(torch.int32), bitmask, offsets),
            TypeError,
            "int8 / float8_e4m3fn codes",
        ),
        ((shape, values, bitmask, offsets[:-1]), ValueError, r"row_offsets must be .* \(20,\)"),
    ]
    flipped = bitmask.clone()
    flipped[0, -1] |= 0x80  # column 31 of a 30-column weight
    cases.append(((shape, values, flipped, offsets), ValueError, "past column 30"))
    for args, error, message in cases:
        for format in ("bitmap", "tiled_csl"):
            with pytest.raises(error, match=message):
                convert_bitmask(*args, format=format, name="layer")


# -- whole checkpoints --------------------------------------------------------------------------------
def tiny_llama():
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def linear_names(model) -> set[str]:
    return {
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn != "lm_head"
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A pruned bf16 tiny Llama saved as llm-compressor saves one: the compressed state dict in
    safetensors, and the compression config in config.json."""
    model = tiny_llama().to(torch.bfloat16).eval()
    with torch.no_grad():
        for fqn, m in model.named_modules():
            if isinstance(m, nn.Linear) and fqn != "lm_head":
                m.weight.copy_(fs.prune(m.weight, 0.6))
    directory = tmp_path_factory.mktemp("ct")
    state = compress_state(model.state_dict(), linear_names(model))
    write_checkpoint(directory, model.config.to_dict(), state)
    return model, state, directory


IDS = torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def empty_llama():
    with empty_weights():
        return tiny_llama().eval()


def test_checkpoint_layout_is_what_the_reader_expects(checkpoint):
    _, state, directory = checkpoint
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == "sparse-bitmask"
    assert "model.layers.0.mlp.up_proj.bitmask" in state and "lm_head.weight" in state
    assert "model.layers.0.mlp.up_proj.weight" not in state
    assert is_compressed_tensors_checkpoint(directory)
    assert is_compressed_tensors_checkpoint(directory / "model.safetensors")


@pytest.mark.parametrize("format", ["bitmap", "tiled_csl", "auto"])
def test_load_checkpoint_matches_dense_model(checkpoint, format):
    model, _, directory = checkpoint
    target = empty_llama()
    fs.load_sparse(target, directory, format=format)  # detects compressed-tensors
    sparse = [m for m in target.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 14 and type(target.lm_head) is nn.Linear
    if format != "auto":
        assert {m.format for m in sparse} == {format}
    assert not any(t.device.type == "meta" for t in [*target.parameters(), *target.buffers()])
    assert target.lm_head.weight.dtype == torch.bfloat16
    for name, layer in target.named_modules():
        if isinstance(layer, SparseLinear):
            assert torch.equal(layer.weight.to_dense(), model.get_submodule(name).weight), name
    # Built with empty_weights(), the rotary buffers are fp32 as in from_pretrained; the dense
    # model cast them to bf16 with .to(). Within bf16 tolerance, then exact once cast alike.
    assert rel_err(logits(target), logits(model).double()) < RTOL[torch.bfloat16]
    assert torch.equal(logits(target.to(torch.bfloat16)), logits(model))


def test_sharded_and_legacy_key_checkpoints(checkpoint, tmp_path):
    model, state, _ = checkpoint
    # Shards with an index, as save_pretrained writes them; keys in the pre-0.7 naming
    # ``<module>.weight.<suffix>``.
    legacy = {}
    for key, value in state.items():
        prefix, _, suffix = key.rpartition(".")
        legacy[f"{prefix}.weight.{suffix}" if suffix in SUFFIXES else key] = value.contiguous()
    names = sorted(legacy)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: legacy[k] for k in keys}, str(tmp_path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    target = empty_llama()
    load_compressed_tensors(target, tmp_path, format="bitmap")
    assert torch.equal(logits(target.to(torch.bfloat16)), logits(model))
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_compressed_tensors(empty_llama(), tmp_path)


def test_bad_checkpoints_leave_the_model_untouched(checkpoint, tmp_path):
    _, state, directory = checkpoint
    target = empty_llama()
    inv_freq = target.model.rotary_emb.inv_freq.clone()

    def assert_untouched():
        assert all(p.device.type == "meta" for p in target.parameters())
        assert not any(isinstance(m, SparseLinear) for m in target.modules())
        assert torch.equal(target.model.rotary_emb.inv_freq, inv_freq)

    broken = dict(state)
    broken["model.layers.1.mlp.down_proj.row_offsets"] = (
        broken["model.layers.1.mlp.down_proj.row_offsets"] + 1
    )
    save_file({k: v.contiguous() for k, v in broken.items()}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.row_offsets do not match"
    ):
        load_compressed_tensors(target, tmp_path / "broken.safetensors")
    assert_untouched()
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        load_compressed_tensors(target, tmp_path / "cut.safetensors")
    assert_untouched()
    partial = {k: v for k, v in state.items() if not k.startswith("model.norm")}
    save_file(
        {k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "partial.safetensors")
    )
    with pytest.raises(ValueError, match=r"no tensor for model\.norm\.weight"):
        load_compressed_tensors(target, tmp_path / "partial.safetensors")
    assert_untouched()
    incomplete = {k: v for k, v in state.items() if k != "model.layers.0.mlp.up_proj.row_offsets"}
    save_file({k: v.contiguous() for k, v in incomplete.items()}, str(tmp_path / "inc.safetensors"))
    with pytest.raises(ValueError, match="lacks row_offsets"):
        load_compressed_tensors(target, tmp_path / "inc.safetensors")
    assert_untouched()
    with torch.device("meta"):  # no rotary buffers: the checkpoint cannot supply them
        meta = tiny_llama()
    with pytest.raises(ValueError, match="empty_weights"):
        load_compressed_tensors(meta, directory)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            {"sparsity_config": {"format": "sparse-24-bitmask"}},
            "'sparse-24-bitmask' is not supported",
        ),
        (
            {"config_groups": {"group_0": {"targets": ["Linear"]}}, "format": "pack-quantized"},
            "'pack-quantized' is not supported",
        ),
    ],
)
def test_unsupported_compression_configs(checkpoint, tmp_path, edit, message):
    _, _, directory = checkpoint
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"].update(edit)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_compressed_tensors(empty_llama(), tmp_path)


def test_cli_converts_a_compressed_tensors_checkpoint(checkpoint, tmp_path, capsys):
    model, _, directory = checkpoint
    out = tmp_path / "out"
    assert main(["sparsify", str(directory), str(out), "--format", "tiled_csl"]) == 0
    printed = capsys.readouterr().out
    assert "compressed-tensors sparse-bitmask" in printed and "14 (tiled_csl: 14)" in printed
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "compression_config" not in config
    with torch.device("meta"):
        loaded = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(out)
        )
    fs.load_sparse(loaded, out)
    assert rel_err(logits(loaded.eval()), logits(model).double()) < RTOL[torch.bfloat16]
    assert main(["sparsify", str(directory), str(tmp_path / "again"), "--sparsity", "0.5"]) == 2
    assert "already sparse" in capsys.readouterr().err
