"""End-to-end decode benchmark: a Llama-3-8B-shaped model, dense vs flashsparse.

The model is built from its config with random weights (no download), in bf16, and its
projections are magnitude-pruned to each ``--sparsities`` value (embeddings and LM head stay
dense, as ``fs.sparsify_`` leaves them). For each batch size it runs greedy ``generate`` and
times the decode steps only (a logits processor stamps each step after a device sync, so the
prefill is excluded): decode tokens/s = batch x (steps - 1) / (last stamp - first stamp), the
median of ``--repeats`` runs after a warm-up run. Peak memory is
``torch.cuda.max_memory_allocated`` over a run (weights + KV cache + activations).

Modes: ``eager`` (dynamic KV cache) and ``compile`` (static KV cache, ``torch.compile`` of the
forward with ``mode="reduce-overhead"``, i.e. CUDA graphs where possible, ``fullgraph=True``).
The dense baseline is the same pruned model before ``fs.sparsify_``; its speed does not depend
on the values, so it is timed at the first sparsity only (``--dense-every`` for all).
``logits_rel_err`` compares one forward pass of the sparse model with the dense pruned one, and
``greedy_tokens_equal_fraction`` the generated tokens (reported, not required: on a GPU the
kernels sum in another order than cuBLAS and greedy paths may part after a near-tie).

The structured alternative (``--no-sliced`` to leave it out): at each sparsity, a Llama of the
same depth, heads and head size whose hidden and intermediate sizes are shrunk by one factor so
that its projections hold as many weights as the sparse model stores (the non-zeros of its
pruned projections) -- SliceGPT-style slicing to the same parameter count, as dense matrices on
cuBLAS. It has random weights and is timed exactly like the others (row ``sliced``, with its
sizes and parameter counts); it measures speed only, not what slicing costs in accuracy.

On a machine without CUDA it runs a tiny Llama config instead (and says so in its output and
in the JSON): that is a smoke test of the script, not a measurement.

    python bench/e2e.py                        # full matrix on the GPU
    python bench/e2e.py --sparsities 0.5 --batches 1,8 --modes eager
    python bench/e2e.py --out bench/results/e2e_h100.json

Results go to ``--out`` (default ``bench/results/e2e_<device>.json``), merged with the rows
already there (``--fresh`` replaces), and a Markdown table on stdout. Compiling the 8B model
takes a minute or more per batch size (the static cache shape changes), so on a machine with a
10-minute limit per command run the matrix in pieces, e.g. ``--modes eager`` first, then
``--modes compile --sparsities 0.5`` and ``--modes compile --sparsities 0.7``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flashsparse as fs

LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
# CPU smoke test: same structure (GQA, SwiGLU, untied head), toy sizes.
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def build_model(
    config_kwargs: dict, dtype: torch.dtype, device: torch.device, seed: int
) -> nn.Module:
    """A Llama with random weights built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**config_kwargs)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def prune_projections(model: nn.Module, sparsity: float) -> None:
    skipped = fs.nn.default_skipped_linears(model)
    with torch.no_grad():
        for fqn, module in model.named_modules():
            if isinstance(module, nn.Linear) and fqn not in skipped:
                module.weight.copy_(fs.prune(module.weight, sparsity))


