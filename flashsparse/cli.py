"""The ``flashsparse`` command: one subcommand per module in ``flashsparse.commands``.

Each command module provides ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("info", "sparsify", "bench", "build", "cache")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flashsparse",
        description="Load-as-Sparse, Compute-as-Dense kernels for unstructured-sparse weights.",
    )
    parser.add_argument("--version", action="version", version=f"flashsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"flashsparse.commands.{name}")
        cmd = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # info reports the environment itself; the other commands refuse a bad one in one line
    # (exit 2) rather than with a traceback from deep inside, and say what is ignored.
    if args.command != "info":
        from .commands.info import check_environment

        problems, warnings = check_environment()
        for warning in warnings:
            print(f"flashsparse {args.command}: warning: {warning}", file=sys.stderr)
        if problems:
            for problem in problems:
                print(
                    f"flashsparse {args.command}: error: {problem} (`flashsparse info` shows "
                    "the setup)",
                    file=sys.stderr,
                )
            return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
