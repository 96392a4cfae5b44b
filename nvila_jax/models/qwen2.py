"""Qwen2 / Qwen2.5 decoder: GQA attention with q/k/v biases, RoPE, RMSNorm, SwiGLU MLP, and an explicit
KV cache pytree that is passed in and returned (never stored in the module).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.config import Qwen2Config
from nvila_jax.kernels.backend import platform
from nvila_jax.models.layers import (KERNEL_INIT, AttentionMask, DenseKernel, Dtype, RMSNorm, dense,
                                     dot_product_attention, rematerialised, stack_layers, swap_length_and_heads)


@flax.struct.dataclass
class KVCache:
    """Keys/values of every layer for `max_length` slots, shared slot index for the batch.

    k, v: one array per layer, each [batch, kv_heads, max_length, head_dim]. Per layer, so that a decode step
    reads and writes each layer's keys in place (slices of one [layers, ...] array were copied by XLA at
    every step); head-major, so that each (row, KV head) is the contiguous [slots, head_dim] matrix that the
    attention matmuls read (slot-major made XLA transpose every layer's cache at every step).
    segment_ids: [batch, max_length], 0 where a slot is empty or padding; index: the next slot to write
    (rows are left-padded so they share it).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def init(cls, config: Qwen2Config, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> "KVCache":
        """An empty cache, every array made by one compiled call (2 x layers + 2 eager `jnp.zeros` dispatches
        took 12-13 ms of each generate call for Qwen2.5-0.5B on a CPU, the compiled call 4-6 ms)."""
        shape = (batch, config.num_key_value_heads, max_length, config.head_dim)
        return _empty_cache(cls, config.num_hidden_layers, shape, jnp.dtype(dtype))

    @property
    def max_length(self) -> int:
        return self.segment_ids.shape[1]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_cache(cls: type[KVCache], layers: int, shape: tuple[int, int, int, int], dtype: jnp.dtype) -> KVCache:
    return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
               v=tuple(jnp.zeros(shape, dtype) for _ in range(layers)),
               segment_ids=jnp.zeros((shape[0], shape[2]), jnp.int32), index=jnp.zeros((), jnp.int32))


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """1 / theta^(2i/d) in float32, computed the way HF does (float32 exponent, float32 power)."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


class RotaryTables(NamedTuple):
    """cos and sin of each position's rotary angles, [B, T, 1, Dh] each (broadcast over the heads)."""

    cos: jax.Array
    sin: jax.Array

    def last(self) -> RotaryTables:
        return RotaryTables(self.cos[:, -1:], self.sin[:, -1:])


def rotary_tables(positions: jax.Array, head_dim: int, theta: float, dtype: Dtype) -> RotaryTables:
    """The rotary tables of positions [B, T], built once per forward and shared by every layer.

    On a CPU they are built inside a conditional, a boundary XLA's fusion does not cross: left alone, XLA
    fuses cos and sin into each layer's rotation of q and k and evaluates them for every element of every
    head (3.9 ms of a 2,048-token layer's rotations instead of 0.7; an optimization barrier is removed
    before fusion). Both branches are the same; the predicate only has to be unknown when compiling."""

    def build(p: jax.Array) -> RotaryTables:
        inv = jnp.asarray(rope_inverse_frequencies(head_dim, theta))
        angles = p.astype(jnp.float32)[..., None] * inv  # [B, T, Dh/2]
        angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
        return RotaryTables(jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype))

    if platform() != "cpu":
        return build(positions)
    return jax.lax.cond(jnp.all(positions >= 0), build, build, positions)


