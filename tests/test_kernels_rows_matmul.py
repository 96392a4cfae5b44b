"""The weight-streaming CPU kernel for products of a few rows (decoding): exact against float64 products for
both weight layouts over shapes with and without whole tiles, row blocks and row groups, split by columns
and by K (the dispatch: test_kernels_cpu_dot_general.py; the build cache: test_kernels_cpu_library.py)."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from helpers.products import assert_equals_float64_product
from nvila_jax.kernels import rows_matmul as rm

needs_kernel = pytest.mark.skipif(not rm.available(), reason="needs a CPU with AVX-512 and a C++ compiler")


# w [K, N]: 1-8 rows take two-vector tiles, 9-16 one-vector tiles; narrow N (short row segments per thread)
# splits K over the threads and adds the partial sums, wide N splits columns (40000: wide for 16 threads too).
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 100), (2, 896, 4864), (8, 896, 4864), (16, 4864, 896), (9, 17, 33),
                                   (5, 16, 32), (8, 40, 31), (3, 1, 7), (12, 1001, 300), (2, 64, 40000),
                                   (16, 33, 16)])
def test_equals_a_float64_product(m, k, n):
    assert_equals_float64_product(rm.rows_matmul, m, k, n, transposed=False)


# w [N, K]: groups of 8 / 3 / ... rows of w with a masked last K vector, and the rows past the last group.
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 100), (1, 896, 1003), (2, 896, 4864), (3, 17, 7), (4, 5, 13),
                                   (7, 100, 31), (8, 896, 1000), (8, 16, 3), (6, 1, 9)])
def test_transposed_equals_a_float64_product(m, k, n):
    assert_equals_float64_product(rm.rows_matmul, m, k, n, transposed=True)


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M in 1..16, K\\] and w \\[K, N\\]"):
        rm.rows_matmul(jnp.ones((17, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(5, 3\\)"):
        rm.rows_matmul(jnp.ones((2, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="x \\[M in 1..8, K\\] and w \\[N, K\\] \\(transposed\\)"):
        rm.rows_matmul(jnp.ones((9, 4)), jnp.ones((3, 4)), transposed=True)
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(4, 3\\)"):
        rm.rows_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), transposed=True)
