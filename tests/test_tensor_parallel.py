"""Sparse models under torch.distributed tensor parallelism.

Real processes (``torch.multiprocessing.spawn``, gloo on the CPU, tp = 2; nccl on two GPUs in the
``gpu`` variants): a tiny Llama and a tiny Qwen3-MoE from transformers configs, split by
transformers' ``tp_plan="auto"`` and by torch's ``parallelize_module``, give the single-process
sparse model's logits and greedy tokens; each rank stores about half the sharded layers' bytes;
a file saved on one process loads on two, and ``save_sparse`` on two writes the one-process file.
In-process tests on a one-rank group check the layer and the refusals (2-D meshes, placements
and hooks it cannot keep) quickly.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flashsparse as fs
from flashsparse.nn.parallel import ShardedSparseLinear

RTOL_FP32 = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


# -- models -----------------------------------------------------------------------------------------
def llama_config():
    import transformers

    # 256 / 512 wide: shards of 128 and 256 rows or columns fall on tile boundaries (and the 64-row
    # k/v shards on bitmap's but not Tiled-CSL's), so per-rank bytes are about half.
    return transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    )


def moe_config():
    import transformers

    # 32-row k/v shards start inside a tile: cut by decoding and re-encoding.
    return transformers.Qwen3MoeConfig(
        vocab_size=96,
        hidden_size=128,
        intermediate_size=192,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )


def formats_by_layer(module: nn.Module, fqn: str) -> bool:
    return ".self_attn." in fqn  # attention in tiled_csl (first call), the rest in bitmap


def sparsify_both_formats(model: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs.sparsify_(model, formats_by_layer, format="tiled_csl")
        fs.sparsify_(model, format="bitmap")


def prepare(tmp: Path, config) -> None:
    """A pruned checkpoint, the single-process sparse model's file and its outputs."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
            elif "embed" in name or "lm_head" in name or ".gate." in name:
                continue
            elif p.dim() == 2:
                p.copy_(fs.prune(p, 0.7))
            elif p.dim() == 3:  # fused experts
                p.copy_(torch.stack([fs.prune(e, 0.7) for e in p]))
    model.save_pretrained(tmp / "dense")
    sparsify_both_formats(model)
    (tmp / "single").mkdir()
    fs.save_sparse(model, tmp / "single")
    model.config.save_pretrained(tmp / "single")  # as `flashsparse sparsify` writes it
    ids = torch.tensor([[3, 17, 5, 60, 9, 2, 44, 8]])
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    nbytes = {layer.name: layer.nbytes for layer in fs.sparsify_summary(model).layers}
    torch.save({"ids": ids, "logits": logits, "tokens": tokens, "nbytes": nbytes}, tmp / "ref.pt")


# -- process plumbing -------------------------------------------------------------------------------
def _entry(rank: int, world: int, tmp: str, backend: str, worker: str) -> None:
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend, init_method=f"file://{tmp}/rendezvous_{backend}", rank=rank, world_size=world
    )
    try:
        globals()[worker](rank, world, Path(tmp), backend)
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp: Path, backend: str = "gloo", world: int = 2) -> None:
    torch.multiprocessing.spawn(
        _entry, args=(world, str(tmp), backend, worker.__name__), nprocs=world, join=True
    )


def _hf_tp_model(tmp: Path, backend: str):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp / "dense", tp_plan="auto", dtype=torch.float32
        ).eval()


def _check_outputs(model, ref, label: str, device) -> None:
    ids = ref["ids"].to(device)
    with torch.no_grad():
        logits = model(ids).logits
    assert not isinstance(logits, torch.distributed.tensor.DTensor)
    err = rel_err(logits.cpu(), ref["logits"])
    assert err < RTOL_FP32, f"{label}: logits differ from the single-process model by {err:.2e}"
    tokens = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert tokens.cpu().tolist() == ref["tokens"].tolist(), label


def _check_shards(model, tmp: Path) -> None:
    """Each sharded layer holds exactly its block of the pruned weight, nothing more."""
    from safetensors.torch import load_file

    dense = load_file(tmp / "dense" / "model.safetensors")
    sharded = [(n, m) for n, m in model.named_modules() if isinstance(m, ShardedSparseLinear)]
    assert sharded
    for name, module in sharded:
        (r0, r1), (c0, c1) = module.layout.rows, module.layout.cols
        want = dense[f"{name}.weight"][r0:r1, c0:c1]
        assert torch.equal(module.shard.sparse_weight.to_dense().cpu(), want), name


