"""The official-key <-> parameter-path table: every rule, every projector type, both tiling modes, tied and
untied LM heads, the -hf key layout; each transform checked against the PyTorch op it stands for."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest
import torch
from flax.linen import meta

from checkpoints_convert.key_table import (
    UNUSED, from_param, is_used, key_rules, official_keys, official_shape, params_to_state_dicts,
    resolve, row_axis, split_hf_layout_key, state_dicts_to_params, to_param)
from nvila_jax.config import ProjectorConfig, SiglipConfig
from nvila_jax.models.nvila import init_params
from nvila_jax.variants import tiny, tiny_lite

RESIZE = dict(tiling="resize", s2_scales=(56,))
CONFIGS = {
    "mlp_downsample+dynamic_s2": tiny(),
    "2x2_fix+dynamic_s2": tiny(projector=ProjectorConfig("mlp_downsample_2x2_fix", 96, 64)),
    "3x3_fix+dynamic": tiny_lite(),
    "3x3_fix+dynamic+tied": tiny_lite(llm=dataclasses.replace(tiny().llm, tie_word_embeddings=True)),
    "linear+resize": tiny(**RESIZE, projector=ProjectorConfig("linear", 32, 64)),
    "mlp2x_gelu+resize": tiny(**RESIZE, projector=ProjectorConfig("mlp2x_gelu", 32, 64)),
    "mlp3x_gelu+dynamic": tiny_lite(projector=ProjectorConfig("mlp3x_gelu", 32, 64)),
    "identity+resize": tiny(**RESIZE, projector=ProjectorConfig("identity", 64, 64),
                            vision=SiglipConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                                num_attention_heads=4, patch_size=7, image_size=56)),
    "last-layer-selected": tiny(select_layer=-1),
}


@functools.lru_cache(maxsize=None)
def _param_shapes(cfg):
    tree = jax.eval_shape(lambda: meta.unbox(init_params(cfg, jax.random.key(0))))
    return {tuple(str(k.key) for k in kp): leaf.shape for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_official(cfg, seed=0):
    """Random tensors for every official key of `cfg`, shaped by the table's own official_shape."""
    rng = np.random.RandomState(seed)
    shapes = _param_shapes(cfg)
    out = {"llm": {}, "vision_tower": {}, "mm_projector": {}}
    for component, key in official_keys(cfg):
        rule, layer = resolve(cfg, component, key)
        if rule.path == UNUSED:
            shape = (cfg.vision.hidden_size,)
        else:
            shape = official_shape(rule.transform, shapes[rule.path][1:] if layer is not None else shapes[rule.path])
        out[component][key] = rng.randn(*shape).astype(np.float32)
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rules_cover_every_parameter_exactly_once(name):
    cfg = CONFIGS[name]
    shapes = _param_shapes(cfg)
    paths = [r.path for r in key_rules(cfg) if r.path != UNUSED]
    assert sorted(paths) == sorted(shapes), "rules and parameters differ"
    assert len(set(paths)) == len(paths)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_keys_resolve_to_their_rule_and_layer(name):
    cfg = CONFIGS[name]
    keys = list(official_keys(cfg))
    assert len(set(keys)) == len(keys)
    for component, key in keys:
        rule, layer = resolve(cfg, component, key)
        assert rule.official_key(layer) == key and rule.component == component
    # unused: the vision layers past the selected one and the post-LayerNorm
    unused = [k for c, k in keys if not is_used(cfg, *resolve(cfg, c, k))]
    n_unused_layers = cfg.vision.num_hidden_layers - cfg.num_vision_layers_used
    assert len(unused) == 2 + 16 * n_unused_layers
    assert resolve(cfg, "llm", "model.layers.0.mlp.gate_proj.weight_x") is None
    assert resolve(cfg, "mm_projector", "layers.3.weight") is None  # GELU slots hold no tensors


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dicts_round_trip_through_params(name):
    cfg = CONFIGS[name]
    official = _random_official(cfg)
    params, unused = state_dicts_to_params(cfg, official)
    shapes = _param_shapes(cfg)
    got = {tuple(str(k.key) for k in kp): v.shape for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert got == shapes
    back = params_to_state_dicts(cfg, params, unused)
    for component in official:
        assert sorted(back[component]) == sorted(official[component])
        for key, value in official[component].items():
            np.testing.assert_array_equal(back[component][key], value, err_msg=f"{component}/{key}")


def test_projector_keys_follow_the_official_sequential_indices():
    keys = lambda cfg: sorted(k for c, k in official_keys(cfg) if c == "mm_projector")
    assert keys(CONFIGS["mlp_downsample+dynamic_s2"]) == [f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("bias", "weight")]
    assert keys(CONFIGS["3x3_fix+dynamic"]) == [f"layers.{i}.{p}" for i in (1, 2, 4, 5, 7) for p in ("bias", "weight")]
    assert keys(CONFIGS["linear+resize"]) == ["layers.bias", "layers.weight"]
    assert keys(CONFIGS["mlp2x_gelu+resize"]) == [f"layers.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    assert keys(CONFIGS["identity+resize"]) == []


def test_tied_lm_head_is_optional_and_carried_when_present():
    cfg = CONFIGS["3x3_fix+dynamic+tied"]
    assert ("llm", "lm_head.weight") not in set(official_keys(cfg))
    assert ("llm", "lm_head.weight") in set(official_keys(cfg, include_optional=True))
    official = _random_official(cfg)
    official["llm"]["lm_head.weight"] = official["llm"]["model.embed_tokens.weight"].copy()
    params, unused = state_dicts_to_params(cfg, official)
    assert "lm_head" not in params["llm"] and "lm_head.weight" in unused["llm"]
    assert "lm_head.weight" in params_to_state_dicts(cfg, params, unused)["llm"]
    del official["llm"]["lm_head.weight"]
    params, unused = state_dicts_to_params(cfg, official)
    assert "lm_head.weight" not in params_to_state_dicts(cfg, params, unused)["llm"]


def test_siglip_keys_without_the_vision_model_prefix_resolve_alike():
    cfg = tiny()
    a = resolve(cfg, "vision_tower", "vision_model.encoder.layers.1.mlp.fc1.weight")
    assert a == resolve(cfg, "vision_tower", "encoder.layers.1.mlp.fc1.weight") and a[1] == 1


def test_hf_layout_keys_split_by_component_prefix():
    assert split_hf_layout_key("llm.model.norm.weight") == ("llm", "model.norm.weight")
    assert split_hf_layout_key("vision_tower.vision_model.post_layernorm.bias") == (
        "vision_tower", "vision_model.post_layernorm.bias")
    assert split_hf_layout_key("mm_projector.layers.1.weight") == ("mm_projector", "layers.1.weight")
    assert split_hf_layout_key("model.norm.weight") is None and split_hf_layout_key("llm.") is None


@pytest.mark.parametrize("transform,shape", [
    ("identity", (5, 3)), ("transpose", (6, 4)), ("conv_oihw_to_hwio", (7, 7, 3, 8)),
    ("heads_in_q", (64, 4, 16)), ("heads_in_kv", (64, 2, 16)), ("heads_bias_q", (4, 16)), ("heads_bias_kv", (2, 16)),
    ("heads_out_q", (4, 16, 64)), ("heads_in_vit", (32, 4, 8)), ("heads_out_vit", (4, 8, 32)),
])
def test_official_shape_is_from_param_on_shapes(transform, shape):
    cfg = tiny()
    x = np.random.RandomState(0).randn(*shape).astype(np.float32)
    official = from_param(cfg, transform, x)
    assert official_shape(transform, shape) == official.shape
    np.testing.assert_array_equal(to_param(cfg, transform, official), x)
    axis = row_axis(transform)
    if axis is not None:  # converting a block of official rows gives the same slice of the parameter
        np.testing.assert_array_equal(to_param(cfg, transform, official[1:3]), np.take(x, [1, 2], axis=axis))


# ------------------------------------------------------------------ each transform is the PyTorch op it replaces
def test_linear_weight_transpose_is_torch_linear():
    lin = torch.nn.Linear(6, 4)
    x = torch.randn(3, 6)
    kernel = to_param(tiny(), "transpose", lin.weight.detach().numpy())
    np.testing.assert_allclose(x.numpy() @ kernel + lin.bias.detach().numpy(), lin(x).detach().numpy(), atol=1e-6)


def test_head_split_kernels_are_the_torch_projections():
    cfg = tiny()  # 4 query heads, 2 KV heads, head_dim 16, hidden 64
    x = torch.randn(5, 64)
    q = torch.nn.Linear(64, 64)
    k = torch.nn.Linear(64, 32)
    o = torch.nn.Linear(64, 64, bias=False)
    qk = to_param(cfg, "heads_in_q", q.weight.detach().numpy())
    qb = to_param(cfg, "heads_bias_q", q.bias.detach().numpy())
    got = np.einsum("te,ehd->thd", x.numpy(), qk) + qb
    np.testing.assert_allclose(got, q(x).detach().numpy().reshape(5, 4, 16), atol=1e-5)
    kk = to_param(cfg, "heads_in_kv", k.weight.detach().numpy())
    np.testing.assert_allclose(np.einsum("te,ehd->thd", x.numpy(), kk) + to_param(cfg, "heads_bias_kv", k.bias.detach().numpy()),
                               k(x).detach().numpy().reshape(5, 2, 16), atol=1e-5)
    heads = torch.randn(5, 4, 16)
    ok = to_param(cfg, "heads_out_q", o.weight.detach().numpy())
    np.testing.assert_allclose(np.einsum("thd,hdo->to", heads.numpy(), ok), o(heads.reshape(5, 64)).detach().numpy(),
                               atol=1e-5)


def test_patch_conv_layout_is_the_torch_conv():
    conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=7)
    x = torch.randn(2, 3, 14, 21)
    kernel = to_param(tiny(), "conv_oihw_to_hwio", conv.weight.detach().numpy())
    got = jax.lax.conv_general_dilated(x.permute(0, 2, 3, 1).numpy(), kernel, (7, 7), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = conv(x).detach().permute(0, 2, 3, 1).numpy() - conv.bias.detach().numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