def apply_rope(x: jax.Array, rope: RotaryTables) -> jax.Array:
    """Rotary embedding with the rotate-half layout. x [B, T, H, Dh]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * rope.cos + jnp.concatenate([-x2, x1], axis=-1) * rope.sin


class Qwen2DecoderLayer(nn.Module):
    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x, layer_cache, rope: RotaryTables, mask: AttentionMask, cache_index, last_only: bool = False):
        """x [B, T, D] -> (x, layer_cache). layer_cache: None, or this layer's (keys, values) [B, KVH, S, Dh]
        from `KVCache`, into which the T new keys and values are written at slots [cache_index,
        cache_index + T) before attending.

        `last_only`: keys and values of every position (they fill the cache), everything else only for the
        last one; the output is [B, 1, D]. The last layer of a prefill needs nothing more."""
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        big = dict(kw, dot_general_cls=self.dot_general_cls)
        h = RMSNorm(c.rms_norm_eps, name="input_layernorm", **kw)(x)
        k = dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj", **big)(h)
        v = dense((c.num_key_value_heads, c.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj", **big)(h)
        k = apply_rope(k, rope)
        if last_only:
            x, h, rope = x[:, -1:], h[:, -1:], rope.last()
            mask = dataclasses.replace(mask, q_segment=mask.q_segment[:, -1:], q_slot=mask.q_slot[:, -1:])
        q = dense((c.num_attention_heads, c.head_dim), ("embed", "q_heads", "head_dim"), name="q_proj", **big)(h)
        q = nn.with_logical_constraint(apply_rope(q, rope), ("batch", "length", "q_heads", "head_dim"))
        if layer_cache is not None:
            layer_cache = tuple(
                jax.lax.dynamic_update_slice(cached, swap_length_and_heads(new).astype(cached.dtype),
                                             (0, 0, cache_index, 0))
                for cached, new in zip(layer_cache, (k, v)))
            k, v = (swap_length_and_heads(cached) for cached in layer_cache)
        k = nn.with_logical_constraint(k, ("batch", "kv_length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "kv_length", "kv_heads", "head_dim"))
        attn = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask, c.head_dim**-0.5)
        residual_add = getattr(self.dot_general_cls, "residual_add", None)  # x + h @ kernel in one call

        def add_dense(x, h, in_shape: tuple[int, ...], axes: tuple[str, ...], name: str) -> jax.Array:
            """x + a bias-free dense layer of h's trailing `in_shape` axes (the residual stream's updates)."""
            if residual_add is None:
                axis = tuple(range(-len(in_shape), 0))
                return x + dense(c.hidden_size, axes, axis=axis, use_bias=False, name=name, **big)(h)
            kernel = DenseKernel((*in_shape, c.hidden_size), axes, self.param_dtype, name=name)()
            return residual_add(x, h, kernel, self.dtype)

        x = add_dense(x, attn, (c.num_attention_heads, c.head_dim), ("q_heads", "head_dim", "embed"), "o_proj")
        h = RMSNorm(c.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
        fused_swiglu = getattr(self.dot_general_cls, "swiglu", None)  # gate, up and activation in one call
        if fused_swiglu is None:
            gate = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="gate_proj", **big)(h)
            up = dense(c.intermediate_size, ("embed", "mlp"), use_bias=False, name="up_proj", **big)(h)
            act = jax.nn.silu(gate) * up
        else:
            wg, wu = (DenseKernel((c.hidden_size, c.intermediate_size), ("embed", "mlp"), self.param_dtype,
                                  name=name)() for name in ("gate_proj", "up_proj"))
            act = fused_swiglu(h, wg, wu, self.dtype)
        act = nn.with_logical_constraint(act, ("batch", "length", "mlp"))
        x = add_dense(x, act, (c.intermediate_size,), ("mlp", "embed"), "down_proj")
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), layer_cache


class Qwen2LM(nn.Module):
    """Embedding, decoder stack, final norm and LM head (tied to the embedding when the config says so).

    `scan_layers=True` (training) keeps every decoder weight in one array stacked over layers, scanned: one
    compiled layer, whatever the depth. `scan_layers=False` (inference) keeps one array per layer
    ("layers_0", "layers_1", ...; see `unstack_layer_params`): a scan slices the stacked weights, and XLA
    copies each slice before its matmul, which is a full extra read and write of the weights per decode step.
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    dot_general_cls: Any = None  # the decoder layers' linears (FP8 training, weight-only FP8, decode kernel)
    logits_dot_general_cls: Any = None  # the LM head's product, tied ([B, D] x [vocab, D]^T) or not
    scan_layers: bool = True

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(KERNEL_INIT, ("vocab", "embed")),
        )
        # The carry holds the hidden states and the KV cache; rotary tables, mask and cache index are broadcast.
        layer_args = (c, self.dtype, self.param_dtype, self.dot_general_cls)
        if self.scan_layers:
            stack = stack_layers(Qwen2DecoderLayer, c.num_hidden_layers, self.remat,
                                 (0, nn.broadcast, nn.broadcast, nn.broadcast))  # caches scanned over
            self.layers = stack(*layer_args)
        else:
            layer_cls = rematerialised(Qwen2DecoderLayer, self.remat, static_argnums=(6,))  # last_only
            self.layers = [layer_cls(*layer_args) for _ in range(c.num_hidden_layers)]  # layers_0, layers_1, ...
        self.norm = RMSNorm(c.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)
        if not c.tie_word_embeddings:
            self.lm_head = dense(c.vocab_size, ("embed", "vocab"), use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype, dot_general_cls=self.logits_dot_general_cls)

    def embed(self, ids: jax.Array) -> jax.Array:
        return self.embed_tokens(ids)

    def decoder_layers(self, x: jax.Array, caches, rope: RotaryTables, mask: AttentionMask, cache_index,
                       last_only: bool = False):
        """The decoder stack, scanned or one layer after another: (x, caches) with caches None or the
        per-layer (keys, values) of `KVCache`. `last_only`: the output holds the last position only, and the
        unrolled stack's last layer computes nothing else (see Qwen2DecoderLayer). The scanned stack stacks
        the caches for the scan and splits them after it (copies; inference runs the unrolled stack)."""
        if self.scan_layers:
            stacked = None if caches is None else tuple(jnp.stack(c) for c in caches)
            x, stacked = self.layers(x, stacked, rope, mask, cache_index)
            caches = None if stacked is None else tuple(tuple(c) for c in stacked)
            return (x[:, -1:] if last_only else x), caches
        new = []
        for i, layer in enumerate(self.layers):
            layer_cache = None if caches is None else (caches[0][i], caches[1][i])
            x, layer_cache = layer(x, layer_cache, rope, mask, cache_index, last_only and i == len(self.layers) - 1)
            new.append(layer_cache)
        return x, (None if caches is None else tuple(zip(*new)))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits of hidden states [..., D] -> [..., vocab]."""
        if self.config.tie_word_embeddings:
            # hidden @ table^T contracted in place: Embed.attend's `table.T` makes XLA copy the whole
            # [vocab, D] table on every call (a full extra read and write per decode step).
            table = jnp.asarray(self.embed_tokens.embedding, self.dtype)
            h = hidden.astype(self.dtype)
            dot_general = self.logits_dot_general_cls() if self.logits_dot_general_cls else jax.lax.dot_general
            out = dot_general(h, table, (((h.ndim - 1,), (1,)), ((), ())))
        else:
            out = self.lm_head(hidden)
        return out.astype(jnp.float32)

    def __call__(
        self,
        inputs_embeds: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final hidden states [B, T, D] (after the norm; [B, 1, D] of the last position with `last_only`) and
        the updated cache.

        Without a cache the T tokens attend causally within their segment (packed rows work). With a cache the
        tokens are written at slots [cache.index, cache.index + T) and attend to every earlier valid slot.
        """
        b, t = segment_ids.shape
        x = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ("batch", "length", "embed"))
        q_slot = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rope = rotary_tables(positions, self.config.head_dim, self.config.rope_theta, self.dtype)
        if cache is None:
            mask = AttentionMask(segment_ids, segment_ids, q_slot, q_slot)
            x, _ = self.decoder_layers(x, None, rope, mask, 0, last_only)
            return self.norm(x), None
        seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        kv_slot = jnp.broadcast_to(jnp.arange(cache.max_length, dtype=jnp.int32), seg.shape)
        mask = AttentionMask(segment_ids, seg, q_slot + cache.index, kv_slot)
        x, (k, v) = self.decoder_layers(x, (cache.k, cache.v), rope, mask, cache.index, last_only)
        return self.norm(x), KVCache(k=k, v=v, segment_ids=seg, index=cache.index + t)


