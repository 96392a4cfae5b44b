"""`nvila-jax demo`: the embedded tiny default, run end to end on CPU."""

from __future__ import annotations

import argparse

COMMAND = "demo"
HELP = "build the tiny NVILA, run it end to end on a generated image and a generated video"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="parameter and image seed")
    p.add_argument("--max-new-tokens", type=int, default=8)


def run(args: argparse.Namespace) -> int:
    import time

    import jax
    import numpy as np
    import PIL.Image
    import PIL.ImageDraw

    from nvila_jax.model import NVILAModel
    from nvila_jax.models.nvila import init_params
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer
    from nvila_jax.variants import tiny

    cfg = tiny()
    model = NVILAModel(cfg, init_params(cfg, jax.random.key(args.seed)), build_tiny_tokenizer())
    img = PIL.Image.new("RGB", (160, 120), "white")
    PIL.ImageDraw.Draw(img).ellipse((40, 30, 100, 90), fill="red")
    frames = [img.rotate(15 * i) for i in range(8)]
    for what, kw in (("image 160x120", dict(images=[img])), ("video, 8 frames", dict(video=frames))):
        req = model.prepare("What color is the circle?", **kw)
        t = time.perf_counter()
        answer = model.generate("What color is the circle?", max_new_tokens=args.max_new_tokens, **kw)
        dt = time.perf_counter() - t
        tiles = sum(x.pixels.shape[0] for x in req.images) if req.images else len(req.video)
        print(f"{what}: {tiles} ViT tiles, {req.fused.num_visual} visual tokens, {req.length} tokens in total; "
              f"answer (random weights) {answer!r} in {dt:.1f}s")
    return 0
