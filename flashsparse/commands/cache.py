"""``flashsparse cache``: list the JIT-built kernels in the kernel cache, or remove them."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "list (default) or clear the JIT-built kernels in the kernel cache"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        nargs="?",
        choices=("list", "clear"),
        default="list",
        help="list: show every cached build and its state (default); clear: remove them",
    )
    parser.add_argument("--cpu", action="store_true", help="only the CPU extension's builds")
    parser.add_argument("--cuda", action="store_true", help="only the CUDA extension's builds")
    parser.add_argument(
        "--dry-run", action="store_true", help="clear: say what would be removed, remove nothing"
    )
    parser.add_argument("--json", action="store_true", help="list: print JSON")
    parser.epilog = (
        "clear never removes a build another process is building or loading (it says which "
        "and exits with status 1), nor anything outside <cache>/extensions except builds of "
        "the old layout (<cache>/<torch version>/...); other tools' folders in the cache are "
        "left alone. The next call or `flashsparse build` rebuilds what it needs."
    )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _describe(item) -> str:
    manifest = item.manifest or {}
    key = manifest.get("key") or {}
    torch_info = key.get("torch") or {}
    details = []
    if manifest.get("built"):
        details.append(f"built {manifest['built']}")
    if torch_info:
        details.append(f"torch {torch_info.get('version')} at {torch_info.get('path')}")
    return "; ".join(details)


def run(args: argparse.Namespace) -> int:
    from ..kernels import build

    devices = [d for d in ("cpu", "cuda") if getattr(args, d)] or None
    root = build.extensions_root()
    if args.action == "list":
        items = build.list_cache(devices)
        if args.json:
            print(
                json.dumps(
                    {
                        "folder": str(root),
                        "items": [
                            {
                                "kind": i.kind,
                                "device": i.device,
                                "path": str(i.path),
                                "state": i.state,
                                "bytes": i.size,
                                "manifest": i.manifest,
                            }
                            for i in items
                        ],
                    },
                    indent=2,
                )
            )
            return 0
        print(f"kernel cache: {root}")
        if not items:
            print("  (empty)")
        for item in items:
            name = item.path.name if item.kind != "legacy" else str(item.path)
            print(f"  {item.device:<5} {item.kind:<8} {_size(item.size):>10}  {name}")
            extra = _describe(item)
            print(f"  {'':<5} {'':<8} {'':>10}  {item.state}" + (f"; {extra}" if extra else ""))
        return 0

    removed, kept = build.clear_cache(devices, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for item in removed:
        print(f"{verb}: {item.path} ({_size(item.size)})")
    for item, why in kept:
        print(f"flashsparse cache: kept {item.path}: {why}", file=sys.stderr)
    total = sum(i.size for i in removed)
    print(f"{verb} {len(removed)} cached build(s), {_size(total)}, from {build.cache_root()}")
    if kept:
        print(
            f"flashsparse cache: {len(kept)} in use were kept; run `flashsparse cache clear` "
            "again once those processes are done",
            file=sys.stderr,
        )
        return 1
    return 0
