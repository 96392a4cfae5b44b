"""`NVILAModel`: config + parameters + tokenizer, with `score` and `generate` on prompts with media."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from nvila_jax import sharding
from nvila_jax.config import NVILAConfig
from nvila_jax.distributed import to_host
from nvila_jax.inference.batch import GenerationRequest, RequestLike, generate_batch
from nvila_jax.inference.engine import Engine, Generation
from nvila_jax.inference.request import Request, VideoLike, prepare_request
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.kernels.cpu_dot_general import CpuDotGeneral
from nvila_jax.media.image import ImageLike
from nvila_jax.models.nvila import NVILA
from nvila_jax.models.qwen2 import unstack_layer_params
from nvila_jax.text.tokenizer import NVILATokenizer


def inference_module(config: NVILAConfig, dtype: Any = jnp.float32, one_device: bool = True) -> NVILA:
    """The NVILA module that inference runs: the LLM's per-layer parameter layout (each weight read once per
    decode step) and, on one CPU device, the CPU kernels for every linear layer, the LM head included
    (`kernels.cpu_dot_general`: weight streaming for a decode step's few rows, OpenBLAS for prefill and the
    vision encoder; XLA's dot where they cannot run)."""
    cpu_kernels = CpuDotGeneral if one_device else None
    return NVILA(config, dtype=dtype, scan_layers=False, vision_dot_general_cls=cpu_kernels,
                 llm_dot_general_cls=cpu_kernels, llm_logits_dot_general_cls=cpu_kernels)


class NVILAModel:
    """A ready-to-run NVILA. Parameters stay a plain pytree (`self.params`), passed to jitted programs, with the
    LLM's layers one subtree each (the `NVILA(scan_layers=False)` layout; stacked trees are split on the way in).

    `suppressed_token_ids` (stored as a sorted tuple) are vocabulary ids that must never be generated: rows
    that the checkpoint never trained (embedding tables padded to the tokenizer's length by the converter) and
    rows without a token. `nvila_jax.load_pretrained` passes the converted checkpoint's list (its
    generation_config.json `suppress_tokens`); sampling is to mask their logits, `score` returns raw logits for
    every id.

    With a `mesh` (nvila_jax.sharding.make_mesh) the parameters are placed in their shards and every program
    runs on the mesh, across processes too.
    """

    def __init__(self, config: NVILAConfig, params: Any, tokenizer: NVILATokenizer, dtype: Any = jnp.float32,
                 suppressed_token_ids: Sequence[int] = (), mesh: Mesh | None = None):
        for name, tid in (("image", config.image_token_id), ("video", config.video_token_id)):
            have = getattr(tokenizer, f"{name}_token_id")
            if tid != have:
                raise ValueError(f"config {name}_token_id={tid} but the tokenizer's <{name}> token is {have}")
        if len(tokenizer) > config.llm.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the LLM only {config.llm.vocab_size} rows")
        self.config = config
        self.mesh = mesh
        placed = nn.meta.unbox(params) if mesh is None else sharding.shard_params(params, config, mesh)
        self.params = unstack_layer_params(placed)  # one array per LLM layer: decoding reads each weight once
        self.tokenizer = tokenizer
        self.module = inference_module(config, dtype, one_device=mesh is None)
        self.suppressed_token_ids = tuple(sorted({int(i) for i in suppressed_token_ids}))
        bad = [i for i in self.suppressed_token_ids if not 0 <= i < config.llm.vocab_size]
        if bad:
            raise ValueError(f"suppressed_token_ids {bad} are outside the vocabulary of {config.llm.vocab_size}")

    @contextlib.contextmanager
    def on_mesh(self) -> Iterator[None]:
        """Device work runs inside: programs traced here follow the mesh and the logical axis rules."""
        with sharding.activate(self.mesh) if self.mesh is not None else contextlib.nullcontext():
            yield

    # ------------------------------------------------------------------ device programs (cached per shape)
    @functools.partial(jax.jit, static_argnums=(0,))
    def _tile_tokens(self, params, pixels):
        return self.module.apply({"params": params}, pixels, method=NVILA.tile_tokens)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def _s2_tokens(self, params, pixels, grid):
        return self.module.apply({"params": params}, pixels, grid, method=NVILA.s2_image_tokens)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _video_tokens(self, params, frames):
        return self.module.apply({"params": params}, frames, method=NVILA.video_tokens)

    @functools.partial(jax.jit, static_argnums=(0,))
    def _all_logits(self, params, ids, visual_index, visual, positions, segments):
        def run(m):
            hidden, _ = m(ids, visual_index, visual, positions, segments)
            return m.logits(hidden)

        return nn.apply(run, self.module)({"params": params})

    def visual_tokens(self, request: Request) -> jax.Array:
        """All visual tokens of a request in sequence order: [M, D]."""
        img_id = self.config.image_token_id
        out = []
        for tid, idx in request.fused.media_order:
            if tid == img_id:
                tiles = request.images[idx]
                if tiles.grid is not None:
                    out.append(self._s2_tokens(self.params, tiles.pixels, tuple(tiles.grid)))
                else:
                    out.append(self._tile_tokens(self.params, tiles.pixels).reshape(-1, self.config.llm.hidden_size))
            else:
                out.append(self._video_tokens(self.params, request.video))
        if not out:
            return jnp.zeros((0, self.config.llm.hidden_size), jnp.float32)
        return jnp.concatenate(out)

    # ------------------------------------------------------------------ public API
    def prepare(self, prompt: str, images: Sequence[ImageLike] = (), video: VideoLike | None = None,
                num_frames: int | None = None) -> Request:
        return prepare_request(self.config, self.tokenizer, prompt, images, video, num_frames)

    def score(self, prompt: str, images: Sequence[ImageLike] = (), video: VideoLike | None = None,
              num_frames: int | None = None) -> np.ndarray:
        """float32 logits [L, vocab] of the whole fused sequence (same prompt construction as `generate`)."""
        req = self.prepare(prompt, images, video, num_frames)
        ids = jnp.asarray(req.fused.input_ids)[None]
        vi = jnp.asarray(req.fused.visual_index)[None]
        pos = jnp.arange(req.length, dtype=jnp.int32)[None]
        with self.on_mesh():
            logits = self._all_logits(self.params, ids, vi, self.visual_tokens(req), pos, jnp.ones_like(ids))
        return to_host(logits)[0]

    @functools.cached_property
    def engine(self) -> Engine:
        """The generation engine; its compiled programs are reused by every later call."""
        shardings = None if self.mesh is None else functools.partial(sharding.kv_cache_shardings, self.mesh)
        return Engine(self.config, self.module, self.tokenizer.stop_token_ids, self.tokenizer.pad_token_id,
                      self.suppressed_token_ids, cache_shardings=shardings)

    def generate(self, prompt: str, images: Sequence[ImageLike] = (), video: VideoLike | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 num_frames: int | None = None, top_k: int = 0) -> str:
        """The decoded answer (greedy when temperature == 0), stopping at the checkpoint's stop tokens."""
        ids = self.generate_ids(prompt, images, video, max_new_tokens, num_frames, temperature=temperature,
                                top_p=top_p, top_k=top_k, seed=seed)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate_ids(self, prompt: str, images: Sequence[ImageLike] = (), video: VideoLike | None = None,
                     max_new_tokens: int = 64, num_frames: int | None = None, *, temperature: float = 0.0,
                     top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[int]:
        """Token ids of the answer, without the stop token."""
        request = GenerationRequest(prompt, images, video, num_frames)
        return self.generate_batch([request], max_new_tokens, temperature, top_p, top_k, seed)[0].token_ids

    def generate_batch(self, requests: Sequence[RequestLike], max_new_tokens: int = 64, temperature: float = 0.0,
                       top_p: float = 1.0, top_k: int = 0, seed: int = 0, max_batch_size: int = 8,
                       on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Answers to many requests (GenerationRequest, dict of its fields, or prompt string), run in
        left-padded batches of up to `max_batch_size` similar-length prompts; results keep the input order.

        Every request is prepared (media loaded, length checked) before any device work. Each gets the same
        sampling settings unless its GenerationRequest carries its own; with the same seed a request gives
        the same tokens alone or in a batch. `on_token(request_index, token_id)` streams tokens."""
        sampling = SamplingParams(max_new_tokens, temperature, top_p, top_k, seed)
        with self.on_mesh():
            return generate_batch(self.engine, self.params, self.config, self.tokenizer, requests, sampling,
                                  max_batch_size, on_token)
