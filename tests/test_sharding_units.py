"""The parts of sharding, multi-host setup and the memory planner that need no devices: mesh shapes from
configs, the rules table covering every logical axis name of the models, spec fitting, environment-driven
jax.distributed setup, and per-device byte counts against independent arithmetic."""

from __future__ import annotations

import glob
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from nvila_jax import sharding
from nvila_jax.distributed import DistributedSetupError, initialize_from_env, is_primary
from nvila_jax.memory_plan import GIB, plan_inference, plan_training
from nvila_jax.variants import get_variant, tiny, tiny_lite
from test_sharding import mesh_test_config

MODELS_DIR = os.path.join(os.path.dirname(sharding.__file__), "models")


# ---------------------------------------------------------------------------------------------- meshes
@pytest.mark.parametrize("spec, devices, want", [
    (None, 8, (1, 8, 1)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4, 1)),
    ({"tensor": 2}, 2, (1, 1, 2)),
    ((2, 2, 2), 8, (2, 2, 2)),
    ((1, -1, 4), 64, (1, 16, 4)),
    ("data=2,fsdp=-1,tensor=2", 16, (2, 4, 2)),
    ("8,1,1", 8, (8, 1, 1)),
    ({"data": -1}, 1, (1, 1, 1)),
])
def test_mesh_shapes_from_configs(spec, devices, want):
    shape = sharding.resolve_mesh_shape(spec, devices)
    assert tuple(shape[a] for a in sharding.MESH_AXES) == want


@pytest.mark.parametrize("spec, devices, message", [
    ({"data": 3, "fsdp": -1}, 8, "not divisible by 3"),
    ((2, 2, 2), 4, "has 8 devices but 4 are available"),
    ({"pipeline": 2}, 2, "unknown axes"),
    ((2, 2), 4, "must have 3 sizes"),
    ((-1, -1, 1), 4, "at most one -1"),
    ({"data": 0}, 4, "sizes must be positive"),
    ("data=2,4", 8, "use either"),
    ("data=x", 8, "'x' is not an integer"),
])
def test_bad_mesh_shapes_are_named(spec, devices, message):
    with pytest.raises(sharding.MeshShapeError, match=re.escape(message)):
        sharding.resolve_mesh_shape(spec, devices)


def test_make_mesh_uses_auto_axes():
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert mesh.axis_names == sharding.MESH_AXES
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# ---------------------------------------------------------------------------------------------- the table
def _constraint_names() -> set[str]:
    """Every logical name in an `nn.with_logical_constraint(..., (names))` of nvila_jax/models."""
    names = set()
    for path in glob.glob(os.path.join(MODELS_DIR, "*.py")):
        with open(path, encoding="utf-8") as f:
            source = f.read()
        for call in re.findall(r"with_logical_constraint\((.*?\(.*?\))\)", source, flags=re.S):
            names |= set(re.findall(r'"([a-z_]+)"', call))
    return names


@pytest.mark.parametrize("variant", ["tiny", "tiny-lite", "NVILA-8B", "NVILA-Lite-2B"])
def test_rules_table_names_every_logical_axis_of_the_models(variant):
    table = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    specs = sharding.param_logical_specs(get_variant(variant))
    param_names = {n for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)) for n in s if n}
    used = param_names | _constraint_names()
    assert {"batch", "tiles", "length", "embed", "mlp", "vocab"} <= used  # the scan found the constraints
    assert used <= table, f"logical names missing from LOGICAL_AXIS_RULES: {sorted(used - table)}"


def test_no_parameter_names_one_logical_axis_twice():
    for cfg in (tiny(), tiny_lite(), get_variant("NVILA-8B-Video")):
        for spec in jax.tree.leaves(sharding.param_logical_specs(cfg), is_leaf=lambda x: isinstance(x, P)):
            named = [n for n in spec if n]
            assert len(named) == len(set(named)), spec


def test_activations_claim_the_batch_axes_before_the_width():
    assert sharding.logical_to_mesh_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_mesh_spec(("tiles", "length", "mlp")) == P(("data", "fsdp"), None, "tensor")
    assert sharding.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")


@pytest.mark.parametrize("spec, shape, sizes, want", [
    (P(("data", "fsdp"), "tensor"), (8, 6), {"data": 2, "fsdp": 4, "tensor": 2}, P(("data", "fsdp"), "tensor")),
    (P(("data", "fsdp"), "tensor"), (2, 6), {"data": 2, "fsdp": 2, "tensor": 4}, P("data")),
    (P("tensor", "fsdp"), (151651, 3584), {"data": 1, "fsdp": 8, "tensor": 2}, P(None, "fsdp")),
    (P(None, "fsdp"), (3, 5), {"data": 1, "fsdp": 2, "tensor": 1}, P()),
    (P(("data", "fsdp")), (1, 4), {"data": 8, "fsdp": 1, "tensor": 1}, P()),
])
def test_fit_spec_keeps_only_axes_that_divide(spec, shape, sizes, want):
    assert sharding.fit_spec(spec, shape, sizes) == want


