"""Whole-model logits against the PyTorch reference (HF SigLIP/Qwen2 + a transcription of the official
NVILA code) over images, several images, text, video and config variants; and the clear errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers.torch_nvila import random_image, video_frames
from nvila_jax.config import MediaEncoderConfig, ProjectorConfig
from nvila_jax.inference.request import ContextLengthError
from nvila_jax.model import NVILAModel
from nvila_jax.models.temporal import TemporalPoolError
from nvila_jax.variants import tiny, tiny_lite

TOL = 1e-4
QUESTION = "What color is the circle?"
TSP = MediaEncoderConfig(kind="tsp", pool_sizes=((4, 1, 1),))
TSP_MULTI = MediaEncoderConfig(kind="tsp", pool_sizes=((2, 1, 1), (4, 2, 2)), sep_tokens="\n")

CONFIGS = {
    "nvila": tiny(),
    "lite": tiny_lite(),
    "nvila-tsp": tiny(video_encoder=TSP),
    "nvila-tsp-multi": tiny(video_encoder=TSP_MULTI),
    "lite-tsp": tiny_lite(video_encoder=MediaEncoderConfig(kind="tsp", pool_sizes=((2, 1, 1),))),
    "nvila-out-scale-1": tiny(s2_resize_output_to_scale_idx=1),
    "nvila-last-layer": tiny(select_layer=-1),
    "nvila-start-end-tokens": tiny(image_encoder=MediaEncoderConfig(start_tokens="image", end_tokens="\n\n")),
    "nvila-2x2-fix-max9": tiny(projector=dataclasses.replace(tiny().projector, projector_type="mlp_downsample_2x2_fix"),
                               max_tiles=9),
    "resize-linear": tiny(tiling="resize", s2_scales=(56,), projector=ProjectorConfig("linear", 32, 64)),
    "resize-mlp2x": tiny(tiling="resize", s2_scales=(56,), projector=ProjectorConfig("mlp2x_gelu", 32, 64)),
    "lite-tied": tiny_lite(llm=dataclasses.replace(tiny().llm, tie_word_embeddings=True)),
}

IMAGES = {
    "wide": random_image(150, 100, 1),
    "tall": random_image(90, 300, 2),
    "tiny": random_image(20, 20, 3),
    "large": random_image(3000, 2000, 4),
    "extreme": random_image(600, 50, 5),
}


def _pair(make_reference, tiny_tokenizer, name):
    ref, params = make_reference(CONFIGS[name])
    return ref, NVILAModel(CONFIGS[name], params, tiny_tokenizer)


def _check(ref, model, prompt=QUESTION, images=(), frames=()):
    want = ref.logits(prompt, images, frames)
    got = model.score(prompt, images, video=list(frames) if frames else None, num_frames=len(frames) or None)
    assert got.shape == want.shape, "fused sequence lengths differ"
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    return got


CASES = [
    ("nvila", ["wide"], 0), ("nvila", ["tall"], 0), ("nvila", ["tiny"], 0), ("nvila", ["large"], 0),
    ("nvila", ["extreme"], 0), ("lite", ["wide"], 0), ("lite", ["large"], 0), ("lite", ["tiny"], 0),
    ("nvila", ["wide", "tall"], 0), ("lite", ["wide", "tall"], 0), ("nvila", [], 0), ("lite", [], 0),
    ("nvila", [], 8), ("nvila", [], 3), ("lite", [], 8), ("nvila-tsp", [], 8), ("nvila-tsp", [], 16),
    ("nvila-tsp-multi", [], 8), ("lite-tsp", [], 6), ("nvila", ["wide"], 4), ("nvila-out-scale-1", ["large"], 0),
    ("nvila-last-layer", ["wide"], 0), ("nvila-start-end-tokens", ["wide", "tiny"], 0),
    ("nvila-start-end-tokens", ["tall"], 0), ("nvila-2x2-fix-max9", ["extreme"], 0), ("resize-linear", ["wide"], 4),
    ("resize-mlp2x", ["tall", "wide"], 0), ("lite-tied", ["wide"], 8),
]


@pytest.mark.parametrize("name, images, frames", CASES, ids=[f"{c}-{'+'.join(i) or 'text'}-{f}f" for c, i, f in CASES])
def test_logits_equal_the_reference(make_reference, tiny_tokenizer, name, images, frames):
    ref, model = _pair(make_reference, tiny_tokenizer, name)
    _check(ref, model, images=[IMAGES[i] for i in images], frames=video_frames(frames, seed=frames) if frames else ())


def test_the_image_changes_the_answer_logits(make_reference, tiny_tokenizer):
    """Guards the comparisons above against an image path that contributes nothing."""
    _, model = _pair(make_reference, tiny_tokenizer, "nvila")
    a = model.score(QUESTION, [random_image(150, 100, 1)])[-1]
    b = model.score(QUESTION, [random_image(150, 100, 9)])[-1]
    assert np.abs(a - b).max() > 1e-2


def test_literal_media_tokens_in_text_are_removed_like_the_reference(make_reference, tiny_tokenizer):
    ref, model = _pair(make_reference, tiny_tokenizer, "nvila")
    with pytest.warns(UserWarning, match="media token '<image>' found"):
        _check(ref, model, prompt="<image> describe it", images=[IMAGES["wide"]])


def test_temporal_pooling_rejects_frame_counts_it_cannot_divide(make_reference, tiny_tokenizer):
    _, model = _pair(make_reference, tiny_tokenizer, "nvila-tsp")
    with pytest.raises(TemporalPoolError, match="7 frames cannot be pooled in groups of 4.*divisible by 4"):
        model.score(QUESTION, video=video_frames(7), num_frames=7)


def test_a_prompt_longer_than_the_context_is_rejected_up_front(tiny_tokenizer):
    cfg = tiny(model_max_length=100)
    from nvila_jax.inference.request import prepare_request

    req = prepare_request(tiny(), tiny_tokenizer, QUESTION, [IMAGES["wide"]])
    with pytest.raises(ContextLengthError, match=f"{req.length} tokens .* exceeds the 100-token context by "
                                                 f"{req.length - 100}"):
        prepare_request(cfg, tiny_tokenizer, QUESTION, [IMAGES["wide"]])


def test_greedy_generation_follows_the_reference(make_reference, tiny_tokenizer):
    ref, model = _pair(make_reference, tiny_tokenizer, "nvila")
    img = [IMAGES["wide"]]
    want = ref.greedy(QUESTION, img, max_new_tokens=6)
    assert model.generate_ids(QUESTION, img, max_new_tokens=6) == want
    assert model.generate(QUESTION, img, max_new_tokens=6) == tiny_tokenizer.decode(want).strip()
