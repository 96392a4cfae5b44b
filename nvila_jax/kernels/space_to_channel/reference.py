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


def space_to_channel_layer_norm_reference(
    x: jax.Array, k: int, scale: jax.Array, bias: jax.Array, eps: float
) -> jax.Array:
    """LayerNorm over the k*k*C channels of STC(x), as the projector's first two layers compute it.

    Statistics in float32 with the centred (two-pass) variance of torch.nn.LayerNorm; padded positions
    are zeros inside each token's vector, so they take part in its mean and variance. Output in x.dtype.
    """
    s = space_to_channel_reference(x, k).astype(jnp.float32)
    mean = jnp.mean(s, axis=-1, keepdims=True)
    centred = s - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype)
