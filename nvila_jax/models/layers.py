"""Building blocks shared by the vision tower, projector and LLM: dense layers and norms that carry
logical axis names, attention with segment/slot masking, and layer stacking (scan + remat).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.kernels import cpu_attention
from nvila_jax.kernels.backend import platform
from nvila_jax.kernels.fp8.linear import FP8_META
from nvila_jax.sharding import per_device_attention

Dtype = Any
KERNEL_INIT = nn.initializers.normal(stddev=0.02)

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


class _DenseAxes(nn.LogicallyPartitioned):
    """flax's logical box for DenseGeneral kernels and biases. DenseGeneral initialises them flattened to 2-D
    and unboxes once before reshaping; with a mesh active, flax would then constrain the flat array with the
    N-d names (a rank error), so the constraint applies only once the value has its real rank."""

    def unbox(self, apply_constraint: bool = True) -> Any:
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _dense_axes(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    return lambda *args, **kwargs: _DenseAxes(init(*args, **kwargs), axes)


class DenseKernel(nn.Module):
    """The kernel alone of a bias-free `dense` layer (same parameter name, shape, initial values and logical
    axes), for callers that multiply it themselves: a fused kernel taking two layers' weights at once, or
    one that adds the product to a residual stream in the same call."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    param_dtype: Dtype

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", _dense_axes(KERNEL_INIT, self.axes), self.shape, self.param_dtype)


def dense(
    features: int | Sequence[int],
    axes: tuple[str | None, ...],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
    use_bias: bool = True,
    axis: int | Sequence[int] = -1,
    dot_general_cls: Any = None,
) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel (and bias) carry the logical axis names `axes` (input dims, then output)."""
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_dense_axes(KERNEL_INIT, axes),
        bias_init=_dense_axes(nn.initializers.zeros_init(), axes[-n_out:]),
        dot_general_cls=dot_general_cls,
        name=name,
    )


def layer_norm(eps: float, axis_name: str, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (HF order of operations)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, described by small per-token arrays instead of a [T, S] matrix.

    A query sees a key when both have the same non-zero segment id and, if causal, the key's slot is not
    after the query's. Segment 0 marks padding; packed samples use different segment ids; a KV cache marks
    its unwritten slots with 0.
    """

    q_segment: jax.Array  # [B, T] int32
    kv_segment: jax.Array  # [B, S] int32
    q_slot: jax.Array  # [B, T] int32
    kv_slot: jax.Array  # [B, S] int32
    causal: bool = True

    @classmethod
    def all_visible(cls, batch: int, queries: int, keys: int) -> AttentionMask:
        """Every query sees every key (no mask: the vision tower), for code that needs the arrays."""
        zeros_q, zeros_kv = jnp.zeros((batch, queries), jnp.int32), jnp.zeros((batch, keys), jnp.int32)
        return cls(zeros_q + 1, zeros_kv + 1, zeros_q, zeros_kv, causal=False)

    def dense(self) -> jax.Array:
        """The [B, T, S] boolean mask."""
        m = (self.q_segment[:, :, None] == self.kv_segment[:, None, :]) & (self.kv_segment[:, None, :] > 0)
        if self.causal:
            m &= self.kv_slot[:, None, :] <= self.q_slot[:, :, None]
        return m


jax.tree_util.register_dataclass(
    AttentionMask, data_fields=["q_segment", "kv_segment", "q_slot", "kv_slot"], meta_fields=["causal"]
)


# Key/query block sizes of the blocked attention (tuned on a 2-core AVX-512 CPU; see docs/inference.md):
# small blocks let a mask skip work; without a mask (the vision tower) there is nothing to skip and a whole
# 1024-token tile in one block runs fastest.
ATTENTION_BLOCK_Q = 512
ATTENTION_BLOCK_KV = 512
ATTENTION_BLOCK_UNMASKED = 1024
_MASKED = float(jnp.finfo(jnp.float32).min)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """Grouped-query attention, softmax in float32. q [B,T,H,Dh], k/v [B,S,KVH,Dh] -> [B,T,H,Dh].

    Exact either way; a query that sees no key gets zeros. On a CPU with AVX-512, float32 attention (prefill,
    decode steps, the vision tower) runs the flash-style C++ kernel (nvila_jax.kernels.cpu_attention;
    gradients from `xla_attention`); other dtypes and backends `xla_attention`. Work that XLA cannot split by
    rows runs per device under a mesh.
    """
    if _cpu_kernel_applies(q, k, v):
        return per_device_attention(_kernel_attention)(q, k, v, mask, scale)
    if _dense_fits(q, k):
        return dense_attention(q, k, v, mask, scale)
    return per_device_attention(xla_attention)(q, k, v, mask, scale)  # its loop cannot be split by XLA


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float) -> jax.Array:
    """Attention in XLA: dense while one head's [T, S] logits fit one query block x key block (decode steps
    against a long cache included); blocked (online softmax, never a [T, S] matrix, blocks no query can see
    skipped) past it."""
    if _dense_fits(q, k):
        return dense_attention(q, k, v, mask, scale)
    if mask is None:
        return blocked_attention(q, k, v, None, scale, ATTENTION_BLOCK_UNMASKED, ATTENTION_BLOCK_UNMASKED)
    return blocked_attention(q, k, v, mask, scale)


