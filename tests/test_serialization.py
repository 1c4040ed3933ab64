"""save_sparse / load_sparse: exact round trips into meta and materialised models, and clear
errors -- with the model untouched -- for other architectures, newer versions and bad files."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("safetensors")
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import flashsparse as fs
from flashsparse import SparseLinear
from flashsparse.serialization import (
    FILE_NAME,
    FORMAT_VERSION,
    architecture,
    checksum,
    empty_weights,
    read_header,
)

pytestmark = pytest.mark.slow  # transformers models


def tiny_llama(tie=True, hidden=64, seed=0, device=None):
    config = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=hidden,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(config).eval()
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt(device=None):
    config = transformers.OPTConfig(
        vocab_size=160,
        hidden_size=64,
        ffn_dim=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=64,
    )
    torch.manual_seed(0)
    if device == "meta":
        with torch.device("meta"):
            return transformers.OPTForCausalLM(config).eval()
    return transformers.OPTForCausalLM(config).eval()


def sparse_llama(dtype=torch.bfloat16, tie=True):
    """Mixed formats, one projection left dense, head dense and tied."""
    model = tiny_llama(tie).to(dtype)
    with torch.no_grad():
        for i, (fqn, m) in enumerate(
            n for n in model.named_modules() if isinstance(n[1], nn.Linear)
        ):
            if fqn != "lm_head":
                m.weight.copy_(fs.prune(m.weight, [0.5, 0.7, 0.9, 1.0][i % 4]))
    fs.sparsify_(model, lambda m, fqn: "mlp" in fqn, format="tiled_csl")
    fs.sparsify_(
        model,
        lambda m, fqn: "self_attn" in fqn and not fqn.endswith("0.self_attn.o_proj"),
        format="bitmap",
    )
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {
        n: type(m) for n, m in model.named_modules()
    }


def assert_untouched(model, before):
    state, types = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        if v.device.type == "meta":
            assert now[k].device.type == "meta"
        else:
            assert torch.equal(now[k], v), k


IDS = torch.randint(0, 160, (2, 7), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_round_trip_into_meta_model_is_exact(tmp_path):
    model = sparse_llama()
    expected = logits(model)
    path = fs.save_sparse(model, tmp_path / "m.safetensors")
    assert path == tmp_path / "m.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left
    target = tiny_llama(device="meta")
    assert fs.load_sparse(target, path) is target
    assert all(t.device.type == "cpu" for t in [*target.parameters(), *target.buffers()])
    assert target.lm_head.weight is target.model.embed_tokens.weight  # still tied
    assert {n: type(m) for n, m in target.named_modules()} == {
        n: type(m) for n, m in model.named_modules()
    }
    src, dst = model.state_dict(), target.state_dict()
    assert src.keys() == dst.keys()
    for k in src:
        assert src[k].dtype == dst[k].dtype and torch.equal(src[k], dst[k]), k
    for name, buf in model.named_buffers():  # non-persistent ones (rotary) too
        assert torch.equal(buf, target.get_buffer(name)), name
    formats = {n: m.format for n, m in target.named_modules() if isinstance(m, SparseLinear)}
    assert formats == {n: m.format for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    assert set(formats.values()) == {"tiled_csl", "bitmap"}
    assert type(target.model.layers[0].self_attn.o_proj) is nn.Linear
    assert torch.equal(logits(target), expected)


def test_round_trip_opt_with_biases_into_materialised_model(tmp_path):
    model = tiny_opt().to(torch.float16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.copy_(fs.prune(m.weight, 0.6))
    fs.sparsify_(model)
    expected = logits(model)
    fs.save_sparse(model, tmp_path)  # a directory: flashsparse.safetensors inside
    assert (tmp_path / FILE_NAME).is_file()
    target = tiny_opt()  # random weights, fp32, dense: all replaced
    fs.load_sparse(target, tmp_path)
    assert target.model.decoder.layers[1].fc1.bias.dtype == torch.float16
    assert target.model.decoder.layers[1].fc1.bias.requires_grad
    assert torch.equal(logits(target), expected)
    # Loading into a model that is already sparse (other nonzeros) replaces those layers too.
    other = tiny_opt()
    fs.sparsify_(other)
    fs.load_sparse(other, tmp_path / FILE_NAME)
    assert torch.equal(logits(other), expected)


def test_plain_module_with_empty_and_full_layers(tmp_path):
    model = nn.Sequential(
        nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 9, bias=False), nn.Linear(9, 5)
    )
    with torch.no_grad():
        model[0].weight.zero_()  # 100 % sparse: zero-length words/values
    fs.sparsify_(model, lambda m, fqn: fqn != "3")
    path = fs.save_sparse(model, tmp_path / "plain.safetensors")
    with torch.device("meta"):
        target = nn.Sequential(
            nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 9, bias=False), nn.Linear(9, 5)
        )
    fs.load_sparse(target, path)
    x = torch.randn(4, 70)
    assert torch.equal(target(x), model(x))
    assert target[0].weight.nnz == 0 and target[2].weight.sparsity == 0.0


def test_dense_file_layer_into_sparse_model_layer(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    path = fs.save_sparse(model, tmp_path / "dense.safetensors")  # no sparse layer at all
    target = fs.sparsify_(nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4)))
    fs.load_sparse(target, path)
    assert [type(m) for m in target] == [nn.Linear, nn.Linear]
    x = torch.randn(3, 16)
    assert torch.equal(target(x), model(x))


def test_compiled_model_saves_its_original(tmp_path):
    model = sparse_llama(torch.float32)
    path = fs.save_sparse(torch.compile(model), tmp_path / "c.safetensors")
    target = tiny_llama(device="meta")
    fs.load_sparse(target, path)
    assert torch.equal(logits(target), logits(model))


def test_metadata_describes_the_file(tmp_path):
    model = sparse_llama()
    path = fs.save_sparse(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    # No quantized layers: written as version 2, which flashsparse before version 3 reads.
    assert meta["format"] == "flashsparse" and int(meta["format_version"]) == 2 < FORMAT_VERSION
    assert (
        meta["flashsparse_version"] == fs.__version__ and meta["torch_version"] == torch.__version__
    )
    assert (
        json.loads(meta["architecture"])
        == architecture(model)
        == architecture(tiny_llama(device="meta"))
    )
    layers = json.loads(meta["layers"])
    assert layers["model.layers.1.mlp.up_proj"] == {
        "format": "tiled_csl",
        "shape": [144, 64],
        "dtype": "bfloat16",
        "nnz": model.model.layers[1].mlp.up_proj.weight.nnz,
        "bias": False,
    }
    assert json.loads(meta["aliases"]) == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.rotary_emb.inv_freq" in json.loads(meta["non_persistent"])
    sums = json.loads(meta["checksums"])
    assert sums.keys() == keys and "lm_head.weight" not in keys
    assert sums["model.norm.weight"] == checksum(model.model.norm.weight.detach())
    assert (
        "model.layers.0.mlp.down_proj.words" in keys
        and "model.layers.0.mlp.down_proj.weight" not in keys
    )


# -- errors -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "m.safetensors"
    fs.save_sparse(sparse_llama(), path)
    return path


def rewrite(path, out, edit_tensors=None, edit_meta=None, fix_checksums=True):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if fix_checksums:
        meta["checksums"] = json.dumps({k: checksum(v) for k, v in tensors.items()})
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("materialised", [False, True], ids=["meta", "materialised"])
def test_other_architecture_is_refused(saved, tmp_path, materialised):
    target = tiny_opt(None if materialised else "meta")
    before = snapshot(target)
    with pytest.raises(
        ValueError, match="holds a LlamaForCausalLM model; cannot load it into a OPTForCausalLM"
    ):
        fs.load_sparse(target, saved)
    assert_untouched(target, before)
    wider = tiny_llama(hidden=96, device=None if materialised else "meta")
    before = snapshot(wider)
    with pytest.raises(
        ValueError,
        match=r"another size.*model\.layers\.0\.self_attn\.q_proj is 96x96 in the model, 64x64",
    ):
        fs.load_sparse(wider, saved)
    assert_untouched(wider, before)


def test_newer_format_version_is_refused(saved, tmp_path):
    newer_version = FORMAT_VERSION + 1
    newer = rewrite(
        saved,
        tmp_path / "newer.safetensors",
        edit_meta=lambda m: m.update(format_version=str(newer_version)),
    )
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(
        ValueError,
        match=rf"format version {newer_version} .* reads versions up to {FORMAT_VERSION}: upgrade flashsparse",
    ):
        fs.load_sparse(target, newer)
    assert_untouched(target, before)


def test_version_1_bitmap_file_is_converted_on_load(tmp_path):
    """Files written before the row-mask layout (format version 1: one mask per 8x8 sub-tile)
    load into today's layout with the same weights."""
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 9))
    for layer in (dense[0], dense[2]):
        layer.weight.data = fs.prune(layer.weight.data, 0.6)
    model = fs.sparsify_(dense, format="bitmap")
    path = fs.save_sparse(model, tmp_path / "v2.safetensors")

    def to_v1(tensors):
        for name, t in tensors.items():
            if name.endswith(".masks"):  # row masks -> [tile, sub-row, sub-col, row-in-sub] bytes
                by = t.view(torch.uint8).view(-1, 8, 8, 8)
                tensors[name] = by.permute(0, 1, 3, 2).contiguous().view(torch.int64).reshape(-1)

    old = rewrite(
        path,
        tmp_path / "v1.safetensors",
        edit_tensors=to_v1,
        edit_meta=lambda m: m.update(format_version="1"),
    )
    target = nn.Sequential(nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 9))
    fs.load_sparse(target, old)
    x = torch.randn(5, 70)
    assert torch.equal(target(x), model(x))
    assert torch.equal(target[0].weight.to_dense(), model[0].weight.to_dense())


