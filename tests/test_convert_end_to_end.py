"""Official checkpoint (written from the PyTorch reference) -> `convert` -> `load_pretrained` -> `score`, equal
to the reference forward of the same checkpoint; `export` gives the official checkpoint back bit for bit."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch

import nvila_jax
from checkpoints_convert import convert as convert_module
from checkpoints_convert.convert import convert
from checkpoints_convert.export import export
from helpers.official_checkpoint import official_reference, write_official_checkpoint
from helpers.torch_nvila import random_image, video_frames
from nvila_jax.checkpoint import restore_params
from nvila_jax.config import MediaEncoderConfig, ProjectorConfig
from nvila_jax.model import NVILAModel
from nvila_jax.variants import tiny, tiny_lite

TOL = 1e-4
QUESTION = "What color is the circle?"
VIDEO = tiny(projector=ProjectorConfig("mlp_downsample_2x2_fix", 96, 64),
             video_encoder=MediaEncoderConfig(kind="tsp", pool_sizes=((4, 1, 1),)), num_video_frames=8)
TIED_LITE = tiny_lite(llm=dataclasses.replace(tiny().llm, tie_word_embeddings=True))

# name: (config, checkpoint options, media of the scored prompt)
CASES = {
    "nvila-slow-no-media-tokens": (tiny(), dict(tokenizer="slow", media_tokens=False, shards=3),
                                   dict(images=[random_image(150, 100, 1)])),
    "lite-fast": (tiny_lite(), dict(tokenizer="fast", media_tokens=True), dict(images=[random_image(90, 300, 2)])),
    "video-slow": (VIDEO, dict(tokenizer="slow", media_tokens=True), dict(frames=video_frames(8, seed=3))),
    "lite-tied-hf-layout": (TIED_LITE, dict(layout="hf", tokenizer="fast", media_tokens=False),
                            dict(images=[random_image(150, 100, 1)], frames=video_frames(4, seed=4))),
}


@pytest.fixture(scope="module")
def converted(make_reference, tmp_path_factory):
    """name -> (reference, official dir, converted dir), built on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            cfg, opts, _ = CASES[name]
            ref, _ = make_reference(cfg)
            root = tmp_path_factory.mktemp(name)
            src = write_official_checkpoint(ref, root / "official", **opts)
            convert(src, str(root / "converted"), dtype="float32", progress=False)
            cache[name] = (ref, src, str(root / "converted"))
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_converted_checkpoint_scores_like_the_reference(name, converted, tokenizer_dir):
    ref, src, dst = converted(name)
    _, _, media = CASES[name]
    model = nvila_jax.load_pretrained(dst)
    reference = official_reference(ref, src, tokenizer_dir)
    frames = media.get("frames", ())
    want = reference.logits(QUESTION, media.get("images", ()), frames)
    got = model.score(QUESTION, images=media.get("images", ()), video=list(frames) or None,
                      num_frames=len(frames) or None)
    assert got.shape[0] == want.shape[0], "fused sequence lengths differ"
    trained = want.shape[1] if CASES[name][1].get("media_tokens", True) else ref.cfg.llm.vocab_size - 3
    np.testing.assert_allclose(got[:, :trained], want[:, :trained], atol=TOL, rtol=0)
    assert model.params["llm"]["embed_tokens"]["embedding"].dtype == np.float32


@pytest.mark.parametrize("name", list(CASES))
def test_export_gives_the_official_checkpoint_back_bit_exact(name, converted, tmp_path):
    _, src, dst = converted(name)
    out = tmp_path / "exported"
    export(dst, str(out), progress=False)
    src_files = sorted(_files(src))
    assert sorted(_files(out)) == src_files
    for rel in src_files:
        if rel.endswith(".safetensors"):
            a, b = load_file(os.path.join(src, rel)), load_file(os.path.join(out, rel))
            assert list(a) == list(b), rel
            for k in a:
                assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (rel, k)
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{rel} {k}")
        # every file, tensors included, is byte-identical (header layout, metadata, configs, tokenizer files)
        assert _sha(os.path.join(src, rel)) == _sha(os.path.join(out, rel)), rel


