"""The PyTorch reference: HF transformers SigLIP + Qwen2 with tiny random weights, and a line-by-line
transcription (in torch / PIL) of what the official NVILA code does around them (NVILA_REFERENCE.md):
tiling, the SigLIP processor, chessboard split/merge with area interpolation, the DownSample view/permute
projectors, encoders with "\\n" end tokens, TSP pooling, the chat template and the per-token fusion loop.

Nothing here imports nvila_jax model code: it only reads hyperparameters from an `NVILAConfig`.
"""

from __future__ import annotations

import re
from collections import deque
from typing import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn as tnn
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers import Qwen2Config as HFQwen2Config
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from nvila_jax.config import NVILAConfig

IMAGE, VIDEO = "<image>", "<vila/video>"


# ------------------------------------------------------------------------------------ HF models
def hf_vision_config(cfg: NVILAConfig) -> SiglipVisionConfig:
    v = cfg.vision
    return SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads, patch_size=v.patch_size, image_size=v.image_size,
        num_channels=v.num_channels, layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, vision_use_head=False,
        attn_implementation="eager",
    )


def hf_llm_config(cfg: NVILAConfig) -> HFQwen2Config:
    c = cfg.llm
    return HFQwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_word_embeddings, eos_token_id=c.eos_token_id, bos_token_id=c.bos_token_id,
        attn_implementation="eager",
    )


class DownSample(tnn.Module):
    """The official DownSample{,2x2Fix,3x3Fix}Block: square token grid, zero pad, view/permute/view/permute."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        n, t, c = x.shape
        side = int(t**0.5)
        x = x.reshape(n, side, side, c)
        k = self.k
        n, w, h, c = x.size()
        if w % k:
            x = torch.cat([x, x.new_zeros(n, k - w % k, h, c)], dim=1)
            n, w, h, c = x.size()
        if h % k:
            x = torch.cat([x, x.new_zeros(n, w, k - h % k, c)], dim=2)
            n, w, h, c = x.size()
        x = x.contiguous().view(n, w, h // k, c * k).permute(0, 2, 1, 3).contiguous()
        x = x.view(n, h // k, w // k, c * k * k).permute(0, 2, 1, 3).contiguous()
        return x.reshape(n, -1, x.shape[-1])


class TorchProjector(tnn.Module):
    """`mm_projector`: `self.layers` is the official nn.Sequential (or bare Linear for `linear`)."""

    def __init__(self, ptype: str, c: int, d: int):
        super().__init__()
        if ptype in ("mlp_downsample", "mlp_downsample_2x2_fix"):
            self.layers = tnn.Sequential(DownSample(2), tnn.LayerNorm(4 * c), tnn.Linear(4 * c, d), tnn.GELU(),
                                         tnn.Linear(d, d))
        elif ptype == "mlp_downsample_3x3_fix":
            self.layers = tnn.Sequential(DownSample(3), tnn.LayerNorm(9 * c), tnn.Linear(9 * c, 3 * c), tnn.GELU(),
                                         tnn.LayerNorm(3 * c), tnn.Linear(3 * c, d), tnn.GELU(), tnn.Linear(d, d))
        elif ptype == "linear":
            self.layers = tnn.Linear(c, d)
        elif ptype == "identity":
            self.layers = tnn.Identity()
        else:
            depth = int(re.fullmatch(r"mlp(\d+)x_gelu", ptype).group(1))
            mods = [tnn.Linear(c, d)]
            for _ in range(1, depth):
                mods += [tnn.GELU(), tnn.Linear(d, d)]
            self.layers = tnn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


def randomize_(module: tnn.Module, seed: int, std: float = 0.08) -> None:
    """Re-draws every parameter so that outputs are far from zero: norms ~ 1 + N(0, 0.1), the rest N(0, std)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if re.search(r"norm", name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(std * noise)


def hf_tokenizer(tokenizer_dir: str) -> PreTrainedTokenizerFast:
    """The HF fast tokenizer of a directory with tokenizer.json + tokenizer_config.json (chat template)."""
    return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)


