"""The flash-style CPU attention kernel (kernels/cpu/attention.cc) beyond the mask cases of
test_generate_attention.py: every head size and group size the variants use and sizes around its chunk and
block edges, float64 reference; dispatch from dot_product_attention; its gradient; vmap; clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import cpu_attention
from nvila_jax.models import layers
from nvila_jax.models.layers import AttentionMask, dot_product_attention, xla_attention

needs_kernel = pytest.mark.skipif(not cpu_attention.available(), reason="needs a CPU with AVX-512 and a C++ compiler")


def _inputs(b, t, s, h, kvh, d, seed=0):
    rs = np.random.RandomState(seed)
    return [rs.randn(*shape).astype(np.float32) for shape in ((b, t, h, d), (b, s, kvh, d), (b, s, kvh, d))]


def _reference(q, k, v, visible, scale):
    """float64 softmax attention with a [B, T, S] visibility matrix; rows that see nothing give zeros."""
    b, t, h, d = q.shape
    g = h // k.shape[2]
    kk, vv = (np.repeat(x.astype(np.float64), g, axis=2) for x in (k, v))
    logits = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) * scale
    logits = np.where(visible[:, None], logits, -np.inf)
    top = np.max(logits, -1, keepdims=True)
    p = np.where(visible[:, None], np.exp(logits - np.where(np.isfinite(top), top, 0)), 0.0)
    denom = p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p / np.where(denom > 0, denom, 1), vv)


@needs_kernel
@pytest.mark.parametrize("t,s,h,kvh,d", [
    (2048 // 16, 2048 // 16, 14, 2, 64),  # Qwen2.5-0.5B heads (groups of 7)
    (97, 97, 16, 16, 72),  # SigLIP-So400m heads (no grouping; 72 = 4.5 vectors)
    (130, 130, 28, 4, 128),  # Qwen2-7B heads
    (1, 300, 8, 2, 32),  # one decode query against a longer cache
    (2, 261, 6, 1, 72),  # two decode queries, 12 rows: blocks transposed as they are read, a partial last one
    (13, 129, 3, 1, 5),  # tiny head, one key past a key block
    (64, 64, 12, 12, 16),  # chunk-aligned
])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_equals_float64_attention(t, s, h, kvh, d, causal):
    q, k, v = _inputs(2, t, s, h, kvh, d, seed=t + d)
    q_slot = np.broadcast_to(np.arange(s - t, s), (2, t)).astype(np.int32)
    kv_slot = np.broadcast_to(np.arange(s), (2, s)).astype(np.int32)
    q_seg, kv_seg = np.ones((2, t), np.int32), np.ones((2, s), np.int32)
    kv_seg[1, : s // 3] = 0  # a left-padded row
    visible = (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] > 0)
    if causal:
        visible &= kv_slot[:, None, :] <= q_slot[:, :, None]
    scale = d**-0.5
    kh, vh = (layers.swap_length_and_heads(x) for x in (k, v))  # the kernel's (the cache's) [B, KVH, S, D]
    got = cpu_attention.attention(*map(jnp.asarray, (q, kh, vh, q_seg, kv_seg, q_slot, kv_slot)), scale, causal)
    np.testing.assert_allclose(np.asarray(got), _reference(q, k, v, visible, scale), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_float32_cpu_attention_runs_the_kernel_decoding_included_and_other_dtypes_do_not():
    lowered = lambda *a: jax.jit(lambda *a: dot_product_attention(*a, None, 0.3)).lower(*a).as_text()
    q, k, v = map(jnp.asarray, _inputs(1, 40, 40, 4, 2, 8))
    assert cpu_attention.TARGET in lowered(q, k, v)
    assert cpu_attention.TARGET in lowered(q[:, :1], k, v)  # a decode step's query
    assert cpu_attention.TARGET not in lowered(*(x.astype(jnp.bfloat16) for x in (q, k, v)))


@needs_kernel
def test_the_gradient_is_xla_attentions():
    """Training through the kernel: its custom VJP differentiates XLA's attention, which computes the same
    function."""
    t = 600  # past one key block: XLA's blocked path
    q, k, v = map(jnp.asarray, _inputs(1, t, t, 4, 2, 16, seed=3))
    seg = jnp.ones((1, t), jnp.int32)
    slot = jnp.arange(t, dtype=jnp.int32)[None]
    mask = AttentionMask(seg, seg, slot, slot)
    weights = jnp.asarray(np.random.RandomState(4).randn(1, t, 4, 16).astype(np.float32))
    loss = lambda fn: jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v, mask, 0.25) * weights), argnums=(0, 1, 2)))
    for got, want in zip(loss(dot_product_attention)(q, k, v), loss(xla_attention)(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(want)).max() > 1e-3


@needs_kernel
def test_vmap_over_a_leading_axis():
    q, k, v = map(jnp.asarray, _inputs(3, 20, 20, 2, 1, 8, seed=5))
    per_item = jax.vmap(lambda q, k, v: dot_product_attention(q[None], k[None], v[None], None, 0.3)[0])(q, k, v)
    np.testing.assert_allclose(np.asarray(per_item), np.asarray(xla_attention(q, k, v, None, 0.3)), atol=1e-6)


@needs_kernel
def test_bad_shapes_are_clear_errors():
    head_major = lambda *a: map(layers.swap_length_and_heads, a)  # noqa: E731
    q, k, v = map(jnp.asarray, _inputs(1, 4, 4, 3, 2, 8))
    ones = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="k, v \\[B, KVH, S, D\\] with KVH dividing H"):
        cpu_attention.attention(q, *head_major(k, v), ones, ones, ones, ones, 0.3, True)
    q, k, v = map(jnp.asarray, _inputs(1, 4, 4, 2, 2, 130))
    with pytest.raises(ValueError, match="head sizes 1 to 128, got 130"):
        cpu_attention.attention(q, *head_major(k, v), ones, ones, ones, ones, 0.3, True)
    assert not layers._cpu_kernel_applies(q, k, v)  # dot_product_attention uses XLA for such heads


def test_without_the_kernel_attention_is_xlas(monkeypatch):
    monkeypatch.setattr(cpu_attention, "available", lambda: False)
    q, k, v = map(jnp.asarray, _inputs(1, 40, 40, 4, 2, 8))
    text = jax.jit(lambda *a: dot_product_attention(*a, None, 0.3)).lower(q, k, v).as_text()
    assert cpu_attention.TARGET not in text