def projection_params(config: dict) -> int:
    """Weights in the q/k/v/o and gate/up/down projections of a Llama ``config`` (what
    ``fs.sparsify_`` converts: not the embeddings, the LM head or the norms)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    per_layer = hidden * (2 * q + 2 * kv) + 3 * hidden * inter
    return config["num_hidden_layers"] * per_layer


def sliced_config(config: dict, target_params: int, align: int) -> dict:
    """``config`` with hidden and intermediate sizes shrunk by one factor f (rounded to
    multiples of ``align``) so that its projections hold about ``target_params`` weights.

    Heads, KV heads and head size stay, as SliceGPT keeps the attention heads and slices the
    residual (hidden) dimension; the attention projections then scale with f and the MLP
    ones with f**2, so f solves ``a*f + b*f**2 = target``."""
    if align < 1:
        raise ValueError(f"align must be a positive integer, got {align!r}")
    full = projection_params(config)
    if not 0 < target_params <= full:
        raise ValueError(f"target_params must be in (0, {full}], got {target_params!r}")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    mlp = 3 * config["hidden_size"] * config["intermediate_size"] * config["num_hidden_layers"]
    attn = full - mlp
    f = (-attn + (attn * attn + 4 * mlp * target_params) ** 0.5) / (2 * mlp)

    def shrink(size: int) -> int:
        return max(align, align * round(f * size / align))

    return {
        **config,
        "hidden_size": shrink(config["hidden_size"]),
        "intermediate_size": shrink(config["intermediate_size"]),
        "head_dim": head_dim,
    }


def stored_projection_weights(model: nn.Module) -> int:
    """Non-zero weights in the linears ``fs.sparsify_`` converts: what the sparse model stores."""
    skipped = fs.nn.default_skipped_linears(model)
    return sum(
        int(torch.count_nonzero(module.weight))
        for fqn, module in model.named_modules()
        if isinstance(module, nn.Linear) and fqn not in skipped
    )


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """A logits processor that stamps each decode step (generate calls it once per new token)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def generate_once(model, ids, new_tokens: int, static: bool):
    from transformers import LogitsProcessorList

    timer = StepTimer(ids.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([timer]),
    )
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        out = model.generate(ids, **kwargs)
    sync(ids.device)
    stamps = timer.stamps
    if len(stamps) < 2:
        raise RuntimeError("generate ran fewer than two decode steps")
    return out, ids.shape[0] * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def measure(model, batch: int, args, device: torch.device, static: bool) -> dict:
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(10, model.config.vocab_size, (batch, args.prompt), generator=generator).to(
        device
    )
    generate_once(model, ids, args.new_tokens, static)  # warm-up (and compilation)
    rates = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.repeats):
        tokens, rate = generate_once(model, ids, args.new_tokens, static)
        rates.append(rate)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_runs": rates,
        "peak_memory_bytes": peak,
        "tokens": tokens[:, args.prompt :].cpu(),
    }


def compiled(model, device: torch.device):
    """Compile ``model.forward`` (CUDA graphs on a GPU); returns a function that undoes it."""
    model.generation_config.cache_implementation = "static"
    if hasattr(model.generation_config, "disable_compile"):
        model.generation_config.disable_compile = True  # we compile; generate must not again
    mode = "reduce-overhead" if device.type == "cuda" else None
    model.forward = torch.compile(model.forward, mode=mode, fullgraph=True)

    def undo() -> None:
        del model.forward
        model.generation_config.cache_implementation = None
        torch._dynamo.reset()

    return undo


def run_model(model, label: str, args, device: torch.device, rows: list, extra: dict) -> dict:
    """Measure ``model`` in each mode and batch; return the greedy tokens by (mode, batch)."""
    tokens = {}
    for mode in args.modes:
        undo = compiled(model, device) if mode == "compile" else None
        try:
            for batch in args.batches:
                row = {"model": label, "mode": mode, "batch": batch, **extra}
                try:
                    result = measure(model, batch, args, device, static=mode == "compile")
                    tokens[(mode, batch)] = result.pop("tokens")
                    row.update(result)
                except Exception as exc:  # one configuration failing must not lose the others
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                rows.append(row)
                print(_row_text(row), flush=True)
        finally:
            if undo is not None:
                undo()
    return tokens


def _row_text(row: dict) -> str:
    if "error" in row:
        return (
            f"  {row['model']:<16} {row['mode']:<8} batch {row['batch']:>3}: ERROR {row['error']}"
        )
    peak = row.get("peak_memory_bytes")
    peak_text = f", peak {peak / 2**30:.2f} GiB" if peak else ""
    return (
        f"  {row['model']:<16} {row['mode']:<8} batch {row['batch']:>3}: "
        f"{row['tokens_per_s']:10.1f} tokens/s{peak_text}"
    )


def environment(device: torch.device, tiny: bool) -> dict:
    import transformers

    from flashsparse.backends import requested_backend

    env = {
        "date": datetime.date.today().isoformat(),
        "flashsparse": fs.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores)",
        "FLASHSPARSE_BACKEND": requested_backend(),
        "available_backends": fs.available_backends(),
        "config": "tiny Llama (CPU smoke test, not a measurement)" if tiny else "Llama-3-8B shape",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def kernel_used(model, device: torch.device) -> str:
    """Which backend runs the first sparse layer for a decode-sized input."""
    from flashsparse.backends import _KERNELS, select

    layer = next(m for m in model.modules() if isinstance(m, fs.SparseLinear))
    x = torch.zeros(1, layer.in_features, dtype=layer.dtype, device=device)
    kernel = select(layer.format, x)
    return next((f"{fmt}/{backend}" for (fmt, backend), k in _KERNELS.items() if k is kernel), "?")


