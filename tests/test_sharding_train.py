"""The training step (nvila_jax/train/step.py) on meshes of 8 fake CPU devices equals one device: two
optimizer steps, each accumulating two packed micro-batches of Dynamic-S2 images, give the same loss,
gradient norm, parameters and Adam moments (fp32, within 1e-5); optimizer moments are split like their
parameters."""

from __future__ import annotations

import os

import numpy as np
import pytest

from test_sharding import MESHES, TOL, mesh_test_config, run_worker

DEFAULT_MESHES = ((2, 2, 2),)  # the others run with -m slow
STEPS = 2


def train_test_config():
    """The sharding test model with the training demo's two Dynamic-S2 scales (56 px + a 4..6-tile grid)."""
    import dataclasses

    base = mesh_test_config()
    return mesh_test_config(s2_scales=(56, 112), max_tiles=6,
                            projector=dataclasses.replace(base.projector, mm_hidden_size=2 * base.vision.hidden_size))


def one_step_batch(cfg, workdir: str) -> dict[str, np.ndarray]:
    """One optimizer step's arrays from the real pipeline: synthetic shapes records, 8 rows x 320 tokens
    (over 256 keys: blocked attention), 32 tiles per micro-batch, 2 micro-batches."""
    from nvila_jax.data import synthetic
    from nvila_jax.data.mixture import DatasetSpec, Mixture
    from nvila_jax.data.packing import PackingOptions
    from nvila_jax.data.pipeline import build_pipeline
    from nvila_jax.data.sample import SampleOptions
    from nvila_jax.text.tiny_tokenizer import build_tiny_tokenizer

    path = synthetic.write_dataset(os.path.join(workdir, "shapes"), 48, seed=0)
    mixture = Mixture((DatasetSpec("shapes", path, os.path.dirname(path)),))
    packing = PackingOptions(rows=8, seq_len=320, tile_buckets=(32,), accumulation=2, group_steps=1,
                             pad_id=build_tiny_tokenizer().pad_token_id)
    it = iter(build_pipeline(mixture, cfg, "tiny", SampleOptions(max_length=320, max_tiles=32), packing, seed=0))
    return next(it).arrays


def make_step(cfg):
    """(optimizer, train step) for the whole model. Adam's eps = 1: its first steps are then ~lr * g rather
    than ~lr * sign(g), which would turn rounding-level differences of near-zero gradients into lr-sized
    parameter differences."""
    from nvila_jax import sharding
    from nvila_jax.data.packing import VisualGeometry
    from nvila_jax.models.nvila import NVILA
    from nvila_jax.train.optimizer import make_optimizer
    from nvila_jax.train.step import make_train_step

    trainable = ("vision_tower", "projector", "llm")
    tx, schedules = make_optimizer(sharding.abstract_params(cfg), trainable=trainable, learning_rate=1e-2,
                                   module_learning_rates=None, total_steps=10, warmup_steps=0, schedule="constant",
                                   weight_decay=0.1, eps=1.0, max_grad_norm=1.0)
    return tx, make_train_step(NVILA(cfg), tx, VisualGeometry.from_config(cfg), trainable, schedules, loss_chunk=64)


def sharded_step(cfg, tx, step, params, mesh, batch):
    """(initial state, jitted step, batch) placed on `mesh`: parameters by the rules table, Adam moments like
    their parameters, the batch's rows and tiles over the batch axes."""
    import jax

    from nvila_jax import sharding
    from nvila_jax.train.step import init_train_state

    state = init_train_state(params, tx, 0)
    ssh = sharding.train_state_shardings(state, cfg, mesh, tx)
    bsh = sharding.step_batch_shardings(mesh, batch)
    step_fn = jax.jit(step, in_shardings=(ssh, bsh), out_shardings=(ssh, sharding.replicated(mesh)),
                      donate_argnums=0)
    return jax.device_put(state, ssh), step_fn, jax.device_put(batch, bsh)


def run_steps(state, step_fn, batch, steps: int = STEPS):
    """(final state, [[loss, grad_norm] per step])."""
    metrics = []
    for _ in range(steps):
        state, m = step_fn(state, batch)
        metrics.append([float(m["loss"]), float(m["grad_norm"])])
    return state, np.asarray(metrics)


def max_abs_diff(a_tree, b_tree) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)))


def _worker(out: str, meshes: list[tuple[int, ...]]) -> None:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from nvila_jax import sharding
    from nvila_jax.models.nvila import init_params
    from nvila_jax.train.step import init_train_state

    cfg = train_test_config()
    batch = one_step_batch(cfg, out)
    tx, step = make_step(cfg)
    key = jax.random.key(0)
    results = {}
    params = jax.jit(lambda r: nn.meta.unbox(init_params(cfg, r)))(key)
    single, results["metrics/single"] = run_steps(init_train_state(params, tx, 0), jax.jit(step),
                                                  {k: jnp.asarray(v) for k, v in batch.items()})
    for shape in meshes:
        tag = "x".join(map(str, shape))
        mesh = sharding.make_mesh(shape)
        state0, step_fn, placed = sharded_step(cfg, tx, step, sharding.init_params_sharded(cfg, key, mesh), mesh,
                                               batch)
        with sharding.activate(mesh):
            state, results[f"metrics/{tag}"] = run_steps(state0, step_fn, placed)
        want = sharding.opt_state_shardings(tx, state.opt_state, sharding.param_shardings(cfg, mesh), mesh)
        results[f"moments_sharded_like_params/{tag}"] = np.asarray(all(
            a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(jax.tree.leaves(state.opt_state),
                                                                   jax.tree.leaves(want))))
        results[f"param_maxdiff/{tag}"] = np.asarray(max_abs_diff(state.params, single.params))
        results[f"opt_maxdiff/{tag}"] = np.asarray(max_abs_diff(state.opt_state, single.opt_state))
        results[f"param_change/{tag}"] = np.asarray(max_abs_diff(state.params, params))
    np.savez(os.path.join(out, "results.npz"), **results)


def _run(tmp_path, meshes) -> dict[str, np.ndarray]:
    args = ["--out", str(tmp_path)] + [f"--mesh={','.join(map(str, m))}" for m in meshes]
    run_worker("test_sharding_train.py", args, devices=8)
    return dict(np.load(os.path.join(tmp_path, "results.npz")))


def _check(results, shape):
    tag = "x".join(map(str, shape))
    single, got = results["metrics/single"], results[f"metrics/{tag}"]
    assert np.all(np.isfinite(single)) and single[0, 0] > 1.0  # a real cross-entropy over 400 ids
    np.testing.assert_allclose(got, single, rtol=TOL, atol=0)
    assert results[f"param_change/{tag}"] > 1e-3  # the steps moved the parameters
    assert results[f"param_maxdiff/{tag}"] <= TOL
    assert results[f"opt_maxdiff/{tag}"] <= TOL
    assert bool(results[f"moments_sharded_like_params/{tag}"])


@pytest.fixture(scope="module")
def default_results(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("train"), DEFAULT_MESHES)


@pytest.mark.parametrize("shape", DEFAULT_MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_train_steps_equal_one_device(default_results, shape):
    _check(default_results, shape)


@pytest.mark.slow
def test_sharded_train_steps_equal_one_device_on_the_other_meshes(tmp_path):
    others = [m for m in MESHES if m not in DEFAULT_MESHES]
    results = _run(tmp_path, others)
    for shape in others:
        _check(results, shape)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--mesh", action="append", default=[])
    cli = parser.parse_args()
    _worker(cli.out, [tuple(int(x) for x in m.split(",")) for m in cli.mesh])
