"""Train-step time and achieved FLOP/s against the machine's matmul peak, measured in the same run.

    python benchmarks/train_step.py [--steps 10] [--configs tiny,small] [--dtype float32|bfloat16] [--fp8]

For each config a real packed batch comes from the training pipeline (synthetic shapes data, Dynamic-S2
tiles), the jitted train step (all modules trainable) is compiled, then timed over --steps steps (median).
Model FLOPs per step come from nvila_jax.train.flops (forward + backward matmuls, padding included); the
reference is the best time of a square matmul in the same dtype on the same device, so the printed fraction
is achieved / measured peak (an MFU against what this machine really does, not a datasheet number).

  tiny   configs/tiny.py (0.56M parameters: 64-wide ViT, 128-wide 2-layer Qwen2), 12 rows x 256 tokens
  small  a 36M-parameter NVILA (ViT 256 wide x 6 layers at 112 px tiles, Qwen2 512 wide x 8 layers,
         8 heads / 2 KV heads, the tiny vocabulary), 4 rows x 1024 tokens

--fp8 also times each config with every LLM decoder linear in FP8 (config.fp8, min_features=0: these models'
linears are below NVILA's 3584) and prints its step time against the same config without FP8. On a CPU the
FP8 matmuls are emulated, so only a GPU with FP8 units gives a meaningful ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections

from nvila_jax.kernels import fp8 as fp8_lib
from nvila_jax.models.nvila import NVILA
from nvila_jax.train import flops as flops_lib
from nvila_jax.train.config import fp8_config, tiny_config
from nvila_jax.train.loop import data_iterator, initial_params, setup_run
from nvila_jax.train.optimizer import make_optimizer
from nvila_jax.train.step import init_fp8_meta, init_train_state, make_train_step


def small_config() -> ml_collections.ConfigDict:
    c = tiny_config()
    c.model_overrides = ml_collections.ConfigDict({
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 7, "num_attention_heads": 4,
                   "patch_size": 14, "image_size": 112},
        "s2_scales": (112, 224), "max_tiles": 6,
        "projector": {"mm_hidden_size": 512, "hidden_size": 512},
        "llm": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 8,
                "num_key_value_heads": 2, "head_dim": 64}})
    c.data.rows_per_batch, c.data.seq_len, c.data.tile_buckets = 4, 1024, (96,)
    return c


CONFIGS = {"tiny": tiny_config, "small": small_config}


def bench(name: str, steps: int, dtype: str, workdir: str, fp8: bool = False) -> dict:
    cfg = CONFIGS[name]()
    cfg.compute_dtype = dtype
    cfg.fp8.enabled, cfg.fp8.min_features = fp8, 0
    cfg.data.synthetic_records = 200
    run = setup_run(cfg, workdir)
    params = initial_params(cfg, run.model_config)
    trainable = tuple(cfg.trainable)
    tx, sched = make_optimizer(params, trainable=trainable, learning_rate=1e-4, module_learning_rates=None,
                               total_steps=1000, warmup_steps=10)
    module = NVILA(run.model_config, dtype=jnp.dtype(dtype), remat=cfg.remat,
                   llm_dot_general_cls=fp8_lib.llm_dot_general_cls(fp8_config(cfg)))
    step = jax.jit(make_train_step(module, tx, run.geometry, trainable, sched, cfg.loss_chunk), donate_argnums=0)
    state = init_train_state(params, tx, 0, init_fp8_meta(module))
    it = data_iterator(run, seed=0)
    batches = [next(it) for _ in range(steps + 1)]
    device = [{k: jnp.asarray(v) for k, v in b.arrays.items()} for b in batches]
    t = time.perf_counter()
    state, m = step(state, device[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t
    times = []
    for d in device[1:]:
        t = time.perf_counter()
        state, m = step(state, d)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    a = batches[1].arrays
    shape = a["input_ids"].shape
    flops = flops_lib.step_flops(run.model_config, shape[1], shape[2], a["tiles"].shape[1], shape[0], trainable)
    sec = statistics.median(times)
    tokens = statistics.median(int((b.arrays["segment_ids"] > 0).sum()) for b in batches[1:])
    n_params = sum(x.size for x in jax.tree.leaves(params))
    return dict(name=name + (" fp8" if fp8 else ""), params=n_params, shape=f"{shape[0]}x{shape[1]}x{shape[2]}, {a['tiles'].shape[1]} tiles",
                compile_s=compile_s, step_s=sec, tflops=flops / sec / 1e12, tokens_per_s=tokens / sec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--fp8", action="store_true", help="also time each config with FP8 LLM linears")
    args = ap.parse_args()
    dev = jax.devices()[0]
    peak = flops_lib.measured_matmul_peak(size=2048, repeats=10, dtype=args.dtype)
    print(f"device: {dev.device_kind} ({dev.platform}); measured {args.dtype} matmul peak {peak / 1e12:.3f} TFLOP/s")
    if args.fp8:
        print(fp8_lib.describe(fp8_lib.Fp8Config(enabled=True, min_features=0)))
    print(f"{'config':<10} {'params':>8} {'step shape (accum x rows x len)':<34} {'compile':>8} {'step':>9} "
          f"{'TFLOP/s':>8} {'of peak':>8} {'tok/s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            base = None
            for fp8 in (False, True) if args.fp8 else (False,):
                r = bench(name, args.steps, args.dtype, f"{tmp}/{name}", fp8)
                ratio = f"  {base / r['step_s']:.2f}x the step speed without FP8" if fp8 else ""
                base = r["step_s"]
                print(f"{r['name']:<10} {r['params'] / 1e6:>7.1f}M {r['shape']:<34} {r['compile_s']:>7.1f}s "
                      f"{r['step_s'] * 1e3:>7.0f}ms {r['tflops']:>8.4f} {r['tflops'] * 1e12 / peak:>8.1%} "
                      f"{r['tokens_per_s']:>9,.0f}{ratio}", flush=True)


if __name__ == "__main__":
    main()
