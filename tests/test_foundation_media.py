"""Host-side media: tiling geometry and pixels, area resize and space-to-channel, against the reference."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from helpers import torch_nvila as ref
from nvila_jax.kernels import space_to_channel
from nvila_jax.media.image import dynamic_s2_tiles, dynamic_tiles, load_image, normalize, preprocess_images
from nvila_jax.media.tiling import dynamic_grid, dynamic_s2_grid
from nvila_jax.media.video import frame_indices
from nvila_jax.models.multiscale import area_resize, merge_s2_features, project_blocks, stitch_tiles
from nvila_jax.variants import get_variant, tiny, tiny_lite

SCALES = (448, 896, 1344)
# (width, height) -> expected (rows, cols) with Dynamic-S2 (9..12 tiles) and Lite tiling (1..12 tiles),
# worked out by hand from the rule in NVILA_REFERENCE.md §2.2.
GEOMETRY = {
    (1000, 1000): ((3, 3), (3, 3)),  # square, large: Lite's 3x3 beats 1x1 and 2x2 on the tie (area > half of 9 tiles)
    (700, 700): ((3, 3), (2, 2)),  # exact tie 1x1 / 2x2 / 3x3: area > half of 2x2 but not of 3x3
    (600, 600): ((3, 3), (1, 1)),  # exact tie, small: stays one tile
    (20, 20): ((3, 3), (1, 1)),
    (1344, 1008): ((3, 4), (3, 4)),  # 4:3
    (1008, 1344): ((4, 3), (4, 3)),  # 3:4
    (3000, 2000): ((3, 4), (2, 3)),  # 3:2 -> 4x3 is the closest S2 grid; Lite has 3x2 exactly
    (100, 1000): ((10, 1), (10, 1)),  # 1:10
    (1000, 100): ((1, 10), (1, 10)),  # 10:1
    (4000, 100): ((1, 12), (1, 12)),  # beyond the extreme grids
    (2750, 1000): ((2, 6), (2, 6)),  # 2.75: exactly between 5:2 and 6:2 (and 3:1); the large area takes 6x2
    (275, 100): ((2, 5), (1, 3)),  # the same tie with a small area keeps the first (fewest tiles) grid
    (897, 448): ((2, 5), (1, 2)),  # a shade over 2:1
}


@pytest.mark.parametrize("size", list(GEOMETRY))
def test_grid_choice_matches_hand_computed_values_and_the_reference(size):
    w, h = size
    want_s2, want_lite = GEOMETRY[size]
    assert dynamic_s2_grid(w, h, SCALES, 12) == want_s2
    assert dynamic_grid(w, h, 448, 1, 12) == want_lite
    _, block = ref.dynamic_s2_preprocess(PIL.Image.new("RGB", (w, h)), list(SCALES), 12, 448)
    assert block == want_s2


@pytest.mark.parametrize("size", [(150, 100), (20, 20), (56, 56), (100, 1000), (301, 97), (1200, 800)])
def test_tile_pixels_equal_the_reference_processor(size):
    cfg = tiny()
    img = ref.random_image(*size, seed=sum(size))
    mine = dynamic_s2_tiles(img, cfg.s2_scales, cfg.max_tiles)
    tiles, block = ref.dynamic_s2_preprocess(img, list(cfg.s2_scales), cfg.max_tiles, cfg.vision.image_size)
    processor = ref.TorchNVILA.__new__(ref.TorchNVILA)
    processor.processor = ref.SiglipImageProcessorPil(size={"height": 56, "width": 56}, resample=3)
    want = ref.TorchNVILA.pixels(processor, tiles).permute(0, 2, 3, 1).numpy()
    assert mine.grid == block
    np.testing.assert_array_equal(mine.pixels, want)
    lite = np.stack(dynamic_tiles(img, 56, 1, 12))
    want = ref.TorchNVILA.pixels(processor, ref.dynamic_preprocess(img, 1, 12, 56)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(lite, want)


def test_inference_policy_tiles_only_a_single_image():
    img = ref.random_image(150, 100)
    s2 = preprocess_images([img], tiny())
    assert len(s2) == 1 and s2[0].grid == (3, 4) and s2[0].pixels.shape == (1 + 4 + 12, 56, 56, 3)
    lite = preprocess_images([img], tiny_lite())
    assert len(lite) == 7 and all(t.grid is None and t.pixels.shape[0] == 1 for t in lite)  # 3x2 + thumbnail
    for cfg in (tiny(), tiny_lite()):
        two = preprocess_images([img, img], cfg)
        assert [t.pixels.shape for t in two] == [(1, 56, 56, 3)] * 2 and all(t.grid is None for t in two)
        np.testing.assert_array_equal(two[0].pixels[0], normalize(img, 56))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_images_of_every_mode_become_rgb(mode, tmp_path):
    img = ref.random_image(30, 20).convert(mode)
    path = tmp_path / "x.png" if mode != "CMYK" else tmp_path / "x.jpg"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (30, 20)


def test_exif_orientation_is_applied(tmp_path):
    img = ref.random_image(40, 20)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_bad_image_inputs_name_the_problem(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png.*cannot be decoded"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="missing.png: image file not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="expected an image path or PIL.Image"):
        load_image(42)


@pytest.mark.parametrize("n_in, n_out", [(32, 96), (64, 96), (64, 160), (32, 128), (24, 24), (16, 24), (96, 32)])
def test_area_resize_equals_torch_area_interpolation(n_in, n_out):
    x = np.random.RandomState(n_in + n_out).randn(2, n_in, n_in + 8, 5).astype(np.float32)
    out_hw = (n_out, n_out + 3)
    want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="area").permute(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(area_resize(jnp.asarray(x), out_hw)), want.numpy(), atol=1e-6)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("side", [1, 2, 3, 5, 7, 8, 9, 11, 32, 33])
def test_space_to_channel_equals_the_reference_view_permute(k, side):
    x = np.random.RandomState(side).randn(3, side, side, 4).astype(np.float32)
    want = ref.DownSample(k)(torch.from_numpy(x).reshape(3, side * side, 4)).numpy()
    got = np.asarray(space_to_channel(jnp.asarray(x), k))
    assert got.shape == (3, -(-side // k), -(-side // k), k * k * 4)
    np.testing.assert_array_equal(got.reshape(3, -1, k * k * 4), want)


def test_space_to_channel_handles_rectangular_grids():
    x = jnp.arange(2 * 5 * 7 * 2, dtype=jnp.float32).reshape(2, 5, 7, 2)
    y = np.asarray(space_to_channel(x, 3))
    assert y.shape == (2, 2, 3, 18)
    np.testing.assert_array_equal(y[1, 0, 1, :2], np.asarray(x[1, 0, 3]))  # (m, n) = (0, 0) of block (0, 1)
    # bottom-right block (rows 3-5, cols 6-8 of the padded 6x9 grid): only x[3, 6] (m=0, n=0) and
    # x[4, 6] (m=1, n=0) are real, everything else is zero padding
    corner = y[0, 1, 2].reshape(9, 2)
    np.testing.assert_array_equal(corner[0], np.asarray(x[0, 3, 6]))
    np.testing.assert_array_equal(corner[3], np.asarray(x[0, 4, 6]))
    np.testing.assert_array_equal(np.delete(corner, [0, 3], axis=0), 0)


@pytest.mark.parametrize("grid, out_idx", [((3, 3), -1), ((3, 4), -1), ((1, 10), -1), ((2, 6), 1), ((4, 3), 0)])
def test_s2_merge_equals_reference_chessboard_and_area_interpolation(grid, out_idx):
    g, c = 8, 3
    n = 1 + 4 + grid[0] * grid[1]
    feats = np.random.RandomState(n).randn(n, g, g, c).astype(np.float32)
    merged, blocks = merge_s2_features(jnp.asarray(feats), grid, (56, 112, 168), out_idx)
    t = torch.from_numpy(feats).reshape(n, g * g, c)
    maps = [ref.merge_chessboard(t[:1], 1, 1), ref.merge_chessboard(t[1:5], 2, 2), ref.merge_chessboard(t[5:], *grid)]
    size = maps[out_idx].shape[-2:]
    want = torch.cat([F.interpolate(m, size=size, mode="area") for m in maps], dim=1)[0].permute(1, 2, 0)
    np.testing.assert_allclose(np.asarray(merged), want.numpy(), atol=1e-6)
    assert blocks == (grid if out_idx == -1 else (out_idx + 1,) * 2)


@pytest.mark.parametrize("g, k", [(8, 2), (7, 2), (8, 3), (9, 3)])
def test_projecting_blocks_equals_the_reference_split_merge(g, k):
    """One global space-to-channel where k divides the block side, per-block padding otherwise."""
    rows, cols = 2, 3
    x = np.random.RandomState(g * k).randn(rows * g, cols * g, 2).astype(np.float32)
    identity = lambda m: space_to_channel(m, k).reshape(m.shape[0], -1, k * k * m.shape[-1])
    got = np.asarray(project_blocks(identity, jnp.asarray(x), (rows, cols), k))
    blocks = ref.split_chessboard(torch.from_numpy(x).permute(2, 0, 1)[None], rows, cols)
    tokens = ref.DownSample(k)(blocks.flatten(2).transpose(1, 2))
    want = ref.merge_chessboard(tokens, rows, cols).flatten(2).transpose(1, 2)[0]
    np.testing.assert_array_equal(got, want.numpy())


def test_stitch_tiles_is_row_major():
    tiles = jnp.arange(6)[:, None, None, None] * jnp.ones((6, 2, 2, 1))
    m = np.asarray(stitch_tiles(tiles, 2, 3))[:, :, 0]
    np.testing.assert_array_equal(m[::2, ::2], [[0, 1, 2], [3, 4, 5]])


@pytest.mark.parametrize("count, n", [(1, 8), (8, 8), (100, 8), (7, 16), (256, 1), (1000, 256)])
def test_frame_indices_are_rounded_linspace(count, n):
    idx = frame_indices(count, n)
    assert len(idx) == n and idx[0] == 0 and idx[-1] == (count - 1 if n > 1 else 0)
    np.testing.assert_array_equal(idx, np.round(np.linspace(0, count - 1, n)).astype(int))


def test_release_variants_tile_like_the_paper():
    """Token counts quoted in NVILA_REFERENCE.md: square image 2304 tokens, 4:3 3072, Lite tiles 121."""
    from nvila_jax.media.image import ImageTiles
    from nvila_jax.media.layout import image_visual_tokens

    cfg = get_variant("NVILA-8B")
    assert image_visual_tokens(cfg, ImageTiles(np.zeros((14, 1, 1, 3)), (3, 3))) == 2304
    assert image_visual_tokens(cfg, ImageTiles(np.zeros((17, 1, 1, 3)), (3, 4))) == 3072
    assert image_visual_tokens(cfg, ImageTiles(np.zeros((1, 1, 1, 3)))) == 256
    assert get_variant("NVILA-Lite-8B").tokens_per_tile == 121
    assert dataclasses.replace(cfg).num_vision_layers_used == 26
