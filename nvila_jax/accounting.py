"""Token and FLOP accounting: for a variant and an image size or frame count, how many ViT tiles, visual
tokens before and after spatial compression (STC) and temporal pooling, and the estimated FLOPs of the
vision encoder, projector, LLM prefill and each decoded token.

FLOPs count matrix multiplies only (2 per multiply-add), which is where the work is; norms, activations,
softmax and the Dynamic-S2 area resize are left out. Tile grids and visual token counts come from the same
host functions that prepare real requests, so they are exact; separator and prompt text tokens are counted
as one token per separator string and a given number of text tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from nvila_jax.config import NVILAConfig, Qwen2Config, SiglipConfig
from nvila_jax.media.layout import EncoderTokens, s2_output_blocks, video_template
from nvila_jax.media.tiling import dynamic_grid, dynamic_s2_grid
from nvila_jax.models.projector import projector_layout
from nvila_jax.models.temporal import check_pool_sizes


@dataclasses.dataclass(frozen=True)
class MediaTokens:
    """What one prompt's media become. `tokens_before_stc` counts positions of the feature maps that enter
    the projector (after the Dynamic-S2 merge), `tokens_after_stc` the projector's outputs and
    `visual_tokens` what reaches the LLM after temporal pooling; `text_tokens` are the encoders' separators
    (e.g. "\\n" after each image or frame, one token each)."""

    description: str
    vit_tiles: int
    tokens_before_stc: int
    tokens_after_stc: int
    visual_tokens: int
    text_tokens: int
    projector_blocks: int  # independent maps the projector sees (1 per merged S2 image, 1 per tile otherwise)

    @property
    def llm_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens


def _one_token_each(text: str) -> list[int]:
    return [0] if text else []


def _separators(config: NVILAConfig, encoder) -> EncoderTokens:
    """Encoder start/end/sep strings counted as one token each (true of Qwen2's "\\n")."""
    return EncoderTokens.from_config(encoder, _one_token_each)


def image_tokens(config: NVILAConfig, sizes: Sequence[tuple[int, int]]) -> MediaTokens:
    """Images of the given (width, height) in one prompt, with the reference's inference policy: dynamic
    tiling (Dynamic-S2 or Lite) for a single image, one 448 tile per image for several."""
    g2 = config.vision.grid_size ** 2
    tpt = config.tokens_per_tile
    sep = _separators(config, config.image_encoder)
    per_item = len(sep.start) + len(sep.end)
    if len(sizes) == 1 and config.tiling == "dynamic_s2":
        w, h = sizes[0]
        grid = dynamic_s2_grid(w, h, config.s2_scales, config.max_tiles)
        base = config.s2_scales[0]
        tiles = sum((s // base) ** 2 for s in config.s2_scales[:-1]) + grid[0] * grid[1]
        rows, cols = s2_output_blocks(config, grid)
        return MediaTokens(f"{w}x{h} image, Dynamic-S2 grid {grid[0]}x{grid[1]} (rows x cols)", tiles,
                           rows * cols * g2, rows * cols * tpt, rows * cols * tpt, per_item, 1)
    if len(sizes) == 1 and config.tiling == "dynamic":
        w, h = sizes[0]
        rows, cols = dynamic_grid(w, h, config.vision.image_size, config.min_tiles, config.max_tiles)
        tiles = rows * cols + (1 if rows * cols > 1 else 0)
        newline_per_tile = 1  # the prompt's "<image>\n" per tile
        return MediaTokens(f"{w}x{h} image, dynamic tiling {rows}x{cols}" + (" + thumbnail" if tiles > 1 else ""),
                           tiles, tiles * g2, tiles * tpt, tiles * tpt, tiles * (per_item + newline_per_tile), tiles)
    n = len(sizes)
    return MediaTokens(f"{n} image(s), one tile each", n, n * g2, n * tpt, n * tpt, n * per_item, n)


def video_tokens(config: NVILAConfig, num_frames: int) -> MediaTokens:
    """A video of `num_frames` sampled frames, one tile each, pooled when the video encoder is TSP."""
    g2 = config.vision.grid_size ** 2
    tpt = config.tokens_per_tile
    template = video_template(config, num_frames, _separators(config, config.video_encoder))
    visual = int((template == -1).sum())
    enc = config.video_encoder
    pooled = f", TSP pooling {[list(p) for p in enc.pool_sizes]}" if enc.kind == "tsp" else ""
    return MediaTokens(f"video, {num_frames} frames{pooled}", num_frames, num_frames * g2, num_frames * tpt,
                       visual, int(template.size) - visual, num_frames)


# ---------------------------------------------------------------------------------------------- FLOPs
def vision_encoder_flops(vision: SiglipConfig, tiles: int, layers: int) -> float:
    """Patch embedding + `layers` pre-LN encoder layers over `tiles` tiles."""
    t, d, i = vision.grid_size ** 2, vision.hidden_size, vision.intermediate_size
    patch = 2 * t * vision.patch_size ** 2 * vision.num_channels * d
    per_layer = 2 * t * (4 * d * d + 2 * d * i) + 4 * t * t * d
    return float(tiles * (patch + layers * per_layer))


def projector_flops(config: NVILAConfig, media: MediaTokens) -> float:
    """The projector's dense layers over the compressed tokens (space-to-channel itself is data movement)."""
    width, flops = config.projector.mm_hidden_size, 0.0
    for spec in projector_layout(config.projector):
        if spec.kind == "stc":
            width *= spec.size ** 2
        elif spec.kind == "dense":
            flops += 2.0 * media.tokens_after_stc * width * spec.size
            width = spec.size
    return flops


def llm_layer_params(llm: Qwen2Config) -> int:
    """Matrix parameters of one decoder layer (q, k, v, o, gate, up, down)."""
    q = llm.num_attention_heads * llm.head_dim
    kv = llm.num_key_value_heads * llm.head_dim
    return llm.hidden_size * (2 * q + 2 * kv) + 3 * llm.hidden_size * llm.intermediate_size


def llm_prefill_flops(llm: Qwen2Config, length: int, last_only: bool = False) -> float:
    """`length` tokens through every layer (causal attention), plus the LM head for the last position.

    `last_only`: what nvila_jax's prefill executes. Its last layer computes keys and values for every token
    (the cache needs them) and everything else for the last token only (generation needs nothing more)."""
    q = llm.num_attention_heads * llm.head_dim
    per_token = 2.0 * llm_layer_params(llm)
    layer = length * per_token + 2.0 * 2.0 * q * length * (length + 1) / 2
    if last_only:
        kv = 2.0 * llm.hidden_size * 2 * llm.num_key_value_heads * llm.head_dim
        last = length * kv + (per_token - kv) + 2.0 * 2.0 * q * length
        layers = (llm.num_hidden_layers - 1) * layer + last
    else:
        layers = llm.num_hidden_layers * layer
    return layers + 2.0 * llm.hidden_size * llm.vocab_size


def llm_decode_flops(llm: Qwen2Config, context: int) -> float:
    """One generated token attending to `context` cached positions (itself included), with the LM head."""
    q = llm.num_attention_heads * llm.head_dim
    per_layer = 2.0 * llm_layer_params(llm) + 4.0 * q * context
    return llm.num_hidden_layers * per_layer + 2.0 * llm.hidden_size * llm.vocab_size


def llm_decode_weight_bytes(llm: Qwen2Config, bytes_per_param: int) -> int:
    """Weight bytes one decode step must read: every layer's matrices, biases and norms, the final norm
    and the LM head (the tied embedding when tied; the looked-up embedding row is negligible)."""
    d = llm.hidden_size
    biases = llm.num_attention_heads * llm.head_dim + 2 * llm.num_key_value_heads * llm.head_dim
    per_layer = llm_layer_params(llm) + biases + 2 * d
    return bytes_per_param * (llm.num_hidden_layers * per_layer + d + d * llm.vocab_size)


@dataclasses.dataclass(frozen=True)
class Accounting:
    config_name: str
    media: MediaTokens | None
    prompt_tokens: int  # text + visual tokens the LLM prefills
    vision_encoder_flops: float
    projector_flops: float
    prefill_flops: float
    decode_flops_per_token: float  # at the prompt's length

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def account(config: NVILAConfig, images: Sequence[tuple[int, int]] = (), num_frames: int | None = None,
            text_tokens: int = 40) -> Accounting:
    """Accounting for one prompt of `text_tokens` chat/text tokens plus the given images or video.

    The vision FLOPs are what nvila_jax runs: the layers up to the selected one (the reference also runs
    the unused rest; see `vision_encoder_flops` with all layers)."""
    if images and num_frames:
        raise ValueError("account one kind of media at a time: images or a video")
    if num_frames is not None and config.video_encoder.kind == "tsp":
        check_pool_sizes(num_frames, config.tokens_per_tile, config.video_encoder.pool_sizes)
    media = image_tokens(config, images) if images else video_tokens(config, num_frames) if num_frames else None
    prompt = text_tokens + (media.llm_tokens if media else 0)
    vision = vision_encoder_flops(config.vision, media.vit_tiles, config.num_vision_layers_used) if media else 0.0
    return Accounting(
        config_name=config.name,
        media=media,
        prompt_tokens=prompt,
        vision_encoder_flops=vision,
        projector_flops=projector_flops(config, media) if media else 0.0,
        prefill_flops=llm_prefill_flops(config.llm, prompt),
        decode_flops_per_token=llm_decode_flops(config.llm, prompt + 1),
    )


def format_accounting(acc: Accounting) -> str:
    """A small human-readable table."""
    lines = [f"{acc.config_name}: " + (acc.media.description if acc.media else "text only")]
    if acc.media:
        m = acc.media
        lines += [
            f"  ViT tiles                     {m.vit_tiles:>12,}",
            f"  visual tokens before STC      {m.tokens_before_stc:>12,}",
            f"  visual tokens after STC       {m.tokens_after_stc:>12,}",
            f"  visual tokens into the LLM    {m.visual_tokens:>12,}  (after temporal pooling)",
            f"  separator tokens              {m.text_tokens:>12,}",
        ]
    lines += [
        f"  prompt tokens (LLM)           {acc.prompt_tokens:>12,}",
        f"  vision encoder                {acc.vision_encoder_flops / 1e12:>12.3f} TFLOP",
        f"  projector                     {acc.projector_flops / 1e12:>12.3f} TFLOP",
        f"  LLM prefill                   {acc.prefill_flops / 1e12:>12.3f} TFLOP",
        f"  per decoded token             {acc.decode_flops_per_token / 1e9:>12.3f} GFLOP",
    ]
    return "\n".join(lines)
