"""Generation against the PyTorch reference (HF `generate`, greedy) on tiny random checkpoints, batches
against single calls, seeded sampling, stop rules, compile reuse, and the clear errors of bad inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from helpers.torch_nvila import random_image, video_frames
from helpers.video_files import write_video
from nvila_jax.config import MediaEncoderConfig
from nvila_jax.inference import engine as engine_module
from nvila_jax.inference.batch import GenerationRequest
from nvila_jax.inference.engine import Engine
from nvila_jax.inference.request import ContextLengthError
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.media.image import MediaError
from nvila_jax.media.video import read_video_frames
from nvila_jax.model import NVILAModel
from nvila_jax.models.temporal import TemporalPoolError
from nvila_jax.variants import tiny, tiny_lite

QUESTION = "What color is the circle?"
NEW = 8
CONFIGS = {
    "nvila": tiny(),
    "lite": tiny_lite(),
    "tsp": tiny(video_encoder=MediaEncoderConfig(kind="tsp", pool_sizes=((4, 1, 1),))),
}
WIDE, TALL, SMALL = random_image(150, 100, 1), random_image(90, 300, 2), random_image(40, 40, 3)


@pytest.fixture(scope="module")
def pair(make_reference, tiny_tokenizer):
    """pair(name) -> (TorchNVILA, NVILAModel) with the same weights, one model per config."""
    models = {}

    def get(name):
        if name not in models:
            ref, params = make_reference(CONFIGS[name])
            models[name] = (ref, NVILAModel(CONFIGS[name], params, tiny_tokenizer))
        return models[name]

    return get


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_video(str(tmp_path_factory.mktemp("video") / "clip.avi"), 30, size=(80, 60))


GREEDY_CASES = {
    "image": ("nvila", dict(images=[WIDE])),
    "two-images": ("nvila", dict(images=[TALL, SMALL])),
    "video-frames": ("nvila", dict(video=video_frames(6, seed=4))),
    "video-file": ("nvila", dict(video="FILE", num_frames=6)),
    "lite-image": ("lite", dict(images=[WIDE])),
    "tsp-video": ("tsp", dict(video=video_frames(8, seed=5))),
    "text-only": ("nvila", dict()),
}


@pytest.mark.parametrize("case", list(GREEDY_CASES))
def test_greedy_tokens_equal_the_reference(pair, video_file, case):
    name, media = GREEDY_CASES[case]
    ref, model = pair(name)
    media = dict(media)
    if media.get("video") == "FILE":
        media["video"] = video_file
        frames = read_video_frames(video_file, media["num_frames"])
    else:
        frames = media.get("video", ())
    want = ref.greedy(QUESTION, media.get("images", ()), frames, max_new_tokens=NEW)
    got = model.generate_ids(QUESTION, max_new_tokens=NEW, **media)
    assert got == want
    assert model.generate(QUESTION, max_new_tokens=NEW, **media) == model.tokenizer.decode(want).strip()


MIXED = [
    GenerationRequest(QUESTION, images=[WIDE]),
    GenerationRequest("How many shapes are there?", images=[TALL, SMALL]),
    GenerationRequest("Describe the video.", video=video_frames(6, seed=4)),
]


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.3, top_p=0.9, top_k=50, seed=7)],
                         ids=["greedy", "sampled"])
def test_a_batch_equals_single_calls(pair, sampling):
    _, model = pair("nvila")
    batch = model.generate_batch(MIXED, max_new_tokens=NEW, **sampling)
    singles = [model.generate_batch([r], max_new_tokens=NEW, **sampling)[0] for r in MIXED]
    assert [g.token_ids for g in batch] == [g.token_ids for g in singles]
    assert [g.text for g in batch] == [g.text for g in singles]
    assert [g.prompt_tokens for g in batch] == [model.prepare(r.prompt, r.images, r.video).length for r in MIXED]
    assert batch[0].stats.batch_size == 3 and singles[0].stats.batch_size == 1
    assert all(len(g.token_ids) > 0 for g in batch)


def test_seeded_sampling_is_reproducible_and_seed_dependent(pair):
    _, model = pair("nvila")
    kw = dict(images=[WIDE], max_new_tokens=NEW, temperature=2.0)
    a = model.generate_ids(QUESTION, **kw, seed=3)
    assert a == model.generate_ids(QUESTION, **kw, seed=3)
    others = [model.generate_ids(QUESTION, **kw, seed=s) for s in (4, 5)]
    assert any(o != a for o in others)
    greedy = model.generate_ids(QUESTION, images=[WIDE], max_new_tokens=NEW)
    assert a != greedy
    assert model.generate_ids(QUESTION, **kw, seed=3, top_k=1) == greedy
    assert model.generate_ids(QUESTION, **kw, seed=3, top_p=1e-6) == greedy


def test_per_request_sampling_settings_in_one_batch(pair):
    _, model = pair("nvila")
    greedy = GenerationRequest(QUESTION, images=[WIDE])
    hot = GenerationRequest(QUESTION, images=[WIDE], sampling=SamplingParams(NEW, temperature=2.0, seed=3))
    out = model.generate_batch([greedy, hot, QUESTION, {"prompt": QUESTION, "images": [WIDE]}], max_new_tokens=NEW)
    assert out[0].token_ids == out[3].token_ids == model.generate_ids(QUESTION, images=[WIDE], max_new_tokens=NEW)
    assert out[1].token_ids == model.generate_ids(QUESTION, images=[WIDE], max_new_tokens=NEW, temperature=2.0,
                                                  seed=3)
    assert out[2].token_ids == model.generate_ids(QUESTION, max_new_tokens=NEW)


def test_streamed_tokens_arrive_in_order(pair):
    _, model = pair("nvila")
    seen = []
    out = model.generate_batch(MIXED, max_new_tokens=NEW, on_token=lambda i, t: seen.append((i, t)))
    for i, g in enumerate(out):
        assert [t for j, t in seen if j == i] == g.token_ids


def test_suppressed_ids_are_never_generated(pair, tiny_tokenizer):
    ref, model = pair("nvila")
    greedy = model.generate_ids(QUESTION, images=[WIDE], max_new_tokens=NEW)
    banned = sorted(set(greedy[:3]))
    masked = NVILAModel(model.config, model.params, tiny_tokenizer, suppressed_token_ids=banned)
    for kw in (dict(), dict(temperature=1.0, seed=1)):
        out = masked.generate_ids(QUESTION, images=[WIDE], max_new_tokens=NEW, **kw)
        assert out and not set(out) & set(banned)


def test_stop_tokens_end_each_row_and_are_not_returned(pair, tiny_tokenizer):
    _, model = pair("nvila")
    reqs = [model.prepare(r.prompt, r.images, r.video) for r in MIXED]
    settings = [SamplingParams(NEW)] * 3
    free = Engine(model.config, model.module, (), tiny_tokenizer.pad_token_id)
    tokens, reasons, _ = free.generate(model.params, reqs, settings)
    assert reasons == ["length"] * 3 and all(len(t) == NEW for t in tokens)
    stop = tokens[1][3]  # row 1 stops at its 4th token; the others stop wherever they meet it, if at all
    stopping = Engine(model.config, model.module, (stop,), tiny_tokenizer.pad_token_id)
    got, reasons, stats = stopping.generate(model.params, reqs, settings)
    for row in range(3):
        cut = tokens[row].index(stop) if stop in tokens[row] else NEW
        assert got[row] == tokens[row][:cut]
        assert reasons[row] == ("stop" if cut < NEW else "length")
    assert stats.decode_tokens == sum(min(NEW, (t.index(stop) + 1) if stop in t else NEW) - 1 for t in tokens)


@pytest.mark.parametrize("per_call", [2, 3])
def test_several_steps_per_call_generate_as_one_step_per_call(pair, tiny_tokenizer, per_call):
    """Decode steps in groups (as on an accelerator, the host reading each group) choose, stream, stop and
    count exactly as one step per call, also where a row stops or runs out of tokens inside a group."""
    _, model = pair("nvila")
    reqs = [model.prepare(r.prompt, r.images, r.video) for r in MIXED]
    settings = [SamplingParams(NEW), SamplingParams(NEW - 3, temperature=2.0, seed=3), SamplingParams(5)]
    pad = tiny_tokenizer.pad_token_id
    free = Engine(model.config, model.module, (), pad).generate(model.params, reqs, settings)[0]
    stop = free[0][2]
    results, calls = {}, []
    for n in (1, per_call):
        engine = Engine(model.config, model.module, (stop,), pad, steps_per_call=n)
        steps = engine.decode_steps
        engine.decode_steps = lambda *args, steps=steps: calls.append((n, args[-1])) or steps(*args)
        seen = []
        tokens, reasons, stats = engine.generate(model.params, reqs, settings, lambda i, t: seen.append((i, t)))
        results[n] = tokens, reasons, stats.decode_tokens, seen
    assert results[per_call] == results[1]
    assert results[1][1][0] == "stop" and results[1][0][0] == free[0][:free[0].index(stop)]
    assert {c for c in calls if c[0] == per_call} == {(per_call, per_call)} and (1, 1) in calls
    with pytest.raises(ValueError, match="steps_per_call"):
        Engine(model.config, model.module, (stop,), pad, steps_per_call=0)


@pytest.mark.parametrize("backend,want", [("cpu", 1), ("gpu", engine_module.ACCELERATOR_STEPS_PER_CALL)])
def test_steps_per_call_default_by_backend(pair, tiny_tokenizer, monkeypatch, backend, want):
    _, model = pair("nvila")
    monkeypatch.setattr(engine_module, "platform", lambda: backend)
    engine = Engine(model.config, model.module, (), tiny_tokenizer.pad_token_id)
    steps, calls = engine.decode_steps, []
    engine.decode_steps = lambda *args: calls.append(args[-1]) or steps(*args)
    tokens, _, _ = engine.generate(model.params, [model.prepare(QUESTION)], [SamplingParams(NEW)])
    assert set(calls) == {want} and tokens[0] == model.generate_ids(QUESTION, max_new_tokens=NEW)


def test_max_new_tokens_and_the_context_limit(pair, tiny_tokenizer):
    _, model = pair("nvila")
    full = model.generate_ids(QUESTION, max_new_tokens=NEW)
    assert model.generate_ids(QUESTION, max_new_tokens=3) == full[:3]
    assert model.generate_batch([QUESTION], max_new_tokens=0)[0].token_ids == []
    req = model.prepare(QUESTION)
    short = dataclasses.replace(model.config, model_max_length=req.length + 2)
    engine = Engine(short, model.module, tiny_tokenizer.stop_token_ids, tiny_tokenizer.pad_token_id)
    tokens, reasons, _ = engine.generate(model.params, [req], [SamplingParams(NEW)])
    assert tokens == [full[:2]] and reasons == ["length"]


def test_a_new_image_size_reuses_the_compiled_programs(pair):
    _, model = pair("nvila")
    model.generate_ids(QUESTION, images=[random_image(150, 110, 8)], max_new_tokens=NEW)
    sizes = lambda: (engine_module._prefill._cache_size(), engine_module._decode_steps._cache_size(),
                     engine_module._tile_features._cache_size(), engine_module._project_s2._cache_size())
    before = sizes()
    # Another size with the same tile grid and prompt bucket: nothing new to compile.
    model.generate_ids(QUESTION, images=[random_image(170, 100, 9)], max_new_tokens=NEW)
    assert sizes() == before


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU compiler options apply on a CPU backend only")
def test_inference_programs_get_the_cpu_options_on_a_cpu():
    """On a CPU backend cpu_tuned_jit compiles with CPU_COMPILER_OPTIONS, which XLA accepts, and gives
    jax.jit's numbers."""
    from nvila_jax.kernels import backend

    fn = backend.cpu_tuned_jit(lambda x: jnp.exp(x).sum(-1))
    x = jnp.linspace(-3.0, 3.0, 4096).reshape(8, 512)
    np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(jax.jit(lambda x: jnp.exp(x).sum(-1))(x)), rtol=1e-6)
    assert fn._chosen() is fn._tuned and fn._cache_size() == 1 and fn._plain._cache_size() == 0
    assert fn.lower(x).compile() is not None


