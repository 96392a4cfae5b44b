"""The `nvila-jax` command. Each module in this package whose name does not start with "_" is one
subcommand: it defines COMMAND (the name), HELP (one line), add_arguments(parser) and run(args) -> int.
Heavy imports happen inside run(), so `nvila-jax --help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Sequence


def _commands():
    pkg = sys.modules[__name__]
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{__name__}.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nvila-jax", description="NVILA in JAX: demo, convert, generate, "
                                     "train, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _commands():
        p = sub.add_parser(mod.COMMAND, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and not getattr(args, "_accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return int(args._run(args) or 0)
