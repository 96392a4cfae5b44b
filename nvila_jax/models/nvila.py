"""The NVILA assembly: vision tower -> (Dynamic-S2 merge) -> projector -> (temporal pooling) -> fused into
the Qwen2 sequence. Parameters: {"vision_tower", "projector", "llm"}; each method is one device program.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.config import NVILAConfig
from nvila_jax.models.layers import Dtype
from nvila_jax.models.multiscale import merge_s2_features, project_blocks
from nvila_jax.models.projector import Projector
from nvila_jax.models.qwen2 import KVCache, Qwen2LM
from nvila_jax.models.siglip import SiglipVisionTower
from nvila_jax.models.temporal import temporal_pool


class NVILA(nn.Module):
    config: NVILAConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    stc_impl: str = "auto"
    vision_dot_general_cls: Any = None  # the vision tower's and projector's linears
    llm_dot_general_cls: Any = None  # the LLM decoder layers' linears (see Qwen2LM)
    llm_logits_dot_general_cls: Any = None  # the LM head's product
    scan_layers: bool = True  # False: the LLM's per-layer parameter layout for inference (see Qwen2LM)

    def setup(self) -> None:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.vision_tower = SiglipVisionTower(c.vision, c.num_vision_layers_used, remat=self.remat,
                                              dot_general_cls=self.vision_dot_general_cls, **kw)
        self.projector = Projector(c.projector, stc_impl=self.stc_impl, dot_general_cls=self.vision_dot_general_cls,
                                   **kw)
        self.llm = Qwen2LM(c.llm, remat=self.remat, dot_general_cls=self.llm_dot_general_cls,
                           logits_dot_general_cls=self.llm_logits_dot_general_cls, scan_layers=self.scan_layers, **kw)

    # ------------------------------------------------------------------ vision
    def tile_features(self, pixels: jax.Array) -> jax.Array:
        """Tiles [N, S, S, 3] -> SigLIP feature maps [N, g, g, C] (hidden_states[select_layer])."""
        return self.vision_tower(pixels)

    def tile_tokens(self, pixels: jax.Array) -> jax.Array:
        """Independent tiles (multi-image, video frames, Lite tiles) -> visual tokens [N, tokens_per_tile, D].

        With Dynamic-S2 a lone tile's features stand in for every scale: repeated on channels.
        """
        return self.project_tiles(self.tile_features(pixels))

    def project_tiles(self, maps: jax.Array) -> jax.Array:
        """`tile_tokens` after the vision tower: feature maps [N, g, g, C] -> [N, tokens_per_tile, D]."""
        if self.config.tiling == "dynamic_s2":
            maps = jnp.tile(maps, (1, 1, 1, len(self.config.s2_scales)))
        return self.projector(maps)

    def s2_image_tokens(self, pixels: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """All scales' tiles of one image [1 + 4 + R*C, S, S, 3] -> visual tokens [tokens, D]."""
        return self.project_s2(self.tile_features(pixels), grid)

    def project_s2(self, maps: jax.Array, grid: tuple[int, int]) -> jax.Array:
        """`s2_image_tokens` after the vision tower: one image's tile maps [1 + 4 + R*C, g, g, C] -> [tokens, D]."""
        c = self.config
        merged, blocks = merge_s2_features(maps, grid, c.s2_scales, c.s2_resize_output_to_scale_idx)
        return project_blocks(self.projector, merged, blocks, c.projector.downsample)

    def video_tokens(self, pixels: jax.Array) -> jax.Array:
        """Frames [T, S, S, 3] -> the video's visual tokens [tokens, D], temporally pooled for TSP."""
        return self.pool_video(self.tile_tokens(pixels))

    def pool_video(self, tokens: jax.Array) -> jax.Array:
        """`video_tokens` after the projector: frame tokens [T, tokens_per_tile, D] -> [tokens, D]."""
        enc = self.config.video_encoder
        if enc.kind == "tsp":
            return jnp.concatenate([p.reshape(-1, p.shape[-1]) for p in temporal_pool(tokens, enc.pool_sizes)])
        return tokens.reshape(-1, tokens.shape[-1])

    # ------------------------------------------------------------------ language
    def embed(self, input_ids: jax.Array, visual_index: jax.Array, visual_tokens: jax.Array) -> jax.Array:
        """Text embeddings with visual tokens put in place: position p takes visual_tokens[visual_index[p]]
        where visual_index >= 0. input_ids/visual_index [B, L]; visual_tokens [M, D] for the whole batch."""
        text = self.llm.embed(input_ids)
        if visual_tokens.shape[0] == 0:
            return text
        vis = jnp.take(visual_tokens.astype(text.dtype), jnp.maximum(visual_index, 0), axis=0)
        return jnp.where((visual_index >= 0)[..., None], vis, text)

    def __call__(
        self,
        input_ids: jax.Array,
        visual_index: jax.Array,
        visual_tokens: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Fused sequence -> final hidden states [B, L, D] (use `logits`) and the updated cache; with
        `last_only`, [B, 1, D] of the last position, computing only what that and the cache need."""
        x = self.embed(input_ids, visual_index, visual_tokens)
        return self.llm(x, positions, segment_ids, cache, last_only)

    def logits(self, hidden: jax.Array) -> jax.Array:
        return self.llm.logits(hidden)

    def initialize(self, pixels: jax.Array, input_ids: jax.Array) -> jax.Array:
        """Touches every parameter once (used by `init`)."""
        tokens = self.tile_tokens(pixels).reshape(-1, self.config.llm.hidden_size)
        vi = jnp.zeros_like(input_ids)
        seg = jnp.ones_like(input_ids)
        hidden, _ = self(input_ids, vi, tokens, jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape),
                         seg)
        return self.logits(hidden)


def init_params(config: NVILAConfig, rng: jax.Array, param_dtype: Dtype = jnp.float32) -> Any:
    """Randomly initialised parameters {"vision_tower", "projector", "llm"}, boxed with logical axis names.

    Use `flax.linen.meta.unbox` (or `nn.get_partition_spec`) on the result; `jax.eval_shape(init_params, ...)`
    gives shapes without allocating.
    """
    model = NVILA(config, param_dtype=param_dtype)
    s = config.vision.image_size
    pixels = jnp.zeros((1, s, s, config.vision.num_channels), jnp.float32)
    ids = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, pixels, ids, method=NVILA.initialize)["params"]
