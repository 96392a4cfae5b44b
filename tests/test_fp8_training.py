"""A tiny NVILA LLM trained 200 steps with FP8 linears reaches a loss within 5% of the bf16 run.

A minimal optax loop over the NVILA module (text-only next-token loss on a fixed set of sequences to
memorise); every LLM linear is FP8 (threshold 0, since the tiny model's linears are far below 3584).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from nvila_jax import get_variant
from nvila_jax.kernels import fp8
from nvila_jax.models.nvila import NVILA, init_params

STEPS = 200


def _train(dot_general_cls, params, data) -> list[float]:
    cfg = get_variant("tiny")
    model = NVILA(cfg, dtype=jnp.bfloat16, llm_dot_general_cls=dot_general_cls)
    b, t = data.shape
    pos, seg = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)
    vis = jnp.zeros((0, cfg.llm.hidden_size))
    opt = optax.adamw(3e-3, weight_decay=0.0)

    def loss_fn(p):
        h, _ = model.apply({"params": p}, data, -jnp.ones_like(data), vis, pos, seg)
        logits = model.apply({"params": p}, h, method=NVILA.logits)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], data[:, 1:]).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss

    state, losses = opt.init(params), []
    for _ in range(STEPS):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_fp8_training_matches_bf16_within_5_percent():
    cfg = get_variant("tiny")
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))
    params = {"llm": params["llm"]}  # text only: the vision tower and projector are not used
    data = jax.random.randint(jax.random.key(1), (8, 32), 0, cfg.llm.vocab_size)
    bf16 = _train(None, params, data)
    cls = fp8.llm_dot_general_cls(fp8.Fp8Config(enabled=True, min_features=0))
    f8 = _train(cls, params, data)
    first, last_bf16, last_fp8 = bf16[0], sum(bf16[-10:]) / 10, sum(f8[-10:]) / 10
    assert last_bf16 < 0.5 * first  # the run learned something, so the comparison means something
    assert abs(last_fp8 - last_bf16) <= 0.05 * last_bf16, (first, last_bf16, last_fp8)
