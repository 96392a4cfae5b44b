"""`nvila-jax accounting`: tiles, visual tokens and FLOPs of a prompt for a variant, without running it."""

from __future__ import annotations

import argparse

COMMAND = "accounting"
HELP = "count ViT tiles, visual tokens before/after STC and pooling, and FLOPs of a prompt for a variant"


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image size WIDTHxHEIGHT such as 1344x1008, got {text!r}")
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return w, h


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--variant", default="NVILA-8B", help="a built-in variant (default NVILA-8B)")
    src.add_argument("--config", help="an official checkpoint directory or its config.json")
    media = p.add_mutually_exclusive_group()
    media.add_argument("--image", type=_size, action="append", default=[], metavar="WxH",
                       help="image size; repeat for several images in one prompt")
    media.add_argument("--frames", type=int, help="number of sampled video frames")
    p.add_argument("--text-tokens", type=int, default=40, help="chat template + question tokens (default 40)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import json

    from nvila_jax.accounting import account, format_accounting
    from nvila_jax.config import NVILAConfig
    from nvila_jax.variants import get_variant

    config = NVILAConfig.from_hf_config(args.config) if args.config else get_variant(args.variant)
    acc = account(config, args.image, args.frames, args.text_tokens)
    print(json.dumps(acc.as_dict(), indent=2) if args.json else format_accounting(acc))
    return 0
