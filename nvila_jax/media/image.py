"""Host-side image preprocessing: loading, PIL bicubic tiling and SigLIP normalisation, as the reference.

The reference resizes with `PIL.Image.resize` (bicubic, antialiased), then the SigLIP processor rescales by
1/255 (in float64, stored as float32) and normalises with mean = std = 0.5. Doing this in JAX instead would
change the pixels, so it stays on the host.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence, Union

import numpy as np
import PIL.Image
import PIL.ImageOps

from nvila_jax.config import NVILAConfig
from nvila_jax.media.tiling import dynamic_grid, dynamic_s2_grid

ImageLike = Union[str, os.PathLike, PIL.Image.Image]


class MediaError(ValueError):
    """An image or video that cannot be used, naming the file and the reason."""


@dataclasses.dataclass(frozen=True)
class ImageTiles:
    """The tiles of one `<image>` token: pixels [n, S, S, 3] in [-1, 1] and, for Dynamic-S2, the (rows, cols)
    grid of the last scale (None when every tile is an independent image)."""

    pixels: np.ndarray
    grid: tuple[int, int] | None = None


def load_image(image: ImageLike) -> PIL.Image.Image:
    """An RGB PIL image from a path or PIL image, EXIF orientation applied (L/P/RGBA/CMYK converted as the
    reference's `convert("RGB")` does)."""
    if isinstance(image, PIL.Image.Image):
        img, name = image, "image"
    elif isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        try:
            with PIL.Image.open(name) as f:
                f.load()
                img = f.copy()
        except FileNotFoundError:
            raise MediaError(f"{name}: image file not found") from None
        except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
            raise MediaError(f"{name}: cannot be decoded as an image ({e})") from None
    else:
        raise MediaError(f"expected an image path or PIL.Image, got {type(image).__name__}")
    if img.width < 1 or img.height < 1:
        raise MediaError(f"{name}: empty image ({img.width}x{img.height})")
    img = PIL.ImageOps.exif_transpose(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def tile_pixels(img: PIL.Image.Image, size: int) -> np.ndarray:
    """The SigLIP processor's resize: bicubic to size x size (no-op when already that size), uint8 [size, size, 3].

    Training ships these uint8 tiles to the device (4x fewer bytes) and normalises them there with
    `normalize_pixels` applied to all 256 values, which gives exactly the same floats."""
    if img.size != (size, size):
        img = img.resize((size, size), PIL.Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def normalize_pixels(x: np.ndarray) -> np.ndarray:
    """SigLIP processor's rescale + normalise of uint8 pixels: x/255 (in float64, stored float32), (x - 0.5) / 0.5."""
    x = (np.asarray(x, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(0.5)) / np.float32(0.5)


def normalize(img: PIL.Image.Image, size: int) -> np.ndarray:
    """SigLIP processor: bicubic resize to size x size (no-op when already that size), x/255, (x - 0.5) / 0.5."""
    return normalize_pixels(tile_pixels(img, size))


def grid_tiles(img: PIL.Image.Image, rows: int, cols: int, size: int) -> list[PIL.Image.Image]:
    """Resize the whole image to (cols*size, rows*size) and crop row-major size x size tiles."""
    resized = img.resize((cols * size, rows * size), PIL.Image.BICUBIC)
    return [
        resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)
    ]


def dynamic_s2_tile_images(
    img: PIL.Image.Image, scales: Sequence[int], max_tiles: int
) -> tuple[list[PIL.Image.Image], tuple[int, int]]:
    """Tiles of every scale: k x k squares for all but the last scale, then the aspect-preserving grid
    (returned as (rows, cols))."""
    size = scales[0]
    tiles = []
    for s in scales[:-1]:
        tiles += grid_tiles(img, s // size, s // size, size)
    rows, cols = dynamic_s2_grid(img.width, img.height, scales, max_tiles)
    tiles += grid_tiles(img, rows, cols, size)
    return tiles, (rows, cols)


def dynamic_s2_tiles(img: PIL.Image.Image, scales: Sequence[int], max_tiles: int) -> ImageTiles:
    """`dynamic_s2_tile_images`, normalised."""
    tiles, grid = dynamic_s2_tile_images(img, scales, max_tiles)
    return ImageTiles(np.stack([normalize(t, scales[0]) for t in tiles]), grid)


def dynamic_tile_images(img: PIL.Image.Image, size: int, min_tiles: int, max_tiles: int) -> list[PIL.Image.Image]:
    """NVILA-Lite tiling: the grid's tiles, plus a whole-image thumbnail when there is more than one tile."""
    rows, cols = dynamic_grid(img.width, img.height, size, min_tiles, max_tiles)
    tiles = grid_tiles(img, rows, cols, size)
    if len(tiles) > 1:
        tiles.append(img.resize((size, size), PIL.Image.BICUBIC))
    return tiles


def dynamic_tiles(img: PIL.Image.Image, size: int, min_tiles: int, max_tiles: int) -> list[np.ndarray]:
    """`dynamic_tile_images`, normalised."""
    return [normalize(t, size) for t in dynamic_tile_images(img, size, min_tiles, max_tiles)]


def preprocess_images(images: Sequence[ImageLike], config: NVILAConfig) -> list[ImageTiles]:
    """One ImageTiles per `<image>` token, following the reference's inference policy.

    A single image gets the config's dynamic tiling: Dynamic-S2 (one token, all scales) or Lite dynamic
    tiling (one token per tile). Several images are each resized to one tile.
    """
    loaded = [load_image(im) for im in images]
    size = config.vision.image_size
    if len(loaded) == 1 and config.tiling == "dynamic_s2":
        return [dynamic_s2_tiles(loaded[0], config.s2_scales, config.max_tiles)]
    if len(loaded) == 1 and config.tiling == "dynamic":
        return [ImageTiles(t[None]) for t in dynamic_tiles(loaded[0], size, config.min_tiles, config.max_tiles)]
    return [ImageTiles(normalize(im, size)[None]) for im in loaded]


def frames_to_pixels(frames: Sequence[ImageLike], size: int) -> np.ndarray:
    """Video frames -> [T, size, size, 3]: each frame resized to one tile (aspect not preserved)."""
    if not frames:
        raise MediaError("a video needs at least one frame")
    return np.stack([normalize(load_image(f), size) for f in frames])
