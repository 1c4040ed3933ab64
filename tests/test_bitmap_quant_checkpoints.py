"""Checkpoints with int8 / fp8 quantized sparse weights: flashsparse's own file (exact round
trips, version 3 only when needed) and compressed-tensors ``sparse-bitmask`` + ``int-quantized``
/ ``float-quantized`` checkpoints in both key layouts, written by the test writer
(compressed_tensors_writer.py), with clear errors for the layouts flashsparse does not read."""

from __future__ import annotations

import json
import os

import pytest
import torch
from compressed_tensors_writer import compress_state, weights_scheme, write_checkpoint
from conftest import rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # every test builds transformers models

import flashsparse as fs
from flashsparse import SparseLinear
from flashsparse.cli import main
from flashsparse.serialization import empty_weights
from flashsparse.serialization.compressed_tensors import (
    load_compressed_tensors,
    scales_from_checkpoint,
)

CONFIG = dict(
    vocab_size=160,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)
IDS = torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_llama(device=None):
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config).eval()
    return transformers.LlamaForCausalLM(config).eval()


def empty_llama():
    with empty_weights():
        return tiny_llama().eval()


def pruned_llama(dtype=torch.bfloat16):
    model = tiny_llama().to(dtype)
    with torch.no_grad():
        for fqn, m in model.named_modules():
            if isinstance(m, nn.Linear) and fqn != "lm_head":
                m.weight.copy_(fs.prune(m.weight.float(), 0.6).to(dtype))
    return model


def linear_names(model) -> set[str]:
    return {
        fqn for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and fqn != "lm_head"
    }


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


# -- flashsparse's own file ---------------------------------------------------------------------
def quantized_llama():
    """int8 per row, fp8 in groups of 32, an unquantized bitmap layer and a tiled_csl one."""
    model = pruned_llama()
    fs.sparsify_(model, lambda m, fqn: "mlp.up" in fqn, format="tiled_csl")
    fs.sparsify_(model, lambda m, fqn: "mlp.down" in fqn, format="bitmap")
    fs.sparsify_(model, lambda m, fqn: "self_attn" in fqn, quant="int8")
    fs.sparsify_(model, lambda m, fqn: "gate" in fqn, quant="fp8", group_size=32)
    return model


def test_round_trip_is_exact(tmp_path):
    model = quantized_llama()
    path = fs.save_sparse(model, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert int(meta["format_version"]) == 3
    layers = json.loads(meta["layers"])
    assert layers["model.layers.0.self_attn.q_proj"]["quant"] == "int8"
    entry = layers["model.layers.1.mlp.gate_proj"]
    assert entry["quant"] == "fp8" and entry["group_size"] == 32 and entry["quant_error"] > 0
    assert "quant" not in layers["model.layers.0.mlp.down_proj"]
    target = tiny_llama(device="meta")
    fs.load_sparse(target, path)
    for fqn, layer in model.named_modules():
        if isinstance(layer, SparseLinear):
            loaded = target.get_submodule(fqn)
            assert (loaded.format, loaded.quant, loaded.group_size) == (
                layer.format,
                layer.quant,
                layer.group_size,
            )
            assert loaded.quant_error == layer.quant_error
            for a, b in zip(loaded.weight.tensors, layer.weight.tensors, strict=True):
                assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert torch.equal(logits(target), logits(model))
    summary = fs.sparsify_summary(target)
    assert len(summary.quant_errors) == 10


def test_bad_quant_entries_are_refused(tmp_path):
    model = quantized_llama()
    path = fs.save_sparse(model, tmp_path / "m.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    for edit, message in (
        ({"quant": "int4"}, "bad layer entry"),
        ({"group_size": 48}, "bad layer entry"),
        ({"quant": "fp8"}, "says fp8 but holds int8"),
    ):
        layers = json.loads(meta["layers"])
        layers["model.layers.0.self_attn.q_proj"].update(edit)
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, "layers": json.dumps(layers)})
        with pytest.raises(ValueError, match=message):
            fs.load_sparse(tiny_llama(device="meta"), bad)
    # A quantized layer in a file that claims version 2 (no reader of version 2 knows quant).
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={**meta, "format_version": "2"})
    with pytest.raises(ValueError, match="bad layer entry"):
        fs.load_sparse(tiny_llama(device="meta"), tmp_path / "v2.safetensors")


# -- compressed-tensors ------------------------------------------------------------------------
SCHEMES = {
    "int8-channel": ("int-quantized", "int", "channel", None, None),
    "int8-group128": ("int-quantized", "int", "group", 128, None),
    "int8-tensor": ("naive-quantized", "int", "tensor", None, None),
    "fp8-channel": ("float-quantized", "float", "channel", None, None),
    "fp8-block": ("float-quantized", "float", "block", None, (64, 128)),
}


