"""Sampling filters against HF transformers' logits warpers, sampled frequencies, and shape buckets."""

from __future__ import annotations

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from nvila_jax.inference.buckets import batch_bucket, bucket, power_of_two_chunks
from nvila_jax.inference.engine import DecodeState, advance
from nvila_jax.inference import sampling
from nvila_jax.inference.sampling import (SamplingParams, _filter_top_k_top_p, first_argmax, greedy_tokens, row_keys,
                                         sample)

SETTINGS = [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.5, 10, 0.5), (0.3, 3, 0.8), (1.0, 1, 1.0), (2.0, 0, 0.05),
            (1.0, 100, 0.99)]


def _hf_filtered(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    x = TemperatureLogitsWarper(temperature)(None, torch.from_numpy(logits))
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1:
        x = TopPLogitsWarper(top_p)(None, x)
    return x.numpy()


def test_filters_equal_hf_warpers():
    logits = np.random.RandomState(0).randn(len(SETTINGS), 40).astype(np.float32) * 3
    t, k, p = (np.asarray(v) for v in zip(*SETTINGS))
    got = _filter_top_k_top_p(jnp.asarray(logits / t[:, None]), jnp.asarray(k, jnp.int32),
                              jnp.asarray(p, jnp.float32))
    for row, (temp, top_k, top_p) in enumerate(SETTINGS):
        want = _hf_filtered(logits[row:row + 1], temp, top_k, top_p)[0]
        np.testing.assert_array_equal(np.isinf(np.asarray(got[row])), np.isinf(want))
        kept = ~np.isinf(want)
        np.testing.assert_allclose(np.asarray(got[row])[kept], want[kept], rtol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = np.asarray([2.0, 1.5, 1.0, 0.2, -1.0, 0.9], np.float32)
    n = 20000
    for temp, top_k, top_p in [(1.0, 0, 1.0), (0.8, 3, 1.0), (1.2, 0, 0.7)]:
        want = _hf_filtered(logits[None], temp, top_k, top_p)[0]
        probs = np.exp(want - want.max())
        probs /= probs.sum()
        keys = row_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
        tokens = sample(jnp.broadcast_to(jnp.asarray(logits), (n, 6)), keys, jnp.full((n,), temp),
                        jnp.full((n,), top_k, jnp.int32), jnp.full((n,), top_p))
        freq = np.bincount(np.asarray(tokens), minlength=6) / n
        assert np.all(freq[probs == 0] == 0)
        np.testing.assert_allclose(freq, probs, atol=0.015)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 50).astype(np.float32))
    keys = row_keys(jnp.arange(4, dtype=jnp.uint32), jnp.zeros((4,), jnp.int32))
    temp = jnp.asarray([0.0, 1.0, 0.0, 1.0])
    got = np.asarray(sample(logits, keys, temp, jnp.zeros((4,), jnp.int32), jnp.ones((4,))))
    np.testing.assert_array_equal(got[[0, 2]], np.asarray(jnp.argmax(logits, -1))[[0, 2]])
    assert jax.jit(sample)(logits, keys, temp * 0, jnp.zeros((4,), jnp.int32), jnp.ones((4,))).tolist() == \
        np.argmax(np.asarray(logits), -1).tolist()


def test_first_argmax_is_jnp_argmax_with_ties_nan_and_infinities():
    x = np.random.RandomState(1).randn(7, 1000).astype(np.float32)
    x[1, [5, 7]] = np.nan  # the first NaN wins
    x[2] = -np.inf  # every token suppressed: index 0
    x[3, 100:] = np.inf  # the first of several +inf
    x[4, [3, 9]] = 1e30  # a tie: the first
    x[5, -1] = 50.0  # the last index
    x[6, [2, 4]] = [np.inf, np.nan]  # a NaN after a +inf still wins
    got = np.asarray(jax.jit(first_argmax)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(jnp.asarray(x), axis=-1)))
    assert got.dtype == np.int32 and list(got[1:]) == [5, 0, 100, 3, 999, 4]


