"""SigLIP and Qwen2 against HF transformers (fp32, tiny random weights), and the KV cache / packing rules."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM, SiglipVisionModel

from checkpoints_convert.key_table import state_dicts_to_params
from helpers.torch_nvila import hf_llm_config, hf_vision_config, randomize_
from nvila_jax.config import Qwen2Config
from nvila_jax.models.qwen2 import KVCache, Qwen2LM, unstack_layer_params
from nvila_jax.models.siglip import SiglipVisionTower
from nvila_jax.variants import tiny


def _vision_cfg(select_layer: int, **vision):
    """A one-scale config around a SigLIP variant (the projector only has to accept its width)."""
    base = tiny()
    v = dataclasses.replace(base.vision, **vision)
    proj = dataclasses.replace(base.projector, mm_hidden_size=v.hidden_size)
    return dataclasses.replace(base, vision=v, projector=proj, tiling="resize", s2_scales=(v.image_size,),
                               select_layer=select_layer)


@pytest.mark.parametrize(
    "select_layer, vision",
    [(-2, {}), (-1, {}), (-3, {}), (1, {}), (-2, dict(hidden_size=48, num_attention_heads=3, image_size=28, patch_size=14))],
)
def test_siglip_hidden_state_matches_hf(select_layer, vision):
    cfg = _vision_cfg(select_layer, **vision)
    hf = SiglipVisionModel(hf_vision_config(cfg)).eval()
    randomize_(hf, seed=3)
    sd = {"vision_model." + k: v.numpy() for k, v in hf.state_dict().items()}
    params, unused = state_dicts_to_params(cfg, {"vision_tower": sd})
    n_used = cfg.num_vision_layers_used
    assert len(unused["vision_tower"]) == 2 + 16 * (cfg.vision.num_hidden_layers - n_used)  # post-LN + skipped layers
    s = cfg.vision.image_size
    pixels = np.random.RandomState(0).uniform(-1, 1, (3, s, s, 3)).astype(np.float32)
    with torch.no_grad():
        want = hf(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
        want = want.hidden_states[select_layer].numpy()
    got = SiglipVisionTower(cfg.vision, n_used).apply({"params": params["vision_tower"]}, jnp.asarray(pixels))
    g = cfg.vision.grid_size
    np.testing.assert_allclose(np.asarray(got).reshape(3, g * g, -1), want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 0.5  # the comparison is not between near-zero tensors


def _llm(cfg: Qwen2Config, seed=5):
    full = dataclasses.replace(tiny(), llm=cfg, projector=dataclasses.replace(tiny().projector, hidden_size=cfg.hidden_size))
    hf = Qwen2ForCausalLM(hf_llm_config(full)).eval()
    randomize_(hf, seed=seed)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    params, _ = state_dicts_to_params(full, {"llm": sd})
    return hf, params["llm"]


LLM_CASES = {
    "gqa-untied": Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6),
    "mqa-tied": Qwen2Config(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                            num_attention_heads=6, num_key_value_heads=1, head_dim=8, rope_theta=10000.0,
                            tie_word_embeddings=True),
    "mha-wide-head": Qwen2Config(vocab_size=200, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=64, rope_theta=5e5),
}


@pytest.mark.parametrize("name", list(LLM_CASES))
def test_qwen2_logits_match_hf_on_a_long_prompt(name):
    cfg = LLM_CASES[name]
    hf, params = _llm(cfg)
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, 517))
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(ids)).logits.numpy()
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    emb = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(ids), method=Qwen2LM.embed)
    got, _ = jax.jit(lambda p: _apply(cfg, p, emb, pos, jnp.ones(ids.shape, jnp.int32)))(params)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
    assert np.abs(want).max() > 1.0


def _apply(cfg, params, embeds, positions, segments, cache=None, scan_layers=True, last_only=False, remat="none"):
    def run(mod):
        h, c = mod(embeds, positions, segments, cache, last_only)
        return mod.logits(h), c

    return Qwen2LM(cfg, scan_layers=scan_layers, remat=remat).apply({"params": params}, method=run)


def test_kv_cache_prefill_then_decode_equals_full_forward():
    cfg = LLM_CASES["gqa-untied"]
    _, params = _llm(cfg)
    ids = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (1, 40)))
    emb = Qwen2LM(cfg).apply({"params": params}, ids, method=Qwen2LM.embed)
    pos = jnp.arange(40)[None]
    full, _ = _apply(cfg, params, emb, pos, jnp.ones((1, 40), jnp.int32))
    cache = KVCache.init(cfg, 1, 64)
    first, cache = _apply(cfg, params, emb[:, :30], pos[:, :30], jnp.ones((1, 30), jnp.int32), cache)
    steps = [first]
    for t in range(30, 40):
        out, cache = _apply(cfg, params, emb[:, t:t + 1], pos[:, t:t + 1], jnp.ones((1, 1), jnp.int32), cache)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), np.asarray(full), atol=2e-5)
    assert int(cache.index) == 40


@pytest.mark.parametrize("name", ["gqa-untied", "mqa-tied"])
def test_per_layer_parameters_equal_the_scanned_stack(name):
    """Inference's layout (one array per layer, no scan) computes exactly what training's scanned stack does."""
    cfg = LLM_CASES[name]
    _, stacked = _llm(cfg)
    per_layer = unstack_layer_params(stacked)
    assert sorted(k for k in per_layer if k.startswith("layers")) == [f"layers_{i}" for i in range(cfg.num_hidden_layers)]
    for i in range(cfg.num_hidden_layers):
        jax.tree.map(lambda s, p: np.testing.assert_array_equal(np.asarray(s)[i], np.asarray(p)),
                     stacked["layers"], per_layer[f"layers_{i}"])
    assert unstack_layer_params(per_layer) is per_layer
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (2, 21)))
    emb = Qwen2LM(cfg).apply({"params": stacked}, ids, method=Qwen2LM.embed)
    pos, seg = jnp.broadcast_to(jnp.arange(21), (2, 21)), jnp.ones((2, 21), jnp.int32)
    results = []
    for params, scan in ((stacked, True), (per_layer, False)):
        cache = KVCache.init(cfg, 2, 32)
        first, cache = _apply(cfg, params, emb[:, :20], pos[:, :20], seg[:, :20], cache, scan_layers=scan)
        step, cache = _apply(cfg, params, emb[:, 20:], pos[:, 20:], seg[:, 20:], cache, scan_layers=scan)
        results.append((first, step, cache.k, cache.v))
    for want, got in zip(*results):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)  # fp32 reassociation
    assert float(jnp.abs(jnp.stack(results[0][3])).max()) > 0  # the cache was written


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the conditional that keeps the tables apart is CPU-only")
@pytest.mark.parametrize("scan", [False, True])
def test_rotary_tables_are_computed_once_per_forward(scan):
    """On a CPU, cos and sin are evaluated once per forward however deep the stack (models.qwen2.rotary_tables):
    fused into each layer's rotations, XLA evaluated them again for every element of every layer's q and k."""
    counts = []
    for layers in (1, 3):
        cfg = dataclasses.replace(LLM_CASES["mqa-tied"], num_hidden_layers=layers)
        _, params = _llm(cfg)
        params = params if scan else unstack_layer_params(params)
        emb, pos, seg = jnp.zeros((1, 33, cfg.hidden_size)), jnp.arange(33)[None], jnp.ones((1, 33), jnp.int32)
        run = jax.jit(lambda p, pos: _apply(cfg, p, emb, pos, seg, scan_layers=scan))  # positions unknown: an input
        hlo = run.lower(params, pos).compile().as_text()
        counts.append((hlo.count(" cosine("), hlo.count(" sine(")))
    assert counts[0] == counts[1], counts
    assert 1 <= counts[1][0] <= 2 and 1 <= counts[1][1] <= 2, counts  # one per branch of the conditional


@pytest.mark.parametrize("scan,remat", [(False, "none"), (False, "full"), (True, "none")])
def test_last_only_equals_the_last_position_of_the_full_stack(scan, remat):
    """A prefill's `last_only` (the unrolled stack's last layer skips every query but the last) gives the last
    position's logits and the same cache, left padding and packing included, with or without a cache."""
    cfg = LLM_CASES["gqa-untied"]
    _, stacked = _llm(cfg)
    params = stacked if scan else unstack_layer_params(stacked)
    ids = jnp.asarray(np.random.RandomState(6).randint(0, cfg.vocab_size, (2, 19)))
    emb = Qwen2LM(cfg).apply({"params": stacked}, ids, method=Qwen2LM.embed)
    seg = np.ones((2, 19), np.int32)
    seg[0, :5] = 0  # left padding
    seg[1, :7] = 2  # a packed earlier sample
    pos = jnp.asarray(np.where(seg[:1] > 0, np.arange(19) - 5, 0).repeat(2, 0))
    seg = jnp.asarray(seg)
    for cache in (None, KVCache.init(cfg, 2, 24)):
        full, full_cache = _apply(cfg, params, emb, pos, seg, cache, scan, remat=remat)
        last, last_cache = _apply(cfg, params, emb, pos, seg, cache, scan, last_only=True, remat=remat)
        assert last.shape == (2, 1, cfg.vocab_size)
        np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5, rtol=0)
        if cache is not None:
            np.testing.assert_array_equal(np.asarray(last_cache.k), np.asarray(full_cache.k))
            np.testing.assert_array_equal(np.asarray(last_cache.v), np.asarray(full_cache.v))
            assert int(last_cache.index) == 19