# ------------------------------------------------------------------------------------ geometry
def find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def _target_ratios(min_num, max_num):
    ratios = {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
              if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda x: x[0] * x[1])


def _crop_grid(image, cols, rows, size):
    resized = image.resize((size * cols, size * rows))
    out = []
    for i in range(cols * rows):
        c, r = i % cols, i // cols
        out.append(resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)))
    return out


def dynamic_preprocess(image, min_num, max_num, image_size):
    w, h = image.size
    cols, rows = find_closest_aspect_ratio(w / h, _target_ratios(min_num, max_num), w, h, image_size)
    tiles = _crop_grid(image, cols, rows, image_size)
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def dynamic_s2_preprocess(image, s2_scales, max_num, image_size):
    w, h = image.size
    tiles = []
    for scale in s2_scales[:-1]:
        k = scale // s2_scales[0]
        tiles += _crop_grid(image, k, k, image_size)
    min_num = (s2_scales[-1] // s2_scales[0]) ** 2
    cols, rows = find_closest_aspect_ratio(w / h, _target_ratios(min_num, max_num), w, h, image_size)
    tiles += _crop_grid(image, cols, rows, image_size)
    return tiles, (rows, cols)


# ------------------------------------------------------------------------------------ the model
def merge_chessboard(x, nh, nw):
    if x.dim() == 3:
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, -1).permute(0, 3, 1, 2)
    b = x.shape[0] // (nh * nw)
    return torch.cat([torch.cat([x[(i * nw + j) * b:(i * nw + j + 1) * b] for j in range(nw)], dim=-1)
                      for i in range(nh)], dim=-2)


def split_chessboard(x, nh, nw):
    _, _, hh, ww = x.shape
    h, w = hh // nh, ww // nw
    return torch.cat([x[:, :, i * h:(i + 1) * h, j * w:(j + 1) * w] for i in range(nh) for j in range(nw)], dim=0)


