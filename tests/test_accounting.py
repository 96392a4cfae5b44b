"""Token and FLOP accounting: counts equal what real requests produce, FLOPs equal PyTorch's flop counter
on the HF models, and the release variants give the paper's token counts."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers.torch_nvila import TorchNVILA, random_image, video_frames
from nvila_jax.accounting import (account, image_tokens, llm_decode_flops, llm_decode_weight_bytes,
                                  llm_prefill_flops, video_tokens, vision_encoder_flops)
from nvila_jax.cli import main
from nvila_jax.config import MediaEncoderConfig
from nvila_jax.inference.request import prepare_request
from nvila_jax.models.temporal import TemporalPoolError
from nvila_jax.variants import get_variant, tiny, tiny_lite

TSP = MediaEncoderConfig(kind="tsp", pool_sizes=((4, 1, 1),))


@pytest.mark.parametrize("cfg", [tiny(), tiny_lite(), tiny(video_encoder=TSP)], ids=["nvila", "lite", "tsp"])
@pytest.mark.parametrize("sizes", [[(150, 100)], [(90, 300)], [(20, 20)], [(3000, 2000)], [(60, 50), (90, 40)]])
def test_image_counts_equal_prepared_requests(tiny_tokenizer, cfg, sizes):
    images = [random_image(w, h, i) for i, (w, h) in enumerate(sizes)]
    req = prepare_request(cfg, tiny_tokenizer, "Describe it.", images)
    m = image_tokens(cfg, sizes)
    assert m.vit_tiles == sum(t.pixels.shape[0] for t in req.images)
    assert m.visual_tokens == m.tokens_after_stc == req.fused.num_visual
    assert m.tokens_before_stc // cfg.vision.grid_size ** 2 * cfg.tokens_per_tile == m.tokens_after_stc


@pytest.mark.parametrize("cfg,frames", [(tiny(), 8), (tiny(), 3), (tiny_lite(), 6), (tiny(video_encoder=TSP), 8)])
def test_video_counts_equal_prepared_requests(tiny_tokenizer, cfg, frames):
    req = prepare_request(cfg, tiny_tokenizer, "Describe it.", video=video_frames(frames), num_frames=frames)
    m = video_tokens(cfg, frames)
    assert m.vit_tiles == frames and m.tokens_before_stc == frames * cfg.vision.grid_size ** 2
    assert m.visual_tokens == req.fused.num_visual
    text = "Describe it."
    bare = prepare_request(cfg, tiny_tokenizer, text).length
    assert req.length == bare - 1 + m.llm_tokens + 1  # the <vila/video> token is replaced by its block
    with pytest.raises(TemporalPoolError, match="6 frames cannot be pooled in groups of 4"):
        account(tiny(video_encoder=TSP), num_frames=6)


def test_release_variants_give_the_paper_counts():
    nvila, lite, video = get_variant("NVILA-8B"), get_variant("NVILA-Lite-8B"), get_variant("NVILA-8B-Video")
    assert image_tokens(nvila, [(448, 448)]).visual_tokens == 2304
    m = image_tokens(nvila, [(1344, 1008)])
    assert (m.vit_tiles, m.tokens_before_stc, m.tokens_after_stc) == (17, 12288, 3072)
    assert image_tokens(nvila, [(640, 480), (300, 300)]).visual_tokens == 512
    m = image_tokens(lite, [(1344, 1008)])
    assert (m.vit_tiles, m.visual_tokens) == (13, 13 * 121)
    m = video_tokens(video, 256)
    assert (m.tokens_after_stc, m.visual_tokens, m.text_tokens) == (65536, 8192, 32)
    # one 448 SigLIP-So400m tile through the 26 used layers is about 1 TFLOP
    assert 0.9e12 < vision_encoder_flops(nvila.vision, 1, 26) < 1.0e12


def _count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            fn()
    return counter.get_total_flops()


def test_flops_equal_torch_flop_counter_on_the_hf_models(tokenizer_dir):
    cfg = tiny()
    ref = TorchNVILA(cfg, tokenizer_dir)
    pixels = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    all_layers = cfg.vision.num_hidden_layers
    assert vision_encoder_flops(cfg.vision, 3, all_layers) == _count(lambda: ref.vision(pixel_values=pixels))
    llm, q = cfg.llm, cfg.llm.num_attention_heads * cfg.llm.head_dim
    length = 37
    ids = torch.randint(0, 300, (1, length))
    hf_prefill = _count(lambda: ref.llm(input_ids=ids, logits_to_keep=1))
    causal_saving = llm.num_hidden_layers * 4 * q * (length * length - length * (length + 1) / 2)
    assert llm_prefill_flops(llm, length) == hf_prefill - causal_saving
    cache = ref.llm(input_ids=ids, use_cache=True).past_key_values
    step = _count(lambda: ref.llm(input_ids=ids[:, :1], cache=cache, use_cache=True))
    assert llm_decode_flops(llm, length + 1) == step


def test_last_only_prefill_flops_count_the_last_layer_as_executed(tokenizer_dir):
    """nvila_jax's prefill runs its last layer's keys and values over every token and the rest for the last
    token only: the full prefill minus one full layer plus exactly that, counted on the HF modules."""
    cfg = tiny()
    llm, length = cfg.llm, 37
    layer = TorchNVILA(cfg, tokenizer_dir).llm.model.layers[-1]
    h = torch.randn(1, length, llm.hidden_size)
    kv = _count(lambda: (layer.self_attn.k_proj(h), layer.self_attn.v_proj(h)))
    rest = _count(lambda: (layer.self_attn.q_proj(h[:, -1:]), layer.self_attn.o_proj(h[:, -1:]), layer.mlp(h[:, -1:])))
    q = torch.randn(1, llm.num_attention_heads, 1, llm.head_dim)
    keys = torch.randn(1, llm.num_attention_heads, length, llm.head_dim)
    attention = _count(lambda: torch.softmax(q @ keys.transpose(-1, -2), -1) @ keys)  # one query, every key
    head = 2.0 * llm.hidden_size * llm.vocab_size
    full_layer = (llm_prefill_flops(llm, length) - head) / llm.num_hidden_layers
    want = llm_prefill_flops(llm, length) - full_layer + kv + rest + attention
    assert llm_prefill_flops(llm, length, last_only=True) == pytest.approx(want, rel=1e-12)
    assert llm_prefill_flops(llm, 1, last_only=True) == llm_prefill_flops(llm, 1)


def test_decode_weight_bytes_equal_the_parameter_count(make_reference):
    for cfg in (tiny(), tiny_lite()):
        ref, _ = make_reference(cfg)
        n = sum(p.numel() for name, p in ref.llm.named_parameters() if "embed_tokens" not in name)
        if cfg.llm.tie_word_embeddings:
            n += ref.llm.model.embed_tokens.weight.numel()
        assert llm_decode_weight_bytes(cfg.llm, 4) == 4 * n


def test_the_command_prints_a_table_and_json(capsys):
    assert main(["accounting", "--variant", "NVILA-8B", "--image", "1344x1008"]) == 0
    out = capsys.readouterr().out
    assert "Dynamic-S2 grid 3x4" in out and "12,288" in out and "3,072" in out
    assert main(["accounting", "--variant", "nvila-8b-video", "--frames", "256", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["media"]["visual_tokens"] == 8192 and data["prefill_flops"] > 1e14
    with pytest.raises(SystemExit):
        main(["accounting", "--image", "100by200"])