def write_quantized(directory, model, scheme, *, legacy=False, dense=frozenset()):
    """``model`` quantized with ``scheme`` and sparse-bitmask compressed (the linears named in
    ``dense`` quantized but stored dense)."""
    fmt, kind, strategy, group_size, block = SCHEMES[scheme]
    names = linear_names(model)
    state = compress_state(
        model.state_dict(),
        names - set(dense),
        names,
        kind=kind,
        strategy=strategy,
        group_size=group_size,
        block=block,
        legacy=legacy,
    )
    write_checkpoint(
        directory,
        model.config.to_dict(),
        state,
        quant_format=fmt,
        weights=weights_scheme(kind, strategy, group_size, block),
        version="0.8.1" if legacy else "0.9.1",
    )
    return state


def dequantized(state, fqn, m, k, scheme, dtype):
    """What compressed-tensors' decompression gives: code * scale (in the scale's dtype)."""
    _, _, strategy, group_size, block = SCHEMES[scheme]
    if f"{fqn}.weight" in state:
        codes = state[f"{fqn}.weight"]
    else:
        prefix = fqn if f"{fqn}.bitmask" in state else f"{fqn}.weight"
        bits = torch.from_numpy(
            __import__("numpy").unpackbits(
                state[f"{prefix}.bitmask"].numpy(), axis=-1, bitorder="little"
            )
        )[:, :k].bool()
        codes = torch.zeros(m, k, dtype=state[f"{prefix}.compressed"].dtype)
        codes[bits] = state[f"{prefix}.compressed"]
    scale = state[f"{fqn}.weight_scale"]
    if strategy == "tensor" or strategy == "channel":
        full = scale.expand(m, k)
    elif strategy == "group":
        full = scale.repeat_interleave(group_size, 1)
    else:
        full = scale.repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :k]
    return (codes.to(scale.dtype) * full).to(dtype)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("legacy", [False, True], ids=["0.9-layout", "0.8-layout"])
def test_quantized_checkpoints_load_as_compressed_tensors_defines_them(tmp_path, scheme, legacy):
    model = pruned_llama()
    dense = {"model.layers.1.self_attn.o_proj"}  # quantized but not sparse-compressed
    state = write_quantized(tmp_path, model, scheme, legacy=legacy, dense=dense)
    target = empty_llama()
    fs.load_sparse(target, tmp_path)
    layers = {fqn: m for fqn, m in target.named_modules() if isinstance(m, SparseLinear)}
    assert set(layers) == linear_names(model)
    quant = "int8" if scheme.startswith("int8") else "fp8"
    reference = pruned_llama()
    with torch.no_grad():
        for fqn, layer in layers.items():
            assert layer.quant == quant and layer.format == "bitmap"
            assert layer.dtype == torch.bfloat16  # the checkpoint's config.json torch_dtype
            m, k = layer.out_features, layer.in_features
            expected = dequantized(state, fqn, m, k, scheme, torch.bfloat16)
            assert torch.equal(layer.weight.to_dense(), expected), fqn
            reference.get_submodule(fqn).weight.copy_(expected)
    assert layers["model.layers.0.mlp.down_proj"].group_size == (  # K = 256: two groups
        128 if scheme in ("int8-group128", "fp8-block") else None  # fp8 blocks: 64 x 128
    )
    # The model computes with the dequantized weights (bf16 logits: within bf16 tolerance).
    assert rel_err(logits(target.to(torch.bfloat16)), logits(reference).double()) < 1e-2


def test_quantized_checkpoint_logits_close_to_the_unquantized_model(tmp_path):
    model = pruned_llama()
    write_quantized(tmp_path, model, "int8-channel")
    target = empty_llama()
    fs.load_sparse(target, tmp_path)
    assert rel_err(logits(target.to(torch.bfloat16)), logits(model).double()) < 0.03


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "pack-quantized"}, "'pack-quantized' is not supported"),
        ({"format": "marlin-24"}, "'marlin-24' is not supported"),
        ({"format": "mystery"}, "'mystery' is not supported"),
        (
            {"sparsity_config": {"format": "sparse-24-bitmask"}},
            "'sparse-24-bitmask' is not supported",
        ),
        ({"weights": {"num_bits": 4}}, "4-bit"),
        ({"weights": {"symmetric": False}}, "asymmetric"),
        ({"weights": {"strategy": "token"}}, "strategy 'token'"),
        ({"weights": {"actorder": "group"}}, "activation-ordered"),
        ({"weights": {"strategy": "block", "block_structure": None}}, "block_structure"),
    ],
)
def test_unsupported_quantization_configs(tmp_path, edit, message):
    model = pruned_llama()
    write_quantized(tmp_path, model, "int8-channel")
    config = json.loads((tmp_path / "config.json").read_text())
    qc = config["quantization_config"]
    for key, value in edit.items():
        if key == "weights":
            qc["config_groups"]["group_0"]["weights"].update(value)
        else:
            qc[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    target = empty_llama()
    with pytest.raises(ValueError, match=message):
        fs.load_sparse(target, tmp_path)
    assert not any(isinstance(m, SparseLinear) for m in target.modules())


@pytest.mark.parametrize(
    ("suffix", "message"),
    [
        ("weight_zero_point", "zero points"),
        ("weight_packed", "packed sub-byte codes"),
        ("weight_g_idx", "activation-ordered groups"),
    ],
)
def test_tensors_of_unsupported_layouts_are_named(tmp_path, suffix, message):
    model = pruned_llama()
    state = write_quantized(tmp_path, model, "int8-channel")
    name = f"model.layers.0.mlp.up_proj.{suffix}"
    state[name] = torch.zeros(256, 1, dtype=torch.int8)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} holds {message}"):
        fs.load_sparse(empty_llama(), tmp_path)


