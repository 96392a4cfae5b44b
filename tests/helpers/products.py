"""The exactness check of the matmul kernels: a float32 product against float64, within float32 rounding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def assert_equals_float64_product(matmul, m: int, k: int, n: int, transposed: bool) -> None:
    """matmul(x [m, k], w, transposed) under jit, w stored [k, n] or, transposed, [n, k], equals x @ w in
    float64 within 1e-6 of the sum of |terms| (float32 rounding grows with it)."""
    rs = np.random.RandomState(m * 1000 + k + n)
    x, w = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
    stored = np.ascontiguousarray(w.T) if transposed else w
    got = np.asarray(jax.jit(matmul, static_argnums=2)(jnp.asarray(x), jnp.asarray(stored), transposed))
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)
    assert got.shape == (m, n)
    assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30)