def swap_length_and_heads(x: jax.Array) -> jax.Array:
    """[B, S, H, D] <-> [B, H, S, D]: attention's operand layout and the head-major one its matmuls read (the
    KV cache's); a transpose applied twice cancels, so no copy is made of a cache read this way."""
    return x.transpose(0, 2, 1, 3)


def _dense_fits(q: jax.Array, k: jax.Array) -> bool:
    return q.shape[1] * k.shape[1] <= ATTENTION_BLOCK_Q * ATTENTION_BLOCK_KV


def _cpu_kernel_applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    return (platform() == "cpu"
            and q.dtype == k.dtype == v.dtype == jnp.float32 and q.shape[-1] <= cpu_attention.MAX_HEAD_DIM
            and cpu_attention.available())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _kernel_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """The CPU kernel's forward pass; the gradient is `xla_attention`'s (same function, same numbers up to
    float32 rounding)."""
    if mask is None:
        mask = AttentionMask.all_visible(q.shape[0], q.shape[1], k.shape[1])
    return cpu_attention.attention(q, swap_length_and_heads(k), swap_length_and_heads(v), mask.q_segment,
                                   mask.kv_segment, mask.q_slot, mask.kv_slot, scale, causal=mask.causal)


def _kernel_attention_fwd(q, k, v, mask, scale):
    return _kernel_attention(q, k, v, mask, scale), (q, k, v, mask)


def _kernel_attention_bwd(scale, residuals, grad):
    q, k, v, mask = residuals
    _, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask, scale), q, k, v)
    return (*vjp(grad), None)


