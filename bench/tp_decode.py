"""Tensor-parallel decode on the CPU: the Llama-shaped model of ``bench/cpu_kernel.py --e2e``
(hidden 2048, intermediate 5632, 4 layers, vocab 32000, bf16, linears pruned to 70 %) split by
transformers' ``tp_plan="auto"`` over gloo, sparsified with ``fs.sparsify_`` on each rank.

Reports, for tp = 1 (one process) and tp = 2 (two processes, one thread each): each rank's
stored sparse-layer bytes and whole-model bytes (``fs.sparsify_summary``), and greedy decode
tokens/s of batch 1 (prompt 16 tokens, then ``--steps`` steps, median of ``--rounds`` rounds),
dense and sparse. tp = 1 runs with one thread and with two (the two cores tp = 2 uses), so the
cost of the per-layer gloo all-reduces shows: on one two-core machine tp = 2 gains no memory
bandwidth and pays two all-reduces per layer, so a slowdown is expected. What tp = 2 gives is
per-rank memory.

    python bench/tp_decode.py --out bench/results/tp-decode-<name>

Writes ``<out>.json`` and ``<out>.md`` (device, dtype, threads, date, load average).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_kernel import E2E_LLAMA, cpu_name

import flashsparse as fs

SPARSITY = 0.7
PROMPT = 16


def write_checkpoint(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**E2E_LLAMA)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(fs.prune(mod.weight.float(), SPARSITY).to(torch.bfloat16))
    model.save_pretrained(path)


def decode_tok_s(model, steps: int) -> float:
    prompt = torch.randint(
        0, E2E_LLAMA["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - start)


def measure(model, steps: int, rounds: int, barrier=None) -> dict:
    """Decode tokens/s (median of rounds, after one warm-up) and the model's sizes."""
    decode_tok_s(model, 2)
    speeds = []
    for _ in range(rounds):
        if barrier is not None:
            barrier()
        speeds.append(decode_tok_s(model, steps))
    summary = fs.sparsify_summary(model)
    return {
        "tok_s": statistics.median(speeds),
        "tok_s_rounds": speeds,
        "sparse_layer_bytes": summary.linear_nbytes,
        "model_bytes": summary.model_nbytes,
        "sharded_layers": summary.sharded_layers,
    }


def one_process(checkpoint: Path, threads: int, steps: int, rounds: int) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    dense = measure(model, steps, rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fs.sparsify_(model, format="bitmap")
    return {"dense": dense, "sparse": measure(model, steps, rounds)}


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # its per-call deprecation notes, not ours
    warnings.simplefilter("ignore")


def _rank(
    rank: int, world: int, checkpoint: str, rendezvous: str, steps: int, rounds: int, out: str
):
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    _quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint, tp_plan="auto", dtype=torch.bfloat16
            ).eval()
        dense = measure(model, steps, rounds, dist.barrier)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fs.sparsify_(model, format="bitmap")
        sparse = measure(model, steps, rounds, dist.barrier)
        results = [None] * world
        dist.all_gather_object(results, {"rank": rank, "dense": dense, "sparse": sparse})
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def tensor_parallel(checkpoint: Path, world: int, steps: int, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        torch.multiprocessing.spawn(
            _rank,
            args=(world, str(checkpoint), f"{tmp}/rendezvous", steps, rounds, str(out)),
            nprocs=world,
            join=True,
        )
        return json.loads(out.read_text())


def markdown(result: dict) -> str:
    meta, tp1, tp1b, tp2 = result["meta"], result["tp1"], result["tp1_two_threads"], result["tp2"]
    single = tp1["sparse"]["sparse_layer_bytes"]
    single_model = tp1["sparse"]["model_bytes"]
    lines = [
        f"# Tensor-parallel decode on the CPU ({meta['date']})",
        "",
        f"Device: {meta['device']}; dtype bfloat16; model {meta['model']}, linears pruned to "
        f"{SPARSITY:.0%} and sparsified as bitmap (`fs.sparsify_`), the LM head and embeddings "
        f"dense; batch 1, prompt {PROMPT}, {meta['steps']} greedy decode steps, median of "
        f"{meta['rounds']} rounds; tp = 2 is two processes over gloo (transformers "
        f'`tp_plan="auto"`), one thread each; torch {meta["torch"]}, transformers '
        f"{meta['transformers']}; started {meta['started']}, {meta['note']}. Regenerate with "
        "`python bench/tp_decode.py --out bench/results/<name>`.",
        "",
        "| run | threads per rank | dense tok/s | sparse tok/s | sparse-layer MiB per rank "
        "| vs one process | whole model MiB per rank | vs one process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    mib = 2**20
    for label, run, threads in (("tp = 1", tp1, 1), ("tp = 1", tp1b, 2)):
        s = run["sparse"]
        lines.append(
            f"| {label} | {threads} | {run['dense']['tok_s']:.1f} | {s['tok_s']:.1f} | "
            f"{s['sparse_layer_bytes'] / mib:.1f} | {s['sparse_layer_bytes'] / single:.2f}x | "
            f"{s['model_bytes'] / mib:.1f} | {s['model_bytes'] / single_model:.2f}x |"
        )
    for rank in tp2:
        s = rank["sparse"]
        lines.append(
            f"| tp = 2, rank {rank['rank']} | 1 | {rank['dense']['tok_s']:.1f} | {s['tok_s']:.1f} | "
            f"{s['sparse_layer_bytes'] / mib:.1f} | {s['sparse_layer_bytes'] / single:.2f}x | "
            f"{s['model_bytes'] / mib:.1f} | {s['model_bytes'] / single_model:.2f}x |"
        )
    worst = max(r["sparse"]["sparse_layer_bytes"] for r in tp2) / single
    speed = tp2[0]["sparse"]["tok_s"]
    lines += [
        "",
        f"Per-rank sparse-layer memory at tp = 2: **{worst:.2f}x** of one process (target <= "
        f"0.55x). Sparse decode at tp = 2: {speed:.1f} tok/s, {speed / tp1['sparse']['tok_s']:.2f}x "
        f"of tp = 1 with one thread, {speed / tp1b['sparse']['tok_s']:.2f}x of tp = 1 with two "
        "threads"
        + (
            ": each layer's two all-reduces over gloo (two processes on the same two cores) cost "
            "more than the halved weight reads save here."
            if speed < tp1b["sparse"]["tok_s"]
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet()
    meta = dict(
        device=cpu_name(),
        model="llama h2048 i5632 L4 v32000",
        steps=args.steps,
        rounds=args.rounds,
        torch=torch.__version__,
        transformers=transformers.__version__,
        date=datetime.date.today().isoformat(),
        started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        note=f"load average {os.getloadavg()[0]:.2f} at the start",
    )
    print(f"{meta['device']}, torch {meta['torch']}, {meta['note']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama"
        write_checkpoint(checkpoint)
        result = {"meta": meta}
        result["tp1"] = one_process(checkpoint, 1, args.steps, args.rounds)
        print(f"tp = 1, 1 thread: {result['tp1']}", flush=True)
        result["tp1_two_threads"] = one_process(checkpoint, 2, args.steps, args.rounds)
        print(f"tp = 1, 2 threads: {result['tp1_two_threads']}", flush=True)
        result["tp2"] = tensor_parallel(checkpoint, 2, args.steps, args.rounds)
        print(f"tp = 2: {result['tp2']}", flush=True)
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
