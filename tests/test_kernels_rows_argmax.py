"""The CPU kernel for a decode step's greedy tokens: exactly numpy's argmax of the logits with the suppressed
ids at -inf (first maximum, first NaN, all -inf -> 0), at vocabulary sizes that cut rows into one or many
chunks with vector tails; clear errors (the dispatch in sampling: test_generate_sampling.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nvila_jax.kernels import rows_argmax as ra

needs_kernel = pytest.mark.skipif(not ra.available(), reason="needs AVX-512, a C++ compiler and a CPU backend")


def expected(logits: np.ndarray, suppressed: np.ndarray) -> np.ndarray:
    return np.argmax(np.where(suppressed, -np.inf, logits), axis=-1)  # numpy: first max, first NaN


def special_rows(v: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that each test one rule, wherever the chunk boundaries fall."""
    x = rng.standard_normal((9, v)).astype(np.float32)
    x[1, rng.integers(0, v, 3)] = np.nan  # the first NaN wins
    x[2] = -np.inf  # nothing possible: index 0
    x[3, v // 2:] = np.inf  # the first of several +inf
    x[4] = np.round(x[4])  # many ties: the first maximum
    x[5, -1] = 50.0  # the last index
    x[6, [0, -1]] = [np.inf, np.nan]  # a NaN after a +inf still wins
    x[7] = -1.0
    x[7, [v // 3, -1]] = [-0.0, 0.0]  # -0.0 and 0.0 tie: the first
    x[8] = np.where(np.arange(v) % 2, -np.inf, np.nan)  # NaN at index 0
    return x


@needs_kernel
@pytest.mark.parametrize("v", [1, 2, 15, 16, 17, 100, 16383, 16385, 40000, 151936])
@pytest.mark.parametrize("share", [0.0, 0.1, 1.0])
def test_equals_numpy_argmax_of_the_masked_logits(v, share):
    rng = np.random.default_rng(v)
    x = special_rows(v, rng)
    suppressed = rng.random(v) < share
    got = np.asarray(jax.jit(ra.rows_argmax)(jnp.asarray(x), jnp.asarray(suppressed)))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, expected(x, suppressed))
    for rows in (1, 3):  # fewer rows: each cut into more chunks
        got = np.asarray(ra.rows_argmax(jnp.asarray(x[:rows]), jnp.asarray(suppressed)))
        np.testing.assert_array_equal(got, expected(x[:rows], suppressed))


@needs_kernel
def test_a_suppressed_nan_or_maximum_does_not_count():
    x = np.zeros((2, 20000), np.float32)
    x[0, [5, 19000]] = [np.nan, 3.0]
    x[1, [7, 12000]] = [9.0, 2.0]
    suppressed = np.zeros(20000, bool)
    suppressed[[5, 7]] = True
    np.testing.assert_array_equal(np.asarray(ra.rows_argmax(jnp.asarray(x), jnp.asarray(suppressed))), [19000, 12000])


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match=r"logits \[B, V >= 1\] and suppressed \[V\], got \(2, 5\) and \(4,\)"):
        ra.rows_argmax(jnp.ones((2, 5)), jnp.zeros((4,), bool))
    with pytest.raises(ValueError, match=r"got \(5,\) and \(5,\)"):
        ra.rows_argmax(jnp.ones((5,)), jnp.zeros((5,), bool))
    with pytest.raises(ValueError, match=r"got \(2, 0\) and \(0,\)"):
        ra.rows_argmax(jnp.ones((2, 0)), jnp.zeros((0,), bool))