_kernel_attention.defvjp(_kernel_attention_fwd, _kernel_attention_bwd)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float) -> jax.Array:
    """The whole [T, S] softmax at once: the reference for `blocked_attention`, and fastest for short keys.
    Written as matmuls batched over (row, KV head) with that pair leading, each head's queries (group x
    time) as rows: XLA's CPU dot then needs no transposed copies beyond moving KV heads before keys, which
    vanishes against the KV cache's head-major layout (2-3x faster on a CPU than contracting in place)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kvh, g * t, d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, swap_length_and_heads(k), preferred_element_type=jnp.float32)
    logits = logits * scale
    if mask is not None:  # [B, T, S] -> [B, 1, G * T, S], the rows of the logits (not the logits reshaped:
        # a softmax over a 5-D view is ~1.6x slower in XLA on a CPU)
        visible = jnp.broadcast_to(mask.dense()[:, None, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
        logits = jnp.where(visible, logits, _MASKED)
    probs = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        probs = jnp.where(visible.any(-1, keepdims=True), probs, 0.0)
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(v.dtype), swap_length_and_heads(v),
                     preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d).astype(q.dtype)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad) if size != x.shape[axis] else x


def blocked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: AttentionMask | None,
    scale: float,
    block_q: int = ATTENTION_BLOCK_Q,
    block_kv: int = ATTENTION_BLOCK_KV,
) -> jax.Array:
    """Flash-style attention: per (query block, batch row, KV head) a loop over key blocks with an online
    softmax in float32. Work items are plain 2-D matmuls (the CPU runtime multi-threads those, not batched
    ones). Per key block one of three paths: skipped when the mask rules out every key in it for every
    query of the block (padding, unwritten cache slots, the future under a causal mask); unmasked when every
    query of the block sees every key in it (below the causal diagonal, inside one segment), which saves
    building and applying the mask; masked otherwise. Keys and values are read block by block (a KV cache
    where it lies); a ragged last block overlaps the one before it, with the overlap masked.
    Same shapes and semantics as `dense_attention`."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    if mask is None:
        mask = AttentionMask.all_visible(b, t, s)
    bq, bk = min(block_q, t), min(block_kv, s)
    nq, nk = -(-t // bq), -(-s // bk)
    q = _pad_to(q, 1, nq * bq)  # padded queries have segment 0: they see nothing and come out as zeros
    q_seg, q_slot = (_pad_to(a, 1, nq * bq).reshape(b, nq, bq) for a in (mask.q_segment, mask.q_slot))
    kv_seg, kv_slot = (_pad_to(a, 1, nk * bk).reshape(b, nk, bk) for a in (mask.kv_segment, mask.kv_slot))
    never, always = jnp.iinfo(jnp.int32).max, jnp.iinfo(jnp.int32).min
    # Per query block and per key block: the range of segments, and of the slots of valid positions.
    q_last = jnp.where(q_seg > 0, q_slot, -1).max(-1)  # [b, nq]; -1: no valid query
    q_first = jnp.where(q_seg > 0, q_slot, never).min(-1)
    q_one_segment = (q_seg.min(-1) == q_seg.max(-1)) & (q_seg.min(-1) > 0)
    kv_first = jnp.where(kv_seg > 0, kv_slot, never).min(-1)  # [b, nk]
    kv_last = jnp.where(kv_seg > 0, kv_slot, always).max(-1)
    kv_live = (kv_seg > 0).any(-1)
    kv_one_segment = kv_seg.min(-1) == kv_seg.max(-1)
    items = q.reshape(b, nq, bq, kvh, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(nq * b * kvh, bq * g, d)
    # Key and value blocks are sliced from [B, KVH, S, D]: contiguous blocks, and no copy at all when k and v
    # come from the head-major KV cache (the transposes cancel); slicing [B, S, KVH, D] through such a
    # transpose made XLA rebuild the whole array for every block.
    k_by_head, v_by_head = swap_length_and_heads(k), swap_length_and_heads(v)
    index = jnp.arange(nq * b * kvh)
    contract_last = (((1,), (1,)), ((), ()))
    # One item at a time on a CPU (each item's matmuls use every core; skipped blocks cost nothing); all at
    # once elsewhere (an accelerator needs the batch; a branch then runs as a select, so every block takes
    # the masked path alone: choosing among paths would compute them all).
    on_cpu = platform() == "cpu"

    def attend(args):
        qi, n = args
        iq, ib, ih = n // (b * kvh), (n // kvh) % b, n % kvh
        qs, qsl = q_seg[ib, iq], q_slot[ib, iq]

        def update(j, carry, masked: bool):
            acc, run_max, denom = carry
            start = jnp.minimum(j * bk, s - bk)
            kj, vj = (jax.lax.dynamic_slice(x, (ib, ih, start, 0), (1, 1, bk, d)).reshape(bk, d)
                      for x in (k_by_head, v_by_head))
            logits = jax.lax.dot_general(qi, kj, contract_last, preferred_element_type=jnp.float32)
            if masked:
                ks = jax.lax.dynamic_slice(mask.kv_segment[ib], (start,), (bk,))
                ksl = jax.lax.dynamic_slice(mask.kv_slot[ib], (start,), (bk,))
                new = start + jnp.arange(bk) >= j * bk  # not already seen in the previous block
                seen = (qs[:, None] == ks[None, :]) & ((ks > 0) & new)[None, :]
                if mask.causal:
                    seen &= ksl[None, :] <= qsl[:, None]
                logits = jnp.where(seen[:, None, :], logits.reshape(bq, g, bk), _MASKED).reshape(bq * g, bk)
            # Maxima of unscaled logits (scale > 0 keeps the order): the scale joins the exponent's pass.
            new_max = jnp.maximum(run_max, logits.max(-1))
            p = jnp.exp((logits - new_max[:, None]) * scale)
            correction = jnp.exp((run_max - new_max) * scale)
            pv = jnp.dot(p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return acc * correction[:, None] + pv, new_max, denom * correction + p.sum(-1)

        def step(j, carry):
            live = kv_live[ib, j] & (q_last[ib, iq] >= 0)
            whole = (q_one_segment[ib, iq] & kv_one_segment[ib, j] & (kv_seg[ib, j, 0] == qs[0])
                     & (j * bk + bk <= s))  # the ragged last block overlaps its predecessor: masked
            if mask.causal:
                live &= kv_first[ib, j] <= q_last[ib, iq]
                whole &= kv_last[ib, j] <= q_first[ib, iq]
            if not on_cpu:
                return jax.lax.cond(live, lambda c: update(j, c, True), lambda c: c, carry)
            path = jnp.where(live, jnp.where(whole, 2, 1), 0)
            return jax.lax.switch(path, [lambda c: c, lambda c: update(j, c, True), lambda c: update(j, c, False)],
                                  carry)

        rows = bq * g
        init = (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), _MASKED, jnp.float32),
                jnp.zeros((rows,), jnp.float32))
        acc, run_max, denom = jax.lax.fori_loop(0, nk, step, init)
        seen_any = run_max > _MASKED
        return jnp.where(seen_any[:, None], acc / jnp.where(seen_any, denom, 1.0)[:, None], 0.0)

    if on_cpu:
        out = jax.lax.map(attend, (items, index))
    else:
        out = jax.vmap(attend)((items, index))
    out = out.reshape(nq, b, kvh, bq, g, d).transpose(1, 0, 3, 2, 4, 5).reshape(b, nq * bq, h, d)
    return out[:, :t].astype(q.dtype)


def rematerialised(layer_cls: type[nn.Module], remat: str, static_argnums: tuple[int, ...] = ()) -> type[nn.Module]:
    """`layer_cls` wrapped to recompute its activations in the backward pass under the named policy.
    `static_argnums` (positions in `__call__`, self = 0) are Python values, not traced."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[remat], prevent_cse=False, static_argnums=static_argnums)


def stack_layers(
    layer_cls: type[nn.Module],
    num_layers: int,
    remat: str,
    in_axes: tuple[Any, ...],
) -> type[nn.Module]:
    """Scans `layer_cls` over a stacked leading "layers" axis of its parameters (and of per-layer inputs
    with in_axes 0, such as KV caches), optionally rematerialised with a named policy."""
    return nn.scan(
        rematerialised(layer_cls, remat),
        variable_axes={"params": 0, FP8_META: 0},  # FP8 amax histories (delayed scaling) are per layer
        split_rngs={"params": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
