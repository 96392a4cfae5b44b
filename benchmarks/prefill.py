"""LLM prefill of 2,048 tokens with a Qwen2.5-0.5B-shaped LLM: nvila_jax against HF transformers (PyTorch,
sdpa attention) on the same weights, float32, same threads, and achieved FLOP/s against the machine's
measured float32 matmul peak.

    python benchmarks/prefill.py [--tokens 2048] [--layers 24] [--repeats 3]

nvila_jax runs the engine's jitted prefill (writes the KV cache, logits of the last position); PyTorch runs
the HF forward with a cache (`use_cache=True`, `logits_to_keep=1`). FLOPs are the matmul FLOPs of a causal
prefill (nvila_jax.accounting.llm_prefill_flops). The reference's work is the whole prefill; nvila_jax
executes less: its last layer computes keys and values for every token and the rest for the last one only.
Both are reported, as for the vision encoder: FLOP/s at the work executed, and at the reference's work.
Each timed run follows a fresh measurement of the peak (the fastest library's GEMM), and its fraction of the
peak is taken against that measurement: the host's speed drifts by more than the margins measured here.
"""

from __future__ import annotations

import argparse

import inference_common as common  # noqa: F401  (sets threads, test helpers on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import torch

from nvila_jax.accounting import llm_prefill_flops
from nvila_jax.inference.engine import PrefillInputs, _prefill
from nvila_jax.model import inference_module
from nvila_jax.models.qwen2 import KVCache


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=24, help="LLM depth (Qwen2.5-0.5B has 24)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    limits, cfg, ref, params = common.setup(vision_layers=1, llm_layers=args.layers)
    n = args.tokens
    ids = np.random.default_rng(0).integers(0, 151000, (1, n)).astype(np.int32)
    flops = llm_prefill_flops(cfg.llm, n)
    executed = llm_prefill_flops(cfg.llm, n, last_only=True)

    module = inference_module(cfg)  # as NVILAModel builds it
    inputs = PrefillInputs(jnp.asarray(ids), jnp.full((1, n), -1, jnp.int32), jnp.arange(n, dtype=jnp.int32)[None],
                           jnp.ones((1, n), jnp.int32), jnp.zeros((0, cfg.llm.hidden_size), jnp.float32))
    cache_len = n + 64

    def run_jax():
        cache = KVCache.init(cfg.llm, 1, cache_len, jnp.float32)
        logits, cache = _prefill(module, params, inputs, cache)
        jax.block_until_ready((logits, cache))
        return logits

    t_ids = torch.from_numpy(ids.astype(np.int64))

    def run_torch():
        with torch.no_grad():
            return ref.llm(input_ids=t_ids, use_cache=True, logits_to_keep=1).logits

    diff = float(np.abs(np.asarray(run_jax())[0] - run_torch()[0, -1].numpy()).max())
    runs = common.timed_beside_peak({"nvila_jax": run_jax, "HF transformers (PyTorch)": run_torch}, limits,
                                    args.repeats)  # both warmed up by the comparison
    rows = []
    for (name, r), work in zip(runs.items(), (executed, flops)):
        rows.append((name, f"{r.best:.2f}", f"{r.median:.2f}", f"{work / 1e12:.3f}", f"{work / r.best / 1e9:.0f}",
                     r.limit_range(), r.of_limit(work), r.of_limit(flops)))
    jax_best, torch_best = runs["nvila_jax"].best, runs["HF transformers (PyTorch)"].best
    print(f"\nprefill of {n} tokens, Qwen2.5-0.5B shape ({args.layers} layers), float32, "
          f"{flops / 1e12:.3f} TFLOP (nvila_jax executes {executed / 1e12:.3f}); last-position logits differ by {diff:.1e}")
    print(common.report(rows, ("framework", "best s", "median s", "TFLOP executed", "executed GFLOP/s (best)",
                               "peak beside the runs, GFLOP/s", "executed of peak (best / median run)",
                               "reference work of peak (best / median run)")))
    print(f"\nspeed-up over PyTorch: {torch_best / jax_best:.2f}x (best of {args.repeats}); at equal work (executed "
          f"FLOP/s ratio): {executed / jax_best / (flops / torch_best):.2f}x")


if __name__ == "__main__":
    main()
