"""The blocked (flash-style) XLA attention and the CPU attention kernel equal the dense one on every mask the
models build."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import cpu_attention
from nvila_jax.models import layers
from nvila_jax.models.layers import AttentionMask, blocked_attention, dense_attention, dot_product_attention


def _qkv(b, t, s, h, kvh, d, seed=0):
    rs = np.random.RandomState(seed)
    return [jnp.asarray(rs.randn(*shape).astype(np.float32) * 2) for shape in ((b, t, h, d), (b, s, kvh, d), (b, s, kvh, d))]


def _kernel(q, k, v, mask, scale):
    if mask is None:
        return jax.jit(lambda q, k, v: layers._kernel_attention(q, k, v, None, scale))(q, k, v)
    return jax.jit(lambda q, k, v, m: layers._kernel_attention(q, k, v, m, scale))(q, k, v, mask)


def _check(q, k, v, mask, rows=None, block_q=8, block_kv=16):
    """Blocked XLA attention (small blocks: every path of its loop) and, where it runs, the CPU kernel against
    dense attention; returns the blocked result."""
    want = np.asarray(dense_attention(q, k, v, mask, 0.3))
    got = np.asarray(jax.jit(lambda *a: blocked_attention(*a, 0.3, block_q, block_kv))(q, k, v, mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    if cpu_attention.available():
        kernel = np.asarray(_kernel(q, k, v, mask, 0.3))
        np.testing.assert_allclose(kernel, want, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(kernel == 0, want == 0)  # rows that see nothing: exactly zero
    return got


@pytest.mark.parametrize("t,s,h,kvh,d", [(40, 40, 4, 2, 8), (37, 37, 6, 1, 16), (64, 64, 4, 4, 8), (5, 5, 2, 2, 4)])
def test_causal_self_attention(t, s, h, kvh, d):
    q, k, v = _qkv(2, t, s, h, kvh, d)
    seg = jnp.ones((2, t), jnp.int32)
    slot = jnp.broadcast_to(jnp.arange(t), (2, t))
    _check(q, k, v, AttentionMask(seg, seg, slot, slot))


def test_no_mask_bidirectional():
    q, k, v = _qkv(3, 50, 50, 4, 4, 8)
    got = _check(q, k, v, None)
    assert np.abs(got).max() > 0.1


def test_left_padding_packing_and_fully_masked_rows_are_zero():
    t = 45
    q, k, v = _qkv(2, t, t, 4, 2, 8, seed=1)
    seg = np.ones((2, t), np.int32)
    seg[0, :19] = 0  # left padding longer than a query block: whole blocks of masked queries
    seg[1, 20:33] = 2  # a packed second sample
    seg[1, 33:] = 0
    seg = jnp.asarray(seg)
    slot = jnp.broadcast_to(jnp.arange(t), (2, t))
    got = _check(q, k, v, AttentionMask(seg, seg, slot, slot))
    assert np.all(got[0, :19] == 0) and np.all(got[1, 33:] == 0)


def test_decode_against_a_partly_filled_cache():
    """One query per row attending to a cache whose tail is unwritten (segment 0), as in decoding."""
    s = 70
    q, k, v = _qkv(3, 1, s, 4, 2, 8, seed=2)
    kv_seg = np.zeros((3, s), np.int32)
    kv_seg[:, :29] = 1
    kv_seg[1, :6] = 0  # a left-padded row
    kv_slot = jnp.broadcast_to(jnp.arange(s), (3, s))
    mask = AttentionMask(jnp.ones((3, 1), jnp.int32), jnp.asarray(kv_seg), jnp.full((3, 1), 28, jnp.int32), kv_slot)
    _check(q, k, v, mask, block_q=1)


def test_chunk_appended_to_a_cache():
    """T queries written at slots [index, index + T) of a longer cache (chunked prefill)."""
    t, s, index = 12, 48, 20
    q, k, v = _qkv(1, t, s, 6, 2, 8, seed=3)
    kv_seg = np.zeros((1, s), np.int32)
    kv_seg[:, : index + t] = 1
    mask = AttentionMask(jnp.ones((1, t), jnp.int32), jnp.asarray(kv_seg),
                         (jnp.arange(t) + index)[None], jnp.arange(s)[None])
    _check(q, k, v, mask, block_q=5, block_kv=7)


def test_bfloat16_inputs():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(1, 33, 33, 4, 2, 8, seed=4))
    seg = jnp.ones((1, 33), jnp.int32)
    slot = jnp.arange(33)[None]
    mask = AttentionMask(seg, seg, slot, slot)
    want = dense_attention(q, k, v, mask, 0.3).astype(jnp.float32)
    got = blocked_attention(q, k, v, mask, 0.3, 8, 8)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), np.asarray(want), atol=0.05)


def test_dispatch_uses_blocks_for_long_keys(monkeypatch):
    """Without the CPU kernel, dot_product_attention picks the blocked path past one key block and still
    equals dense."""
    monkeypatch.setattr(layers, "_cpu_kernel_applies", lambda *a: False)
    t = layers.ATTENTION_BLOCK_KV + 40
    q, k, v = _qkv(1, t, t, 2, 1, 8, seed=5)
    seg = jnp.ones((1, t), jnp.int32)
    slot = jnp.arange(t)[None]
    mask = AttentionMask(seg, seg, slot, slot)
    text = jax.jit(lambda *a: dot_product_attention(*a, 0.3)).lower(q, k, v, mask).as_text()
    assert "while" in text  # the blocked loops, not one [T, S] softmax
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask, 0.3)),
                               np.asarray(dense_attention(q, k, v, mask, 0.3)), atol=1e-5)


def test_dispatch_keeps_decode_steps_dense_against_a_long_cache(monkeypatch):
    """A few queries against many keys (a decode step, 2,048 cache slots): the [T, S] logits are small, so
    dense attention (one batched matmul per row and KV head) runs, not the blocked loop."""
    monkeypatch.setattr(layers, "_cpu_kernel_applies", lambda *a: False)
    q, k, v = _qkv(2, 3, 2048, 4, 2, 8, seed=7)
    seg = jnp.ones((2, 2048), jnp.int32).at[0, :100].set(0)  # a left-padded row
    mask = AttentionMask(seg[:, -3:], seg, jnp.arange(2045, 2048)[None].repeat(2, 0),
                         jnp.arange(2048)[None].repeat(2, 0))
    text = jax.jit(lambda *a: dot_product_attention(*a, 0.3)).lower(q, k, v, mask).as_text()
    assert "while" not in text
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, mask, 0.3)),
                               np.asarray(blocked_attention(q, k, v, mask, 0.3)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [layers.ATTENTION_BLOCK_KV + 44, 1100])
def test_dispatch_without_mask_uses_whole_tile_blocks(t, monkeypatch):
    """Without the CPU kernel, unmasked (vision tower) attention past one key block runs blocked, in
    ATTENTION_BLOCK_UNMASKED (1024) blocks (1100 keys: a ragged last block), and still equals dense."""
    monkeypatch.setattr(layers, "_cpu_kernel_applies", lambda *a: False)
    q, k, v = _qkv(2, t, t, 2, 1, 8, seed=6)
    text = jax.jit(lambda *a: dot_product_attention(*a, None, 0.3)).lower(q, k, v).as_text()
    assert "while" in text
    np.testing.assert_allclose(np.asarray(dot_product_attention(q, k, v, None, 0.3)),
                               np.asarray(dense_attention(q, k, v, None, 0.3)), atol=1e-5, rtol=0)
