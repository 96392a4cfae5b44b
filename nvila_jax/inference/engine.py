"""Batched generation over an explicit KV cache: vision programs, a jitted prefill and jitted decode steps.

`prefill` and `decode_steps` are pure functions of (module, params, inputs/state, cache) so that they can be
jitted as they are here or with in/out shardings on a mesh. Every shape they see is bucketed (batch, prompt
length, visual tokens, cache length), and the vision tower runs on power-of-two chunks of tiles, so a new
prompt or image size mostly reuses compiled programs. Rows are left-padded: padding has segment id 0 and
positions start at 0 on each row's first real token, so every row's last prompt token sits in the last
column and all rows write the cache at the same slot.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.config import NVILAConfig
from nvila_jax.distributed import to_host
from nvila_jax.inference.buckets import batch_bucket, bucket, power_of_two_chunks
from nvila_jax.inference.request import Request
from nvila_jax.inference.sampling import SamplingParams, greedy_tokens, row_keys, sample
from nvila_jax.kernels.backend import cpu_tuned_jit, platform
from nvila_jax.models.nvila import NVILA
from nvila_jax.models.qwen2 import KVCache

PROMPT_BUCKET_MIN = 32
VISUAL_BUCKET_MIN = 64
STOP_IDS_MULTIPLE = 4
ACCELERATOR_STEPS_PER_CALL = 8


@flax.struct.dataclass
class PrefillInputs:
    """One left-padded batch. [B, L] arrays, plus the visual tokens of the whole batch [M, D] that
    `visual_index` points into (-1 for text and padding)."""

    input_ids: jax.Array
    visual_index: jax.Array
    positions: jax.Array
    segment_ids: jax.Array
    visual_tokens: jax.Array


@flax.struct.dataclass
class DecodeState:
    """Per-row generation state ([B] arrays unless noted). `tokens` is the last chosen token and
    `positions` the position it takes when fed back; `generated` counts chosen tokens (stop included)."""

    tokens: jax.Array
    positions: jax.Array
    done: jax.Array
    generated: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seeds: jax.Array
    stop_ids: jax.Array  # [K], padded with -1 to a multiple of STOP_IDS_MULTIPLE (one compiled shape)
    suppressed: jax.Array  # [V] bool: token ids never to generate


@flax.struct.dataclass
class StepOutput:
    """What the host reads after each step: the chosen tokens [B], which rows were still generating when
    they were chosen, and which rows are done after them."""

    tokens: jax.Array
    active: jax.Array
    done: jax.Array


def advance(state: DecodeState, logits: jax.Array, sampling: bool = True) -> tuple[DecodeState, StepOutput]:
    """Chooses each row's next token from float32 logits [B, V] and updates stop bookkeeping.

    `sampling=False` (every row greedy) compiles the argmax alone: `sample` decides on the device whether any
    row samples, a conditional that a GPU resolves by a device-to-host copy, stalling every decode step."""
    if sampling:
        tokens = sample(logits, row_keys(state.seeds, state.generated), state.temperature, state.top_k,
                        state.top_p, state.suppressed)
    else:
        tokens = greedy_tokens(logits, state.suppressed)
    active = ~state.done
    generated = state.generated + active.astype(jnp.int32)
    stopped = jnp.isin(tokens, state.stop_ids)
    done = state.done | stopped | (generated >= state.max_new)
    new = state.replace(tokens=tokens, generated=generated, done=done)
    return new, StepOutput(tokens, active, done)


def prefill(module: NVILA, params: Any, inputs: PrefillInputs, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Runs the prompts through the LLM into the cache. Returns the last position's float32 logits [B, V]
    (choose the first tokens with `advance`) and the cache."""

    def run(m: NVILA):
        hidden, new_cache = m(inputs.input_ids, inputs.visual_index, inputs.visual_tokens, inputs.positions,
                              inputs.segment_ids, cache, last_only=True)
        return m.logits(hidden[:, -1]), new_cache

    return nn.apply(run, module)({"params": params})


def decode_step(module: NVILA, params: Any, state: DecodeState, cache: KVCache, sampling: bool = True):
    """Feeds each row's last token at its position and chooses the next one (`advance`'s `sampling`).
    Returns (state, cache, out)."""
    tokens = state.tokens[:, None]
    no_visual = jnp.zeros((0, module.config.llm.hidden_size), jnp.float32)

    def run(m: NVILA):
        hidden, new_cache = m(tokens, jnp.full_like(tokens, -1), no_visual, state.positions[:, None],
                              jnp.ones_like(tokens), cache)
        return m.logits(hidden[:, -1]), new_cache

    logits, cache = nn.apply(run, module)({"params": params})
    state, out = advance(state.replace(positions=state.positions + 1), logits, sampling)
    return state, cache, out


