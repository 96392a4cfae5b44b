"""Memory planner figures for NVILA-8B full fine-tuning with FSDP, checked against XLA.

    python benchmarks/memory_plan.py                       # the BENCHMARKS.md tables + the XLA check
    python benchmarks/memory_plan.py --check-model tiny    # a quick check on the tiny model

1. `nvila_jax.memory_plan.plan_training` for NVILA-8B on 8 and on 64 devices of 80 GiB (mesh fsdp=-1),
   with the stage-4 recipe (configs/nvila/stage4_image_instruction_tuning.py): one packed row of 8192 tokens
   and up to 48 ViT tiles per device, full remat, bfloat16 compute, float32 master weights + AdamW,
   cross-entropy in 1024-position chunks.
2. The reference, measured in the same run: the real sharded train step (nvila_jax.train.step) of
   `--check-model` compiled by XLA for a mesh of `--check-devices` fake CPU devices (nothing is allocated);
   XLA's buffer assignment gives the per-device bytes of arguments + outputs + temporaries - donated aliases.
   Printed: planner / XLA. XLA for CPU schedules and fuses differently from GPU, so this checks the order
   of magnitude and the split between the components, not the last GiB.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check-model", default="NVILA-8B", help="model compiled for the XLA reference")
    p.add_argument("--check-devices", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--tiles-per-row", type=int, default=48)
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--remat", default="full")
    p.add_argument("--device-memory", type=float, default=80.0)
    return p.parse_args()


def xla_per_device_bytes(config, devices: int, seq_len: int, tiles: int, remat: str, loss_chunk: int) -> dict:
    """XLA's per-device buffer sizes of the FSDP train step (one row per device), compiled only."""
    import jax
    import jax.numpy as jnp

    from nvila_jax import sharding
    from nvila_jax.data.packing import BatchShape, VisualGeometry, array_spec
    from nvila_jax.models.nvila import NVILA
    from nvila_jax.train.optimizer import make_optimizer
    from nvila_jax.train.step import init_train_state, make_train_step

    mesh = sharding.make_mesh({"fsdp": -1}, devices=jax.devices()[:devices])
    trainable = ("vision_tower", "projector", "llm")
    params = sharding.abstract_params(config)
    tx, schedules = make_optimizer(params, trainable=trainable, learning_rate=1e-5, module_learning_rates=None,
                                   total_steps=10, warmup_steps=1)
    geom = VisualGeometry.from_config(config)
    step = make_train_step(NVILA(config, dtype=jnp.bfloat16, remat=remat), tx, geom, trainable, schedules,
                           loss_chunk)
    state = jax.eval_shape(lambda p: init_train_state(p, tx, 0), params)
    batch = {k: jax.ShapeDtypeStruct((1,) + shape, dtype)
             for k, (shape, dtype) in array_spec(geom, BatchShape(devices, seq_len, tiles * devices)).items()}
    ssh = sharding.train_state_shardings(state, config, mesh, tx)
    bsh = sharding.step_batch_shardings(mesh, batch)
    fn = jax.jit(step, in_shardings=(ssh, bsh), out_shardings=(ssh, sharding.replicated(mesh)), donate_argnums=0)
    with sharding.activate(mesh):
        stats = fn.lower(state, batch).compile().memory_analysis()
    return {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes, "aliased": stats.alias_size_in_bytes,
            "total": stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes}


def main() -> int:
    args = _args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.check_devices} " + \
        os.environ.get("XLA_FLAGS", "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from nvila_jax.memory_plan import format_bytes, plan_training
    from nvila_jax.variants import get_variant

    settings = dict(seq_len=args.seq_len, tiles_per_row=args.tiles_per_row, remat=args.remat,
                    loss_chunk=args.loss_chunk)
    for devices in (8, 64):
        plan = plan_training(get_variant("NVILA-8B"), {"fsdp": -1}, devices, rows=devices, **settings)
        print(plan.table(args.device_memory), end="\n\n")

    config = get_variant(args.check_model)
    n = args.check_devices
    plan = plan_training(config, {"fsdp": -1}, n, rows=n, **settings)
    t = time.perf_counter()
    xla = xla_per_device_bytes(config, n, args.seq_len, args.tiles_per_row, args.remat, args.loss_chunk)
    compile_s = time.perf_counter() - t
    print(f"Reference: XLA's buffer assignment for the {config.name} train step on {n} CPU devices "
          f"(jax {jax.__version__}, compiled in {compile_s:.0f} s), per device:")
    print(", ".join(f"{k} {format_bytes(v)}" for k, v in xla.items()))
    print(f"planner total {format_bytes(plan.total)} / XLA total {format_bytes(xla['total'])} = "
          f"{plan.total / xla['total']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