def test_checkpoint_without_a_source_record_exports_from_its_config(converted, tmp_path):
    """No manifest / source files (e.g. parameters saved by training): the official layout is written from the
    config, and converting it again gives the same parameters, tokenizer and scores."""
    _, _, dst = converted("lite-fast")
    bare = tmp_path / "bare"
    shutil.copytree(dst, bare)
    os.remove(bare / "manifest.json")
    shutil.rmtree(bare / "source")
    export(str(bare), str(tmp_path / "official"), progress=False)
    files = sorted(_files(tmp_path / "official"))
    assert "config.json" in files and "llm/config.json" in files and "llm/tokenizer.json" in files
    assert [f for f in files if f.endswith(".safetensors")] == [
        "llm/model.safetensors", "mm_projector/model.safetensors", "vision_tower/model.safetensors"]
    convert(str(tmp_path / "official"), str(tmp_path / "again"), dtype="float32", progress=False)
    a, b = restore_params(dst), restore_params(tmp_path / "again")
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    first, second = nvila_jax.load_pretrained(dst), nvila_jax.load_pretrained(tmp_path / "again")
    assert second.config == dataclasses.replace(first.config, name="official")
    assert first.tokenizer.encode("<image>\nHi 123") == second.tokenizer.encode("<image>\nHi 123")


def test_media_tokens_are_added_in_the_official_order_and_masked(converted):
    ref, src, dst = converted("nvila-slow-no-media-tokens")
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    vocab = manifest["vocab"]
    assert vocab["added_tokens"] == {"<vila/sentinel>": 387, "<image>": 388, "<vila/video>": 389}
    assert vocab["source_rows"] == 387 and vocab["rows"] == 390 and vocab["tokenizer_size"] == 390
    assert vocab["suppressed_token_ids"] == [387, 388, 389]
    assert json.load(open(os.path.join(dst, "generation_config.json")))["suppress_tokens"] == [387, 388, 389]
    model = nvila_jax.load_pretrained(dst)
    assert model.suppressed_token_ids == (387, 388, 389)
    assert model.config.image_token_id == 388 and model.config.video_token_id == 389
    emb = np.asarray(model.params["llm"]["embed_tokens"]["embedding"])
    head = np.asarray(model.params["llm"]["lm_head"]["kernel"])
    assert emb.shape == (390, 64) and head.shape == (64, 390)
    assert not emb[387:].any() and not head[:, 387:].any()
    np.testing.assert_array_equal(emb[:387], ref.llm.model.embed_tokens.weight.detach().numpy()[:387])
    # the stop tokens come from the template with the added sentinel, like the official loader
    assert model.tokenizer.stop_token_ids == (386,)


def test_generation_never_produces_the_never_trained_ids(converted):
    """Padded rows made to win every step: generation still skips them (and would not without the list)."""
    _, _, dst = converted("nvila-slow-no-media-tokens")
    loaded = nvila_jax.load_pretrained(dst)
    params = jax.tree_util.tree_map(lambda x: x, loaded.params)
    u = jax.random.normal(jax.random.key(0), (64,))  # ids 387 / 388 score +-1000 (h . u): one of them wins
    params["llm"]["lm_head"]["kernel"] = params["llm"]["lm_head"]["kernel"].at[:, 387].set(1000 * u).at[:, 388].set(
        -1000 * u)
    image = [random_image(90, 70, 7)]
    masked = NVILAModel(loaded.config, params, loaded.tokenizer, suppressed_token_ids=loaded.suppressed_token_ids)
    unmasked = NVILAModel(loaded.config, params, loaded.tokenizer)
    for kw in (dict(), dict(temperature=1.0, seed=3)):
        assert not set(masked.generate_ids(QUESTION, image, max_new_tokens=4, **kw)) & {387, 388, 389}
    assert set(unmasked.generate_ids(QUESTION, image, max_new_tokens=4)) & {387, 388, 389}


