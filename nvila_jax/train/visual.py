"""Device side of the packing plan (nvila_jax/data/packing.py): a micro-batch's tiles -> its visual tokens.

Equals running `NVILA.s2_image_tokens` / `tile_tokens` / `video_tokens` per media item (tested), but as one
static program per batch shape.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.data.packing import VisualGeometry
from nvila_jax.media.image import normalize_pixels
from nvila_jax.models.nvila import NVILA

# The SigLIP processor's value of every uint8 level: a lookup gives exactly the host's float pixels.
PIXEL_TABLE = normalize_pixels(np.arange(256, dtype=np.uint8))


def tile_pixels_on_device(tiles: jax.Array) -> jax.Array:
    """uint8 tiles [N, S, S, 3] -> normalised float32 pixels."""
    return jnp.asarray(PIXEL_TABLE)[tiles.astype(jnp.int32)]


def _s2_blocks(feats: jax.Array, batch: Mapping[str, jax.Array], geom: VisualGeometry) -> jax.Array:
    """Merged Dynamic-S2 blocks [NB, g, g, C * scales]: per fixed scale, the block's k x k source tiles
    stitched and area-resized by its row/column matrices (in float32, as the reference); then the last-scale
    tile."""
    nb = batch["s2_last"].shape[0]
    g, c = feats.shape[1], feats.shape[-1]
    parts = []
    for i, k in enumerate(geom.scale_factors):
        src = jnp.take(feats, batch[f"s2_src_{i}"], axis=0)  # [NB, k*k, g, g, C]
        stitched = src.reshape(nb, k, k, g, g, c).transpose(0, 1, 3, 2, 4, 5).reshape(nb, k * g, k * g, c)
        merged = jnp.einsum("byi,bijc,bxj->byxc", batch[f"s2_rows_{i}"], stitched.astype(jnp.float32),
                            batch[f"s2_cols_{i}"], precision=jax.lax.Precision.HIGHEST)
        parts.append(merged.astype(feats.dtype))
    parts.append(jnp.take(feats, batch["s2_last"], axis=0))
    return jnp.concatenate(parts, axis=-1)


def batch_visual_tokens(model: NVILA, batch: Mapping[str, jax.Array], geom: VisualGeometry) -> jax.Array:
    """All visual tokens of one micro-batch [M, D], in the order `visual_index` addresses them.

    `model` is a bound NVILA (inside `nn.apply`); `batch` holds one micro-batch's arrays (no leading
    accumulation axis)."""
    feats = model.tile_features(tile_pixels_on_device(batch["tiles"]))  # [N, g, g, C]
    tiles = jnp.take(feats, batch["tile_src"], axis=0)
    if geom.s2:
        tiles = jnp.tile(tiles, (1, 1, 1, len(geom.scale_factors) + 1))
        blocks = jnp.concatenate([_s2_blocks(feats, batch, geom), tiles], axis=0)
    else:
        blocks = tiles
    tokens = model.projector(blocks)
    tokens = tokens.reshape(-1, tokens.shape[-1])
    if geom.pool_sizes:
        pooled = jnp.einsum("mk,mkd->md", batch["pool_weight"],
                            jnp.take(tokens, batch["pool_src"], axis=0).astype(jnp.float32))
        tokens = jnp.concatenate([tokens, pooled.astype(tokens.dtype)], axis=0)
    return tokens