def test_left_padded_rows_in_a_cache_equal_unpadded_rows():
    cfg = LLM_CASES["mqa-tied"]
    _, params = _llm(cfg)
    rs = np.random.RandomState(3)
    short, long = rs.randint(0, cfg.vocab_size, 7), rs.randint(0, cfg.vocab_size, 12)
    ids = np.zeros((2, 12), np.int32)
    ids[0, 5:], ids[1] = short, long
    seg = np.ones((2, 12), np.int32)
    seg[0, :5] = 0
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0)
    emb = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(ids), method=Qwen2LM.embed)
    got, _ = _apply(cfg, params, emb, jnp.asarray(pos), jnp.asarray(seg), KVCache.init(cfg, 2, 16))
    for row, seq in ((0, short), (1, long)):
        e = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(seq)[None], method=Qwen2LM.embed)
        want, _ = _apply(cfg, params, e, jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), jnp.int32))
        np.testing.assert_allclose(np.asarray(got)[row, -len(seq):], np.asarray(want)[0], atol=2e-5)


def test_packed_segments_do_not_attend_across_samples():
    cfg = LLM_CASES["gqa-untied"]
    _, params = _llm(cfg)
    rs = np.random.RandomState(4)
    a, b = rs.randint(0, cfg.vocab_size, 9), rs.randint(0, cfg.vocab_size, 6)
    ids = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 9 + [2] * 6 + [0, 0]])
    pos = np.array([list(range(9)) + list(range(6)) + [0, 0]])
    emb = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(ids), method=Qwen2LM.embed)
    packed, _ = _apply(cfg, params, emb, jnp.asarray(pos), jnp.asarray(seg))
    for seq, sl in ((a, slice(0, 9)), (b, slice(9, 15))):
        e = Qwen2LM(cfg).apply({"params": params}, jnp.asarray(seq)[None], method=Qwen2LM.embed)
        want, _ = _apply(cfg, params, e, jnp.arange(len(seq))[None], jnp.ones((1, len(seq)), jnp.int32))
        np.testing.assert_allclose(np.asarray(packed)[0, sl], np.asarray(want)[0], atol=2e-5)


@pytest.mark.parametrize("variant", ["tiny", "tiny-lite", "NVILA-8B", "NVILA-Lite-2B"])
def test_every_parameter_carries_logical_axis_names(variant):
    """Sharding rules address parameters by these names; shapes come from eval_shape (nothing allocated)."""
    import flax.linen as nn

    from nvila_jax.models.nvila import init_params
    from nvila_jax.variants import get_variant

    boxed = jax.eval_shape(lambda: init_params(get_variant(variant), jax.random.key(0)))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    for box in leaves:
        assert len(box.names) == box.value.ndim
    stacked = [b for b in leaves if b.names[0] == "layers"]
    assert stacked and all(b.value.shape[0] in (get_variant(variant).llm.num_hidden_layers,
                                                get_variant(variant).num_vision_layers_used) for b in stacked)
