"""Sharded execution on 8 fake CPU devices equals one device: parameters land where the rules table says,
sharded init and restore give the same values, and score / generate on meshes (8,1,1), (2,4,1), (2,2,2),
(1,1,8) give the single-device results (fp32, within 1e-5).

The device work runs in a subprocess (this file run as a script), because the fake device count must be set
before JAX initialises; the tests compare what it returns. Mesh-shape parsing and the memory planner need no
devices and run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

TOL = 1e-5
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
QUESTION = "What color is the circle?"
# Over 256 fused tokens with an image: attention then runs blocked (a loop per row, split by shard_map);
# on the meshes with a tensor axis, where its heads are split too (a single row is never split by rows).
LONG_QUESTION = QUESTION + " Describe the shapes, their colors and where they are, one by one." * 3
LONG_MESHES = ("2x2x2", "1x1x8")
HERE = os.path.dirname(os.path.abspath(__file__))


def mesh_test_config(**overrides):
    """The tiny model with every sharded dimension divisible by 8 (heads, KV heads, MLP, vocabulary, widths),
    so each parameter is split exactly as the rules table says on every test mesh."""
    import dataclasses

    from nvila_jax.variants import tiny

    base = tiny()
    return tiny(vision=dataclasses.replace(base.vision, num_attention_heads=8),
                llm=dataclasses.replace(base.llm, num_attention_heads=16, num_key_value_heads=8, head_dim=8,
                                        vocab_size=400),
                **overrides)


def sample_image(width: int = 150, height: int = 100, seed: int = 1):
    """A smooth random RGB image (PIL)."""
    import PIL.Image

    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((width, height), PIL.Image.BILINEAR)


def run_worker(script: str, args: list[str], devices: int, env: dict | None = None, timeout: int = 600):
    """Runs `script` (a test module as a program) with `devices` fake CPU devices; fails with its output."""
    full_env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                    JAX_PLATFORMS="cpu", **(env or {}))
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode:
        pytest.fail(f"{script} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-6000:]}")
    return proc


# ---------------------------------------------------------------------------------------------- the worker
def _worker(out: str, media: str) -> None:
    """Runs every mesh case for `media` ("image": also init, specs, restore; "video") into OUT."""
    import flax.linen as nn
    import jax
    import orbax.checkpoint as ocp

    from nvila_jax import sharding
    from nvila_jax.checkpoint import load_pretrained, restore_params
    from nvila_jax.model import NVILAModel
    from nvila_jax.models.nvila import init_params
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    assert jax.device_count() == 8, jax.devices()
    cfg = mesh_test_config()
    tok = build_tiny_tokenizer()
    key = jax.random.key(0)
    boxed = init_params(cfg, key)
    host_params = jax.tree.map(np.asarray, nn.meta.unbox(boxed))
    image = sample_image()
    frames = [sample_image(40, 30, seed=10 + i) for i in range(4)]
    arrays: dict[str, np.ndarray] = {}
    meta: dict = {"logical": {}, "specs": {}, "shard_shapes": {}, "shapes": {}}

    def keyname(path) -> str:
        return "/".join(str(getattr(k, "key", k)) for k in path)

    for path, names in jax.tree_util.tree_leaves_with_path(nn.get_partition_spec(boxed),
                                                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        meta["logical"][keyname(path)] = list(names)
    for path, a in jax.tree_util.tree_leaves_with_path(host_params):
        meta["shapes"][keyname(path)] = list(a.shape)

    def run(model: NVILAModel, tag: str) -> None:
        kw = dict(images=[image]) if media == "image" else dict(video=frames)
        arrays[f"score/{tag}"] = model.score(QUESTION, **kw)
        if media == "image" and tag in ("single",) + LONG_MESHES:
            arrays[f"score_long/{tag}"] = model.score(LONG_QUESTION, **kw)
        arrays[f"generate/{tag}"] = np.asarray(model.generate_ids(QUESTION, max_new_tokens=3, **kw))
        if media == "image":  # decode steps in groups (an accelerator's default): the scan carries the shards
            model.engine.steps_per_call = 2
            arrays[f"generate_grouped/{tag}"] = np.asarray(model.generate_ids(QUESTION, max_new_tokens=3, **kw))
            model.engine.steps_per_call = None

    run(NVILAModel(cfg, host_params, tok), "single")
    for shape in MESHES:
        tag = "x".join(map(str, shape))
        mesh = sharding.make_mesh(shape)
        params = sharding.init_params_sharded(cfg, key, mesh)
        flat = jax.tree_util.tree_leaves_with_path(params)
        meta["specs"][tag] = {keyname(p): [list(e) if isinstance(e, tuple) else e for e in a.sharding.spec]
                              for p, a in flat}
        meta["shard_shapes"][tag] = {keyname(p): list(a.addressable_shards[0].data.shape) for p, a in flat}
        arrays[f"init_maxdiff/{tag}"] = np.asarray(max(float(np.max(np.abs(np.asarray(a) - h)))
                                                       for a, h in zip(jax.tree.leaves(params),
                                                                       jax.tree.leaves(host_params))))
        run(NVILAModel(cfg, params, tok, mesh=mesh), tag)
        if shape == (8, 1, 1):
            saved = params
    if media != "image":
        np.savez(os.path.join(out, "results.npz"), **arrays)
        return

    # A checkpoint written from the (8,1,1) shards (as training saves), read back onto other meshes.
    ckpt = os.path.join(out, "ckpt")
    os.makedirs(ckpt)
    with ocp.StandardCheckpointer() as c:
        c.save(os.path.join(ckpt, "params"), saved)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write(cfg.to_json())
    tok.save(os.path.join(ckpt, "tokenizer"))
    for shape in ((1, 1, 8), (2, 2, 2)):
        tag = "x".join(map(str, shape))
        target = sharding.abstract_sharded_params(cfg, sharding.make_mesh(shape))
        restored = restore_params(ckpt, target)
        arrays[f"restore_maxdiff/{tag}"] = np.asarray(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                                                          for a, b in zip(jax.tree.leaves(restored),
                                                                          jax.tree.leaves(saved))))
        arrays[f"restore_sharding_ok/{tag}"] = np.asarray(all(
            a.sharding.is_equivalent_to(t.sharding, a.ndim)
            for a, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target))))
    loaded = load_pretrained(ckpt, mesh_shape={"data": 2, "fsdp": -1, "tensor": 2})
    meta["loaded_mesh"] = dict(loaded.mesh.shape)
    arrays["score/loaded"] = loaded.score(QUESTION, images=[image])
    np.savez(os.path.join(out, "results.npz"), **arrays)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)


def _run_cases(out: str, media: str) -> dict[str, np.ndarray]:
    run_worker("test_sharding.py", ["--out", out, "--media", media], devices=8)
    return dict(np.load(os.path.join(out, "results.npz")))


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sharded"))
    arrays = _run_cases(out, "image")
    with open(os.path.join(out, "meta.json")) as f:
        return arrays, json.load(f)


# ---------------------------------------------------------------------------------------------- tests
def _rules_oracle(names, shape, axis_sizes):
    """Expected mesh axes per dimension, read straight from the table: the first rule of each name whose
    mesh axes are still free in this array (flax's precedence), kept only when they divide the size."""
    from nvila_jax.sharding import LOGICAL_AXIS_RULES

    used: set[str] = set()
    out = []
    for name, size in zip(names, shape):
        got = None
        for rule_name, axes in LOGICAL_AXIS_RULES:
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
            if rule_name == name and not used & set(axes_t):
                got = axes_t
                break
        if got:
            used |= set(got)
            assert size % int(np.prod([axis_sizes[a] for a in got])) == 0, (names, shape, got)
        out.append(got or ())
    return out


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_parameter_shardings_follow_the_rules_table(sharded, shape):
    _, meta = sharded
    tag = "x".join(map(str, shape))
    sizes = dict(zip(("data", "fsdp", "tensor"), shape))
    assert set(meta["specs"][tag]) == set(meta["logical"])
    for path, names in meta["logical"].items():
        want = _rules_oracle(names, meta["shapes"][path], sizes)
        spec = meta["specs"][tag][path] + [None] * (len(names) - len(meta["specs"][tag][path]))
        got = [tuple([e]) if isinstance(e, str) else tuple(e or ()) for e in spec]
        got = [tuple(a for a in axes if sizes[a] > 1) for axes in got]
        want_real = [tuple(a for a in axes if sizes[a] > 1) for axes in want]
        assert got == want_real, (path, names, got, want)
        ways = [int(np.prod([sizes[a] for a in axes])) for axes in want]
        assert meta["shard_shapes"][tag][path] == [d // w for d, w in zip(meta["shapes"][path], ways)], path


def test_key_parameters_are_split_as_documented(sharded):
    """FSDP on the model width, tensor parallelism on heads / MLP / vocabulary, for LLM and vision tower."""
    spec = sharded[1]["specs"]["2x2x2"]
    assert spec["llm/layers/q_proj/kernel"] == [None, "fsdp", "tensor"]
    assert spec["llm/layers/o_proj/kernel"] == [None, "tensor", None, "fsdp"]
    assert spec["llm/layers/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert spec["llm/embed_tokens/embedding"] == ["tensor", "fsdp"]
    assert spec["llm/lm_head/kernel"] == ["fsdp", "tensor"]
    assert spec["vision_tower/layers/fc1/kernel"] == [None, "fsdp", "tensor"]
    assert spec["projector/layers_2/kernel"] == ["fsdp", "tensor"]
    assert spec["projector/layers_4/kernel"] == ["tensor", "fsdp"]


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_init_equals_unsharded_init(sharded, shape):
    assert sharded[0]["init_maxdiff/" + "x".join(map(str, shape))] <= 1e-7


def _check_cases(arrays: dict[str, np.ndarray], shape: tuple[int, ...]) -> None:
    tag = "x".join(map(str, shape))
    for score in ("score", "score_long"):
        if f"{score}/{tag}" in arrays:
            want, got = arrays[f"{score}/single"], arrays[f"{score}/{tag}"]
            assert got.shape == want.shape and got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    if "score_long/single" in arrays:
        assert arrays["score_long/single"].shape[0] > 256 > arrays["score/single"].shape[0]
    assert len(arrays["generate/single"]) == 3
    np.testing.assert_array_equal(arrays[f"generate/{tag}"], arrays["generate/single"])
    if f"generate_grouped/{tag}" in arrays:
        np.testing.assert_array_equal(arrays[f"generate_grouped/{tag}"], arrays["generate/single"])


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_score_and_generate_equal_one_device(sharded, shape):
    """A Dynamic-S2 image prompt: tiles spread over the batch axes, then the LLM prefill and decode."""
    tag = "x".join(map(str, shape))
    assert (f"score_long/{tag}" in sharded[0]) == (tag in LONG_MESHES)
    _check_cases(sharded[0], shape)


@pytest.mark.slow
def test_sharded_video_score_and_generate_equal_one_device(tmp_path):
    arrays = _run_cases(str(tmp_path), "video")
    for shape in MESHES:
        _check_cases(arrays, shape)


@pytest.mark.parametrize("shape", ((1, 1, 8), (2, 2, 2)), ids=lambda s: "x".join(map(str, s)))
def test_restore_onto_a_different_mesh(sharded, shape):
    arrays, _ = sharded
    tag = "x".join(map(str, shape))
    assert arrays[f"restore_maxdiff/{tag}"] == 0.0
    assert bool(arrays[f"restore_sharding_ok/{tag}"])


def test_load_pretrained_on_a_mesh_scores_like_one_device(sharded):
    arrays, meta = sharded
    assert meta["loaded_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(arrays["score/loaded"], arrays["score/single"], atol=TOL, rtol=0)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--media", choices=("image", "video"), default="image")
    cli = parser.parse_args()
    _worker(cli.out, cli.media)
