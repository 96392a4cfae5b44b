"""The OpenBLAS CPU kernel for products of many rows (prefill, the vision encoder): exact against float64
products for both weight layouts, split by rows (M >= N) and by columns (M < N, with column tails), empty
contractions; the product added to an operand by the GEMM (`add`); clear errors; the fallback without
scipy-openblas32 (the dispatch: test_kernels_cpu_dot_general.py)."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.products import assert_equals_float64_product
from nvila_jax.kernels import blas_matmul as bm

needs_kernel = pytest.mark.skipif(not bm.available(), reason="needs scipy-openblas32, a C++ compiler and a CPU backend")


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(17, 64, 48), (2048, 96, 130), (300, 1, 7), (333, 129, 100), (20, 64, 1000),
                                   (17, 896, 4864), (40, 31, 33), (64, 5, 65), (1, 8, 3), (3, 0, 5)])
def test_equals_a_float64_product(m, k, n, transposed):
    assert_equals_float64_product(bm.blas_matmul, m, k, n, transposed)


@needs_kernel
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("m,k,n", [(2048, 96, 130), (20, 64, 1000), (333, 129, 100), (3, 0, 5)])
def test_adds_the_product_to_an_operand(m, k, n, transposed):
    """add=r gives r + x @ w, for an intermediate r (its buffer becomes the result) and for r still read
    afterwards (XLA copies it first: the later reader and the caller's array see r unchanged)."""
    rs = np.random.RandomState(m + k + n)
    x, w, r = (rs.randn(*shape).astype(np.float32) for shape in ((m, k), (k, n), (m, n)))
    stored = np.ascontiguousarray(w.T) if transposed else w
    product = jax.jit(lambda x, w, r: (bm.blas_matmul(x, w, transposed, add=2 * r),
                                       bm.blas_matmul(x, w, transposed, add=r), r + 1))
    doubled, added, later = (np.asarray(a) for a in product(jnp.asarray(x), jnp.asarray(stored), jnp.asarray(r)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64) + 2 * np.abs(r)
    assert np.all(np.abs(doubled - (want + 2 * r)) <= 1e-6 * scale + 1e-30)
    assert np.all(np.abs(added - (want + r)) <= 1e-6 * scale + 1e-30)
    np.testing.assert_array_equal(later, r + 1)
    assert np.abs(want).max() > 1 if k else np.array_equal(added, r)


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[K, N\\], got \\(20, 4\\) and \\(5, 3\\)"):
        bm.blas_matmul(jnp.ones((20, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="w \\[N, K\\] \\(transposed\\), got \\(20, 4\\) and \\(4, 3\\)"):
        bm.blas_matmul(jnp.ones((20, 4)), jnp.ones((4, 3)), transposed=True)
    with pytest.raises(ValueError, match="got \\(2, 3, 4\\)"):
        bm.blas_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="`add` must have the product's shape \\(20, 3\\), got \\(3, 20\\)"):
        bm.blas_matmul(jnp.ones((20, 4)), jnp.ones((4, 3)), add=jnp.ones((3, 20)))


def test_without_scipy_openblas_the_kernel_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # `import scipy_openblas32` raises ImportError
    bm._openblas_flags.cache_clear()
    try:
        assert bm._openblas_flags() is None and not bm.available()
    finally:
        bm._openblas_flags.cache_clear()