def _per_rank_fraction(model, ref) -> float:
    """This rank's stored bytes of the sharded layers over the whole layers' (one process)."""
    layers = [layer for layer in fs.sparsify_summary(model).layers if layer.shard is not None]
    return sum(layer.nbytes for layer in layers) / sum(
        ref["nbytes"][layer.name] for layer in layers
    )


# -- workers (run in each spawned process) ----------------------------------------------------------
def llama_worker(rank: int, world: int, tmp: Path, backend: str) -> None:
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from flashsparse.serialization.files import TensorReader

    ref = torch.load(tmp / "ref.pt")
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", rank)

    # 1. transformers' plan, then sparsify_: never a gather, each rank its own block.
    model = _hf_tp_model(tmp, backend)

    def no_gather(*args, **kwargs):
        raise AssertionError("sparsify_ gathered or redistributed a DTensor")

    full_tensor, redistribute = DTensor.full_tensor, DTensor.redistribute
    DTensor.full_tensor, DTensor.redistribute = no_gather, no_gather
    try:
        sparsify_both_formats(model)
    finally:
        DTensor.full_tensor, DTensor.redistribute = full_tensor, redistribute
    assert not any(isinstance(m, nn.Linear) for n, m in model.named_modules() if "layers" in n)
    _check_shards(model, tmp)
    _check_outputs(model, ref, "transformers tp_plan + sparsify_", device)
    fraction = _per_rank_fraction(model, ref)
    assert 0.45 < fraction < 0.55, fraction
    summary = fs.sparsify_summary(model)
    assert (summary.rank, summary.world_size, summary.sharded_layers) == (rank, world, 14)
    assert f"rank {rank} of {world}" in str(summary)

    # 2. save_sparse on two processes writes the one-process file.
    (tmp / f"gathered_{backend}").mkdir(exist_ok=True)
    written = fs.save_sparse(model, tmp / f"gathered_{backend}")
    if rank == 0:
        single = tmp / "single" / "flashsparse.safetensors"
        with safe_open(str(single), "pt") as a, safe_open(str(written), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            for key in a.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
            for key in ("architecture", "layers", "aliases", "checksums"):
                assert a.metadata()[key] == b.metadata()[key], key
    dist.barrier()

    # 3. The one-process file into transformers' dense parallel model: each rank reads its tiles.
    whole: list[str] = []
    get = TensorReader.get

    def spy(self, name):
        whole.append(name)
        return get(self, name)

    TensorReader.get = spy
    try:
        loaded = fs.load_sparse(_hf_tp_model(tmp, backend), tmp / "single")
    finally:
        TensorReader.get = get
    sharded = {n for n, m in loaded.named_modules() if isinstance(m, ShardedSparseLinear)}
    assert len(sharded) == 14
    assert not [
        n
        for n in whole
        if n.rpartition(".")[0] in sharded and n.endswith(("values", "words", "masks"))
    ]
    assert "model.embed_tokens.weight" not in whole and "lm_head.weight" not in whole
    _check_shards(loaded, tmp)
    _check_outputs(loaded, ref, "transformers tp_plan + load_sparse", device)
    # What `flashsparse info --model` says each rank stores is what this rank stores.
    from flashsparse.serialization.sharded import per_rank_bytes

    predicted = per_rank_bytes(tmp / "single", world, loaded.tp_plan)["ranks"][rank]
    summary = fs.sparsify_summary(loaded)
    assert (predicted["sparse_bytes"], predicted["dense_bytes"]) == (
        summary.linear_nbytes,
        summary.other_nbytes,
    )
    for (n1, m1), (n2, m2) in zip(model.named_modules(), loaded.named_modules(), strict=True):
        if isinstance(m1, ShardedSparseLinear):  # the same bytes as sparsify_ made
            assert n1 == n2
            for c, t in m1.shard.sparse_weight.state().items():
                assert torch.equal(t, m2.shard.sparse_weight.state()[c]), (n1, c)

    # 3b. Into a model already sparse and split: its ShardedSparseLinear layers are replaced.
    fs.load_sparse(model, tmp / "single")
    _check_outputs(model, ref, "sparse tp model + load_sparse", device)

    # 4. transformers' plan applied to a model built on the meta device: no dense weights at all.
    import transformers
    from transformers.distributed import DistributedConfig

    config = transformers.AutoConfig.from_pretrained(tmp / "dense")
    cls = type(model)
    distributed, _, meshes = cls.prepare_distribute_model(DistributedConfig(tp_plan="auto"))
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    skeleton = cls.maybe_distribute_model(skeleton, distributed, meshes).eval()
    fs.load_sparse(skeleton, tmp / "single", device=device)
    _check_outputs(skeleton, ref, "transformers plan on meta + load_sparse", device)

    # 5. torch's parallelize_module on a model built on the meta device, then load_sparse.
    mesh = torch.distributed.init_device_mesh(device.type, (world,))
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plan = {}
    for i in range(len(skeleton.model.layers)):
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[f"model.layers.{i}.{proj}"] = ColwiseParallel()
        for proj in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"model.layers.{i}.{proj}"] = RowwiseParallel()
    for style in plan.values():
        style.src_data_rank = None  # meta weights: nothing to scatter
    parallelize_module(skeleton, mesh, plan)
    fs.load_sparse(skeleton, tmp / "single", device=device)
    _check_shards(skeleton, tmp)
    _check_outputs(skeleton, ref, "parallelize_module + load_sparse", device)

    # 6. torch styles whose outputs stay DTensors, with biases: a reduce-scatter at the end.
    # The first layer's rows 0:65 (rank 0's) are 90 % zeros, rows 65:130 (rank 1's) 30 %: the
    # layer's 60 % decides min_sparsity=0.55 on both ranks alike.
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 50)).to(device)
    with torch.no_grad():
        first = mlp[0].weight
        first[:65] = fs.prune(first[:65], 0.9)
        first[65:] = fs.prune(first[65:], 0.3)
        mlp[2].weight.copy_(fs.prune(mlp[2].weight, 0.6))
    x = torch.randn(3, 70, device=device)
    with torch.no_grad():
        want = mlp(x)
    from torch.distributed.tensor import Shard

    parallelize_module(
        mlp,
        mesh,
        {
            "0": ColwiseParallel(use_local_output=False),
            "2": RowwiseParallel(output_layouts=Shard(-1), use_local_output=False),
        },
    )
    fs.sparsify_(mlp, min_sparsity=0.55)
    assert isinstance(mlp[0], ShardedSparseLinear) and isinstance(mlp[2], ShardedSparseLinear)
    with torch.no_grad():
        got = mlp(x)
    assert isinstance(got, DTensor)
    assert rel_err(got.full_tensor(), want) < RTOL_FP32

    # 7. Other transformers styles: the LM head (colwise_gather_output) converted too, an MLP
    # gathered (colwise_rep) into a split-input rowwise layer or a replicated one.
    def everything(module, fqn):
        return True

    whole = transformers.AutoModelForCausalLM.from_pretrained(tmp / "dense", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs.sparsify_(whole, everything, format="bitmap")
    with torch.no_grad():
        want = whole(ref["ids"]).logits
    for down in ("rowwise_split_input", "replicate"):
        plan = {
            "model.layers.*.mlp.gate_proj": "colwise_rep",
            "model.layers.*.mlp.up_proj": "colwise_rep",
            "model.layers.*.mlp.down_proj": down,
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            styled = transformers.AutoModelForCausalLM.from_pretrained(
                tmp / "dense",
                distributed_config=DistributedConfig(tp_plan=plan),
                dtype=torch.float32,
            ).eval()
            fs.sparsify_(styled, everything, format="bitmap")
        assert isinstance(styled.lm_head, ShardedSparseLinear)
        expected = ShardedSparseLinear if down != "replicate" else fs.SparseLinear
        assert type(styled.model.layers[0].mlp.down_proj) is expected
        with torch.no_grad():
            got = styled(ref["ids"].to(device)).logits
        assert rel_err(got.cpu(), want) < RTOL_FP32, down


def moe_worker(rank: int, world: int, tmp: Path, backend: str) -> None:
    import transformers
    from transformers.distributed import DistributedConfig

    from flashsparse.nn import SparseExperts

    ref = torch.load(tmp / "ref.pt")
    device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", rank)
    model = _hf_tp_model(tmp, backend)
    sparsify_both_formats(model)
    # transformers' TP plan leaves the experts replicated: so does sparsify_.
    experts = [m for m in model.modules() if isinstance(m, SparseExperts)]
    assert len(experts) == 2
    _check_shards(model, tmp)
    _check_outputs(model, ref, "qwen3-moe tp_plan + sparsify_", device)
    summary = fs.sparsify_summary(model)
    attention = [layer for layer in summary.layers if layer.shard is not None]
    assert {layer.name.rpartition(".")[2] for layer in attention} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
    }
    for layer in summary.layers:
        if layer.shard is None:
            assert layer.nbytes == ref["nbytes"][layer.name], layer.name  # replicated
    assert 0.45 < _per_rank_fraction(model, ref) < 0.65

    loaded = fs.load_sparse(_hf_tp_model(tmp, backend), tmp / "single")
    _check_outputs(loaded, ref, "qwen3-moe tp_plan + load_sparse", device)
    (tmp / f"gathered_moe_{backend}").mkdir(exist_ok=True)
    written = fs.save_sparse(loaded, tmp / f"gathered_moe_{backend}")
    if rank == 0:
        from safetensors.torch import load_file

        a, b = load_file(tmp / "single" / "flashsparse.safetensors"), load_file(written)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Expert parallelism shards the experts themselves: refused by name, nothing converted.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = transformers.AutoModelForCausalLM.from_pretrained(
            tmp / "dense",
            distributed_config=DistributedConfig(tp_size=world, ep_size=world),
            dtype=torch.float32,
        )
    before = {n: type(m) for n, m in ep.named_modules()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts: fused MoE experts"):
        fs.sparsify_(ep)
    assert {n: type(m) for n, m in ep.named_modules()} == before

    # A split that leaves a rank without rows: refused on every rank, by name.
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = torch.distributed.init_device_mesh(device.type, (world,))
    tiny = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 1)).to(device)
    parallelize_module(tiny, mesh, {"0": ColwiseParallel(), "1": ColwiseParallel()})
    with pytest.raises(ValueError, match=r"^1: splitting its 1 output features over 2 ranks"):
        fs.sparsify_(tiny)
    assert isinstance(tiny[0], nn.Linear) and isinstance(tiny[1], nn.Linear)


