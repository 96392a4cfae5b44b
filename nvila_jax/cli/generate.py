"""`nvila-jax generate`: answer one prompt with images or a video, printing the answer as it is generated."""

from __future__ import annotations

import argparse
import sys

COMMAND = "generate"
HELP = "answer a prompt about images or a video with a converted checkpoint, streaming the answer"
BUILTIN = ("tiny", "tiny-lite")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="an nvila_jax checkpoint directory (from `nvila-jax convert`); `tiny` or `tiny-lite` runs "
                        "the built-in tiny model with random weights (a smoke test)")
    p.add_argument("--prompt", required=True, help="the question or instruction")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image file; repeat for several images")
    p.add_argument("--video", metavar="PATH", help="a video file or a directory of frame images")
    p.add_argument("--num-frames", type=int, help="frames sampled from the video (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = no top-k filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--warmup", action="store_true",
                   help="run once before the reported run, so the timings exclude compilation")
    p.add_argument("--quiet", action="store_true", help="print only the answer, once complete")


class _Printer:
    """Prints the decoded answer incrementally (a token's text can change once the next token arrives,
    so the whole answer is decoded each time and only the new part is printed)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, _row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.startswith(self.shown) and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self, text: str) -> None:
        """Prints what is still held back (e.g. an incomplete character at the end) and a newline."""
        print(text[len(self.shown):] if text.startswith(self.shown) else "", flush=True)


def _load(args: argparse.Namespace):
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype) if args.dtype else None
    if args.model in BUILTIN:
        import jax

        from nvila_jax.model import NVILAModel
        from nvila_jax.models.nvila import init_params
        from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer
        from nvila_jax.variants import get_variant

        print(f"{args.model}: built-in tiny model with RANDOM weights (the answer is noise)", file=sys.stderr)
        cfg = get_variant(args.model)
        return NVILAModel(cfg, init_params(cfg, jax.random.key(args.seed)), build_tiny_tokenizer(),
                          dtype=dtype or jnp.float32)
    import nvila_jax

    return nvila_jax.load_pretrained(args.model, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    from nvila_jax.inference.batch import GenerationRequest

    try:
        model = _load(args)
        request = GenerationRequest(args.prompt, args.image, args.video, args.num_frames)
        kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                  top_k=args.top_k, seed=args.seed)
        if args.warmup:
            model.generate_batch([request], **kw)
        printer = None if args.quiet else _Printer(model.tokenizer)
        result = model.generate_batch([request], **kw, on_token=printer)[0]
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"nvila-jax generate: error: {e}", file=sys.stderr)
        return 1
    if args.quiet:
        print(result.text)
        return 0
    printer.finish(result.text)
    s = result.stats
    print(f"[prompt {result.prompt_tokens} tokens ({result.visual_tokens} visual from {result.vit_tiles} ViT tiles) | "
          f"vision {s.vision_s:.2f} s | "
          f"prefill {s.prefill_s:.2f} s | {len(result.token_ids)} tokens, decode {s.decode_tokens_per_s:.1f} "
          f"tokens/s | finished by {result.finish_reason}"
          f"{'' if args.warmup else ' | times include compilation (--warmup excludes it)'}]", file=sys.stderr)
    return 0