def test_inference_programs_get_no_cpu_options_elsewhere(monkeypatch):
    """Where the backend is not a CPU, cpu_tuned_jit is plain jax.jit: other backends never see xla_cpu_*
    options (runs on any machine: the backend lookup is faked, the plain program compiles for the real one)."""
    from nvila_jax.kernels import backend

    fn = backend.cpu_tuned_jit(lambda x: jnp.exp(x).sum(-1))
    x = jnp.linspace(-3.0, 3.0, 4096).reshape(8, 512)
    monkeypatch.setattr(backend, "platform", lambda: "gpu")
    assert fn._chosen() is fn._plain
    np.testing.assert_allclose(np.asarray(fn(x)), np.asarray(jax.jit(lambda x: jnp.exp(x).sum(-1))(x)), rtol=1e-6)
    assert fn._plain._cache_size() == 1 and fn._tuned._cache_size() == 0


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_images_of_any_mode_are_converted_to_rgb(pair, mode):
    _, model = pair("nvila")
    img = WIDE.convert(mode) if mode != "I;16" else WIDE.convert("L").convert("I;16")
    got = model.generate_ids(QUESTION, images=[img], max_new_tokens=NEW)
    assert got == model.generate_ids(QUESTION, images=[img.convert("RGB")], max_new_tokens=NEW)


