"""FP8 GEMM vs bf16 GEMM (TFLOP/s, fraction of the card's peak) and an FP8 vs bf16 LLM training step.

    python benchmarks/kernels_fp8.py [--skip-train]

GEMM shapes are NVILA-8B's LLM linears (Qwen2.5-7B: d=3584, mlp=18944) at 8192 tokens. "fp8 xla" is XLA's
FP8 dot_general (cuBLASLt) on pre-quantized operands, "fp8 pallas" the Hopper Mosaic GPU kernel. The
training step is forward + backward + AdamW of a 2-layer Qwen2.5-7B-shaped decoder (4 x 2048 tokens),
bf16 compute, with all linears in bf16 vs FP8 (dynamic per-tensor scaling, the NVILA recipe).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from kernels_common import device_name, init_qwen2, peak_tflops, time_fn
from nvila_jax.kernels import backend, fp8
from nvila_jax.kernels.fp8.pallas_hopper import TileConfig, fp8_matmul_nt

GEMMS = [(8192, 3584, 18944), (8192, 18944, 3584), (8192, 3584, 3584), (8192, 8192, 8192)]  # (M, K, N)
PALLAS_TILES = [TileConfig(128, 128, 128, 4), TileConfig(128, 128, 128, 6), TileConfig(128, 256, 128, 3),
                TileConfig(64, 256, 128, 4)]


def gemm_table() -> dict:
    peaks = peak_tflops()
    print(f"device: {device_name()}; peak dense TFLOP/s (datasheet) bf16/fp8: {peaks}")
    print(f"{'M x K x N':22s} {'bf16 TF/s':>9s} {'%pk':>4s} {'fp8 xla':>8s} {'%pk':>4s} {'fp8 pallas':>10s} {'%pk':>4s} "
          f"{'best tiles':>18s} {'xla fp8/bf16':>12s} {'pallas/xla':>10s}")
    results = {}
    for m, k, n in GEMMS:
        ka, kb = jax.random.split(jax.random.key(m + k + n))
        a = jax.random.normal(ka, (m, k), jnp.bfloat16)
        b = jax.random.normal(kb, (k, n), jnp.bfloat16)
        qa, sa = fp8.quantize_dynamic(a, fp8.E4M3)
        qb_t, sb = fp8.quantize_dynamic(b.T, fp8.E4M3)
        flops = 2 * m * n * k
        t_bf16 = time_fn(jax.jit(lambda a, b: a @ b), a, b)
        t_xla = time_fn(jax.jit(lambda a, b, sa, sb: fp8.scaled_matmul(a, b, sa, sb, impl="xla")), qa, qb_t, sa, sb)
        ref = fp8.scaled_matmul_reference(qa, qb_t, sa, sb)
        err = lambda y: float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))  # noqa: E731
        errs = [err(fp8.scaled_matmul(qa, qb_t, sa, sb, out_dtype=jnp.float32, impl="xla"))]
        t_pl, best = None, None
        if backend.is_hopper():
            errs.append(err(fp8_matmul_nt(qa, qb_t, sa, sb, out_dtype=jnp.float32)))
            for tiles in PALLAS_TILES:
                try:
                    t = time_fn(jax.jit(lambda a, b, sa, sb, tiles=tiles: fp8_matmul_nt(a, b, sa, sb, tiles=tiles)),
                                qa, qb_t, sa, sb)
                except Exception as e:  # a tile shape the compiler rejects (registers, shared memory)
                    print(f"  tiles {tiles} failed: {type(e).__name__}: {str(e)[:160]}")
                    continue
                if t_pl is None or t < t_pl:
                    t_pl, best = t, tiles
        tf = lambda t: flops / t / 1e12  # noqa: E731
        pk_b, pk_8 = peaks or (float("nan"), float("nan"))
        row = f"{m}x{k}x{n:<10d} {tf(t_bf16):9.0f} {tf(t_bf16) / pk_b * 100:3.0f}% {tf(t_xla):8.0f} {tf(t_xla) / pk_8 * 100:3.0f}%"
        if t_pl:
            tiles_s = f"{best.tile_m}x{best.tile_n}x{best.tile_k}/{best.steps}"
            row += f" {tf(t_pl):10.0f} {tf(t_pl) / pk_8 * 100:3.0f}% {tiles_s:>18s} {t_bf16 / t_xla:12.2f} {t_xla / t_pl:10.2f}"
        else:
            row += f" {'-':>10s} {'':4s} {'':>18s} {t_bf16 / t_xla:12.2f} {'-':>10s}"
        print(row + "  rel err vs f32 (xla, pallas): " + ", ".join(f"{e:.1e}" for e in errs), flush=True)
        results[(m, k, n)] = (t_bf16, t_xla, t_pl)
    return results


def train_step_table() -> None:
    from nvila_jax.config import Qwen2Config
    from nvila_jax.models.qwen2 import Qwen2LM

    cfg = Qwen2Config(vocab_size=32768, hidden_size=3584, intermediate_size=18944, num_hidden_layers=2,
                      num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    b, t = 2, 2048
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    print(f"\ntraining step: 2-layer Qwen2.5-7B-shaped decoder, {b}x{t} tokens, bf16 compute, AdamW")
    times = {}
    for name, fcfg in [("bf16", None), ("fp8 dynamic", fp8.Fp8Config(enabled=True)),
                       ("fp8 delayed", fp8.Fp8Config(enabled=True, scaling="delayed"))]:
        model = Qwen2LM(cfg, dtype=jnp.bfloat16, dot_general_cls=fp8.llm_dot_general_cls(fcfg))
        variables = init_qwen2(model, 1, 128)
        params, meta = variables["params"], {k: v for k, v in variables.items() if k != "params"}
        opt = optax.adamw(1e-4)
        state = opt.init(params)

        def loss_fn(params, meta):
            x = model.apply({"params": params}, ids, method=Qwen2LM.embed)
            h, _ = model.apply({"params": params, **meta}, x, pos, seg)
            logits = model.apply({"params": params}, h, method=Qwen2LM.logits)
            return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

        @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
        def step(params, state, meta):
            loss, (g, new_meta) = jax.value_and_grad(loss_fn, argnums=(0, 1))(params, meta)
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, new_meta, loss

        laps = []
        for i in range(8):  # a real training loop: each step consumes the last one's state
            t0 = time.perf_counter()
            params, state, meta, loss = step(params, state, meta)
            loss.block_until_ready()
            laps.append(time.perf_counter() - t0)
        times[name] = statistics.median(laps[2:])
        print(f"{name:12s} {times[name] * 1e3:8.1f} ms/step  speed-up vs bf16 {times['bf16'] / times[name]:.2f}x",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip-train", action="store_true")
    args = p.parse_args()
    if backend.platform() != "gpu":
        print("FP8 GEMM timings need a GPU (on CPU FP8 is emulated); nothing to measure here.")
        return
    gemm_table()
    if not args.skip_train:
        train_step_table()


if __name__ == "__main__":
    main()
