"""Sparse fine-tuning on a CPU in about a minute: prune a small transformers model, then win
the lost accuracy back by training only the nonzeros that are left (the mask stays fixed).

1. A tiny Llama (built from a config: no download) learns a toy task: continue arithmetic
   sequences ``a, a + d, a + 2d, ... (mod 64)`` with random ``a`` and ``d`` per sequence.
2. Every projection is magnitude-pruned to 70 % zeros: the loss jumps up.
3. ``fs.sparsify_(model, trainable=True)`` turns each projection into a bitmap SparseLinear
   whose packed nonzeros are an ``nn.Parameter``; AdamW over ``model.parameters()`` trains
   them (and the embeddings and norms, which stay dense). The loss comes back down, and the
   stored nonzeros -- the sparsity -- are exactly those of step 2.

    python examples/finetune_sparse.py            # ~1 minute on 2 CPU cores
    python examples/finetune_sparse.py --steps 50 # quicker
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import flashsparse as fs

VOCAB, SEQ = 64, 48


def batch(size: int, generator: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    step = torch.randint(1, 8, (size, 1), generator=generator)
    return (start + step * torch.arange(SEQ)) % VOCAB


def loss_of(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=tokens[:, :-1]).logits
    # The first two tokens fix a and d: score the predictions that can be right.
    return F.cross_entropy(logits[:, 1:].reshape(-1, VOCAB), tokens[:, 2:].reshape(-1))


def train(model: nn.Module, steps: int, lr: float, generator: torch.Generator, report=None) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss_of(model, batch(32, generator)).backward()
        opt.step()
        if report is not None and (step % max(1, steps // 5) == 0 or step == steps):
            report(step)


def stored_nonzeros(model: nn.Module) -> int:
    return sum(m.sparse_weight.nnz for m in model.modules() if isinstance(m, fs.SparseLinear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=120, help="steps of each training phase")
    parser.add_argument("--sparsity", type=float, default=0.7)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    held_out = batch(256, torch.Generator().manual_seed(1))
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    t0 = time.perf_counter()

    def evaluate() -> float:
        with torch.no_grad():
            return float(loss_of(model, held_out))

    train(model, args.steps, 3e-3, g)
    trained = evaluate()
    with torch.no_grad():  # magnitude pruning of every projection but the LM head
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(fs.prune(module.weight, args.sparsity))
    pruned = evaluate()

    fs.sparsify_(model, trainable=True)  # the LM head stays dense (and trains densely)
    summary = fs.sparsify_summary(model)
    nnz_before = stored_nonzeros(model)
    print(
        f"sparse fine-tuning ({summary.sparse_layers} trainable bitmap layers, "
        f"{summary.sparsity:.2%} sparsity):"
    )
    train(
        model,
        args.steps,
        1e-3,
        g,
        lambda step: print(f"  step {step:4d}: held-out loss {evaluate():.4f}"),
    )
    recovered = evaluate()
    nnz_after = stored_nonzeros(model)
    summary_after = fs.sparsify_summary(model)

    print(
        f"held-out loss: trained dense {trained:.4f} -> pruned to {args.sparsity:.0%} "
        f"{pruned:.4f} -> after sparse fine-tuning {recovered:.4f}"
    )
    print(
        f"sparse layers: {summary.sparse_layers}; stored nonzeros before fine-tuning "
        f"{nnz_before:,}, after {nnz_after:,}; sparsity {summary.sparsity:.4%} -> "
        f"{summary_after.sparsity:.4%}"
    )
    print(f"({time.perf_counter() - t0:.0f} s on {torch.get_num_threads()} threads)")
    assert nnz_after == nnz_before and summary_after.sparsity == summary.sparsity


if __name__ == "__main__":
    main()
