"""The FP8 recipe of NVILA's FP8 training (COAT `QLinearTE`): per-tensor scales from the absolute maximum.

E4M3 (max 448, 3 mantissa bits) for activations and weights, E5M2 (max 57344, 2 mantissa bits) for output
gradients. A tensor t is stored as q = fp8(t / s) with s = amax(|t|) / fp8_max, so its largest element
lands on the format's largest normal value; t ~= q * s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_MAX = {jnp.dtype(E4M3): 448.0, jnp.dtype(E5M2): 57344.0}
# Half a unit in the last place relative to the value: round-to-nearest's worst relative error for
# normal numbers (2**-(mantissa bits + 1)).
RELATIVE_ROUNDING = {jnp.dtype(E4M3): 2.0**-4, jnp.dtype(E5M2): 2.0**-3}


def fp8_max(dtype) -> float:
    return FP8_MAX[jnp.dtype(dtype)]


def amax(x: jax.Array) -> jax.Array:
    """max |x| in float32 (a scalar)."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def scale_from_amax(a: jax.Array, dtype) -> jax.Array:
    """s = amax / fp8_max; 1 for an all-zero tensor (any scale represents it exactly)."""
    a = jnp.asarray(a, jnp.float32)
    return jnp.where(a > 0, a / fp8_max(dtype), 1.0).astype(jnp.float32)


def quantize(x: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """fp8(x / scale), saturating: values past the format's range clip to +-max (possible with delayed
    scaling, whose scale comes from earlier steps) instead of becoming NaN."""
    m = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) / scale, -m, m).astype(dtype)


def quantize_dynamic(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(q, s) with the scale from this tensor's own amax (current scaling)."""
    s = scale_from_amax(amax(x), dtype)
    return quantize(x, s, dtype), s


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (q.astype(jnp.float32) * scale).astype(dtype)
