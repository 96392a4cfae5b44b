"""The fused SwiGLU product for many rows (prefill's gate, up and activation): silu(x @ wg) * (x @ wu) against
float64 within float32 rounding, across row tiles and their tails, contraction blocks (partial sums kept between
blocks), column panels and work items with their tails, extreme gate values, empty shapes; clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import swiglu_matmul as sm

needs_kernel = pytest.mark.skipif(not sm.available(), reason="needs a CPU with AVX-512 and a C++ compiler")


def _silu(a: np.ndarray) -> np.ndarray:
    return a / (1.0 + np.exp(-a))


def _assert_equals_float64(x: np.ndarray, wg: np.ndarray, wu: np.ndarray) -> np.ndarray:
    """The kernel's result within float32 rounding of the float64 one: each product within 1e-6 of the sum of
    its |terms|, carried through the activation (|silu'| <= 1.1), plus a few ulp of the activation itself."""
    got = np.asarray(jax.jit(sm.swiglu_matmul)(jnp.asarray(x), jnp.asarray(wg), jnp.asarray(wu)))
    x64, g64, u64 = (a.astype(np.float64) for a in (x, wg, wu))
    g, u = x64 @ g64, x64 @ u64
    want = _silu(g) * u
    bound = (1.1e-6 * (np.abs(x64) @ np.abs(g64)) * np.abs(u) + 1e-6 * np.abs(_silu(g)) * (np.abs(x64) @ np.abs(u64))
             + 1e-6 * np.abs(want) + 1e-30)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)
    return got


@needs_kernel
@pytest.mark.parametrize("m,k,f", [
    (1, 3, 5), (14, 16, 16), (15, 17, 33), (29, 448, 47),  # one row tile, a tile plus a tail, column tails
    (17, 449, 16), (40, 900, 200), (3, 1000, 17),          # two and three contraction blocks
    (1009, 64, 193), (2100, 96, 390),                      # row and column work items with tails
    (33, 896, 4864),                                       # Qwen2.5-0.5B's MLP
])
def test_equals_a_float64_product(m, k, f):
    rs = np.random.RandomState(m * 7 + k * 3 + f)
    x = rs.randn(m, k).astype(np.float32)
    wg, wu = (rs.randn(k, f).astype(np.float32) / np.sqrt(k) for _ in range(2))
    _assert_equals_float64(x, wg, wu)


@needs_kernel
def test_extreme_gates():
    """Gates from -200 to 200: the sigmoid neither overflows nor loses the sign (silu(g) -> 0 below, g above)."""
    f = 48
    x = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    wg = np.stack([np.linspace(-200, 200, f), np.zeros(f)]).astype(np.float32)
    wu = np.stack([np.ones(f), np.linspace(-3, 3, f)]).astype(np.float32)
    got = _assert_equals_float64(x, wg, wu)
    assert np.all(np.isfinite(got))
    np.testing.assert_array_equal(got[1], 0.0)  # silu(0) * u = 0


@needs_kernel
def test_empty_shapes():
    """An empty contraction gives silu(0) * 0 = 0; no rows or no columns give empty results."""
    got = jax.jit(sm.swiglu_matmul)(jnp.ones((20, 0)), jnp.ones((0, 7)), jnp.ones((0, 7)))
    np.testing.assert_array_equal(np.asarray(got), np.zeros((20, 7), np.float32))
    assert jax.jit(sm.swiglu_matmul)(jnp.ones((0, 8)), jnp.ones((8, 5)), jnp.ones((8, 5))).shape == (0, 5)
    assert jax.jit(sm.swiglu_matmul)(jnp.ones((3, 8)), jnp.ones((8, 0)), jnp.ones((8, 0))).shape == (3, 0)


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M, K\\] and wg, wu \\[K, F\\], got \\(20, 4\\), \\(5, 3\\) and "):
        sm.swiglu_matmul(jnp.ones((20, 4)), jnp.ones((5, 3)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="got \\(20, 4\\), \\(4, 3\\) and \\(4, 2\\)"):
        sm.swiglu_matmul(jnp.ones((20, 4)), jnp.ones((4, 3)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="got \\(2, 3, 4\\)"):
        sm.swiglu_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 3)), jnp.ones((4, 3)))
