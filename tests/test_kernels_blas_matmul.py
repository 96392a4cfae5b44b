"""The OpenBLAS CPU kernel for products of many rows (prefill, the vision encoder): exact against float64
products for both weight layouts, split by rows (M >= N) and by columns (M < N, with column tails), empty
contractions; clear errors; the fallback without scipy-openblas32 (the dispatch: test_kernels_cpu_dot_general.py)."""

from __future__ import annotations

import sys

import jax.numpy as jnp
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


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M, K\\] and w \\[K, N\\], got \\(20, 4\\) and \\(5, 3\\)"):
        bm.blas_matmul(jnp.ones((20, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="w \\[N, K\\] \\(transposed\\), got \\(20, 4\\) and \\(4, 3\\)"):
        bm.blas_matmul(jnp.ones((20, 4)), jnp.ones((4, 3)), transposed=True)
    with pytest.raises(ValueError, match="got \\(2, 3, 4\\)"):
        bm.blas_matmul(jnp.ones((2, 3, 4)), jnp.ones((4, 3)))


def test_without_scipy_openblas_the_kernel_is_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy_openblas32", None)  # `import scipy_openblas32` raises ImportError
    bm._openblas_flags.cache_clear()
    try:
        assert bm._openblas_flags() is None and not bm.available()
    finally:
        bm._openblas_flags.cache_clear()
