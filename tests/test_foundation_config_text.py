"""Config files in every official form, the chat template and fusion rules, and the README contract."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from helpers.torch_nvila import hf_tokenizer
from nvila_jax.config import ConfigError, NVILAConfig
from nvila_jax.media.layout import VISUAL
from nvila_jax.text.fusion import FusionError, fuse
from nvila_jax.text.prompt import prompt_ids
from nvila_jax.variants import VARIANTS, get_variant

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variants_round_trip_through_the_official_config_files(name, tmp_path):
    cfg = get_variant(name)
    files = cfg.to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(files["config.json"]))
    for sub in ("llm", "vision_tower", "mm_projector"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text(json.dumps(files[sub]))
    ids = dict(image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id)
    back = NVILAConfig.from_hf_config(tmp_path, name=cfg.name, **ids)
    assert back == cfg
    nested = NVILAConfig.from_hf_config(files["config.json"], name=cfg.name, **ids)  # the `*_cfg` form
    assert nested == cfg
    assert NVILAConfig.from_json(cfg.to_json()) == cfg


def test_reads_the_nvila_8b_config_as_released():
    """Field names and values of the released NVILA-8B config.json (NVILA_REFERENCE.md §1)."""
    top = {
        "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama", "hidden_size": 3584,
        "mm_hidden_size": 3456, "image_aspect_ratio": "dynamic_s2", "dynamic_s2": True, "s2": False,
        "s2_scales": "448,896,1344", "s2_max_split_size": 448, "s2_resize_output_to_scale_idx": -1,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "num_video_frames": 8,
        "llm_cfg": {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
                    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                    "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "max_position_embeddings": 32768,
                    "model_max_length": 8192, "vocab_size": 151648, "bos_token_id": 151643,
                    "eos_token_id": 151645, "tie_word_embeddings": False, "hidden_act": "silu"},
        "vision_tower_cfg": {"architectures": ["SiglipVisionModel"], "hidden_size": 1152, "intermediate_size": 4304,
                             "num_hidden_layers": 27, "num_attention_heads": 16, "patch_size": 14,
                             "image_size": 448, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-06,
                             "vision_use_head": False},
        "mm_projector_cfg": {"mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"},
    }
    cfg = NVILAConfig.from_hf_config(top)
    assert (cfg.tiling, cfg.s2_scales, cfg.max_tiles, cfg.min_tiles) == ("dynamic_s2", (448, 896, 1344), 12, 1)
    assert cfg.llm.head_dim == 128 and cfg.llm.rope_theta == 1e6 and cfg.model_max_length == 8192
    assert cfg.num_vision_layers_used == 26 and cfg.projector.downsample == 2
    assert (cfg.image_encoder.kind, cfg.video_encoder.kind, cfg.video_encoder.end_tokens) == ("basic", "basic", "\n")
    tsp = NVILAConfig.from_hf_config({**top, "video_encoder": json.dumps(
        {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[8, 1, 1]]})})
    assert tsp.video_encoder.kind == "tsp" and tsp.video_encoder.pool_sizes == ((8, 1, 1),)
    rope_params = {**top, "llm_cfg": {**top["llm_cfg"], "rope_parameters": {"rope_theta": 5e5}}}
    del rope_params["llm_cfg"]["rope_theta"]
    assert NVILAConfig.from_hf_config(rope_params).llm.rope_theta == 5e5


def test_reads_the_hf_layout_config():
    cfg = get_variant("NVILA-Lite-2B")
    files = cfg.to_hf_config()
    hf = {"model_type": "nvila_lite", "text_config": files["llm"], "vision_config": files["vision_tower"],
          "image_token_id": 7, "video_token_id": 8}
    back = NVILAConfig.from_hf_config(hf)
    assert back.tiling == "dynamic" and back.projector.projector_type == "mlp_downsample_3x3_fix"
    assert (back.image_token_id, back.video_token_id, back.llm.tie_word_embeddings) == (7, 8, True)


@pytest.mark.parametrize("change, message", [
    (dict(tiling="pyramid"), "tiling .* expected one of"),
    (dict(s2_scales=(56, 100, 168)), "increasing multiples"),
    (dict(max_tiles=4), "max_tiles=4 is below"),
    (dict(select_layer=-9), "outside the 3 layers"),
    (dict(select_feature="patch"), "only 'cls_patch'"),
])
def test_inconsistent_configs_are_rejected_with_the_reason(change, message):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(get_variant("tiny"), **change)


def test_config_file_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(ConfigError, match="config.json: file not found"):
        NVILAConfig.from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        NVILAConfig.from_hf_config(tmp_path)
    files = get_variant("tiny").to_hf_config()
    top = files["config.json"]
    with pytest.raises(ConfigError, match="unknown mm_projector_type 'mlp9x_magic'"):
        NVILAConfig.from_hf_config({**top, "mm_projector_cfg": {"mm_projector_type": "mlp9x_magic"}})
    broken = {**top, "llm_cfg": {k: v for k, v in top["llm_cfg"].items() if k != "vocab_size"}}
    with pytest.raises(ConfigError, match="llm config: missing required field 'vocab_size'"):
        NVILAConfig.from_hf_config(broken)
    with pytest.raises(ConfigError, match="fixed-scale S2"):
        NVILAConfig.from_hf_config({**top, "s2": True, "dynamic_s2": False, "image_aspect_ratio": "resize"})


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "<image>What is it?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}],
])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_renders_like_transformers(tiny_tokenizer, tokenizer_dir, messages, generation_prompt):
    hf = hf_tokenizer(tokenizer_dir)
    want = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    assert tiny_tokenizer.apply_chat_template(messages, generation_prompt) == want
    assert tiny_tokenizer.encode(want) == hf(want).input_ids


def test_prompt_layout_and_stop_tokens(tiny_tokenizer):
    ids = prompt_ids(tiny_tokenizer, "  Count the stars. ", "<image>")
    text = tiny_tokenizer.decode(ids, skip_special_tokens=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n"
                    "<image>  Count the stars.<|im_end|>\n<|im_start|>assistant\n")  # the reference strips the
    # whole turn, not the text part (unless it held a literal media token)
    assert tiny_tokenizer.stop_token_ids == (tiny_tokenizer.token_id("<|im_end|>"),)


def test_fusion_places_blocks_in_order_and_counts_visual_tokens():
    ids = [5, 100, 6, 101, 100, 7]  # image, video, image
    img = [np.array([VISUAL, VISUAL, 9]), np.array([VISUAL, 9])]
    vid = [np.array([VISUAL, 8, VISUAL, 8])]
    f = fuse(ids, {100: img, 101: vid}, pad_id=0)
    np.testing.assert_array_equal(f.input_ids, [5, 0, 0, 9, 6, 0, 8, 0, 8, 0, 9, 7])
    np.testing.assert_array_equal(f.visual_index, [-1, 0, 1, -1, -1, 2, -1, 3, -1, 4, -1, -1])
    assert f.media_order == ((100, 0), (101, 0), (100, 1)) and f.num_visual == 5
    with pytest.raises(FusionError, match="2 media token.* of id 100 but 1 media item"):
        fuse(ids, {100: img[:1], 101: vid})


def test_readme_opens_with_the_two_commands_that_ci_runs():
    text = (ROOT / "README.md").read_text()
    first_block = re.match(r"```bash\n(.*?)```", text, re.S)
    assert first_block, "README.md must open with a bash code block"
    lines = first_block.group(1).strip().splitlines()
    assert len(lines) == 2 and "nvila-jax demo" in lines[0] and "pytest" in lines[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "sed -n 2p" in ci and "README.md" in ci
