"""Scale-then-compress at small scale: visual tokens and LLM prefill time of a 1344x1008 image tiled four ways,
and of a 256-frame video with and without 8-frame temporal pooling (NVILA paper: compressing the tokens of
a scaled-up input recovers the cost of scaling).

    python benchmarks/scale_then_compress.py [--layers 2] [--frames 256] [--repeats 1]

Token counts are exact (the same host code that prepares real requests, via nvila_jax.accounting); prefill
time is measured with the engine's jitted prefill on a Qwen2.5-0.5B-shaped LLM reduced to `--layers`
layers (random visual tokens: prefill time does not depend on their values), at the exact prompt length,
compiled ahead of time (so a single timed run is not a compile). Nearly all prefill work is in the layers,
so the ratios hardly depend on `--layers`. The prefill's last layer computes only keys and values for all
tokens (the rest for the last token), so the default 2 layers time one whole layer plus that; the 256-frame
uncompressed video (65k tokens) takes ~2 minutes per whole layer on 2 cores.
The reference of each group is its uncompressed case, measured in the same run. The FLOPs columns are the
full NVILA-8B (all 28 layers, vision encoder included) from nvila_jax.accounting.
"""

from __future__ import annotations

import argparse
import dataclasses

import flax.linen as nn
import inference_common as common  # noqa: F401  (sets threads, test helpers on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.accounting import account
from nvila_jax.config import MediaEncoderConfig, ProjectorConfig
from nvila_jax.inference.engine import PrefillInputs, _prefill
from nvila_jax.model import inference_module
from nvila_jax.models.nvila import init_params
from nvila_jax.models.qwen2 import unstack_layer_params
from nvila_jax.models.qwen2 import KVCache
from nvila_jax.variants import get_variant

IMAGE = (1344, 1008)
TEXT_TOKENS = 40


def cases(frames: int):
    """(group, name, NVILA-8B-sized config, accounting kwargs)."""
    nvila = get_variant("NVILA-8B")
    no_stc = ProjectorConfig("mlp2x_gelu", nvila.projector.mm_hidden_size, nvila.llm.hidden_size)
    single = dataclasses.replace(nvila, tiling="resize", s2_scales=(448,),
                                 projector=ProjectorConfig("mlp2x_gelu", nvila.vision.hidden_size, nvila.llm.hidden_size))
    lite = dataclasses.replace(get_variant("NVILA-Lite-8B"), llm=nvila.llm, image_token_id=nvila.image_token_id,
                               video_token_id=nvila.video_token_id)
    tsp = MediaEncoderConfig(kind="tsp", pool_sizes=((8, 1, 1),))
    image = dict(images=[IMAGE])
    return [
        ("image", "(a) one 448 tile, no STC", single, image),
        ("image", "(b) Dynamic-S2, no STC", dataclasses.replace(nvila, projector=no_stc), image),
        ("image", "(c) Dynamic-S2 + 2x2 STC (NVILA)", nvila, image),
        ("image", "(d) Lite tiling + 3x3 STC", lite, image),
        ("video", f"(e) {frames} frames, no pooling", nvila, dict(num_frames=frames)),
        ("video", f"(f) {frames} frames, 8-frame pooling (TSP)", dataclasses.replace(nvila, video_encoder=tsp),
         dict(num_frames=frames)),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="LLM depth used for the measured prefill (>= 2: the last "
                   "layer only computes keys and values for all tokens)")
    p.add_argument("--frames", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args()
    if args.layers < 2:
        p.error(f"--layers must be >= 2 (got {args.layers}): one layer would time only keys and values")

    limits = common.measure_machine()
    print(limits.describe(), flush=True)
    cfg = common.bench_config(vision_layers=1, llm_layers=args.layers)
    module = inference_module(cfg)  # as NVILAModel builds it
    params = unstack_layer_params(nn.meta.unbox(init_params(cfg, jax.random.key(0))))
    d = cfg.llm.hidden_size
    rng = np.random.default_rng(0)

    def prefill_seconds(visual: int, total: int) -> float:
        ids = rng.integers(0, 151000, (1, total)).astype(np.int32)
        index = np.full((1, total), -1, np.int32)
        index[0, TEXT_TOKENS // 2:TEXT_TOKENS // 2 + visual] = np.arange(visual)
        inputs = PrefillInputs(jnp.asarray(ids), jnp.asarray(index), jnp.arange(total, dtype=jnp.int32)[None],
                               jnp.ones((1, total), jnp.int32),
                               jnp.asarray(rng.standard_normal((visual, d), dtype=np.float32) * 0.02))

        new_cache = lambda: KVCache.init(cfg.llm, 1, total, jnp.float32)
        compiled = _prefill.lower(module, params, inputs, new_cache()).compile()

        def run():
            jax.block_until_ready(compiled(params, inputs, new_cache()))

        best, _ = common.timed(run, args.repeats, warmup=0)
        return best

    rows, reference = [], {}
    for group, name, config, media in cases(args.frames):
        acc = account(config, text_tokens=TEXT_TOKENS, **media)
        m = acc.media
        seconds = prefill_seconds(m.visual_tokens, acc.prompt_tokens)
        reference.setdefault(group, seconds)
        rows.append((name, f"{m.vit_tiles}", f"{m.tokens_before_stc:,}", f"{m.visual_tokens:,}", f"{acc.prompt_tokens:,}",
                     f"{seconds:.2f}", f"{seconds / reference[group]:.2f}",
                     f"{acc.vision_encoder_flops / 1e12:.0f}", f"{acc.prefill_flops / 1e12:.1f}"))
        print(f"{name}: {m.visual_tokens:,} visual tokens, {acc.prompt_tokens:,} prompt tokens, prefill {seconds:.2f} s",
              flush=True)
    print(f"\nimage {IMAGE[0]}x{IMAGE[1]} and a {args.frames}-frame video; prefill measured with a Qwen2.5-0.5B-shaped "
          f"LLM of {args.layers} layer(s) (float32); ratio = prefill time / the group's first (uncompressed) case")
    print(common.report(rows, ("case", "ViT tiles", "tokens before STC", "visual tokens", "prompt tokens",
                               "prefill s", "ratio", "NVILA-8B vision TFLOP", "NVILA-8B prefill TFLOP")))


if __name__ == "__main__":
    main()