def decode_steps(module: NVILA, params: Any, state: DecodeState, cache: KVCache, sampling: bool = True,
                 steps: int = 1):
    """`steps` decode steps in one program, their outputs stacked ([steps, B] arrays). A GPU runs a 0.5B
    model's step faster than the host dispatches it (BENCHMARKS.md, GPU breakdown): several steps per
    dispatch. Rows that are done keep stepping without effect until the program ends."""
    if steps == 1:
        state, cache, out = decode_step(module, params, state, cache, sampling)
        return state, cache, jax.tree.map(lambda x: x[None], out)

    def body(carry, _):
        state, cache, out = decode_step(module, params, *carry, sampling)
        return (state, cache), out

    (state, cache), outs = jax.lax.scan(body, (state, cache), length=steps)
    return state, cache, outs


# Compiled programs. The module is a static argument (equal configs give equal modules), so every engine and
# model of the same configuration shares one compile cache.
_prefill = cpu_tuned_jit(prefill, static_argnums=(0,), donate_argnums=(3,))
_decode_steps = cpu_tuned_jit(decode_steps, static_argnums=(0, 4, 5), donate_argnums=(3,))
_advance = cpu_tuned_jit(advance, static_argnums=(2,))  # apart from prefill: once per batch size, not prompt length


@functools.partial(cpu_tuned_jit, static_argnums=(0,))
def _tile_tokens(module: NVILA, params: Any, pixels: jax.Array) -> jax.Array:
    return module.apply({"params": params}, pixels, method=NVILA.tile_tokens)


@functools.partial(cpu_tuned_jit, static_argnums=(0,))
def _tile_features(module: NVILA, params: Any, pixels: jax.Array) -> jax.Array:
    return module.apply({"params": params}, pixels, method=NVILA.tile_features)


@functools.partial(cpu_tuned_jit, static_argnums=(0, 3))
def _project_s2(module: NVILA, params: Any, maps: jax.Array, grid: tuple[int, int]) -> jax.Array:
    return module.apply({"params": params}, maps, grid, method=NVILA.project_s2)


@functools.partial(cpu_tuned_jit, static_argnums=(0,))
def _pool_video(module: NVILA, params: Any, tokens: jax.Array) -> jax.Array:
    return module.apply({"params": params}, tokens, method=NVILA.pool_video)


@functools.partial(cpu_tuned_jit, donate_argnums=(0,))
def _place(buffer: jax.Array, piece: jax.Array, offset: jax.Array) -> jax.Array:
    """Writes visual tokens [..., D] into the batch buffer [M, D] from row `offset`."""
    piece = piece.reshape(-1, buffer.shape[-1]).astype(buffer.dtype)
    return jax.lax.dynamic_update_slice(buffer, piece, (offset, jnp.zeros_like(offset)))


@dataclasses.dataclass
class BatchStats:
    """Where the time of one batch went (seconds; device work waited for at each phase's end)."""

    batch_size: int
    prompt_tokens: int  # fused prompt tokens of all rows, padding excluded
    visual_tokens: int
    vision_s: float
    prefill_s: float
    decode_s: float
    decode_tokens: int  # tokens chosen by decode steps (the first token of each row comes from prefill)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