def test_manifest_records_source_checksums_and_counts(converted):
    ref, src, dst = converted("lite-fast")
    manifest = json.load(open(os.path.join(dst, "manifest.json")))
    assert manifest["format"] == "nvila_jax.checkpoint/1" and manifest["dtype"] == "float32"
    assert manifest["source"] == {"path": os.path.abspath(src), "layout": "official", "tokenizer": "fast"}
    assert sorted(manifest["files"]) == sorted(_files(src))
    for rel, info in manifest["files"].items():
        assert info["sha256"] == _sha(os.path.join(src, rel)) and info["bytes"] == os.path.getsize(os.path.join(src, rel))
    params = restore_params(dst)
    assert manifest["parameter_count"] == sum(x.size for x in _leaves(params))
    assert manifest["vocab"]["suppressed_token_ids"] == [] and manifest["vocab"]["added_tokens"] == {}
    # the unused SigLIP layer and post-LayerNorm are carried beside the parameters, uncast
    extras = load_file(os.path.join(dst, "extras.safetensors"))
    assert sorted(extras) == sorted(f"vision_tower/{k}" for k in ref.state_dicts()["vision_tower"]
                                    if k.startswith("vision_model.encoder.layers.2.") or "post_layernorm" in k)


def test_bfloat16_conversion_casts_exactly_and_round_trips(make_reference, tmp_path, tokenizer_dir):
    """A bfloat16 release converted with the default dtype: parameters equal the stored values, the export
    is byte-identical, and the bfloat16 model still follows the reference."""
    ref, _ = make_reference(tiny())
    src = write_official_checkpoint(ref, tmp_path / "official", dtype="bfloat16", tokenizer="fast")
    convert(src, str(tmp_path / "converted"), progress=False)  # default dtype: bfloat16
    llm = {}
    for name in os.listdir(os.path.join(src, "llm")):
        if name.endswith(".safetensors"):
            llm.update(load_torch(os.path.join(src, "llm", name)))
    params = restore_params(tmp_path / "converted", dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(params["llm"]["embed_tokens"]["embedding"]),
                                  llm["model.embed_tokens.weight"].float().numpy())
    q1 = llm["model.layers.1.self_attn.q_proj.weight"].float().numpy()  # [heads * head_dim, hidden]
    np.testing.assert_array_equal(np.asarray(params["llm"]["layers"]["q_proj"]["kernel"][1]),
                                  q1.T.reshape(64, 4, 16))
    export(str(tmp_path / "converted"), str(tmp_path / "exported"), progress=False)
    for rel in _files(src):
        assert _sha(os.path.join(src, rel)) == _sha(os.path.join(tmp_path / "exported", rel)), rel
    model = nvila_jax.load_pretrained(tmp_path / "converted")
    assert str(model.params["llm"]["norm"]["scale"].dtype) == "bfloat16"
    image = random_image(150, 100, 1)
    want = official_reference(ref, src, tokenizer_dir).logits(QUESTION, [image])
    got = model.score(QUESTION, images=[image])
    assert got.shape == want.shape and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


def test_streamed_blocks_give_the_same_parameters(make_reference, tmp_path, monkeypatch):
    """Tiny blocks force every large-tensor path (row blocks, padded vocabulary blocks, stacked layers)."""
    ref, _ = make_reference(tiny())
    src = write_official_checkpoint(ref, tmp_path / "official", tokenizer="slow", media_tokens=False)
    convert(src, str(tmp_path / "whole"), dtype="float32", progress=False)
    monkeypatch.setattr(convert_module, "BLOCK_BYTES", 8192)
    convert(src, str(tmp_path / "blocks"), dtype="float32", progress=False)
    a, b = restore_params(tmp_path / "whole"), restore_params(tmp_path / "blocks")
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_more_rows_than_tokens_keeps_every_row_and_suppresses_the_extra_ids(make_reference, tmp_path, tokenizer_dir):
    """Like Qwen2.5 (151936 rows, fewer tokens): rows without a token stay, and are never generated."""
    cfg = tiny(llm=dataclasses.replace(tiny().llm, vocab_size=392))
    ref, _ = make_reference(cfg)
    src = write_official_checkpoint(ref, tmp_path / "official", tokenizer="slow")
    convert(src, str(tmp_path / "converted"), dtype="float32", progress=False)
    model = nvila_jax.load_pretrained(tmp_path / "converted")
    assert model.config.llm.vocab_size == 392 and model.suppressed_token_ids == (390, 391)
    image = random_image(90, 70, 6)
    want = official_reference(ref, src, tokenizer_dir).logits(QUESTION, [image])
    np.testing.assert_allclose(model.score(QUESTION, images=[image]), want, atol=TOL, rtol=0)


def _files(root) -> list[str]:
    return [os.path.relpath(os.path.join(d, n), root) for d, _, names in os.walk(root) for n in names]


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)
