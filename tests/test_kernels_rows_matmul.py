"""The weight-streaming CPU kernel for products of a few rows (decoding): exact against float64 products for
both weight layouts over shapes with and without whole tiles, row blocks and row groups, split by columns
and by K; the dispatch of RowsDotGeneral (dense layers, the LM head) and the XLA fallback (the build cache:
test_kernels_cpu_library.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import rows_matmul as rm

needs_kernel = pytest.mark.skipif(not rm.available(), reason="needs a CPU with AVX-512 and a C++ compiler")


def _check_product(m, k, n, transposed):
    rs = np.random.RandomState(m * 1000 + k + n)
    x, w = rs.randn(m, k).astype(np.float32), rs.randn(k, n).astype(np.float32)
    stored = np.ascontiguousarray(w.T) if transposed else w
    got = np.asarray(jax.jit(rm.rows_matmul, static_argnums=2)(jnp.asarray(x), jnp.asarray(stored), transposed))
    want = x.astype(np.float64) @ w.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64)  # float32 rounding grows with this
    assert got.shape == (m, n)
    assert np.all(np.abs(got - want) <= 1e-6 * scale + 1e-30)


# w [K, N]: 1-8 rows take two-vector tiles, 9-16 one-vector tiles; narrow N (short row segments per thread)
# splits K over the threads and adds the partial sums, wide N splits columns (40000: wide for 16 threads too).
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 100), (2, 896, 4864), (8, 896, 4864), (16, 4864, 896), (9, 17, 33),
                                   (5, 16, 32), (8, 40, 31), (3, 1, 7), (12, 1001, 300), (2, 64, 40000),
                                   (16, 33, 16)])
def test_equals_a_float64_product(m, k, n):
    _check_product(m, k, n, transposed=False)


# w [N, K]: groups of 8 / 3 / ... rows of w with a masked last K vector, and the rows past the last group.
@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 64, 100), (1, 896, 1003), (2, 896, 4864), (3, 17, 7), (4, 5, 13),
                                   (7, 100, 31), (8, 896, 1000), (8, 16, 3), (6, 1, 9)])
def test_transposed_equals_a_float64_product(m, k, n):
    _check_product(m, k, n, transposed=True)


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="x \\[M in 1..16, K\\] and w \\[K, N\\]"):
        rm.rows_matmul(jnp.ones((17, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(5, 3\\)"):
        rm.rows_matmul(jnp.ones((2, 4)), jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="x \\[M in 1..8, K\\] and w \\[N, K\\] \\(transposed\\)"):
        rm.rows_matmul(jnp.ones((9, 4)), jnp.ones((3, 4)), transposed=True)
    with pytest.raises(ValueError, match="got \\(2, 4\\) and \\(4, 3\\)"):
        rm.rows_matmul(jnp.ones((2, 4)), jnp.ones((4, 3)), transposed=True)


def _dense_layers(dot_general_cls):
    """A q_proj-like layer (3-D kernel) feeding an o_proj-like one (two contracted axes)."""

    class Layers(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), dot_general_cls=dot_general_cls, name="q")(x)
            return nn.DenseGeneral(24, axis=(-2, -1), dot_general_cls=dot_general_cls, name="o")(h)

    return Layers()


def _record_calls(monkeypatch) -> list:
    calls = []
    real = rm.rows_matmul
    monkeypatch.setattr(rm, "rows_matmul", lambda x, w, transposed=False: calls.append((x.shape, transposed))
                        or real(x, w, transposed))
    return calls


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
def test_dense_layers_through_the_kernel_equal_xla(rows, monkeypatch):
    calls = _record_calls(monkeypatch)
    x = jnp.asarray(np.random.RandomState(rows).randn(rows, 1, 24).astype(np.float32))
    params = _dense_layers(None).init(jax.random.key(0), x)
    want = _dense_layers(None).apply(params, x)
    got = _dense_layers(rm.RowsDotGeneral).apply(params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # the kernel takes 1..16 rows; prefill-sized products stay with XLA
    assert calls == ([((rows, 24), False), ((rows, 32), False)] if rows <= 16 else [])


@needs_kernel
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("rows", [1, 8, 9])
def test_lm_head_through_the_kernel_equals_xla(tied, rows, monkeypatch):
    """Qwen2LM.logits with the decode kernel: the tied head ([vocab, D] table, contracted on its last axis)
    takes up to 8 rows, an untied head ([D, vocab] kernel) up to 16."""
    from nvila_jax.config import Qwen2Config
    from nvila_jax.models.qwen2 import Qwen2LM

    cfg = Qwen2Config(vocab_size=301, hidden_size=40, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    hidden = jnp.asarray(np.random.RandomState(rows).randn(rows, 1, 40).astype(np.float32))
    params = Qwen2LM(cfg).init(jax.random.key(0), hidden, method=Qwen2LM.logits)
    want = Qwen2LM(cfg).apply(params, hidden, method=Qwen2LM.logits)
    calls = _record_calls(monkeypatch)
    got = Qwen2LM(cfg, logits_dot_general_cls=rm.RowsDotGeneral).apply(params, hidden, method=Qwen2LM.logits)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert got.shape == (rows, 1, 301)
    expected = {True: [((rows, 40), True)] if rows <= 8 else [], False: [((rows, 40), False)]}[tied]
    assert calls == expected


def test_without_the_kernel_everything_goes_to_xla(monkeypatch):
    monkeypatch.setattr(rm, "available", lambda: False)
    monkeypatch.setattr(rm, "rows_matmul", lambda *a: pytest.fail("the kernel was called"))
    x = jnp.ones((4, 1, 24), jnp.float32)
    params = _dense_layers(None).init(jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(_dense_layers(rm.RowsDotGeneral).apply(params, x)),
                                  np.asarray(_dense_layers(None).apply(params, x)))
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)  # other dtypes never reach the kernel either
    assert _dense_layers(rm.RowsDotGeneral).apply(bf16, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