def test_scale_layouts_the_kernels_do_not_take_are_refused():
    for scale, k, message in (
        (torch.ones(8, 2), 192, r"group size 96\) is not a layout"),  # groups of 96
        (torch.ones(8, 4), 100, r"group size 25\) is not a layout"),
        (torch.ones(8, 8), 128, r"group size 16\) is not a layout"),
        (torch.ones(4, 2), 128, r"has shape \(4, 2\)"),
        (torch.ones(8, 1, dtype=torch.int32), 64, "floating-point"),
        (torch.full((8, 1), float("inf")), 64, "non-finite"),
    ):
        with pytest.raises(ValueError, match=message):
            scales_from_checkpoint(scale, 8, k, "layer")
    scales, group = scales_from_checkpoint(torch.ones(8, 4, dtype=torch.bfloat16), 8, 256, "l")
    assert group == 64 and scales.dtype == torch.float32 and scales.shape == (8, 4)
    scales, group = scales_from_checkpoint(torch.tensor([0.5]), 8, 100, "l")
    assert group is None and scales.shape == (8, 1) and bool((scales == 0.5).all())


def test_quant_and_format_conflicts(tmp_path):
    model = pruned_llama()
    write_quantized(tmp_path / "q", model, "fp8-channel")
    with pytest.raises(ValueError, match="loads as format 'bitmap'"):
        load_compressed_tensors(empty_llama(), tmp_path / "q", format="tiled_csl")
    with pytest.raises(ValueError, match="already quantized"):
        load_compressed_tensors(empty_llama(), tmp_path / "q", quant="int8")
    # An unquantized sparse checkpoint quantized on the way in.
    write_checkpoint(
        tmp_path / "s",
        model.config.to_dict(),
        compress_state(model.state_dict(), linear_names(model)),
    )
    target = load_compressed_tensors(empty_llama(), tmp_path / "s", quant="int8", group_size=32)
    layers = [m for m in target.modules() if isinstance(m, SparseLinear)]
    assert layers and all(m.quant == "int8" and m.group_size == 32 for m in layers)
    assert rel_err(logits(target.to(torch.bfloat16)), logits(model).double()) < 0.03


def test_activation_quantization_is_said_to_be_ignored(tmp_path):
    model = pruned_llama()
    write_quantized(tmp_path, model, "int8-channel")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8,
        "type": "int",
        "dynamic": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(RuntimeWarning, match="weight-only"):
        fs.load_sparse(empty_llama(), tmp_path)


def test_cli_sparsify_quant_and_quantized_input(tmp_path, capsys):
    # A dense pruned Hugging Face directory, quantized by the CLI.
    model = pruned_llama()
    model.save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    assert (
        main(
            [
                "sparsify",
                str(tmp_path / "dense"),
                str(out),
                "--quant",
                "int8",
                "--group-size",
                "128",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "quantized:" in printed and "int8: 14" in printed
    loaded = tiny_llama(device="meta")
    fs.load_sparse(loaded, out)
    layers = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and all(m.quant == "int8" and m.group_size == 128 for m in layers)
    assert rel_err(logits(loaded), logits(model).double()) < 0.03
    # A quantized compressed-tensors checkpoint, converted as it is.
    write_quantized(tmp_path / "ct", model, "fp8-channel")
    assert main(["sparsify", str(tmp_path / "ct"), str(tmp_path / "out2")]) == 0
    assert "fp8: 14" in capsys.readouterr().out
    assert main(["sparsify", str(tmp_path / "ct"), str(tmp_path / "out3"), "--quant", "int8"]) == 2
    assert "already quantized" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["sparsify", str(tmp_path / "dense"), str(tmp_path / "o4"), "--quant", "int4"])
    assert exit_info.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    assert (
        main(["sparsify", str(tmp_path / "dense"), str(tmp_path / "o5"), "--group-size", "128"])
        == 2
    )
    assert "needs --quant" in capsys.readouterr().err
