"""Dynamic-S2 feature merging: stitch the tiles of each scale into one map, area-resize every scale to the
output scale's grid and concatenate on channels (NVILA_REFERENCE.md §2.5)."""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] averaging weights of torch `F.interpolate(mode="area")` (= adaptive average pooling):
    output o averages inputs [floor(o * n_in / n_out), ceil((o + 1) * n_in / n_out))."""
    o = np.arange(n_out)[:, None]
    i = np.arange(n_in)[None, :]
    start = (o * n_in) // n_out
    end = -((-(o + 1) * n_in) // n_out)
    inside = (i >= start) & (i < end)
    return (inside / (end - start)).astype(np.float32)


def area_resize(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Area-resizes maps [..., H, W, C] to [..., out_h, out_w, C], computed in float32 like the reference."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == tuple(out_hw):
        return x
    ah = jnp.asarray(area_resize_matrix(h, out_hw[0]))
    aw = jnp.asarray(area_resize_matrix(w, out_hw[1]))
    y = jnp.einsum("oh,...hwc,pw->...opc", ah, x.astype(jnp.float32), aw, precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def stitch_tiles(tiles: jax.Array, rows: int, cols: int) -> jax.Array:
    """Row-major tiles [rows*cols, g, g, C] -> one map [rows*g, cols*g, C] (the reference's merge_chessboard)."""
    n, gh, gw, c = tiles.shape
    return tiles.reshape(rows, cols, gh, gw, c).transpose(0, 2, 1, 3, 4).reshape(rows * gh, cols * gw, c)


def split_tiles(x: jax.Array, rows: int, cols: int) -> jax.Array:
    """The inverse of `stitch_tiles`: [rows*h, cols*w, C] -> [rows*cols, h, w, C] row-major."""
    hh, ww, c = x.shape
    h, w = hh // rows, ww // cols
    return x.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)


def s2_tile_counts(scales: Sequence[int], grid: tuple[int, int]) -> list[tuple[int, int]]:
    """(rows, cols) of the tiles at each scale: k x k for the fixed scales, `grid` for the last."""
    base = scales[0]
    return [(s // base, s // base) for s in scales[:-1]] + [tuple(grid)]


def merge_s2_features(
    tile_maps: jax.Array, grid: tuple[int, int], scales: Sequence[int], output_scale_idx: int = -1
) -> tuple[jax.Array, tuple[int, int]]:
    """Tile feature maps [1 + 4 + R*C, g, g, C] of one image -> (map [H, W, C * len(scales)], block grid).

    The block grid is how the output map splits into g x g blocks: (R, C) when the output is the last scale.
    """
    counts = s2_tile_counts(scales, grid)
    expected = sum(r * c for r, c in counts)
    if tile_maps.shape[0] != expected:
        raise ValueError(f"Dynamic-S2 grid {grid} with scales {tuple(scales)} needs {expected} tiles, "
                         f"got {tile_maps.shape[0]}")
    maps, start = [], 0
    for r, c in counts:
        maps.append(stitch_tiles(tile_maps[start:start + r * c], r, c))
        start += r * c
    out_hw = maps[output_scale_idx].shape[:2]
    merged = jnp.concatenate([area_resize(m, out_hw) for m in maps], axis=-1)
    return merged, counts[output_scale_idx]


def project_blocks(
    project: Callable[[jax.Array], jax.Array], merged: jax.Array, blocks: tuple[int, int], k: int
) -> jax.Array:
    """Visual tokens of a merged map, row-major over the whole map: [tokens, D].

    The reference runs the projector (k x k space-to-channel + MLP) on each g x g block and stitches the
    results back. When k divides g this equals one space-to-channel over the whole map, which is what runs;
    otherwise each block is padded on its own, as the reference does.
    """
    rows, cols = blocks
    g = merged.shape[0] // rows
    if g % k == 0:
        return project(merged[None])[0]
    tokens = project(split_tiles(merged, rows, cols))  # [R*C, g'*g', D]
    gk = -(-g // k)
    tokens = tokens.reshape(rows * cols, gk, gk, -1)
    return stitch_tiles(tokens, rows, cols).reshape(rows * cols * gk * gk, -1)
