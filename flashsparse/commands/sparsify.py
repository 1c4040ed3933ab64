"""``flashsparse sparsify MODEL_DIR OUT_DIR``: a local Hugging Face causal-LM directory in, a
compressed flashsparse model directory out.

The input is a directory as ``save_pretrained`` writes it (``config.json`` plus safetensors or
PyTorch weights), either dense (pruned or not: ``--sparsity`` prunes it) or a compressed-tensors
``sparse-bitmask`` checkpoint (converted straight to flashsparse formats, never densified as a
whole). The output holds ``config.json``, ``flashsparse.safetensors`` and the input's other
files (tokenizer, generation config). Load it with::

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OUT_DIR))
    flashsparse.load_sparse(model, OUT_DIR, device="cuda")

Nothing is downloaded: the directory must be complete.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

HELP = "sparsify a local Hugging Face model directory and save it in compressed form"

_DTYPES = ("auto", "float16", "bfloat16", "float32")
# Weight files of the input: not copied (the output has its own).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..formats import FORMAT_NAMES
    from ..prune import METHODS

    parser.add_argument(
        "model_dir", help="local Hugging Face model directory (config.json + weights)"
    )
    parser.add_argument("out_dir", help="output directory (created if needed)")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="prune every projection (linear, Conv1D, each MoE expert matrix) to this fraction of "
        "zeros first, in [0, 1), e.g. 0.5 (default: keep the checkpoint's zeros, for an already "
        "pruned model)",
    )
    parser.add_argument(
        "--method", choices=METHODS, default="magnitude", help="pruning method (with --sparsity)"
    )
    parser.add_argument(
        "--format", choices=FORMAT_NAMES, default="auto", help="sparse weight format"
    )
    parser.add_argument(
        "--quant",
        choices=("int8", "fp8"),
        default=None,
        help="store the nonzeros as 8-bit codes with float32 scales (weight-only; bitmap "
        "format): int8 or fp8 (e4m3); default: the weights' own dtype",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="with --quant: one scale per this many input columns (a power of two >= 32, "
        "e.g. 128) instead of one per output row",
    )
    parser.add_argument(
        "--min-sparsity",
        type=float,
        default=0.0,
        help="leave projections with a smaller fraction of zeros dense (default 0.0: convert all)",
    )
    parser.add_argument(
        "--dtype", choices=_DTYPES, default="auto", help="weight dtype (auto: the checkpoint's)"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="where to prune and encode: cpu, cuda or cuda:N (default cpu)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write into OUT_DIR even if it is not empty (its files of the same names are replaced)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _fail(message: str) -> int:
    print(f"flashsparse sparsify: error: {message}", file=sys.stderr)
    return 2


def _dtype_keyword(transformers_version: str) -> str:
    """``from_pretrained`` takes ``dtype`` from transformers 4.56 on, ``torch_dtype`` before."""
    match = re.match(r"(\d+)\.(\d+)", transformers_version)
    version = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    return "dtype" if version >= (4, 56) else "torch_dtype"


def _load_model(model_dir: Path, args: argparse.Namespace):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..serialization import empty_weights
    from ..serialization.compressed_tensors import compression_config, load_compressed_tensors

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    ct = compression_config(model_dir)
    if ct is not None and (ct.get("sparsity_config") or {}).get("format") == "sparse-bitmask":
        if args.sparsity is not None:
            raise ValueError(
                "the checkpoint is already sparse (compressed-tensors sparse-bitmask); "
                "drop --sparsity"
            )
        if args.quant is not None and ct.get("config_groups"):
            raise ValueError(
                "the checkpoint is already quantized (compressed-tensors config_groups); "
                "drop --quant"
            )
        # The output is no longer compressed-tensors: its config must not say so.
        for key in ("quantization_config", "compression_config"):
            if hasattr(config, key):
                delattr(config, key)
        with empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        load_compressed_tensors(
            model,
            model_dir,
            format=args.format,
            device=args.device,
            quant=args.quant,
            group_size=args.group_size,
        )
        return model, "compressed-tensors sparse-bitmask" + (
            " (quantized)" if ct.get("config_groups") else ""
        )
    if ct is not None:
        from ..serialization.compressed_tensors import _check_compression_config

        if _check_compression_config(ct, str(model_dir))["quantized"]:
            raise ValueError(
                "the checkpoint is quantized but not sparse (no compressed-tensors "
                "sparse-bitmask); flashsparse reads sparse-bitmask checkpoints, with or without "
                "int8 / fp8 weights"
            )
    kwargs = {_dtype_keyword(transformers.__version__): "auto", "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.to(torch.device(args.device)), "dense"


def _copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or path.name == "config.json" or path.name.startswith("."):
            continue
        if path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            continue
        shutil.copy2(path, out_dir / path.name)
        copied.append(path.name)
    return copied


def run(args: argparse.Namespace) -> int:
    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    if not (model_dir / "config.json").is_file():
        return _fail(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if out_dir.exists() and out_dir.resolve() == model_dir.resolve():
        return _fail("OUT_DIR must differ from MODEL_DIR")
    # [0, 1) as in `flashsparse bench`: 1.0 would write a model whose projections are all zero.
    if args.sparsity is not None and not 0.0 <= args.sparsity < 1.0:
        return _fail(
            f"--sparsity must be in [0, 1) (fraction of zeros, e.g. 0.5), got {args.sparsity}"
        )
    if not 0.0 <= args.min_sparsity <= 1.0:
        return _fail(f"--min-sparsity must be in [0, 1], got {args.min_sparsity}")
    if args.group_size is not None and args.quant is None:
        return _fail("--group-size needs --quant int8 or fp8")
    if args.quant is not None and args.format == "tiled_csl":
        return _fail("--quant stores the bitmap format: use --format bitmap or auto")
    from ..formats.bitmap_quant import check_group_size, check_quant

    try:
        check_quant(args.quant)
        check_group_size(args.group_size)
    except ValueError as exc:
        return _fail(str(exc).replace("group_size", "--group-size").replace("quant=", "--quant "))
    if out_dir.exists() and not out_dir.is_dir():
        return _fail(f"OUT_DIR {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        return _fail(f"OUT_DIR {out_dir} is not empty; pass --overwrite to write into it anyway")
    from .common import output_file_problem, parse_device

    problem = output_file_problem(str(out_dir / "config.json"))
    if problem:
        return _fail(problem)
    try:
        parse_device(args.device)
    except ValueError as exc:
        return _fail(f"--device: {exc}")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError:
        return _fail("this command needs transformers: pip install 'flashsparse[hf]'")

    from ..nn import default_skipped_linears, is_conv1d, sparsify_, sparsify_summary
    from ..nn.experts import expert_projections, is_fused_experts
    from ..notices import FlashsparseWarning, ReferencePathWarning
    from ..prune import prune
    from ..serialization import save_sparse

    start = time.perf_counter()
    try:
        model, kind = _load_model(model_dir, args)
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    except Exception as exc:  # a corrupt weight file raises the reader's own error type
        return _fail(f"cannot load {model_dir}: {type(exc).__name__}: {exc}")
    model.eval()
    if args.dtype != "auto":
        model.to(getattr(torch, args.dtype))
    if args.sparsity is not None:
        skipped = default_skipped_linears(model)
        with torch.no_grad():
            for fqn, module in model.named_modules():
                if fqn in skipped:
                    continue
                if isinstance(module, torch.nn.Linear) or is_conv1d(module):
                    module.weight.copy_(prune(module.weight, args.sparsity, args.method))
                elif is_fused_experts(module):
                    # Each expert matrix is pruned on its own, as a linear layer would be.
                    for _, weight, _ in expert_projections(module):
                        for e in range(weight.shape[0]):
                            weight[e].copy_(prune(weight[e], args.sparsity, args.method))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FlashsparseWarning)
        sparsify_(
            model,
            format=args.format,
            min_sparsity=args.min_sparsity,
            quant=args.quant,
            group_size=args.group_size,
        )
    for w in caught:
        # The reference-path notice is about running the model, not storing it: not said here.
        if issubclass(w.category, FlashsparseWarning) and not issubclass(
            w.category, ReferencePathWarning
        ):
            message = str(w.message).replace("flashsparse.prune(weight, 0.5)", "--sparsity 0.5")
            message = message.replace("format='bitmap' (or 'auto')", "--format bitmap (or auto)")
            message = message.replace("min_sparsity=", "--min-sparsity ").replace(
                "min_sparsity", "--min-sparsity"
            )
            print(f"flashsparse sparsify: warning: {message}", file=sys.stderr)
        elif not issubclass(w.category, FlashsparseWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    summary = sparsify_summary(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = save_sparse(model, out_dir)
    model.config.save_pretrained(out_dir)
    copied = _copy_side_files(model_dir, out_dir)
    elapsed = time.perf_counter() - start
    if args.json:
        print(
            json.dumps(
                {
                    "input": str(model_dir),
                    "input_kind": kind,
                    "output": str(written),
                    "file_nbytes": written.stat().st_size,
                    "copied": copied,
                    "seconds": elapsed,
                    **summary.as_dict(),
                },
                indent=2,
            )
        )
        return 0
    print(f"{model_dir} ({type(model).__name__}, {kind}) -> {written}")
    print(summary)
    print(
        f"file:            {written.stat().st_size / 2**20:,.2f} MiB; also wrote config.json"
        + (f" and copied {', '.join(copied)}" if copied else "")
        + f" ({elapsed:.1f} s)"
    )
    return 0