# -- the tests --------------------------------------------------------------------------------------
def both_worker(rank: int, world: int, tmp: Path, backend: str) -> None:
    # One pair of processes for both models: starting them (imports) is most of the time.
    llama_worker(rank, world, tmp / "llama", backend)
    torch.distributed.barrier()
    moe_worker(rank, world, tmp / "moe", backend)


@pytest.fixture(scope="module")
def checkpoints():
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("llama", llama_config()), ("moe", moe_config())):
            (Path(tmp) / name).mkdir()
            prepare(Path(tmp) / name, config)
        yield Path(tmp)


@pytest.mark.slow
def test_llama_and_qwen3_moe_tensor_parallel_two_processes(checkpoints):
    spawn(both_worker, checkpoints)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (one nccl process each)"
)
def test_llama_and_qwen3_moe_tensor_parallel_nccl(checkpoints):
    spawn(both_worker, checkpoints, backend="nccl")


# -- one rank, in process -----------------------------------------------------------------------------
@pytest.fixture
def one_rank(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield torch.distributed.init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def pruned_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(70, 130), nn.ReLU(), nn.Linear(130, 50))
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(fs.prune(p, 0.6) if p.dim() == 2 else torch.randn_like(p))
    return mlp


@pytest.mark.parametrize("local_output", [True, False])
def test_sharded_layers_keep_the_plans_layouts(one_rank, local_output):
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mlp = pruned_mlp()
    x = torch.randn(4, 3, 70)
    with torch.no_grad():
        want = mlp(x)
    plan = {
        "0": ColwiseParallel(use_local_output=local_output),
        "2": RowwiseParallel(use_local_output=local_output),
    }
    parallelize_module(mlp, one_rank, plan)
    fs.sparsify_(mlp, format="bitmap")
    first, last = mlp[0], mlp[2]
    assert isinstance(first, ShardedSparseLinear) and isinstance(last, ShardedSparseLinear)
    assert (first.layout.kind, last.layout.kind) == ("colwise", "rowwise")
    assert (first.out_features, first.in_features, last.in_features) == (130, 70, 130)
    assert isinstance(first.bias, DTensor) and first.bias.placements == (Shard(0),)
    assert isinstance(last.bias, DTensor) and last.bias.placements == (Replicate(),)
    assert "colwise, rank 0 of 1: rows 0:130, columns 0:70 of 130x70" in repr(first)
    with torch.no_grad():
        got = mlp(x)
        hidden = first(x)
    assert isinstance(got, DTensor) != local_output
    assert isinstance(hidden, DTensor) != local_output
    if not local_output:
        assert hidden.placements == (Shard(2),) and got.placements == (Replicate(),)
        got = got.to_local()
    assert rel_err(got, want) < RTOL_FP32
    # Called without the plan's hooks, on local tensors: the local product plus the bias.
    with torch.no_grad():
        local = ShardedSparseLinear.forward(first, x)
    with torch.no_grad():
        assert rel_err(local, pruned_mlp()[0](x)) < RTOL_FP32


