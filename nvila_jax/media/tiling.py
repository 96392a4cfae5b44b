"""Tile geometry decided on the host: which grid of tiles an image is cut into (NVILA_REFERENCE.md §2.2-2.6).

Grids are (cols, rows) pairs while choosing, as in the reference; the results name rows and cols explicitly.
"""

from __future__ import annotations

from typing import Sequence


def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(cols, rows) grids with min_tiles <= cols*rows <= max_tiles, ordered by tile count.

    The reference builds a Python set and sorts it by product; ties keep the set's iteration order, which
    for small int tuples is fixed by CPython's tuple hash. Building the same set keeps that order exactly.
    """
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def closest_grid(width: int, height: int, grids: Sequence[tuple[int, int]], tile_size: int) -> tuple[int, int]:
    """The (cols, rows) grid whose aspect ratio is closest to the image's.

    On an exact tie a later (larger) grid replaces the current one only if the image area exceeds half of
    that grid's pixel area, so small images keep fewer tiles.
    """
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def dynamic_s2_grid(width: int, height: int, scales: Sequence[int], max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of the aspect-preserving last Dynamic-S2 scale: at least (scales[-1]/scales[0])^2 tiles."""
    min_tiles = (scales[-1] // scales[0]) ** 2
    cols, rows = closest_grid(width, height, candidate_grids(min_tiles, max_tiles), scales[0])
    return rows, cols


def dynamic_grid(width: int, height: int, tile_size: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) of NVILA-Lite's dynamic tiling."""
    cols, rows = closest_grid(width, height, candidate_grids(min_tiles, max_tiles), tile_size)
    return rows, cols
