"""Pure-JAX space-to-channel: the oracle for the kernels and the fallback on every backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def space_to_channel_reference(x: jax.Array, k: int) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H/k), ceil(W/k), k*k*C].

    Zero rows/columns are appended at the bottom/right up to a multiple of k, then each k x k block becomes
    one token whose channels are ordered by (row offset, column offset, channel), as NVILA's DownSample
    blocks do (einops `b (i m) (j n) c -> b i j (m n c)`).
    """
    b, h, w, c = x.shape
    ph, pw = -h % k, -w % k
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hk, wk = (h + ph) // k, (w + pw) // k
    x = x.reshape(b, hk, k, wk, k, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hk, wk, k * k * c)
