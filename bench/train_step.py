"""One sparse fine-tuning step against the same dense model trained with a mask hook.

A Llama-shaped decoder block (transformers' ``LlamaDecoderLayer``: hidden 2048, intermediate
5632, 32 heads, 4 KV heads -- TinyLlama-1.1B's block; random weights, no download) has its seven
projections magnitude-pruned to ``--sparsity`` (per tensor). Two copies train on the same
random batch of ``--tokens`` tokens (x requires grad, as inside a model):

* ``dense``: the pruned block as it is, each projection weight's gradient multiplied by its
  fixed mask in a tensor hook (the usual way to fine-tune a pruned model with the mask fixed:
  the masked weights then stay exactly zero under AdamW, as their gradient and state are zero);
* ``sparse``: ``fs.sparsify_(block, trainable=True)``: bitmap layers whose packed nonzeros are
  the Parameters.

One step = ``zero_grad`` + forward + ``loss.backward()`` + ``AdamW.step()`` (weight decay 0.1,
torch's default foreach implementation for both). The two models alternate step by step in one
process (which goes first alternates too) after ``--warmup`` steps each; every phase is timed
with ``time.perf_counter``; the table gives median [min-max] over ``--rounds`` rounds.

Memory is measured, not computed: after a step, the bytes of every distinct tensor storage
reachable from the model's parameters and buffers (sparse: values, masks, tile offsets), their
``.grad`` and the optimizer's state, plus (dense) the masks the hooks hold -- shown with and
without those masks. Activations and temporaries are not in it.

    python bench/train_step.py                                   # bf16, 70 %, 512 tokens, 2 threads
    python bench/train_step.py --dtype fp32 --out bench/results/x.json
    python bench/train_step.py --summary bench/results/train-step-*.json > summary.md
    python bench/train_step.py --quick                            # small block: a smoke test

The machine this ran on is shared, so run it several times (separate processes) and summarise:
``--summary`` prints, per figure, the median [min-max] over the runs' medians.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

import flashsparse as fs
from flashsparse import backends

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
PHASES = ("forward", "backward", "optimizer", "step")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_block(hidden: int, intermediate: int, heads: int, kv_heads: int, dtype, sparsity):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        num_hidden_layers=1,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    block = LlamaDecoderLayer(config, layer_idx=0).to(dtype)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(fs.prune(module.weight, sparsity))
    return block, LlamaRotaryEmbedding(config)


def run_block(block: nn.Module, x: torch.Tensor, position_embeddings) -> torch.Tensor:
    out = block(x, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def storage_bytes(model: nn.Module, opt: torch.optim.Optimizer, masks=()) -> dict[str, int]:
    """Bytes of the distinct storages behind weights (parameters and buffers), gradients,
    optimizer state and masks, each counted once."""
    seen: set[int] = set()
    total = dict.fromkeys(("weights", "grads", "optimizer", "masks"), 0)

    def add(kind: str, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total[kind] += storage.nbytes()

    for p in model.parameters():
        add("weights", p)
        if p.grad is not None:
            add("grads", p.grad)
    for b in model.buffers():
        add("weights", b)
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                add("optimizer", value)
    for m in masks:
        add("masks", m)
    return total


def train_step(model, opt, x, position_embeddings) -> dict[str, float]:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    x.grad = None
    loss = run_block(model, x, position_embeddings).float().square().mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.quick:
        shape = dict(hidden=256, intermediate=704, heads=4, kv_heads=2)
        args.tokens = min(args.tokens, 64)
    else:
        shape = dict(hidden=2048, intermediate=5632, heads=32, kv_heads=4)
    dense, rotary = build_block(**shape, dtype=dtype, sparsity=args.sparsity)
    sparse = fs.sparsify_(copy.deepcopy(dense), trainable=True)
    masks = []
    for module in dense.modules():
        if isinstance(module, nn.Linear):
            mask = module.weight.detach() != 0
            masks.append(mask)
            module.weight.register_hook(lambda grad, mask=mask: grad * mask)
    opts = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        for name, model in (("dense", dense), ("sparse", sparse))
    }
    models = {"dense": dense, "sparse": sparse}
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, args.tokens, shape["hidden"], generator=g) * 0.5).to(dtype)
    x.requires_grad_(True)
    positions = torch.arange(args.tokens).unsqueeze(0)
    position_embeddings = tuple(t.to(dtype) for t in rotary(x, positions))
    kernels = {
        "forward": backends.select("bitmap", x.detach()).backend,
        "weight_gradient": backends.select(fs.ops.SDDMM, x.detach()).backend,
    }
    if kernels["forward"] == "cpu" or kernels["weight_gradient"] == "cpu":
        from flashsparse.kernels.cpu import bitmap as cpu_kernels

        kernels["cpu_isa"] = {v: k for k, v in cpu_kernels.ISAS.items()}[cpu_kernels.isa()]
    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for name in ("dense", "sparse"):
            train_step(models[name], opts[name], x, position_embeddings)
    times: dict[str, list[dict[str, float]]] = {"dense": [], "sparse": []}
    for r in range(args.rounds):
        for name in ("dense", "sparse") if r % 2 == 0 else ("sparse", "dense"):
            times[name].append(train_step(models[name], opts[name], x, position_embeddings))
    load_after = os.getloadavg()
    memory = {
        "dense": storage_bytes(dense, opts["dense"], masks),
        "sparse": storage_bytes(sparse, opts["sparse"]),
    }
    # The mask of the sparse model never moved, nor did its padding.
    nnz = sum(m.sparse_weight.nnz for m in sparse.modules() if isinstance(m, fs.SparseLinear))
    nnz_dense = sum(int(m.sum()) for m in masks)
    elements = sum(m.numel() for m in masks)

    def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
        return {
            phase: {
                "median_ms": 1e3 * statistics.median(r[phase] for r in rows),
                "min_ms": 1e3 * min(r[phase] for r in rows),
                "max_ms": 1e3 * max(r[phase] for r in rows),
            }
            for phase in PHASES
        }

    ratios = [s["step"] / d["step"] for s, d in zip(times["sparse"], times["dense"], strict=True)]
    return {
        "meta": {
            "device": "cpu",
            "cpu": cpu_name(),
            "threads": args.threads,
            "dtype": args.dtype,
            "sparsity": args.sparsity,
            "tokens": args.tokens,
            "block": shape,
            "quick": args.quick,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "kernels": kernels,
            "torch": torch.__version__,
            "flashsparse": fs.__version__,
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "nnz": {"sparse_layers": nnz, "dense_mask": nnz_dense, "elements": elements},
        "memory_bytes": memory,
        "times": {name: summary(rows) for name, rows in times.items()},
        "step_ratio_per_round": ratios,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def report(result: dict) -> str:
    meta, mem = result["meta"], result["memory_bytes"]
    d, s = mem["dense"], mem["sparse"]
    dense_total = d["weights"] + d["grads"] + d["optimizer"]
    sparse_total = s["weights"] + s["grads"] + s["optimizer"]
    lines = [
        f"{meta['cpu']}, {meta['threads']} threads, {meta['dtype']}, {meta['sparsity']:.0%} "
        f"sparsity, {meta['tokens']} tokens, block {meta['block']}, torch {meta['torch']}, "
        f"{meta['date_utc']} UTC, load average {meta['loadavg_before'][0]:.1f} -> "
        f"{meta['loadavg_after'][0]:.1f}; kernels {meta['kernels']}",
        "",
        "| memory after a step | dense + mask hook | sparse (trainable bitmap) | ratio |",
        "|---|---|---|---|",
    ]
    for kind in ("weights", "grads", "optimizer"):
        ratio = s[kind] / d[kind] if d[kind] else float("nan")
        lines.append(f"| {kind} | {_mib(d[kind])} | {_mib(s[kind])} | {ratio:.3f}x |")
    lines.append(
        f"| **weights + grads + optimizer** | {_mib(dense_total)} | {_mib(sparse_total)} | "
        f"**{sparse_total / dense_total:.3f}x** |"
    )
    lines.append(
        f"| same, dense counting its masks | {_mib(dense_total + d['masks'])} | "
        f"{_mib(sparse_total)} | {sparse_total / (dense_total + d['masks']):.3f}x |"
    )
    lines += [
        "",
        "| time (ms) | dense + mask hook | sparse | ratio of medians |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        a, b = result["times"]["dense"][phase], result["times"]["sparse"][phase]
        lines.append(
            f"| {phase} | {a['median_ms']:.1f} [{a['min_ms']:.1f}-{a['max_ms']:.1f}] | "
            f"{b['median_ms']:.1f} [{b['min_ms']:.1f}-{b['max_ms']:.1f}] | "
            f"{b['median_ms'] / a['median_ms']:.2f}x |"
        )
    nnz = result["nnz"]
    lines.append(
        f"\nstored nonzeros after training: {nnz['sparse_layers']:,} (the dense mask: "
        f"{nnz['dense_mask']:,} of {nnz['elements']:,})"
    )
    return "\n".join(lines)


def summarize(paths: list[str]) -> str:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    if not runs:
        raise SystemExit("--summary needs at least one JSON file")

    def stat(values: list[float], fmt: str) -> str:
        return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}-{fmt.format(max(values))}]"

    lines = [
        f"{len(runs)} runs (separate processes); each figure: median [min-max] over the runs' "
        "own medians. Runs:",
        "",
    ]
    for p, r in zip(paths, runs, strict=True):
        m = r["meta"]
        lines.append(
            f"- {Path(p).name}: {m['date_utc']} UTC, {m['cpu']}, {m['threads']} threads, "
            f"{m['dtype']}, {m['tokens']} tokens, {m['sparsity']:.0%}, kernels {m['kernels']}, "
            f"load average {m['loadavg_before'][0]:.1f} -> {m['loadavg_after'][0]:.1f}"
        )

    def totals(r: dict, name: str) -> int:
        b = r["memory_bytes"][name]
        return b["weights"] + b["grads"] + b["optimizer"]

    mem_ratio = [totals(r, "sparse") / totals(r, "dense") for r in runs]
    mem_ratio_masks = [
        totals(r, "sparse") / (totals(r, "dense") + r["memory_bytes"]["dense"]["masks"])
        for r in runs
    ]
    lines += [
        "",
        f"memory (weights + grads + AdamW state): dense {_mib(totals(runs[0], 'dense'))}, "
        f"sparse {_mib(totals(runs[0], 'sparse'))}: **{stat(mem_ratio, '{:.3f}')}x** of dense "
        f"({stat(mem_ratio_masks, '{:.3f}')}x if the dense run's masks count)",
        "",
        "| time (ms) | dense + mask hook | sparse | sparse / dense (medians) |",
        "|---|---|---|---|",
    ]
    for phase in PHASES:
        a = [r["times"]["dense"][phase]["median_ms"] for r in runs]
        b = [r["times"]["sparse"][phase]["median_ms"] for r in runs]
        ratio = [y / x for x, y in zip(a, b, strict=True)]
        lines.append(
            f"| {phase} | {stat(a, '{:.1f}')} | {stat(b, '{:.1f}')} | {stat(ratio, '{:.2f}')}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a small block (smoke test)")
    parser.add_argument("--out", help="write the result as JSON here")
    parser.add_argument("--summary", nargs="*", metavar="JSON", help="summarise earlier runs")
    args = parser.parse_args(argv)
    if args.summary is not None:
        print(summarize(args.summary))
        return 0
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    result = measure(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
