"""Grouped-query attention forward on a CPU with a flash-style AVX-512 kernel (kernels/cpu/attention.cc).

XLA's CPU attention (nvila_jax.models.layers.blocked_attention) runs each block's two products as separate
GEMM calls and its online softmax as three passes over the logits; the kernel computes 12-row chunks of
queries against 128-key blocks with register-tiled micro-kernels, each block's keys (packed once) and values
read from L1 by every query head of its group, and skips what a mask hides (docs/kernels.md). It computes the
forward pass only; `models.layers.dot_product_attention` pairs it with the gradient of the XLA attention.
Compiled on first use by `cpu_library`; `available()` is False (logged once) without a compiler, without
AVX-512 or on another backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.kernels import cpu_library

TARGET = "nvila_attention"
MAX_HEAD_DIM = 128


def available() -> bool:
    """True when the kernel can run here: a CPU backend with AVX-512 and a working C++ compiler."""
    return cpu_library.register("attention", "NvilaAttention", TARGET, "XLA's attention")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment: jax.Array, kv_segment: jax.Array,
              q_slot: jax.Array, kv_slot: jax.Array, scale: float, causal: bool) -> jax.Array:
    """softmax(scale q k^T) v in float32: q [B,T,H,Dh], k/v head-major [B,KVH,S,Dh] (the KV cache's layout,
    read in place) -> [B,T,H,Dh]. A query sees a key when their segments are equal and non-zero and, if
    causal, the key's slot is not after the query's; a query that sees no key gives zeros
    (nvila_jax.models.layers.AttentionMask)."""
    if not available():
        raise RuntimeError("the CPU attention kernel cannot run here (see the log); use XLA's attention")
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or not k.shape[1] or h % k.shape[1]:
        raise ValueError(f"attention expects q [B, T, H, D] and k, v [B, KVH, S, D] with KVH dividing H, got "
                         f"{q.shape}, {k.shape}, {v.shape}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"the CPU attention kernel supports head sizes 1 to {MAX_HEAD_DIM}, got {d}")
    out = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    f32, i32 = (lambda x: x.astype(jnp.float32)), (lambda x: x.astype(jnp.int32))
    call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
    return call(f32(q), f32(k), f32(v), i32(q_segment), i32(kv_segment), i32(q_slot), i32(kv_slot),
                scale=np.float32(scale), causal=np.int32(causal))
