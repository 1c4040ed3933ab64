"""Checks shared by the commands: each turns a user mistake into one clear line."""

from __future__ import annotations

import os
from pathlib import Path


def parse_device(text: str, *, allow_auto: bool = False):
    """``cpu``, ``cuda`` or ``cuda:N`` (and ``auto`` where allowed) as a usable
    ``torch.device``; a ValueError saying what is wrong otherwise (no CUDA, no such GPU)."""
    import torch

    expected = ("auto, " if allow_auto else "") + "cpu, cuda or cuda:N"
    if allow_auto and text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"expected {expected}, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"expected {expected}, got {text!r}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"expected {expected}, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "CUDA is not available to torch on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{device} does not exist ({torch.cuda.device_count()} CUDA device(s))"
            )
    return device


def output_file_problem(path: str) -> str | None:
    """Why ``path`` cannot be written as an output file (checked before a long run, so a typo
    fails in a second rather than after the work); None if it can."""
    p = Path(path)
    if p.is_dir():
        return f"{path} is a directory; give a file name"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing directories are created: the first existing one counts
    if not parent.is_dir():
        return f"cannot create {path}: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"cannot write {path}: permission denied"
    return None
