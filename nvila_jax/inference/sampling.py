"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling with a per-request
seed, as HF transformers' warpers do it (temperature, then top-k, then top-p).

All settings are per-row arrays, so one compiled program serves every mix of settings in a batch; the
random key of a row depends only on its seed and on how many tokens it has generated, so a request samples
the same tokens alone or in any batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nvila_jax.kernels import rows_argmax


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")


def suppress(logits: jax.Array, suppressed: jax.Array) -> jax.Array:
    """Logits [B, V] with the never-trained token ids (`suppressed`: bool [V]) set to -inf."""
    return jnp.where(suppressed, -jnp.inf, logits)


def _filter_top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits [B, V] outside each row's top-k (ties kept) and top-p nucleus set to -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a token stays when
    the mass of the tokens ranked before it is below top_p (the most likely token always stays)."""
    vocab = scaled.shape[-1]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < top_p[:, None]).at[:, 0].set(True)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((scaled >= threshold) & (scaled >= kth), scaled, -jnp.inf)


def first_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; the first NaN where there is one), int32, as two
    plain reductions: XLA's CPU argmax (one reduction of value-index pairs) is ~1.4x slower on a [8, 152k]
    vocabulary, time each decode step pays."""
    nan = jnp.isnan(logits)
    top = jnp.max(logits, axis=-1, keepdims=True)  # XLA's CPU max need not propagate NaN: they are tested apart
    hit = jnp.where(jnp.any(nan, axis=-1, keepdims=True), nan, logits == top)
    index = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    return jnp.min(jnp.where(hit, index, logits.shape[-1]), axis=-1)


def greedy_tokens(logits: jax.Array, suppressed: jax.Array | None = None) -> jax.Array:
    """The argmax of each row of float32 logits [B, V] with the `suppressed` ids [V] at -inf (`first_argmax`
    semantics), in one pass by the CPU kernel (kernels.rows_argmax) on a single CPU device."""
    if suppressed is None:
        suppressed = jnp.zeros(logits.shape[-1:], jnp.bool_)
    if jax.device_count() == 1 and rows_argmax.available():
        return rows_argmax.rows_argmax(logits, suppressed)
    return first_argmax(suppress(logits, suppressed))


def sample(
    logits: jax.Array,
    keys: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    suppressed: jax.Array | None = None,
) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V], never one of the `suppressed` ids [V] (bool; None: none);
    rows with temperature 0 take the argmax.

    keys: one PRNG key per row. The masked logits are built and the sort that top-k/top-p need runs only
    when some row samples, and asks for a filter."""
    greedy = greedy_tokens(logits, suppressed)

    def sampled(logits):
        if suppressed is not None:
            logits = suppress(logits, suppressed)
        scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, logits)


def row_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """PRNG keys [B] for the `step`-th generated token of each row, from the rows' integer seeds."""
    return jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seeds, step)