def test_refusals_name_the_layer_and_change_nothing(one_rank):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
    from torch.distributed.tensor.placement_types import _StridedShard

    def model_with(last_weight=None, forward=None):
        mlp = pruned_mlp()
        parallelize_module(mlp, one_rank, {"0": ColwiseParallel()})
        if last_weight is not None:
            mlp[2].weight = nn.Parameter(last_weight(mlp[2].weight.detach()))
        if forward is not None:
            mlp[0].forward = forward
        return mlp

    mesh2 = torch.distributed.init_device_mesh("cpu", (1, 1))
    cases = [
        (
            model_with(lambda w: distribute_tensor(w, mesh2, [Shard(0), Replicate()])),
            r"^2: its weight is laid out over a 2-D device mesh \(1, 1\)",
        ),
        (
            model_with(
                lambda w: distribute_tensor(w, one_rank, [_StridedShard(0, split_factor=2)])
            ),
            r"^2: weight placement _StridedShard.* is not supported",
        ),
        (
            model_with(forward=lambda x: x),
            r"^0: its forward was replaced by .*<lambda>.*cannot carry over",
        ),
    ]
    for model, message in cases:
        before = [(n, m, dict(m._parameters)) for n, m in model.named_modules()]
        with pytest.raises(ValueError, match=message):
            fs.sparsify_(model)
        after = [(n, m, dict(m._parameters)) for n, m in model.named_modules()]
        assert len(before) == len(after)
        for (n1, m1, p1), (n2, m2, p2) in zip(before, after, strict=True):
            assert n1 == n2 and m1 is m2 and p1.keys() == p2.keys()
            assert all(p1[k] is p2[k] for k in p1)