class TorchNVILA:
    """The reference forward for one prompt with images and/or video frames."""

    def __init__(self, cfg: NVILAConfig, tokenizer_dir: str, seed: int = 0,
                 vision: SiglipVisionModel | None = None, llm: Qwen2ForCausalLM | None = None,
                 projector: TorchProjector | None = None):
        torch.manual_seed(seed)
        self.cfg = cfg
        self.vision = vision or SiglipVisionModel(hf_vision_config(cfg)).eval()
        self.llm = llm or Qwen2ForCausalLM(hf_llm_config(cfg)).eval()
        self.projector = projector or TorchProjector(cfg.projector.projector_type, cfg.projector.mm_hidden_size,
                                                     cfg.llm.hidden_size).eval()
        if vision is None:
            randomize_(self.vision, seed + 1)
            randomize_(self.llm, seed + 2)
            randomize_(self.projector, seed + 3)
        self.tokenizer = hf_tokenizer(tokenizer_dir)
        s = cfg.vision.image_size
        self.processor = SiglipImageProcessorPil(size={"height": s, "width": s}, resample=3, do_rescale=True,
                                                 rescale_factor=1 / 255, do_normalize=True,
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3)

    def state_dicts(self) -> dict[str, dict[str, np.ndarray]]:
        """The three official components' tensors under their released names (no tied lm_head, no pooling
        head; SigLIP keys with the `vision_model.` prefix that transformers 5 no longer writes)."""
        llm = {k: v.numpy() for k, v in self.llm.state_dict().items()}
        if self.cfg.llm.tie_word_embeddings:
            llm.pop("lm_head.weight", None)
        return {
            "llm": llm,
            "vision_tower": {("" if k.startswith("vision_model.") else "vision_model.") + k: v.numpy()
                             for k, v in self.vision.state_dict().items()},
            "mm_projector": {k: v.numpy() for k, v in self.projector.state_dict().items()},
        }

    # -------------------------------------------------------------------------------- pieces
    def pixels(self, images: Sequence[PIL.Image.Image]) -> torch.Tensor:
        return torch.stack([self.processor.preprocess(im, return_tensors="pt")["pixel_values"][0] for im in images])

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.vision(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[self.cfg.select_layer]

    def encode_images(self, pixels, block_sizes=None):
        cfg = self.cfg
        if cfg.tiling != "dynamic_s2":
            return self.projector(self.vision_features(pixels))
        feats = self.vision_features(pixels)
        scales = list(cfg.s2_scales)
        idx = cfg.s2_resize_output_to_scale_idx
        block_sizes = block_sizes or [None] * len(pixels)
        maps, new_blocks, cnt = [], [], 0
        for bs in block_sizes:
            if bs is None:
                f = feats[cnt:cnt + 1]
                side = int(f.shape[1] ** 0.5)
                f = f.reshape(1, side, side, -1).permute(0, 3, 1, 2).repeat(1, len(scales), 1, 1)
                maps.append(f)
                new_blocks.append((1, 1))
                cnt += 1
                continue
            per_scale = []
            for s in scales[:-1]:
                k = s // scales[0]
                per_scale.append(merge_chessboard(feats[cnt:cnt + k * k], k, k))
                cnt += k * k
            per_scale.append(merge_chessboard(feats[cnt:cnt + bs[0] * bs[1]], bs[0], bs[1]))
            cnt += bs[0] * bs[1]
            size = per_scale[idx].shape[-2:]
            maps.append(torch.cat([F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in per_scale],
                                  dim=1))
            if idx in (-1, len(scales) - 1):
                new_blocks.append(bs)
            else:
                k = scales[idx] // scales[0]
                new_blocks.append((k, k))
        blocks = [split_chessboard(m, *b) for m, b in zip(maps, new_blocks)]
        tokens = torch.cat([b.flatten(2).transpose(1, 2) for b in blocks], dim=0)
        tokens = self.projector(tokens)
        tokens = tokens.split([b[0] * b[1] for b in new_blocks], dim=0)
        merged = [merge_chessboard(t, *b) for t, b in zip(tokens, new_blocks)]
        return [m.flatten(2).transpose(1, 2)[0] for m in merged]

    def embed_text(self, text: str | None):
        if text is None:
            return None
        ids = torch.tensor(self.tokenizer(text).input_ids)
        return self.llm.model.embed_tokens(ids)

    def _with_tokens(self, f, start, end):
        if start is not None:
            f = torch.cat([start, f], dim=0)
        if end is not None:
            f = torch.cat([f, end], dim=0)
        return f

    def image_embeds(self, pixels, block_sizes):
        enc = self.cfg.image_encoder
        feats = self.encode_images(pixels, block_sizes)
        start, end = self.embed_text(enc.start_tokens), self.embed_text(enc.end_tokens)
        return [self._with_tokens(f, start, end) for f in feats]

    def video_embeds(self, pixels):
        enc = self.cfg.video_encoder
        feats = self.encode_images(pixels)
        if isinstance(feats, list):
            feats = torch.stack(feats)
        start, end, sep = (self.embed_text(t) for t in (enc.start_tokens, enc.end_tokens, enc.sep_tokens))
        if enc.kind == "basic":
            return torch.cat([self._with_tokens(f, start, end) for f in feats], dim=0)
        nt, ns = feats.shape[:2]
        nl = int(ns**0.5)
        outs = []
        for pool in enc.pool_sizes:
            x = feats.view(nt, nl, nl, -1)
            for dim, p in enumerate(pool):
                x = x.view(x.shape[:dim] + (-1, p) + x.shape[dim + 1:]).mean(dim + 1)
            x = x.flatten(1, 2)
            x = torch.cat([self._with_tokens(f, start, end) for f in x], dim=0)
            if sep is not None:
                x = torch.cat([x, sep], dim=0)
            outs.append(x)
        return torch.cat(outs, dim=0)

    # -------------------------------------------------------------------------------- prompt + fusion
    def prepare(self, prompt: str, images: Sequence[PIL.Image.Image] = (), frames: Sequence[PIL.Image.Image] = ()):
        """(input_ids, {"image": deque of embeds, "video": deque}) as generate_content builds them."""
        cfg = self.cfg
        text = prompt
        for tok in (IMAGE, VIDEO):
            if tok in text:
                text = text.replace(tok, "").strip()
        value = IMAGE * len(images) + (VIDEO if frames else "") + text
        media = {}
        if images:
            images = [im.convert("RGB") for im in images]
            if len(images) == 1 and cfg.tiling == "dynamic":
                tiles = dynamic_preprocess(images[0], cfg.min_tiles, cfg.max_tiles, cfg.vision.image_size)
                value = value.replace(IMAGE, f"{IMAGE}\n" * len(tiles))
                media["image"] = deque(self.image_embeds(self.pixels(tiles), None))
            elif len(images) == 1 and cfg.tiling == "dynamic_s2":
                tiles, bs = dynamic_s2_preprocess(images[0], list(cfg.s2_scales), cfg.max_tiles, cfg.vision.image_size)
                media["image"] = deque(self.image_embeds(self.pixels(tiles), [bs]))
            else:
                media["image"] = deque(self.image_embeds(self.pixels(images), None))
        if frames:
            media["video"] = deque([self.video_embeds(self.pixels([f.convert("RGB") for f in frames]))])
        chat = self.tokenizer.apply_chat_template([{"role": "user", "content": value.strip()}],
                                                  add_generation_prompt=True, tokenize=False)
        return torch.tensor(self.tokenizer(chat).input_ids), media

    def fuse(self, input_ids, media):
        """The reference `_embed` loop for one sequence."""
        media_ids = {self.tokenizer.convert_tokens_to_ids(IMAGE): "image",
                     self.tokenizer.convert_tokens_to_ids(VIDEO): "video"}
        text = self.llm.model.embed_tokens(input_ids)
        pieces, pos = [], 0
        while pos < len(input_ids):
            if input_ids[pos].item() in media_ids:
                pieces.append(media[media_ids[input_ids[pos].item()]].popleft())
                pos += 1
            else:
                end = pos
                while end < len(input_ids) and input_ids[end].item() not in media_ids:
                    end += 1
                pieces.append(text[pos:end])
                pos = end
        assert all(not q for q in media.values()), "not all media embeddings were consumed"
        return torch.cat(pieces, dim=0)

    @torch.no_grad()
    def inputs_embeds(self, prompt, images=(), frames=()):
        return self.fuse(*self.prepare(prompt, images, frames))

    @torch.no_grad()
    def logits(self, prompt: str, images=(), frames=()) -> np.ndarray:
        embeds = self.inputs_embeds(prompt, images, frames)
        return self.llm(inputs_embeds=embeds[None]).logits[0].float().numpy()

    @torch.no_grad()
    def greedy(self, prompt: str, images=(), frames=(), max_new_tokens: int = 8) -> list[int]:
        """HF `generate` (greedy) on the fused embeddings, stopping at eos / <|im_end|>; stop token dropped."""
        embeds = self.inputs_embeds(prompt, images, frames)[None]
        stops = sorted({self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                                pad_token_id=self.tokenizer.pad_token_id or stops[0])[0].tolist()
        return [t for t in out if t not in stops]


def video_frames(n: int, size=(40, 30), seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.RandomState(seed)
    return [PIL.Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def random_image(width: int, height: int, seed: int = 0) -> PIL.Image.Image:
    """A smooth random image (so that resampling differences would show)."""
    rng = np.random.RandomState(seed)
    small = rng.randint(0, 255, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return PIL.Image.fromarray(small).resize((width, height), PIL.Image.BILINEAR)

