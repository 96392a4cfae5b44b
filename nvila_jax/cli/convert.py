"""`nvila-jax convert SRC DST`: an official NVILA checkpoint -> an nvila_jax checkpoint (docs/convert.md)."""

from __future__ import annotations

import argparse

COMMAND = "convert"
HELP = "convert an official NVILA checkpoint (safetensors, HF layout) into an nvila_jax checkpoint (Orbax)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="official checkpoint directory (config.json + llm/ + vision_tower/ + "
                   "mm_projector/, or a *-hf repo)")
    p.add_argument("dst", metavar="DST", help="nvila_jax checkpoint directory to create")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="parameter dtype (default bfloat16; float32 keeps float32 sources exact)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from nvila_jax.cli._interrupt import report_errors

    with report_errors():
        from checkpoints_convert.convert import convert

        m = convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet)
        v = m["vocab"]
        added = ", ".join(f"{t}={i}" for t, i in v["added_tokens"].items()) or "none"
        print(f"{args.dst}: {m['parameter_count']:,} parameters ({m['dtype']}), {m['unused_tensors']} unused tensors "
              f"kept for export; tokenizer {v['tokenizer_size']} tokens (built from {m['source']['tokenizer']} files, "
              f"added {added}); {len(v['suppressed_token_ids'])} never-trained ids suppressed in generation")
        return 0
    return 1
