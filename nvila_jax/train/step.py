"""The train step: a pure function (state, batch) -> (state, metrics), jittable with in/out shardings.

`batch` holds one optimizer step: every array has a leading [accumulation] axis of micro-batches
(nvila_jax/data/packing.py). The loss is the token-weighted mean of next-token cross-entropy over every
trained token of the step (all micro-batches together), computed in float32 in sequence chunks so the
[tokens, vocab] logits never exist at once. Gradients are taken only for the trainable modules.

FP8 with delayed scaling (nvila_jax/kernels/fp8) keeps amax histories in the state's `fp8_meta` (the
model's "fp8_meta" collection; empty otherwise): the step differentiates with respect to them and the
"gradient" is the updated history, threaded through the micro-batches in order (each forward sees the
amaxes of the ones before it, as Transformer Engine updates its history on every forward).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from nvila_jax.data.packing import VisualGeometry
from nvila_jax.kernels.fp8.linear import FP8_META
from nvila_jax.models.nvila import NVILA
from nvila_jax.train.visual import batch_visual_tokens

TOKEN_KEYS = ("input_ids", "targets", "positions", "segment_ids", "visual_index")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # float32 master weights {"vision_tower", "projector", "llm"}
    opt_state: Any
    rng: jax.Array  # raw uint32 key data; step keys are fold_in(rng, step)
    fp8_meta: Any = flax.struct.field(default_factory=dict)  # FP8 amax histories (delayed scaling) or {}


def token_nll(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, targets: jax.Array,
              chunk: int) -> jax.Array:
    """Per-token negative log-likelihood [B, L] in float32 (0 where targets < 0), `chunk` positions at a time
    (rematerialised, so only one chunk's logits are alive)."""

    def nll(h, t):
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(t >= 0, lse - picked, 0.0)

    b, length, d = hidden.shape
    if chunk <= 0 or chunk >= length:
        return nll(hidden, targets)
    if length % chunk:
        raise ValueError(f"loss_chunk {chunk} must divide the sequence length {length}")
    n = length // chunk
    h = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
    t = targets.reshape(b, n, chunk).swapaxes(0, 1)
    out = jax.lax.map(lambda x: jax.checkpoint(nll)(*x), (h, t))
    return out.swapaxes(0, 1).reshape(b, length)


def constrain_micro_batch(micro: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Logical sharding of a micro-batch: token arrays over (batch, length), tiles over tiles."""
    out = dict(micro)
    for k in TOKEN_KEYS:
        out[k] = nn.with_logical_constraint(micro[k], ("batch", "length"))
    out["tiles"] = nn.with_logical_constraint(micro["tiles"], ("tiles", None, None, None))
    return out


def micro_batch_nll(module: NVILA, params: Any, micro: Mapping[str, jax.Array], geom: VisualGeometry,
                    loss_chunk: int, rng: jax.Array | None = None, fp8_meta: Any = None) -> jax.Array:
    """Per-token NLL [B, L] of one micro-batch (0 on untrained tokens). `fp8_meta`: the FP8 amax histories
    of a model with delayed-scaling FP8 linears."""
    micro = constrain_micro_batch(micro)

    def hidden_states(m: NVILA) -> jax.Array:
        visual = batch_visual_tokens(m, micro, geom)
        hidden, _ = m(micro["input_ids"], micro["visual_index"], visual, micro["positions"], micro["segment_ids"])
        return hidden

    rngs = {"dropout": rng} if rng is not None else None
    variables = {"params": params, FP8_META: fp8_meta} if fp8_meta else {"params": params}
    hidden = nn.apply(hidden_states, module)(variables, rngs=rngs)
    logits = lambda h: nn.apply(lambda m, x: m.logits(x), module)({"params": params}, h)
    return token_nll(logits, hidden, micro["targets"], loss_chunk)


def make_train_step(
    module: NVILA,
    tx: optax.GradientTransformation,
    geom: VisualGeometry,
    trainable: Sequence[str],
    schedules: Mapping[str, optax.Schedule],
    loss_chunk: int = 0,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]:
    """The step function. Frozen modules enter the loss as constants (no gradient, no optimizer state)."""
    trainable = tuple(trainable)

    def loss_sums(train_params, fp8_meta, frozen_params, micro, rng):
        nll = micro_batch_nll(module, {**frozen_params, **train_params}, micro, geom, loss_chunk, rng, fp8_meta)
        return nll.sum(), (micro["targets"] >= 0).sum()

    def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        train_params = {k: v for k, v in state.params.items() if k in trainable}
        frozen = {k: v for k, v in state.params.items() if k not in trainable}
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grad_fn = jax.value_and_grad(loss_sums, argnums=(0, 1), has_aux=True)

        def accumulate(carry, xs):
            grads, fp8_meta, loss, count = carry
            micro, i = xs
            (l, n), (g, fp8_meta) = grad_fn(train_params, fp8_meta, frozen, micro, jax.random.fold_in(key, i))
            return (jax.tree.map(jnp.add, grads, g), fp8_meta, loss + l, count + n), None

        zeros = jax.tree.map(jnp.zeros_like, train_params)
        steps = jax.tree.leaves(batch)[0].shape[0]
        (grads, fp8_meta, loss, count), _ = jax.lax.scan(
            accumulate, (zeros, state.fp8_meta, jnp.float32(0), jnp.int32(0)), (dict(batch), jnp.arange(steps)))
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        full_grads = {**jax.tree.map(jnp.zeros_like, frozen), **grads}
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / denom, "trained_tokens": count, "grad_norm": optax.global_norm(grads)}
        metrics.update({f"lr/{m}": s(state.step) for m, s in schedules.items()})
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, fp8_meta=fp8_meta)
        return new_state, metrics

    return step


def init_train_state(params: Any, tx: optax.GradientTransformation, seed: int, fp8_meta: Any = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)), fp8_meta=fp8_meta or {})


def init_fp8_meta(module: NVILA) -> dict:
    """Zero amax histories for the module's delayed-scaling FP8 linears ({} when it has none)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    visual = jnp.zeros((0, module.config.llm.hidden_size), jnp.float32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids - 1, visual, ids, ids + 1))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes.get(FP8_META, {})))