# ---------------------------------------------------------------------------------------------- distributed
def test_single_process_environments_start_nothing():
    assert initialize_from_env({}) is False
    assert initialize_from_env({"NVILA_DISTRIBUTED": "off", "NVILA_NUM_PROCESSES": "4"}) is False
    assert initialize_from_env({"NVILA_NUM_PROCESSES": "1"}) is False
    assert initialize_from_env({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1"}) is False
    assert not jax.distributed.is_initialized() and is_primary()


@pytest.mark.parametrize("env, message", [
    ({"NVILA_DISTRIBUTED": "maybe"}, "NVILA_DISTRIBUTED='maybe'"),
    ({"NVILA_NUM_PROCESSES": "two"}, "NVILA_NUM_PROCESSES='two' is not an integer"),
    ({"NVILA_NUM_PROCESSES": "0"}, "must be at least 1"),
    ({"NVILA_NUM_PROCESSES": "2"}, "NVILA_PROCESS_ID is not set"),
    ({"NVILA_NUM_PROCESSES": "2", "NVILA_PROCESS_ID": "2"}, "outside 0..1"),
    ({"NVILA_NUM_PROCESSES": "2", "NVILA_PROCESS_ID": "1"}, "JAX_COORDINATOR_ADDRESS"),
])
def test_incomplete_multi_process_environments_are_named(env, message):
    with pytest.raises(DistributedSetupError, match=re.escape(message)):
        initialize_from_env(env)


# ---------------------------------------------------------------------------------------------- memory plan
def _rows(plan) -> dict[str, int]:
    return {r.name: r.bytes_per_device for r in plan.rows}


def _param_bytes_oracle(cfg, sizes, itemsize, modules=("vision_tower", "projector", "llm")) -> int:
    """Parameter bytes per device from the logical names alone: an `embed` dimension splits over fsdp, an
    mlp / heads / vocab dimension over tensor (the test config divides them all)."""
    total = 0
    specs = {m: sharding.param_logical_specs(cfg)[m] for m in modules}
    shapes = {m: sharding.abstract_params(cfg)[m] for m in modules}
    for names, a in zip(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)), jax.tree.leaves(shapes)):
        ways = sizes["fsdp"] if "embed" in names else 1
        ways *= sizes["tensor"] if {"mlp", "heads", "q_heads", "kv_heads", "vocab"} & set(names) else 1
        total += math.prod(a.shape) * itemsize // ways
    return total


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 1, 8)])
def test_planned_parameter_gradient_and_adam_bytes(shape):
    cfg = mesh_test_config()
    sizes = dict(zip(sharding.MESH_AXES, shape))
    rows = _rows(plan_training(cfg, shape, 8, rows=8, seq_len=64, tiles_per_row=5))
    want = _param_bytes_oracle(cfg, sizes, 4)
    assert rows["parameters"] == want and rows["gradients"] == want
    assert 2 * want <= rows["optimizer state"] <= 2 * want + 64  # mu + nu (+ step counters)


def test_frozen_modules_have_no_gradients_or_optimizer_state():
    cfg = mesh_test_config()
    full = _rows(plan_training(cfg, (1, 8, 1), 8, rows=8, seq_len=64, tiles_per_row=5))
    llm_only = _rows(plan_training(cfg, (1, 8, 1), 8, rows=8, seq_len=64, tiles_per_row=5, trainable=("llm",)))
    assert llm_only["parameters"] == full["parameters"]
    assert llm_only["gradients"] == _param_bytes_oracle(cfg, {"fsdp": 8, "tensor": 1}, 4, ("llm",))
    assert 2 * llm_only["gradients"] <= llm_only["optimizer state"] <= 2 * llm_only["gradients"] + 64
    assert llm_only["activations saved for backward"] < full["activations saved for backward"]


