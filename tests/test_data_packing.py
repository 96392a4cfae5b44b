"""Packed batches: layout (segments, restarting positions, shifted targets), the static visual-token plan
against the model's per-image programs, and packed loss == unpacked loss == the model's own loss."""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from nvila_jax.config import MediaEncoderConfig, ProjectorConfig
from nvila_jax.data.conversation import IGNORE
from nvila_jax.data.mixture import load_mixture
from nvila_jax.data.packing import BatchShape, VisualGeometry, assemble
from nvila_jax.data.pipeline import mixture_dataset
from nvila_jax.data.sample import Sample, SampleBuilder, SampleOptions
from nvila_jax.media.image import normalize_pixels
from nvila_jax.models.nvila import NVILA, init_params
from nvila_jax.train.step import micro_batch_nll
from nvila_jax.train.visual import batch_visual_tokens
from nvila_jax.variants import tiny, tiny_lite

BASE = tiny()
CONFIGS = {
    "s2_3_scales": BASE,
    "s2_2_scales_tsp": dataclasses.replace(
        BASE, s2_scales=(56, 112), max_tiles=6, projector=ProjectorConfig("mlp_downsample", 64, 64),
        video_encoder=MediaEncoderConfig(kind="tsp", pool_sizes=((2, 1, 1), (1, 2, 2)))),
    "lite": tiny_lite(),
}


