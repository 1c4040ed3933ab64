"""Tensor-parallel decode on the CPU: the Llama-shaped model of ``bench/cpu_kernel.py --e2e``
(hidden 2048, intermediate 5632, 4 layers, vocab 32000, bf16, linears pruned to 70 %) split by
transformers' ``tp_plan="auto"`` over gloo, sparsified with ``fs.sparsify_`` on each rank.

Reports, for tp = 1 (one process) and tp = 2 (two processes, one thread each): each rank's
stored sparse-layer bytes and whole-model bytes (``fs.sparsify_summary``), and greedy decode
tokens/s of batch 1 (prompt 16 tokens, then ``--steps`` steps, median of ``--rounds`` rounds),
dense and sparse. tp = 1 runs with one thread and with two (the two cores tp = 2 uses), so the
cost of the per-layer gloo all-reduces shows: on one two-core machine tp = 2 gains no memory
bandwidth and pays two all-reduces per layer, so a slowdown is expected. What tp = 2 gives is
per-rank memory. Every configuration is timed once per round, in turn (rank 0 also runs the
one-process model while rank 1 waits), so load from other processes hits all of them alike.

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
KINDS = ("dense", "sparse")


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


def sizes(model) -> dict:
    summary = fs.sparsify_summary(model)
    return {
        "sparse_layer_bytes": summary.linear_nbytes,
        "model_bytes": summary.model_nbytes,
        "sharded_layers": summary.sharded_layers,
    }


def load(checkpoint: str, sparse: bool, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, **kwargs).eval()
    if sparse:
        fs.sparsify_(model, format="bitmap")
    return model


def _quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # its per-call deprecation notes, not ours
    warnings.simplefilter("ignore")


def _rank(
    rank: int, world: int, checkpoint: str, rendezvous: str, steps: int, rounds: int, out: str
):
    """Both tp = 2 ranks; rank 0 also runs the one-process model (1 and 2 threads) while rank 1
    waits, round by round, so load from other processes hits every configuration alike."""
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    _quiet()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        parallel = {kind: load(checkpoint, kind == "sparse", tp_plan="auto") for kind in KINDS}
        single = {kind: load(checkpoint, kind == "sparse") for kind in KINDS} if rank == 0 else {}
        runs = {f"tp2_{kind}": [] for kind in KINDS}
        if rank == 0:
            runs.update({f"tp1_{t}t_{kind}": [] for kind in KINDS for t in (1, 2)})
        for model in [*parallel.values(), *single.values()]:
            decode_tok_s(model, 2)  # warm-up (one rank's single model runs alone: no collective)
        for _ in range(rounds):
            for kind in KINDS:
                dist.barrier()
                runs[f"tp2_{kind}"].append(decode_tok_s(parallel[kind], steps))
                if rank == 0:
                    for threads in (1, 2):
                        torch.set_num_threads(threads)
                        runs[f"tp1_{threads}t_{kind}"].append(decode_tok_s(single[kind], steps))
                    torch.set_num_threads(1)
        report = {
            "rank": rank,
            "runs": runs,
            "tp2_sizes": {kind: sizes(parallel[kind]) for kind in KINDS},
            "tp1_sizes": {kind: sizes(single[kind]) for kind in KINDS} if rank == 0 else None,
        }
        results = [None] * world
        dist.all_gather_object(results, report)
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_all(checkpoint: Path, steps: int, rounds: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        torch.multiprocessing.spawn(
            _rank,
            args=(2, str(checkpoint), f"{tmp}/rendezvous", steps, rounds, str(out)),
            nprocs=2,
            join=True,
        )
        return json.loads(out.read_text())


def markdown(result: dict) -> str:
    meta, ranks = result["meta"], result["ranks"]
    runs = ranks[0]["runs"]
    med = {name: statistics.median(values) for name, values in runs.items()}
    one = ranks[0]["tp1_sizes"]["sparse"]
    mib = 2**20
    lines = [
        f"# Tensor-parallel decode on the CPU ({meta['date']})",
        "",
        f"Device: {meta['device']}, CPU kernel ISA path `{meta['isa']}`; dtype bfloat16; model {meta['model']}, linears pruned to "
        f"{SPARSITY:.0%} and sparsified as bitmap (`fs.sparsify_`), the LM head and embeddings "
        f"dense; batch 1, prompt {PROMPT}, {meta['steps']} greedy decode steps; median of "
        f"{meta['rounds']} rounds, every configuration timed once per round, in turn, so load "
        "from other processes hits all alike; tp = 2 is two processes over gloo "
        f'(transformers `tp_plan="auto"`), one thread each; torch {meta["torch"]}, '
        f"transformers {meta['transformers']}; started {meta['started']}, {meta['note']}. "
        "Regenerate with `python bench/tp_decode.py --out bench/results/<name>`.",
        "",
        "| run | threads per rank | dense tok/s | sparse tok/s | sparse / dense |",
        "|---|---|---|---|---|",
    ]
    for label, key, threads in (
        ("tp = 1", "tp1_1t", 1),
        ("tp = 1", "tp1_2t", 2),
        ("tp = 2", "tp2", 1),
    ):
        dense, sparse = med[f"{key}_dense"], med[f"{key}_sparse"]
        lines.append(
            f"| {label} | {threads} | {dense:.1f} | {sparse:.1f} | {sparse / dense:.2f}x |"
        )
    lines += [
        "",
        "| process | sparse-layer MiB | vs one process | whole model MiB | vs one process |",
        "|---|---|---|---|---|",
        f"| tp = 1 | {one['sparse_layer_bytes'] / mib:.1f} | 1.00x | "
        f"{one['model_bytes'] / mib:.1f} | 1.00x |",
    ]
    for rank in ranks:
        s = rank["tp2_sizes"]["sparse"]
        lines.append(
            f"| tp = 2, rank {rank['rank']} ({s['sharded_layers']} sharded layers) | "
            f"{s['sparse_layer_bytes'] / mib:.1f} | "
            f"{s['sparse_layer_bytes'] / one['sparse_layer_bytes']:.2f}x | "
            f"{s['model_bytes'] / mib:.1f} | {s['model_bytes'] / one['model_bytes']:.2f}x |"
        )
    worst = max(r["tp2_sizes"]["sparse"]["sparse_layer_bytes"] for r in ranks)
    tp2, tp1, tp1b = med["tp2_sparse"], med["tp1_1t_sparse"], med["tp1_2t_sparse"]
    lines += [
        "",
        f"Per-rank sparse-layer memory at tp = 2: **{worst / one['sparse_layer_bytes']:.2f}x** of "
        f"one process (target <= 0.55x). Sparse decode at tp = 2: {tp2:.1f} tok/s, "
        f"{tp2 / tp1:.2f}x of tp = 1 with one thread, {tp2 / tp1b:.2f}x of tp = 1 with two "
        "threads"
        + (
            ": each layer's two all-reduces over gloo (two processes on the same two cores) cost "
            "more than the halved weight reads per rank save here."
            if tp2 < tp1b
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
    from flashsparse.kernels.cpu import bitmap as cpu_kernels

    meta = dict(
        device=cpu_name(),
        isa={v: k for k, v in cpu_kernels.ISAS.items()}[cpu_kernels.isa()],
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
        result = {"meta": meta, "ranks": run_all(checkpoint, args.steps, args.rounds)}
    text = markdown(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(text)
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