def unstack_layer_params(params: Any) -> Any:
    """NVILA (or Qwen2LM) parameters with the LLM's stacked "layers" split into "layers_0", "layers_1", ...,
    the layout of `scan_layers=False`; parameters already in that layout are returned as they are.

    Each per-layer array keeps its parameter's sharding (minus the layer axis). The stacked arrays are not
    freed here: the caller's tree still holds them.
    """
    llm = params["llm"] if "llm" in params else params
    if "layers" not in llm:
        return params
    stacked = llm["layers"]
    count = jax.tree.leaves(stacked)[0].shape[0]

    def split(a: jax.Array) -> tuple[jax.Array, ...]:
        sharding = getattr(a, "sharding", None)
        out = None
        if isinstance(sharding, jax.sharding.NamedSharding):
            per_layer = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
            out = (per_layer,) * count
        return jax.jit(lambda x: tuple(x[i] for i in range(count)), out_shardings=out)(a)

    parts = jax.tree.map(split, stacked)
    layers = {f"layers_{i}": jax.tree.map(lambda p: p[i], parts, is_leaf=lambda p: isinstance(p, tuple))
              for i in range(count)}
    new_llm = {k: v for k, v in llm.items() if k != "layers"} | layers
    return {**params, "llm": new_llm} if "llm" in params else new_llm
