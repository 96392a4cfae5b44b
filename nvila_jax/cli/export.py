"""`nvila-jax export SRC DST`: an nvila_jax checkpoint -> the official NVILA layout (docs/convert.md)."""

from __future__ import annotations

import argparse

COMMAND = "export"
HELP = "write an nvila_jax checkpoint back in the official NVILA layout (safetensors, HF directories)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="nvila_jax checkpoint directory (made by `nvila-jax convert`)")
    p.add_argument("dst", metavar="DST", help="official checkpoint directory to create")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from nvila_jax.cli._interrupt import report_errors

    with report_errors():
        from checkpoints_convert.export import export

        files = export(args.src, args.dst, force=args.force, progress=not args.quiet)
        print(f"{args.dst}: {len(files)} tensor files written ({', '.join(files)})")
        return 0
    return 1