def row_key(row: dict) -> tuple:
    """Rows with the same key measure the same thing (dense rows: at any sparsity)."""
    sparsity = None if row["model"] == "dense" else row["sparsity"]
    return (row["model"], sparsity, row["mode"], row["batch"])


def merge(path: Path, result: dict) -> dict:
    """Add this run's rows and checks to those already in ``path`` (a later run wins), so a GPU
    session can run the matrix in several calls."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return result
    rows = {row_key(r): r for r in old.get("rows", [])}
    rows.update({row_key(r): r for r in result["rows"]})
    checks = {c["sparsity"]: c for c in old.get("checks", [])}
    checks.update({c["sparsity"]: c for c in result["checks"]})
    return {**result, "rows": list(rows.values()), "checks": [checks[k] for k in sorted(checks)]}


def table(rows: list) -> str:
    lines = [
        "| sparsity | model | mode | batch | tokens/s | vs dense | sliced vs sparse | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = {(r["mode"], r["batch"]): r.get("tokens_per_s") for r in rows if r["model"] == "dense"}
    sparse = {
        (r["sparsity"], r["mode"], r["batch"]): r.get("tokens_per_s")
        for r in rows
        if r["model"].startswith("flashsparse")
    }
    rows = sorted(
        rows,
        key=lambda r: (
            r["model"] != "dense",
            r["sparsity"],
            r["mode"],
            r["batch"],
            r["model"] == "sliced",
        ),
    )
    for r in rows:
        rate = r.get("tokens_per_s")
        base = dense.get((r["mode"], r["batch"]))
        speedup = f"{rate / base:.2f}x" if rate and base and r["model"] != "dense" else ""
        other = (
            sparse.get((r["sparsity"], r["mode"], r["batch"])) if r["model"] == "sliced" else None
        )
        versus = f"{rate / other:.2f}x" if rate and other else ""
        peak = r.get("peak_memory_bytes")
        lines.append(
            f"| {'any' if r['model'] == 'dense' else format(r['sparsity'], '.0%')} | {r['model']} | {r['mode']} | {r['batch']} | "
            + (f"{rate:.1f}" if rate else r.get("error", "")[:60])
            + f" | {speedup} | {versus} | "
            + (f"{peak / 2**30:.2f}" if peak else "")
            + " |"
        )
    return "\n".join(lines)


def run_sliced(
    config: dict,
    stored: int,
    sparsity: float,
    tiny: bool,
    dtype: torch.dtype,
    device: torch.device,
    args,
    rows: list,
    check: dict,
) -> None:
    """Time the Llama sliced to ``stored`` projection weights (built after the sparse model is
    freed, so the two never share the GPU's memory)."""
    # Multiples of 64 keep cuBLAS on its fast tiles at full size; the tiny config is too small.
    cfg = sliced_config(config, stored, align=8 if tiny else 64)
    model = build_model(cfg, dtype, device, args.seed)
    params = projection_params(cfg)
    extra = {
        "sparsity": sparsity,
        "model_bytes": model_bytes(model),
        "hidden_size": cfg["hidden_size"],
        "intermediate_size": cfg["intermediate_size"],
        "projection_params": params,
        "sparse_stored_weights": stored,
        "params_vs_sparse": params / stored,
    }
    check["sliced"] = {k: v for k, v in extra.items() if k != "sparsity"}
    print(
        f"  sliced: hidden {config['hidden_size']} -> {cfg['hidden_size']}, intermediate "
        f"{config['intermediate_size']} -> {cfg['intermediate_size']}; projections {params:,} "
        f"weights = {params / stored:.3f}x the sparse model's {stored:,} stored",
        flush=True,
    )
    run_model(model, "sliced", args, device, rows, extra)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsities", default="0.5,0.7", help="comma-separated, e.g. 0.5,0.7")
    p.add_argument("--batches", default="1,8,32", help="comma-separated decode batch sizes")
    p.add_argument("--modes", default="eager,compile", help="eager and/or compile")
    p.add_argument("--format", default="auto", choices=("auto", "tiled_csl", "bitmap"))
    p.add_argument(
        "--prompt", type=int, default=None, help="prompt tokens (default 128 GPU, 16 CPU)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="decode steps (default 64 GPU, 8 CPU)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="the tiny config even on a GPU")
    p.add_argument(
        "--out", default=None, help="JSON results path (default bench/results/e2e_<device>.json)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dense-every", action="store_true", help="time the dense model at every sparsity"
    )
    p.add_argument("--fresh", action="store_true", help="replace --out instead of merging into it")
    p.add_argument(
        "--no-sliced",
        action="store_true",
        help="leave out the sliced (structured, same parameter count) model",
    )
    args = p.parse_args(argv)
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = [m.strip() for m in args.modes.split(",")]
    bad = [m for m in args.modes if m not in ("eager", "compile")]
    if bad:
        p.error(f"--modes takes eager and/or compile, got {bad}")
    if any(not 0 <= s <= 1 for s in args.sparsities):
        p.error("--sparsities must be in [0, 1]")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    args.prompt = args.prompt or (16 if tiny else 128)
    args.new_tokens = args.new_tokens or (8 if tiny else 64)
    env = environment(device, tiny)
    if tiny:
        print(
            "flashsparse e2e: no CUDA device"
            if device.type != "cuda"
            else "flashsparse e2e: --tiny",
            "-- running a TINY Llama config as a smoke test; these numbers are not a measurement",
        )
    print(json.dumps(env))
    config = TINY if tiny else LLAMA3_8B
    dtype = torch.bfloat16
    rows: list[dict] = []
    checks: list[dict] = []
    for sparsity in args.sparsities:
        start = time.perf_counter()
        model = build_model(config, dtype, device, args.seed)
        prune_projections(model, sparsity)
        sync(device)
        print(f"sparsity {sparsity:.0%}: built and pruned in {time.perf_counter() - start:.1f} s")
        probe = torch.randint(
            10, config["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1)
        ).to(device)
        with torch.no_grad():
            dense_logits = model(probe).logits.float()
        dense_bytes = fs.sparsify_summary(model).model_dense_nbytes
        stored = stored_projection_weights(model)
        extra = {"sparsity": sparsity, "model_bytes": dense_bytes}
        # Dense speed does not depend on the values: time it once (first sparsity) unless asked.
        dense_tokens = {}
        if args.dense_every or sparsity == args.sparsities[0]:
            dense_tokens = run_model(model, "dense", args, device, rows, extra)
        start = time.perf_counter()
        fs.sparsify_(model, format=args.format)
        sync(device)
        encode_s = time.perf_counter() - start
        summary = fs.sparsify_summary(model)
        kernel = kernel_used(model, device)
        with torch.no_grad():
            sparse_logits = model(probe).logits.float()
        rel = float((sparse_logits - dense_logits).norm() / dense_logits.norm())
        print(
            f"  sparsify_ {encode_s:.1f} s; {summary.sparse_layers} layers {summary.formats}; "
            f"kernel {kernel}; logits rel err {rel:.2e}",
            flush=True,
        )
        if device.type == "cuda" and kernel.endswith("/reference"):
            print(
                "  WARNING: no GPU kernel runs this format here (reference path: decode to dense on "
                "every call); sparse timings will be slow",
                flush=True,
            )
        label = f"flashsparse-{'/'.join(sorted(summary.formats))}"
        extra = {"sparsity": sparsity, "model_bytes": summary.model_nbytes}
        sparse_tokens = run_model(model, label, args, device, rows, extra)
        # Kernels sum in another order than cuBLAS: on a GPU greedy paths may part after a
        # near-tie, so this is reported, not required.
        same = {
            f"{mode}/b{batch}": float(
                (sparse_tokens[(mode, batch)] == dense_tokens[(mode, batch)]).float().mean()
            )
            for (mode, batch) in sparse_tokens
            if (mode, batch) in dense_tokens
        }
        checks.append(
            {
                "sparsity": sparsity,
                "encode_seconds": encode_s,
                "logits_rel_err": rel,
                "greedy_tokens_equal_fraction": same,
                "kernel": kernel,
                "summary": summary.as_dict(),
            }
        )
        print(
            f"  model {summary.model_dense_nbytes / 2**20:,.1f} -> {summary.model_nbytes / 2**20:,.1f} MiB; "
            f"greedy tokens equal to dense: {same}"
        )
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_sliced and stored:
            run_sliced(config, stored, sparsity, tiny, dtype, device, args, rows, checks[-1])
    result = {
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rows": rows,
        "checks": checks,
    }
    out = (
        Path(args.out)
        if args.out
        else Path(__file__).parent
        / "results"
        / (
            "e2e_cpu_tiny.json"
            if device.type != "cuda"
            else "e2e_" + re.sub(r"[^a-z0-9]+", "_", env["device"].lower()).strip("_") + ".json"
        )
    )
    if not args.fresh:
        result = merge(out, result)
    print(table(result["rows"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        main(sys.argv[1:])