def test_exif_orientation_is_applied_before_tiling(pair, tmp_path):
    _, model = pair("nvila")
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated by 90 degrees
    path = str(tmp_path / "sideways.jpg")
    random_image(300, 60, 6).save(path, exif=exif, quality=95)
    stored = PIL.Image.fromarray(np.asarray(PIL.Image.open(path)))  # the pixels as stored, without EXIF
    upright = stored.transpose(PIL.Image.Transpose.ROTATE_270)
    grid = lambda image: model.prepare(QUESTION, [image]).images[0].grid
    assert grid(path) == grid(upright) != grid(stored)
    np.testing.assert_array_equal(model.prepare(QUESTION, [path]).images[0].pixels,
                                  model.prepare(QUESTION, [upright]).images[0].pixels)


def test_bad_inputs_give_clear_errors(pair, tmp_path):
    _, model = pair("nvila")
    _, tsp = pair("tsp")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(MediaError, match="broken.png: cannot be decoded as an image"):
        model.generate(QUESTION, images=[str(broken)])
    with pytest.raises(MediaError, match="nowhere.jpg: image file not found"):
        model.generate(QUESTION, images=[str(tmp_path / "nowhere.jpg")])
    fake = tmp_path / "clip.mp4"
    fake.write_text("no video here")
    with pytest.raises(MediaError, match="clip.mp4: cannot be opened as a video"):
        model.generate(QUESTION, video=str(fake))
    with pytest.raises(TemporalPoolError, match="6 frames cannot be pooled in groups of 4"):
        tsp.generate(QUESTION, video=video_frames(6), num_frames=6)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate(QUESTION, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        model.generate(QUESTION, top_p=0.0)
    with pytest.raises(TypeError, match="request 1: expected keys"):
        model.generate_batch([QUESTION, {"prompt": QUESTION, "image": WIDE}])


def test_a_prompt_that_does_not_fit_is_rejected_with_the_overflow(pair, tiny_tokenizer):
    _, model = pair("nvila")
    length = model.prepare(QUESTION, [WIDE]).length
    small = NVILAModel(dataclasses.replace(model.config, model_max_length=length - 5), model.params, tiny_tokenizer)
    with pytest.raises(ContextLengthError, match=f"{length} tokens .* exceeds the {length - 5}-token context by 5"):
        small.generate(QUESTION, images=[WIDE])
    with pytest.raises(ContextLengthError, match="request 1: the prompt is"):
        small.generate_batch([QUESTION, GenerationRequest(QUESTION, images=[WIDE])])
