"""Temporal-spatial pooling of projected video features (the TSP video encoder, NVILA_REFERENCE.md §4)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


class TemporalPoolError(ValueError):
    """Frame count or token grid not divisible by a pool size."""


def check_pool_sizes(num_frames: int, tokens_per_frame: int, pool_sizes: Sequence[Sequence[int]]) -> None:
    """Raises a clear error unless every (t, h, w) pool size divides frames and the token grid."""
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise TemporalPoolError(f"temporal pooling needs a square token grid per frame, got {tokens_per_frame} tokens")
    for pt, ph, pw in pool_sizes:
        if num_frames % pt:
            raise TemporalPoolError(
                f"{num_frames} frames cannot be pooled in groups of {pt}: use a frame count divisible by {pt} "
                f"(e.g. {max(pt, num_frames // pt * pt)})"
            )
        if side % ph or side % pw:
            raise TemporalPoolError(f"the {side}x{side} token grid cannot be pooled by ({ph}, {pw})")


def temporal_pool(tokens: jax.Array, pool_sizes: Sequence[Sequence[int]]) -> list[jax.Array]:
    """Projected frame tokens [T, n, D] -> per pool size (t, h, w) the mean-pooled [T/t, n/(h*w), D]."""
    t, n, d = tokens.shape
    check_pool_sizes(t, n, pool_sizes)
    side = math.isqrt(n)
    x = tokens.reshape(t, side, side, d).astype(jnp.float32)
    out = []
    for pt, ph, pw in pool_sizes:
        y = x.reshape(t // pt, pt, side // ph, ph, side // pw, pw, d).mean(axis=(1, 3, 5))
        out.append(y.reshape(t // pt, -1, d).astype(tokens.dtype))
    return out
