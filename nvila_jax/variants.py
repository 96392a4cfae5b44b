"""Named model variants: the official NVILA releases and a tiny model for tests and the demo.

The release shapes come from the official configs (NVILA_REFERENCE.md §1). Fields the reference marks
UNVERIFIED (15B and Lite LLM shapes, the -Video encoder) are best estimates: a converted checkpoint always
uses its own config files, never these. `vocab_size` is the embedding size after the NVILA media tokens are
added to the tokenizer, which is what nvila_jax runs with.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from nvila_jax.config import MediaEncoderConfig, NVILAConfig, ProjectorConfig, Qwen2Config, SiglipConfig

SIGLIP_SO400M_448 = SiglipConfig()

QWEN25_7B = Qwen2Config(vocab_size=151651, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rope_theta=1e6,
                        bos_token_id=151643, eos_token_id=151645)
QWEN25_14B = Qwen2Config(vocab_size=151670, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                         num_attention_heads=40, num_key_value_heads=8, head_dim=128, rope_theta=1e6,
                         bos_token_id=151643, eos_token_id=151645)
QWEN25_1P5B = Qwen2Config(vocab_size=151670, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, head_dim=128, rope_theta=1e6,
                          tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)
# Qwen2.5-0.5B shapes, used by the benchmarks as a small but real LLM.
QWEN25_0P5B = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                          tie_word_embeddings=True)


def _nvila(llm: Qwen2Config, name: str, **kw) -> NVILAConfig:
    """Dynamic-S2 (448/896/dynamic 9-12 tiles) + 2x2 STC projector."""
    fields = dict(
        vision=SIGLIP_SO400M_448,
        llm=llm,
        projector=ProjectorConfig("mlp_downsample", 3 * SIGLIP_SO400M_448.hidden_size, llm.hidden_size),
        tiling="dynamic_s2",
        s2_scales=(448, 896, 1344),
        image_token_id=llm.vocab_size - 2,
        video_token_id=llm.vocab_size - 1,
        name=name,
    )
    return NVILAConfig(**{**fields, **kw})


def _nvila_lite(llm: Qwen2Config, name: str) -> NVILAConfig:
    """InternVL-style dynamic tiling (1-12 tiles + thumbnail) + 3x3 STC projector, 4096 context."""
    return NVILAConfig(
        vision=SIGLIP_SO400M_448,
        llm=llm,
        projector=ProjectorConfig("mlp_downsample_3x3_fix", SIGLIP_SO400M_448.hidden_size, llm.hidden_size),
        tiling="dynamic",
        s2_scales=(448,),
        model_max_length=4096,
        image_token_id=llm.vocab_size - 2,
        video_token_id=llm.vocab_size - 1,
        name=name,
    )


def tiny(**overrides) -> NVILAConfig:
    """A few-MB NVILA with the real structure (3 scales, 2x2 STC, GQA) for tests and `nvila-jax demo`.

    Tiles are 56 px with 7 px patches (8x8 grid), so Dynamic-S2 stitches 8/16/24-patch maps exactly like the
    32/64/96 maps of the real model. Token ids fit the tokenizer built by `nvila_jax.text.tiny_tokenizer`.
    """
    from nvila_jax.text.tiny_tokenizer import TINY_IDS, TINY_VOCAB_SIZE

    vision = SiglipConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          patch_size=7, image_size=56)
    llm = Qwen2Config(vocab_size=TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      max_position_embeddings=4096, eos_token_id=TINY_IDS["<|im_end|>"])
    cfg = NVILAConfig(
        vision=vision,
        llm=llm,
        projector=ProjectorConfig("mlp_downsample", 3 * vision.hidden_size, llm.hidden_size),
        tiling="dynamic_s2",
        s2_scales=(56, 112, 168),
        model_max_length=4096,
        name="tiny",
        image_token_id=TINY_IDS["<image>"],
        video_token_id=TINY_IDS["<vila/video>"],
    )
    return _replace(cfg, overrides)


def tiny_lite(**overrides) -> NVILAConfig:
    """The tiny model with NVILA-Lite's tiling and 3x3 projector."""
    base = tiny()
    cfg = dataclasses.replace(
        base,
        tiling="dynamic",
        s2_scales=(base.vision.image_size,),
        projector=ProjectorConfig("mlp_downsample_3x3_fix", base.vision.hidden_size, base.llm.hidden_size),
        name="tiny-lite",
    )
    return _replace(cfg, overrides)


def _replace(cfg: NVILAConfig, overrides: dict) -> NVILAConfig:
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


VARIANTS: dict[str, Callable[[], NVILAConfig]] = {
    "NVILA-8B": lambda: _nvila(QWEN25_7B, "NVILA-8B"),
    "NVILA-15B": lambda: _nvila(QWEN25_14B, "NVILA-15B"),
    "NVILA-8B-Video": lambda: _nvila(
        QWEN25_7B, "NVILA-8B-Video", num_video_frames=256, model_max_length=16384,
        projector=ProjectorConfig("mlp_downsample_2x2_fix", 3456, 3584),
        video_encoder=MediaEncoderConfig(kind="tsp", pool_sizes=((8, 1, 1),)),
    ),
    "NVILA-Lite-2B": lambda: _nvila_lite(QWEN25_1P5B, "NVILA-Lite-2B"),
    "NVILA-Lite-8B": lambda: _nvila_lite(dataclasses.replace(QWEN25_7B, vocab_size=151670), "NVILA-Lite-8B"),
    "NVILA-Lite-15B": lambda: _nvila_lite(QWEN25_14B, "NVILA-Lite-15B"),
    "tiny": tiny,
    "tiny-lite": tiny_lite,
}


def get_variant(name: str) -> NVILAConfig:
    """The config of a named variant (case-insensitive), with a clear error listing the known names."""
    for key, make in VARIANTS.items():
        if key.lower() == name.lower():
            return make()
    raise KeyError(f"unknown variant {name!r}; known variants: {', '.join(VARIANTS)}")