@dataclasses.dataclass
class Generation:
    """One request's answer. finish_reason: "stop" (a stop token came; not included) or "length"."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    visual_tokens: int
    vit_tiles: int
    stats: BatchStats  # of the batch it ran in


class Engine:
    """Compiled programs of one model, reused across calls (the jit caches live as long as the engine).

    `max_tile_batch` bounds how many tiles go through the vision tower at once (a power of two).
    `cache_shardings(cache)`, when given, returns the shardings to place a new KV cache with (on a mesh).
    `steps_per_call`: decode steps per dispatch (`decode_steps`); None: 1 on a CPU, where a step outlasts
    its dispatch, ACCELERATOR_STEPS_PER_CALL elsewhere. Tokens stream in groups of that many.
    """

    def __init__(self, config: NVILAConfig, module: NVILA, stop_token_ids: Sequence[int], pad_id: int,
                 suppressed_token_ids: Sequence[int] = (), max_tile_batch: int = 16,
                 cache_shardings: Callable[[KVCache], Any] | None = None, steps_per_call: int | None = None) -> None:
        power_of_two_chunks(0, max_tile_batch)  # validates max_tile_batch
        if steps_per_call is not None and steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1 (or None: chosen by backend), got {steps_per_call}")
        self.config = config
        self.module = module
        self.pad_id = pad_id
        self.max_tile_batch = max_tile_batch
        self.cache_shardings = cache_shardings
        self.steps_per_call = steps_per_call
        stops = sorted(set(stop_token_ids))
        size = max(STOP_IDS_MULTIPLE, -(-len(stops) // STOP_IDS_MULTIPLE) * STOP_IDS_MULTIPLE)
        self.stop_ids = np.asarray(stops + [-1] * (size - len(stops)), np.int32)
        self.suppressed = np.zeros((config.llm.vocab_size,), bool)
        self.suppressed[list(suppressed_token_ids)] = True
        self.prefill = functools.partial(_prefill, module)
        self.decode_steps = functools.partial(_decode_steps, module)
        self._tile_tokens = functools.partial(_tile_tokens, module)
        self._tile_features = functools.partial(_tile_features, module)
        self._project_s2 = functools.partial(_project_s2, module)
        self._pool_video = functools.partial(_pool_video, module)

    # ------------------------------------------------------------------ vision
    def _chunked(self, fn: Callable, params: Any, pixels: np.ndarray) -> jax.Array:
        """fn over tiles [N, S, S, 3] in power-of-two chunks, concatenated."""
        outs, start = [], 0
        for size in power_of_two_chunks(pixels.shape[0], self.max_tile_batch):
            outs.append(fn(params, jnp.asarray(pixels[start:start + size])))
            start += size
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs)

    def visual_tokens(self, params: Any, requests: Sequence[Request]) -> tuple[jax.Array, list[np.ndarray]]:
        """The visual tokens of a whole batch in one buffer [M, D] (M bucketed), and per request the buffer
        row of each of its visual tokens (in the request's own visual order).

        Independent image tiles of all requests (several images, Lite tiles) go through the tower and
        projector together; each Dynamic-S2 image and each video runs on its own tiles."""
        d = self.config.llm.hidden_size
        img_id = self.config.image_token_id
        tpt = self.config.tokens_per_tile
        loose = [(r, i) for r, req in enumerate(requests) for i, t in enumerate(req.images) if t.grid is None]
        loose_index = {key: n for n, key in enumerate(loose)}
        pieces: list[tuple[jax.Array, int]] = []  # (tokens, buffer offset)
        total = 0
        if loose:
            pixels = np.concatenate([requests[r].images[i].pixels for r, i in loose])
            pieces.append((self._chunked(self._tile_tokens, params, pixels), 0))
            total = len(loose) * tpt
        rows: list[np.ndarray] = []
        for r, req in enumerate(requests):
            spans = []
            for tid, idx in req.fused.media_order:
                if tid == img_id and req.images[idx].grid is None:
                    spans.append(np.arange(tpt) + loose_index[(r, idx)] * tpt)
                    continue
                if tid == img_id:
                    tiles = req.images[idx]
                    maps = self._chunked(self._tile_features, params, tiles.pixels)
                    tokens = self._project_s2(params, maps, tuple(tiles.grid))
                else:
                    tokens = self._pool_video(params, self._chunked(self._tile_tokens, params, req.video))
                n = tokens.shape[0]
                pieces.append((tokens, total))
                spans.append(np.arange(n) + total)
                total += n
            rows.append(np.concatenate(spans).astype(np.int32) if spans else np.zeros((0,), np.int32))
            if rows[-1].shape[0] != req.fused.num_visual:
                raise RuntimeError(f"request {r}: the encoders produced {rows[-1].shape[0]} visual tokens but the "
                                   f"prompt layout expects {req.fused.num_visual}")
        if not total:
            return jnp.zeros((0, d), jnp.float32), rows
        buffer = jnp.zeros((bucket(total, VISUAL_BUCKET_MIN), d), pieces[0][0].dtype)
        for tokens, offset in pieces:
            buffer = _place(buffer, tokens, jnp.int32(offset))
        return buffer, rows

    # ------------------------------------------------------------------ batch building
    def build_inputs(self, requests: Sequence[Request], visual: jax.Array, rows: Sequence[np.ndarray],
                     batch: int) -> PrefillInputs:
        """Left-padded [batch, L] arrays (L bucketed); rows past len(requests) are all padding."""
        length = bucket(max(r.length for r in requests), PROMPT_BUCKET_MIN)
        ids = np.full((batch, length), self.pad_id, np.int32)
        vis = np.full((batch, length), -1, np.int32)
        pos = np.zeros((batch, length), np.int32)
        seg = np.zeros((batch, length), np.int32)
        for b, (req, remap) in enumerate(zip(requests, rows)):
            n = req.length
            local = req.fused.visual_index
            ids[b, length - n:] = req.fused.input_ids
            vis[b, length - n:] = np.where(local >= 0, remap[np.maximum(local, 0)] if remap.size else -1, -1)
            pos[b, length - n:] = np.arange(n)
            seg[b, length - n:] = 1
        return PrefillInputs(jnp.asarray(ids), jnp.asarray(vis), jnp.asarray(pos), jnp.asarray(seg), visual)

    def initial_state(self, requests: Sequence[Request], sampling: Sequence[SamplingParams], batch: int,
                      max_new: Sequence[int]) -> DecodeState:
        pad = batch - len(requests)
        col = lambda values, dtype, fill: jnp.asarray(np.asarray(list(values) + [fill] * pad, dtype))
        return DecodeState(
            tokens=jnp.zeros((batch,), jnp.int32),
            positions=col((r.length for r in requests), np.int32, 0),
            done=col((m == 0 for m in max_new), bool, True),
            generated=jnp.zeros((batch,), jnp.int32),
            max_new=col(max_new, np.int32, 0),
            temperature=col((s.temperature for s in sampling), np.float32, 0.0),
            top_k=col((s.top_k for s in sampling), np.int32, 0),
            top_p=col((s.top_p for s in sampling), np.float32, 1.0),
            seeds=col((s.seed for s in sampling), np.uint32, 0),
            stop_ids=jnp.asarray(self.stop_ids),
            suppressed=jnp.asarray(self.suppressed),
        )

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        params: Any,
        requests: Sequence[Request],
        sampling: Sequence[SamplingParams],
        on_token: Callable[[int, int], None] | None = None,
    ) -> tuple[list[list[int]], list[str], BatchStats]:
        """Generates for one batch of prepared requests. Returns per request the token ids (stop token
        excluded) and finish reason, and the batch's timing.

        `on_token(row, token_id)` is called for every generated token as soon as the host sees it. A
        request never grows past the model's context (`model_max_length`): it stops there with "length".
        """
        if len(requests) != len(sampling):
            raise ValueError(f"{len(requests)} requests but {len(sampling)} sampling settings")
        if not requests:
            raise ValueError("generate needs at least one request")
        limit = self.config.model_max_length
        max_new = [max(0, min(s.max_new_tokens, limit - r.length)) for r, s in zip(requests, sampling)]
        if max(max_new) == 0:
            stats = BatchStats(len(requests), sum(r.length for r in requests),
                               sum(r.fused.num_visual for r in requests), 0.0, 0.0, 0.0, 0)
            return [[] for _ in requests], ["length"] * len(requests), stats
        batch = batch_bucket(len(requests))
        t0 = time.perf_counter()
        visual, rows = self.visual_tokens(params, requests)
        visual.block_until_ready()
        t1 = time.perf_counter()
        inputs = self.build_inputs(requests, visual, rows, batch)
        cache_len = bucket(inputs.input_ids.shape[1] + max(max_new), PROMPT_BUCKET_MIN)
        cache = KVCache.init(self.config.llm, batch, cache_len, self.module.dtype)
        if self.cache_shardings is not None:
            cache = jax.device_put(cache, self.cache_shardings(cache))
        state = self.initial_state(requests, sampling, batch, max_new)
        samples = any(s.temperature > 0 for s in sampling)  # else the argmax alone is compiled (see advance)
        logits, cache = self.prefill(params, inputs, cache)
        state, first = _advance(state, logits, samples)
        per_call = self.steps_per_call or (1 if platform() == "cpu" else ACCELERATOR_STEPS_PER_CALL)
        stops = set(self.stop_ids.tolist())
        tokens: list[list[int]] = [[] for _ in requests]
        reasons = ["length"] * len(requests)
        pending = [jax.tree.map(lambda x: x[None], first)]  # StepOutputs of [steps, B]
        steps_left = max(max_new) - 1
        t2 = None
        decode_tokens = 0
        live = len(requests)
        while pending:
            if steps_left > 0:  # dispatch the next steps before reading these, so host and device overlap
                state, cache, nxt = self.decode_steps(params, state, cache, samples, per_call)
                pending.append(nxt)
                steps_left -= per_call
            out = jax.tree.map(to_host, pending.pop(0))
            if t2 is None:
                t2 = time.perf_counter()
            else:
                decode_tokens += int(out.active[:, :live].sum())
            for step, row in zip(*np.nonzero(out.active[:, :live])):  # step by step; a done row is never active
                token = int(out.tokens[step, row])
                if token in stops:
                    reasons[row] = "stop"
                    continue
                tokens[row].append(token)
                if on_token is not None:
                    on_token(int(row), token)
            if out.done[-1, :live].all():
                break
        t3 = time.perf_counter()
        stats = BatchStats(
            batch_size=len(requests),
            prompt_tokens=sum(r.length for r in requests),
            visual_tokens=sum(r.fused.num_visual for r in requests),
            vision_s=t1 - t0,
            prefill_s=t2 - t1,
            decode_s=t3 - t2,
            decode_tokens=decode_tokens,
        )
        return tokens, reasons, stats
