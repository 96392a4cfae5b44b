"""How many visual tokens each media item becomes and where the encoder's text tokens go around them.

A media item's *template* is an int array with one entry per embedding of its block: a token id for text
embeddings (the encoder's start/end/sep tokens, e.g. "\\n" after each image or frame) and -1 for each visual
token, in the order the device produces them. Templates are computed on the host before anything runs, so
the fused sequence length is known up front.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nvila_jax.config import MediaEncoderConfig, NVILAConfig
from nvila_jax.media.image import ImageTiles
from nvila_jax.models.temporal import check_pool_sizes

VISUAL = -1


@dataclasses.dataclass(frozen=True)
class EncoderTokens:
    """Token ids an encoder puts around each image/frame (start, end) and after each pooled group (sep)."""

    start: tuple[int, ...] = ()
    end: tuple[int, ...] = ()
    sep: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, enc: MediaEncoderConfig, encode) -> "EncoderTokens":
        """`encode` maps text to ids (the tokenizer's), as the reference's `tokenizer(text).input_ids`."""
        ids = lambda s: tuple(encode(s)) if s else ()
        return cls(ids(enc.start_tokens), ids(enc.end_tokens), ids(enc.sep_tokens))


def tokens_per_block(config: NVILAConfig) -> int:
    """Visual tokens of one tile-sized block after k x k space-to-channel (padding included)."""
    return config.tokens_per_tile


def s2_output_blocks(config: NVILAConfig, grid: tuple[int, int]) -> tuple[int, int]:
    """Blocks of the merged Dynamic-S2 map: the last scale's grid, or k x k of the chosen output scale."""
    idx = config.s2_resize_output_to_scale_idx % len(config.s2_scales)
    if idx == len(config.s2_scales) - 1:
        return tuple(grid)
    k = config.s2_scales[idx] // config.s2_scales[0]
    return (k, k)


def image_visual_tokens(config: NVILAConfig, tiles: ImageTiles) -> int:
    if tiles.grid is None:
        if tiles.pixels.shape[0] != 1:
            raise ValueError(f"an image without an S2 grid is one tile, got {tiles.pixels.shape[0]}")
        return tokens_per_block(config)
    rows, cols = s2_output_blocks(config, tiles.grid)
    return rows * cols * tokens_per_block(config)


def _block(n_visual: int, tokens: EncoderTokens) -> np.ndarray:
    return np.concatenate([np.asarray(tokens.start, np.int32), np.full(n_visual, VISUAL, np.int32),
                           np.asarray(tokens.end, np.int32)])


def image_template(config: NVILAConfig, tiles: ImageTiles, tokens: EncoderTokens) -> np.ndarray:
    return _block(image_visual_tokens(config, tiles), tokens)


def video_template(config: NVILAConfig, num_frames: int, tokens: EncoderTokens) -> np.ndarray:
    """Basic encoder: every frame's tokens + end tokens. TSP: per pool size, every pooled frame's tokens +
    end tokens, then the sep tokens."""
    n = tokens_per_block(config)
    enc = config.video_encoder
    if enc.kind == "basic":
        return np.tile(_block(n, tokens), num_frames)
    check_pool_sizes(num_frames, n, enc.pool_sizes)
    parts = []
    for pt, ph, pw in enc.pool_sizes:
        parts += [np.tile(_block(n // (ph * pw), tokens), num_frames // pt), np.asarray(tokens.sep, np.int32)]
    return np.concatenate(parts)