@pytest.mark.parametrize("cut", [1, 1000, "header"])
def test_truncated_file_is_refused(saved, tmp_path, cut):
    data = saved.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:20] if cut == "header" else data[:-cut])
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(ValueError, match="truncated"):
        fs.load_sparse(target, bad)
    assert_untouched(target, before)


def test_corrupt_bytes_are_caught_by_checksums(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end + (len(data) - header_end) // 2] ^= 0x40  # one bit in the tensor data
    bad = tmp_path / "flip.safetensors"
    bad.write_bytes(bytes(data))
    target = tiny_llama(device="meta")
    before = snapshot(target)
    with pytest.raises(ValueError, match="does not match its checksum"):
        fs.load_sparse(target, bad)
    assert_untouched(target, before)
    fs.load_sparse(target, bad, verify=False)  # on request, the checks are skipped
    assert not any(t.device.type == "meta" for t in target.parameters())


def test_corrupt_header_and_foreign_files_are_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[9] = ord("#")  # the header is no longer JSON
    (tmp_path / "hdr.safetensors").write_bytes(bytes(data))
    save_file({"x": torch.ones(3)}, str(tmp_path / "foreign.safetensors"))
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    target = tiny_llama()
    before = snapshot(target)
    for name, message in [
        ("hdr", "not valid JSON"),
        ("foreign", "not a flashsparse file"),
        ("tiny", "only 3 bytes"),
    ]:
        with pytest.raises(ValueError, match=message):
            fs.load_sparse(target, tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        fs.load_sparse(target, tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="holds neither"):
        fs.load_sparse(target, tmp_path)
    assert_untouched(target, before)


def test_inconsistent_components_are_refused_before_any_change(saved, tmp_path):
    # Valid checksums, but one layer's offsets no longer match its words: a writer's bug or an
    # edited file. The layers before it in the file are fine -- and must not be installed.
    def break_offsets(tensors):
        t = tensors["model.layers.1.mlp.down_proj.tile_offsets"]
        t[-1] += 1

    bad = rewrite(saved, tmp_path / "bad.safetensors", edit_tensors=break_offsets)
    target = tiny_llama()
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"corrupt: sparse layer model\.layers\.1\.mlp\.down_proj"):
        fs.load_sparse(target, bad)
    assert_untouched(target, before)

    def drop(tensors):
        del tensors["model.norm.weight"]

    missing = rewrite(saved, tmp_path / "missing.safetensors", edit_tensors=drop)
    with pytest.raises(ValueError, match=r"model\.norm\.weight"):
        fs.load_sparse(target, missing)
    assert_untouched(target, before)

    def extra(tensors):
        tensors["model.surprise"] = torch.ones(2)

    surplus = rewrite(saved, tmp_path / "extra.safetensors", edit_tensors=extra)
    with pytest.raises(ValueError, match=r"no place for: model\.surprise"):
        fs.load_sparse(target, surplus)
    assert_untouched(target, before)
    garbled = rewrite(
        saved, tmp_path / "meta.safetensors", edit_meta=lambda m: m.update(layers="{")
    )
    with pytest.raises(ValueError, match="no valid 'layers' entry"):
        fs.load_sparse(target, garbled)
    assert_untouched(target, before)


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="meta device"):
        fs.save_sparse(tiny_llama(device="meta"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        fs.save_sparse(nn.Linear(2, 2), tmp_path / "m.bin")
    with pytest.raises(ValueError, match="does not exist"):
        fs.save_sparse(nn.Linear(2, 2), tmp_path / "no" / "m.safetensors")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fs.save_sparse("model", tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fs.load_sparse("model", tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_read_header_checks_sizes(saved):
    header = read_header(saved)
    assert header["__metadata__"]["format"] == "flashsparse"
    assert header["model.norm.weight"]["shape"] == [64]


def test_empty_weights_puts_parameters_on_meta_and_keeps_buffers():
    with empty_weights():
        model = tiny_llama()
        layer = nn.Linear(3, 4)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert layer.weight.device.type == "meta" and layer.weight.requires_grad
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    assert torch.equal(model.model.rotary_emb.inv_freq, tiny_llama().model.rotary_emb.inv_freq)
    assert nn.Linear(2, 2).weight.device.type == "cpu"  # restored afterwards

    class Tagged(nn.Module):
        def __init__(self):
            super().__init__()
            weight = nn.Parameter(torch.ones(3), requires_grad=False)
            weight.tag = "kept"
            self.weight = weight

    with empty_weights():
        tagged = Tagged()
    assert tagged.weight.device.type == "meta" and tagged.weight.tag == "kept"
    assert not tagged.weight.requires_grad


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_round_trip_other_architectures(arch, tmp_path):
    cls = {
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = cls[0](
        vocab_size=160,
        hidden_size=64,
        intermediate_size=144,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = cls[1](config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m is not model.lm_head:
                m.weight.copy_(fs.prune(m.weight, 0.75))
    fs.sparsify_(model)
    path = fs.save_sparse(model, tmp_path / "m.safetensors")
    with torch.device("meta"):
        target = cls[1](config).eval()
    fs.load_sparse(target, path)
    if arch == "qwen2":  # q/k/v carry biases
        assert target.model.layers[0].self_attn.q_proj.bias is not None
    assert sum(isinstance(m, SparseLinear) for m in target.modules()) == 14
    assert torch.equal(logits(target), logits(model))


def test_tensor_attributes_follow_their_buffer(tmp_path):
    class Rotary(nn.Module):  # as transformers 4.x writes it: an attribute aliasing a buffer
        def __init__(self):
            super().__init__()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
            self.original_inv_freq = self.inv_freq
            self.scratch = (
                torch.empty(2, device="meta") if torch.get_default_device().type == "meta" else None
            )

    model = nn.Sequential(Rotary(), nn.Linear(4, 4))
    path = fs.save_sparse(fs.sparsify_(model), tmp_path / "r.safetensors")
    with torch.device("meta"):
        target = nn.Sequential(Rotary(), nn.Linear(4, 4))
    with pytest.warns(RuntimeWarning, match=r"0\.scratch: tensor attribute"):
        fs.load_sparse(target, path)
    assert target[0].original_inv_freq is target[0].inv_freq
    assert torch.equal(target[0].inv_freq, torch.arange(4.0))