def smooth_image(w, h, seed):
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((w, h), PIL.Image.BILINEAR)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    sizes = [(100, 60), (60, 150), (90, 90), (200, 40), (70, 110)]
    for i, (w, h) in enumerate(sizes):
        smooth_image(w, h, i).save(root / f"im{i}.png")
    os.makedirs(root / "clip")
    for f in range(4):
        smooth_image(64, 48, 10 + f).save(root / "clip" / f"{f:03d}.png")
    turn = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    recs = [
        {"image": "im0.png", "conversations": turn("<image>\nWhat color is it?", "red")},
        {"images": ["im1.png", "im2.png"], "conversations": turn("Which one?", "the first") + turn("And?", "no")},
        {"video": "clip", "conversations": turn("<video>\nWhat moves?", "the circle")},
        {"conversations": turn("Count to three.", "one two three")},
        {"image": "im3.png", "conversations": turn("<image>Where?", "left")},
        {"images": ["im4.png", "im0.png", "im2.png"], "conversations": turn("Same?", "yes")},
    ]
    with open(root / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return str(root / "d.jsonl"), len(recs)


def build_samples(cfg, records, policy) -> list[Sample]:
    path, n = records
    mix = load_mixture([{"name": "d", "path": path}])
    builder = SampleBuilder(cfg, "tiny", mix.datasets, SampleOptions(1024, 64, image_policy=policy,
                                                                      num_video_frames=4))
    src = mixture_dataset(mix, 0, shuffle=False, repeat=False)
    out = [builder(src[i]) for i in range(n)]
    assert all(isinstance(s, Sample) for s in out), out
    return out


def reference_tokens(model, params, cfg, sample):
    """The sample's visual tokens from NVILA's own per-item programs, in media order."""
    out, t = [], 0
    for item in sample.media:
        px = jnp.asarray(normalize_pixels(sample.tiles[t:t + item.num_tiles]))
        t += item.num_tiles
        if item.kind == "s2":
            out.append(model.apply({"params": params}, px, item.grid, method=NVILA.s2_image_tokens))
        elif item.kind == "video":
            out.append(model.apply({"params": params}, px, method=NVILA.video_tokens))
        else:
            out.append(model.apply({"params": params}, px, method=NVILA.tile_tokens).reshape(-1, cfg.llm.hidden_size))
    return np.concatenate(out) if out else np.zeros((0, cfg.llm.hidden_size), np.float32)


# The 2-scale all_images case is slow-marked (test time): its S2 images are covered by s2_3_scales and its TSP
# video by the single_image case.
@pytest.mark.parametrize("name,policy", [("s2_3_scales", "all_images"),
                                         pytest.param("s2_2_scales_tsp", "all_images", marks=pytest.mark.slow),
                                         ("s2_2_scales_tsp", "single_image"), ("lite", "all_images")])
def test_visual_plan_equals_per_item_programs(name, policy, records):
    cfg = CONFIGS[name]
    samples = build_samples(cfg, records, policy)
    kinds = {it.kind for s in samples for it in s.media}
    assert kinds == ({"s2", "video"} if cfg.tiling == "dynamic_s2" and policy == "all_images" else
                     {"s2", "tile", "video"} if cfg.tiling == "dynamic_s2" else {"tile", "video"})
    geom = VisualGeometry.from_config(cfg)
    tiles = sum(s.num_tiles for s in samples)
    rows = [samples[0:2], samples[2:4], samples[4:6]]
    arrays = assemble(geom, BatchShape(3, 1024, tiles + 3), rows, pad_id=0)
    model = NVILA(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
    tokens = jax.jit(lambda p, a: nn.apply(lambda m: batch_visual_tokens(m, a, geom), model)({"params": p}))(
        params, {k: jnp.asarray(v) for k, v in arrays.items()})
    tokens = np.asarray(tokens)
    for r, row in enumerate(rows):
        pos = 0
        for s in row:
            vi = arrays["visual_index"][r, pos:pos + s.length]
            np.testing.assert_array_equal(vi >= 0, s.visual_index >= 0)
            want = reference_tokens(model, params, cfg, s)
            np.testing.assert_allclose(tokens[vi[vi >= 0]], want, rtol=1e-5, atol=1e-5)
            pos += s.length


def test_row_layout(records):
    cfg = CONFIGS["s2_2_scales_tsp"]
    samples = build_samples(cfg, records, "all_images")
    geom = VisualGeometry.from_config(cfg)
    rows = [samples[:3], samples[3:4]]
    a = assemble(geom, BatchShape(3, 700, 64), rows, pad_id=384)
    lens = [s.length for s in samples[:3]]
    assert sum(lens) <= 700
    seg = a["segment_ids"][0]
    np.testing.assert_array_equal(seg[:sum(lens)], np.repeat([1, 2, 3], lens))
    assert (seg[sum(lens):] == 0).all() and (a["segment_ids"][2] == 0).all()
    starts = np.cumsum([0] + lens[:-1])
    for s, st, n in zip(samples, starts, lens):
        np.testing.assert_array_equal(a["positions"][0, st:st + n], np.arange(n))  # restart per sample
        np.testing.assert_array_equal(a["input_ids"][0, st:st + n], s.input_ids)
        assert a["targets"][0, st + n - 1] == IGNORE  # no sample predicts the next one's first token
    pad = a["segment_ids"] == 0
    assert (a["input_ids"][pad] == 384).all() and (a["targets"][pad] == IGNORE).all()
    assert (a["visual_index"][pad] == -1).all()
    with pytest.raises(ValueError, match="row 0 holds"):
        assemble(geom, BatchShape(1, 100, 64), [samples[:1]], 0)


def test_targets_are_the_shifted_reference_labels(records, tiny_tokenizer):
    """targets[t] = label[t + 1] over the fused sequence; media blocks and the prompt are never trained."""
    cfg = CONFIGS["s2_3_scales"]
    s = build_samples(cfg, records, "all_images")[0]
    trained = s.targets != IGNORE
    assert (s.visual_index[1:][trained[:-1]] < 0).all()
    text = tiny_tokenizer.decode(s.targets[trained].tolist(), skip_special_tokens=False)
    assert text == "red<|im_end|>"
    np.testing.assert_array_equal(s.targets[trained], s.input_ids[1:][trained[:-1]])


def test_packed_loss_equals_unpacked_and_model_loss(records):
    cfg = CONFIGS["s2_2_scales_tsp"]
    samples = build_samples(cfg, records, "all_images")
    geom = VisualGeometry.from_config(cfg)
    model = NVILA(cfg)
    params = nn.meta.unbox(init_params(cfg, jax.random.key(2)))
    nll = jax.jit(lambda p, a: micro_batch_nll(model, p, a, geom, loss_chunk=0))

    def per_sample(rows, seq_len, tiles):
        a = assemble(geom, BatchShape(len(rows), seq_len, tiles), rows, pad_id=0)
        out = np.asarray(nll(params, {k: jnp.asarray(v) for k, v in a.items()}))
        sums = []
        for r, row in enumerate(rows):
            for seg in range(1, len(row) + 1):
                sums.append(out[r][a["segment_ids"][r] == seg].sum())
        return np.asarray(sums)

    packed = per_sample([samples[:3], samples[3:]], 1024, 64)
    alone = np.concatenate([per_sample([[s]], s.length, max(s.num_tiles, 1)) for s in samples])
    np.testing.assert_allclose(packed, alone, rtol=2e-5, atol=1e-5)
    # The model's own forward on one unpacked sample (visual tokens from NVILA's methods) gives the same loss.
    for s, want in zip(samples, alone):
        vis = reference_tokens(model, params, cfg, s)
        n = s.length
        logits = model.apply({"params": params}, jnp.asarray(s.input_ids)[None],
                             jnp.asarray(s.visual_index)[None], jnp.asarray(vis), jnp.arange(n)[None],
                             jnp.ones((1, n), jnp.int32))[0]
        logits = np.asarray(model.apply({"params": params}, logits, method=NVILA.logits))[0].astype(np.float64)
        m = s.targets >= 0
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        ce = (lse - logits[np.arange(n), np.maximum(s.targets, 0)])[m].sum()
        np.testing.assert_allclose(want, ce, rtol=2e-5)