def test_summary_counts_this_ranks_part_of_dtensors(one_rank):
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mlp = pruned_mlp()
    parallelize_module(mlp, one_rank, {"0": ColwiseParallel()})
    dense = fs.sparsify_summary(mlp)
    assert dense.other_nbytes == sum(p.numel() * 4 for p in pruned_mlp().parameters())
    fs.sparsify_(mlp)
    summary = fs.sparsify_summary(mlp)
    assert [layer.name for layer in summary.layers] == ["0", "2"]
    assert summary.sharded_layers == 1 and summary.layers[0].shard.startswith("colwise")
    assert (summary.rank, summary.world_size) == (0, 1)
    assert summary.as_dict()["sharded_layers"] == 1


@pytest.mark.slow
def test_info_reports_per_rank_bytes(checkpoints, capsys):
    import json

    from flashsparse.cli import main

    single = checkpoints / "llama" / "single"
    assert main(["info", "--model", str(single), "--tp-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["tensor_parallel"]
    ranks = report["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and report["unsupported"] == []
    for r in ranks:
        assert 0.45 < (r["sparse_bytes"] + r["dense_bytes"]) / report["one_process_bytes"] < 0.55
    assert main(["info", "--model", str(single), "--tp-size", "4"]) == 0
    text = capsys.readouterr().out
    assert "tensor parallel" in text and "rank 3" in text
    assert main(["info", "--model", str(checkpoints / "nowhere")]) == 2
    assert "--model" in capsys.readouterr().err


def test_plain_layers_with_a_replaced_forward_convert_as_before():
    # e.g. accelerate's offloading hooks replace forward on single-device models: not a plan.
    mlp = pruned_mlp()
    mlp[0].forward = lambda x: x
    fs.sparsify_(mlp)
    assert isinstance(mlp[0], fs.SparseLinear) and isinstance(mlp[2], fs.SparseLinear)


def test_replicated_dtensor_weights_stay_replicated(one_rank):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    mlp = pruned_mlp()
    x = torch.randn(5, 70)
    with torch.no_grad():
        want = mlp(x)
    for layer in (mlp[0], mlp[2]):
        for name in ("weight", "bias"):
            full = getattr(layer, name).detach()
            setattr(layer, name, nn.Parameter(distribute_tensor(full, one_rank, [Replicate()])))
    fs.sparsify_(mlp)
    assert mlp[0].layout.kind == "replicated" and mlp[0].layout.rows == (0, 130)
    with torch.no_grad():
        local = mlp(x)
        spread = mlp[2](DTensor.from_local(torch.relu(mlp[0](x)), one_rank, [Replicate()]))
    assert rel_err(local, want) < RTOL_FP32
    assert isinstance(spread, DTensor) and spread.placements == (Replicate(),)
    assert rel_err(spread.to_local(), want) < RTOL_FP32