@pytest.mark.parametrize("kernel", [True, False])
def test_greedy_tokens_never_choose_a_suppressed_id(kernel, monkeypatch):
    if not kernel:  # the XLA path, as on a mesh or without the CPU kernel
        monkeypatch.setattr(sampling.rows_argmax, "available", lambda: False)
    x = np.random.RandomState(2).randn(5, 3000).astype(np.float32)
    x[1, [4, 8]] = np.nan
    x[2, 10] = 99.0  # suppressed below
    x[3] = -np.inf
    suppressed = np.zeros(3000, bool)
    suppressed[[4, 10, 2999]] = True
    x[4, 2999] = 98.0
    want = np.argmax(np.where(suppressed, -np.inf, x), -1)
    got = np.asarray(jax.jit(greedy_tokens)(jnp.asarray(x), jnp.asarray(suppressed)))
    np.testing.assert_array_equal(got, want)
    assert got[1] == 8 and got[3] == 0 and not suppressed[got[[0, 2, 4]]].any()
    np.testing.assert_array_equal(np.asarray(greedy_tokens(jnp.asarray(x))), np.argmax(x, -1))  # none suppressed
    temp = jnp.asarray([0.0, 0.0, 1.0, 0.0, 1.0])  # sampled rows never draw a suppressed id either
    for seed in range(5):
        keys = row_keys(jnp.arange(5, dtype=jnp.uint32) + seed, jnp.zeros((5,), jnp.int32))
        got = np.asarray(sample(jnp.asarray(x), keys, temp, jnp.zeros((5,), jnp.int32), jnp.ones((5,)),
                                jnp.asarray(suppressed)))
        np.testing.assert_array_equal(got[[0, 1, 3]], want[[0, 1, 3]])
        assert not suppressed[got[[2, 4]]].any()


def _primitives(jaxpr) -> set[str]:
    """Names of every primitive in a closed jaxpr, sub-jaxprs (cond branches, custom calls) included."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_an_all_greedy_step_compiles_no_conditional_and_chooses_the_same_tokens():
    """advance(sampling=False) (the engine's choice when no request samples) is the argmax alone, with no
    device-side conditional, and picks what the sampling-capable step picks for temperature-0 rows."""
    rng = np.random.RandomState(3)
    batch, vocab = 3, 500
    suppressed = np.zeros(vocab, bool)
    suppressed[rng.choice(vocab, 20, replace=False)] = True
    logits = rng.randn(batch, vocab).astype(np.float32)
    logits[0, np.flatnonzero(suppressed)[0]] = 50.0  # the argmax is suppressed: the next best wins
    state = DecodeState(tokens=jnp.zeros((batch,), jnp.int32), positions=jnp.zeros((batch,), jnp.int32),
                        done=jnp.asarray([False, False, True]), generated=jnp.asarray([0, 4, 2], jnp.int32),
                        max_new=jnp.asarray([8, 5, 8], jnp.int32), temperature=jnp.zeros((batch,)),
                        top_k=jnp.zeros((batch,), jnp.int32), top_p=jnp.ones((batch,)),
                        seeds=jnp.arange(batch, dtype=jnp.uint32),
                        stop_ids=jnp.asarray([int(np.argmax(np.where(suppressed, -np.inf, logits[1]))), -1, -1, -1],
                                             jnp.int32),
                        suppressed=jnp.asarray(suppressed))
    greedy_state, greedy_out = jax.jit(advance, static_argnums=2)(state, jnp.asarray(logits), False)
    general_state, general_out = jax.jit(advance, static_argnums=2)(state, jnp.asarray(logits), True)
    for a, b in zip(jax.tree.leaves((greedy_state, greedy_out)), jax.tree.leaves((general_state, general_out))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(greedy_out.tokens), np.argmax(np.where(suppressed, -np.inf, logits), -1))
    assert np.asarray(greedy_out.done).tolist() == [False, True, True]  # row 1 chose its stop token
    assert "cond" not in _primitives(jax.make_jaxpr(advance, static_argnums=2)(state, logits, False).jaxpr)
    assert "cond" in _primitives(jax.make_jaxpr(advance, static_argnums=2)(state, logits, True).jaxpr)


@pytest.mark.parametrize("bad,match", [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
                                       (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k")])
def test_sampling_params_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**bad)


def test_buckets_cover_every_size_with_bounded_padding():
    sizes = [bucket(n) for n in range(0, 5000)]
    assert all(s >= n for n, s in enumerate(sizes)) and sizes == sorted(sizes)
    assert all(s <= max(16, n * 1.25 + 1) for n, s in enumerate(sizes))
    assert len(set(sizes)) < 40  # few compiled shapes
    assert [bucket(n) for n in (1, 16, 17, 33, 65, 129, 2048, 2049)] == [16, 16, 20, 40, 80, 160, 2048, 2560]
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 16]
    for n in range(0, 70):
        chunks = power_of_two_chunks(n, 16)
        assert sum(chunks) == n and all(c in (1, 2, 4, 8, 16) for c in chunks) and chunks == sorted(chunks)[::-1]
    with pytest.raises(ValueError, match="power of two"):
        power_of_two_chunks(4, 12)