def test_activation_estimates_follow_batch_remat_and_tensor_split():
    cfg = tiny(max_tiles=6, s2_scales=(56, 112), projector=tiny().projector.__class__("mlp_downsample", 64, 64))

    def saved(mesh, rows, remat):
        return _rows(plan_training(cfg, mesh, 8, rows=rows, seq_len=128, tiles_per_row=5, remat=remat,
                                   compute_dtype=jnp.float32))

    one, two = saved((1, 8, 1), 8, "none"), saved((1, 8, 1), 16, "none")
    assert two["activations saved for backward"] == pytest.approx(2 * one["activations saved for backward"], rel=0.02)
    full = saved((1, 8, 1), 8, "full")
    assert full["activations saved for backward"] < one["activations saved for backward"] / 3
    assert 0 < full["layer rebuilt in backward"] < one["activations saved for backward"]
    # Per row, the LLM layer inputs alone are 2 layers x 128 tokens x 64 wide x 4 bytes (remat keeps them).
    assert full["activations saved for backward"] >= 2 * 128 * 64 * 4
    split = saved((1, 4, 2), 4, "none")  # the same rows per device, MLP and vocabulary halved
    assert split["activations saved for backward"] < one["activations saved for backward"]


def test_planned_kv_cache_bytes():
    cfg = mesh_test_config()
    c = cfg.llm
    for shape, rows in (((2, 2, 2), 8), ((1, 1, 8), 2)):
        sizes = dict(zip(sharding.MESH_AXES, shape))
        got = _rows(plan_inference(cfg, shape, 8, rows=rows, max_length=256))["KV cache"]
        row_ways = sizes["data"] * sizes["fsdp"] if rows % (sizes["data"] * sizes["fsdp"]) == 0 else 1
        want = 2 * c.num_hidden_layers * rows * 256 * c.num_key_value_heads * c.head_dim * 2
        assert got == want // (row_ways * sizes["tensor"])


def test_nvila_8b_fsdp_plan_and_the_memory_warning():
    cfg = get_variant("NVILA-8B")
    plan = plan_training(cfg, {"fsdp": -1}, 64, rows=64, seq_len=1024, tiles_per_row=14)
    n = sum(math.prod(a.shape) for a in jax.tree.leaves(sharding.abstract_params(cfg)))
    params = _rows(plan)["parameters"]
    assert n * 4 / 64 <= params <= 1.01 * n * 4 / 64  # all but biases and norms split 64 ways
    assert plan.warning(80) is None and plan.total < 80 * GIB
    assert "exceeds the 1 GiB" in plan.warning(1) and "WARNING" in plan.table(1)
    assert "| **total** |" in plan.table(80) and "fsdp=64" in plan.title


def test_memory_plan_command(capsys):
    from nvila_jax.cli import main

    assert main(["memory-plan", "--model", "tiny", "--devices", "8", "--mesh", "data=2,fsdp=-1", "--seq-len", "128",
                 "--tiles-per-row", "5", "--device-memory", "0.001"]) == 0
    out = capsys.readouterr().out
    assert "mesh data=2 fsdp=4 tensor=1 (8 devices)" in out and "optimizer state" in out and "WARNING" in out
    assert main(["memory-plan", "--model", "tiny", "--devices", "8", "--mode", "inference"]) == 0
    assert "KV cache" in capsys.readouterr().out
    assert main(["memory-plan", "--model", "tiny", "--devices", "6", "--mesh", "data=4,fsdp=-1"]) == 2
    assert "not divisible by 4" in capsys.readouterr().err


def test_train_state_and_step_batch_shardings():
    import optax

    from nvila_jax.train.step import init_train_state

    cfg = mesh_test_config()
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx = optax.adamw(1e-3)
    state = jax.eval_shape(lambda: init_train_state(sharding.abstract_params(cfg), tx, 0))
    got = sharding.train_state_shardings(state, cfg, mesh, tx)
    assert got.params["llm"]["layers"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert got.opt_state[0].mu["llm"]["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")
    assert got.step.spec == P() and got.rng.spec == P()
    arrays = {"input_ids": jax.ShapeDtypeStruct((2, 8, 64), jnp.int32),
              "tiles": jax.ShapeDtypeStruct((2, 16, 56, 56, 3), jnp.uint8),
              "s2_rows_0": jax.ShapeDtypeStruct((2, 4, 8, 16), jnp.float32)}
    batch = sharding.step_batch_shardings(mesh, arrays)
    assert batch["input_ids"].spec == P(None, ("data", "fsdp"))
    assert batch["tiles"].spec == P(None, ("data", "fsdp"))
    assert batch["s2_rows_0"].spec == P()


def test_blocked_attention_is_split_per_device_only_under_a_mesh():
    from nvila_jax.models.layers import blocked_attention

    q = jax.ShapeDtypeStruct((2, 300, 4, 8), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, 300, 2, 8), jnp.float32)
    fn = sharding.per_device_attention(blocked_attention)
    plain = str(jax.make_jaxpr(lambda q, k, v: fn(q, k, v, None, 0.1))(q, kv, kv))
    with sharding.activate(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        split = str(jax.make_jaxpr(lambda q, k, v: fn(q, k, v, None, 0.1))(q, kv, kv))
    assert "shard_map" not in plain and "shard_map" in split
