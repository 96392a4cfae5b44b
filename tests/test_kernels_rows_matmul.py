"""The weight-streaming CPU kernel for products of a few rows (batched decoding): exact against float64
products over shapes with and without whole tiles and row blocks, the dense-layer dispatch of
RowsDotGeneral, and the XLA fallback (the build cache: test_kernels_cpu_library.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import rows_matmul as rm

needs_kernel = pytest.mark.skipif(not rm.available(), reason="needs a CPU with AVX-512 and a C++ compiler")


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 100), (2, 896, 4864), (8, 896, 4864), (16, 4864, 896), (9, 17, 33),
                                   (5, 16, 32), (8, 40, 31), (3, 1, 7)])
def test_equals_a_float64_product(m, k, n):
    rs = np.random.RandomState(m * 1000 + k + n)
    x, w = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
    got = np.asarray(jax.jit(rm.rows_matmul)(jnp.asarray(x), jnp.asarray(w)))
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)  # float32 rounding grows with this
    assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30)


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M <= 16, K\\] and w \\[K, N\\]"):
        rm.rows_matmul(jnp.ones((17, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(5, 3\\)"):
        rm.rows_matmul(jnp.ones((2, 4)), jnp.ones((5, 3)))


def _dense_layers(dot_general_cls):
    """A q_proj-like layer (3-D kernel) feeding an o_proj-like one (two contracted axes)."""

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), dot_general_cls=dot_general_cls, name="q")(x)
            return nn.DenseGeneral(24, axis=(-2, -1), dot_general_cls=dot_general_cls, name="o")(h)

    return Layers()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
def test_dense_layers_through_the_kernel_equal_xla(rows, monkeypatch):
    calls = []
    real = rm.rows_matmul
    monkeypatch.setattr(rm, "rows_matmul", lambda x, w: calls.append(x.shape) or real(x, w))
    x = jnp.asarray(np.random.RandomState(rows).randn(rows, 1, 24).astype(np.float32))
    params = _dense_layers(None).init(jax.random.key(0), x)
    want = _dense_layers(None).apply(params, x)
    got = _dense_layers(rm.RowsDotGeneral).apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the kernel takes 2..16 rows; one row (a matrix-vector product) and prefill-sized products stay with XLA
    assert calls == ([(rows, 24), (rows, 32)] if 2 <= rows <= 16 else [])


def test_without_the_kernel_everything_goes_to_xla(monkeypatch):
    monkeypatch.setattr(rm, "available", lambda: False)
    monkeypatch.setattr(rm, "rows_matmul", lambda *a: pytest.fail("the kernel was called"))
    x = jnp.ones((4, 1, 24), jnp.float32)
    params = _dense_layers(None).init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(_dense_layers(rm.RowsDotGeneral).apply(params, x)),
                                  np.asarray(_dense_layers(None).apply(params, x)))
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)  # other dtypes never reach the kernel either
    assert _dense_layers(rm.RowsDotGeneral).apply(bf16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
