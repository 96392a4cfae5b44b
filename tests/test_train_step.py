"""The train step: frozen modules stay put, per-module learning rates, gradient accumulation equals one
big batch, remat / loss chunking / bf16 compute change nothing that matters, and a tiny model overfits."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nvila_jax.config import ProjectorConfig
from nvila_jax.data import synthetic
from nvila_jax.data.mixture import load_mixture
from nvila_jax.data.packing import BatchShape, VisualGeometry, assemble
from nvila_jax.data.pipeline import mixture_dataset
from nvila_jax.data.sample import SampleBuilder, SampleOptions
from nvila_jax.models.nvila import NVILA, init_params
from nvila_jax.train.optimizer import lr_schedule, make_optimizer, module_labels
from nvila_jax.train.step import init_train_state, make_train_step, token_nll
from nvila_jax.variants import tiny

CFG = dataclasses.replace(tiny(), s2_scales=(56, 112), max_tiles=6,
                          projector=ProjectorConfig("mlp_downsample", 64, 64))
GEOM = VisualGeometry.from_config(CFG)
ALL = ("vision_tower", "projector", "llm")


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    path = synthetic.write_dataset(str(tmp_path_factory.mktemp("shapes")), 8, seed=11)
    mix = load_mixture([{"name": "s", "path": path}])
    builder = SampleBuilder(CFG, "tiny", mix.datasets, SampleOptions(512, 64))
    src = mixture_dataset(mix, 0, shuffle=False, repeat=False)
    return [builder(src[i]) for i in range(8)]


@pytest.fixture(scope="module")
def params():
    return nn.meta.unbox(init_params(CFG, jax.random.key(0)))


def step_batch(micro_rows, seq_len=512, tiles=40):
    """{name: [A, ...]} for A micro-batches, each a list of rows of samples."""
    n_rows = max(len(rows) for rows in micro_rows)
    parts = [assemble(GEOM, BatchShape(n_rows, seq_len, tiles), rows, pad_id=384) for rows in micro_rows]
    return {k: jnp.asarray(np.stack([p[k] for p in parts])) for k in parts[0]}


def make(params, trainable=ALL, lr=3e-3, module_lrs=None, module=None, chunk=0, clip=1.0):
    tx, sched = make_optimizer(params, trainable=trainable, learning_rate=lr, module_learning_rates=module_lrs,
                               total_steps=100, warmup_steps=0, schedule="constant", max_grad_norm=clip)
    step = jax.jit(make_train_step(module or NVILA(CFG), tx, GEOM, trainable, sched, chunk))
    return step, init_train_state(params, tx, 0)


# One program (all modules trainable, the vision tower at LR 0, the projector at its own LR; steps of two
# micro-batches of two rows) serves most tests: compiling is what costs time on a CPU.
MODULE_LRS = {"vision_tower": 0.0, "projector": 1e-3}


@pytest.fixture(scope="module")
def main_step(params):
    return make(params, module_lrs=MODULE_LRS)


def test_frozen_modules_do_not_change_and_bf16_keeps_float32_masters(params, samples):
    step, state = make(params, trainable=("projector",), module=NVILA(CFG, dtype=jnp.bfloat16))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * sum(x.size for x in jax.tree.leaves(params["projector"]))  # no Adam state if frozen
    batch = step_batch([[samples[:2], samples[2:4]]])
    for _ in range(2):
        state, metrics = step(state, batch)
    for name in ("vision_tower", "llm"):
        jax.tree.map(np.testing.assert_array_equal, state.params[name], params[name])
    changed = jax.tree.map(lambda a, b: bool((np.asarray(a) != np.asarray(b)).any()), state.params["projector"],
                           params["projector"])
    assert all(jax.tree.leaves(changed))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["trained_tokens"]) > 0


def test_per_module_learning_rates(main_step, params, samples):
    step, state = main_step
    state, m = step(state, step_batch([[samples[:2], samples[2:4]], []]))
    assert float(m["lr/llm"]) == pytest.approx(3e-3) and float(m["lr/projector"]) == pytest.approx(1e-3)
    # learning rate 0 (given explicitly, not "unset") leaves the module unchanged
    jax.tree.map(np.testing.assert_array_equal, state.params["vision_tower"], params["vision_tower"])
    labels = module_labels(params, ("llm",))
    assert set(jax.tree.leaves(labels)) == {"llm", "frozen"}


def test_gradient_accumulation_equals_one_batch(main_step, samples):
    """Two micro-batches of one step = one micro-batch holding both (token-weighted mean)."""
    step, state = main_step
    a = [samples[0:2], samples[2:3]]
    b = [samples[3:5], samples[5:6]]
    s1, m1 = step(state, step_batch([a, b]))
    s2, m2 = step(state, step_batch([a + b], tiles=80))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    assert int(m1["trained_tokens"]) == int(m2["trained_tokens"])
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)

    # The accumulated gradient, as Adam's first moment holds it: equal up to float32 rounding, which scales
    # with the terms summed, not with the result (a k_proj bias has a zero gradient made of large terms),
    # hence a tolerance relative to the largest gradient entry.
    def first_moments(s):
        adam = jax.tree.leaves(s.opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        return [a.mu for a in adam if isinstance(a, optax.ScaleByAdamState)]

    mu1, mu2 = first_moments(s1), first_moments(s2)
    largest = max(float(np.abs(x).max()) for x in jax.tree.leaves(mu2))
    assert largest > 0
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * largest), mu1, mu2)
    # Parameters: a first Adam step moves each by lr * g / (|g| + eps), ill-conditioned where |g| is near eps
    # (a rounding-level change of g moves it by a sizeable part of lr). Compared where the step is a full one.
    def full_steps_close(new1, new2, old):
        step1, step2 = np.asarray(new1) - np.asarray(old), np.asarray(new2) - np.asarray(old)
        full = np.abs(step1) > 0.99 * np.abs(step1).max(initial=0.0)
        np.testing.assert_allclose(np.asarray(new1)[full], np.asarray(new2)[full], rtol=1e-4, atol=2e-6)
        np.testing.assert_array_equal(step1 == 0, step2 == 0)  # frozen (lr 0) leaves stay put in both
        return np.array([full.sum(), full.size if step1.any() else 0])

    compared, trained = sum(jax.tree.leaves(jax.tree.map(full_steps_close, s1.params, s2.params, state.params)))
    assert compared > 0.5 * trained  # most trained parameters are compared (85% of them here)


def test_remat_and_chunked_loss_change_nothing(main_step, params, samples):
    batch = step_batch([[samples[:2], samples[2:4]], [samples[4:6]]])
    step, state = main_step
    _, ref = step(state, batch)
    step, state = make(params, module_lrs=MODULE_LRS, module=NVILA(CFG, remat="full"), chunk=128)
    _, got = step(state, batch)
    np.testing.assert_allclose(float(got["loss"]), float(ref["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(got["grad_norm"]), float(ref["grad_norm"]), rtol=1e-5)
    hidden = jax.random.normal(jax.random.key(0), (2, 8, 4))
    targets = jnp.array([[1, -100, 2, 0, 3, 1, -100, 2]] * 2)
    logits = lambda h: h @ jnp.ones((4, 5)) * jnp.arange(5.0)
    np.testing.assert_allclose(token_nll(logits, hidden, targets, 4), token_nll(logits, hidden, targets, 0),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="must divide"):
        token_nll(logits, hidden, targets, 3)


def test_schedule_warmup_cosine():
    s = lr_schedule(1.0, total_steps=100, warmup_steps=10)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0) and float(s(100)) == pytest.approx(0.0)
    assert float(s(55)) == pytest.approx(0.5, abs=1e-6)  # halfway through the cosine
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_schedule(1.0, 10, 1, "linear")


def test_tiny_model_overfits_a_small_dataset(main_step, samples):
    """Four samples, repeated: the loss falls at least 10x."""
    step, state = main_step
    batch = step_batch([[samples[:2]], [samples[2:4]]])
    losses = []
    for _ in range(50):  # the loss is below 1/50 of the first by step 45
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] / 10, losses[::10]
