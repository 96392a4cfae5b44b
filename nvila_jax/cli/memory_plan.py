"""`nvila-jax memory-plan`: per-device memory of a training or inference setup, from shapes alone."""

from __future__ import annotations

import argparse

COMMAND = "memory-plan"
HELP = "per-device memory (parameters, optimizer state, activations, KV cache) of a model on a mesh"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="NVILA-8B", help="a variant name (e.g. NVILA-8B) or an nvila_jax model dir")
    p.add_argument("--devices", type=int, required=True, help="number of devices of the job")
    p.add_argument("--mesh", default=None,
                   help="mesh shape, e.g. fsdp=-1 (the default: FSDP over every device) or data=2,fsdp=-1,tensor=2")
    p.add_argument("--mode", choices=("train", "inference"), default="train")
    p.add_argument("--rows", type=int, default=None,
                   help="sequences in the global (micro-)batch; default: one per device (train) or 1 (inference)")
    p.add_argument("--seq-len", type=int, default=4096, help="train: tokens per sequence")
    p.add_argument("--tiles-per-row", type=int, default=14,
                   help="train: ViT tiles per sequence (14 = one 1344x1344 Dynamic-S2 image of NVILA-8B)")
    p.add_argument("--remat", default="full", help="train: none | full | dots | dots_all")
    p.add_argument("--loss-chunk", type=int, default=0, help="train: positions per cross-entropy chunk (0: rows)")
    p.add_argument("--trainable", default="vision_tower,projector,llm", help="train: modules that are trained")
    p.add_argument("--param-dtype", default=None, help="default: float32 (train), bfloat16 (inference)")
    p.add_argument("--compute-dtype", default="bfloat16", help="train: activation dtype")
    p.add_argument("--max-length", type=int, default=None, help="inference: KV cache length (default: context)")
    p.add_argument("--cache-dtype", default="bfloat16", help="inference: KV cache dtype")
    p.add_argument("--device-memory", type=float, default=80.0, help="GiB per device; warns when exceeded")


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    import jax.numpy as jnp

    from nvila_jax.memory_plan import plan_inference, plan_training
    from nvila_jax.sharding import MeshShapeError

    def dtype(name: str, flag: str):
        try:
            return jnp.dtype(name)
        except TypeError:
            raise SystemExit(f"nvila-jax memory-plan: {flag} {name!r} is not a dtype (e.g. float32, bfloat16)")

    if os.path.isdir(args.model):
        from nvila_jax.checkpoint import read_config

        config = read_config(args.model)
    else:
        from nvila_jax.variants import get_variant

        try:
            config = get_variant(args.model)
        except KeyError as e:
            print(f"nvila-jax memory-plan: --model: {e.args[0]}", file=sys.stderr)
            return 2
    try:
        if args.mode == "train":
            plan = plan_training(
                config, args.mesh, args.devices, rows=args.rows or args.devices, seq_len=args.seq_len,
                tiles_per_row=args.tiles_per_row, remat=args.remat, loss_chunk=args.loss_chunk,
                param_dtype=dtype(args.param_dtype or "float32", "--param-dtype"),
                compute_dtype=dtype(args.compute_dtype, "--compute-dtype"),
                trainable=tuple(m.strip() for m in args.trainable.split(",") if m.strip()))
        else:
            plan = plan_inference(
                config, args.mesh, args.devices, rows=args.rows or 1, max_length=args.max_length or config.model_max_length,
                param_dtype=dtype(args.param_dtype or "bfloat16", "--param-dtype"),
                cache_dtype=dtype(args.cache_dtype, "--cache-dtype"))
    except (MeshShapeError, ValueError) as e:
        print(f"nvila-jax memory-plan: {e}", file=sys.stderr)
        return 2
    print(plan.table(args.device_memory))
    return 0
