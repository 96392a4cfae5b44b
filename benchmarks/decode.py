"""Decoding at batch 1 and batch 8 with a Qwen2.5-0.5B-shaped LLM: nvila_jax's engine against HF
transformers `generate` (PyTorch) on the same weights, float32, same threads; tokens/s, and bytes of weights
read per second against the machine's measured memory bandwidth.

    python benchmarks/decode.py [--batches 1,8] [--prompt 128] [--new 16] [--layers 24] [--repeats 3]

Decoding is bound by reading every weight once per step, so weights bytes/s = (weight bytes per step) x
(steps/s) measures how close a framework gets to the memory system's limit (KV-cache reads, small here,
are not counted). Decode time is the time of generating `--new` tokens minus the time of generating one
(which is the prefill), for both frameworks; every row generates exactly `--new` tokens (no stop tokens).
Each measurement follows a fresh measurement of the read bandwidth (the fastest reader's), and its fraction
is taken against that: the memory system is shared with the host's neighbours.
"""

from __future__ import annotations

import argparse

import inference_common as common  # noqa: F401  (sets threads, test helpers on sys.path)
import numpy as np
import torch

from nvila_jax.accounting import llm_decode_weight_bytes
from nvila_jax.inference.engine import Engine
from nvila_jax.inference.request import Request
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.model import inference_module
from nvila_jax.text.fusion import FusedSequence


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per row")
    p.add_argument("--new", type=int, default=16, help="tokens generated per row")
    p.add_argument("--layers", type=int, default=24, help="LLM depth (Qwen2.5-0.5B has 24)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    limits, cfg, ref, params = common.setup(vision_layers=1, llm_layers=args.layers)
    module = inference_module(cfg)  # as NVILAModel builds it
    engine = Engine(cfg, module, stop_token_ids=(), pad_id=0)
    weight_bytes = llm_decode_weight_bytes(cfg.llm, 4)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = rng.integers(0, 151000, (batch, args.prompt))
        requests = [Request(r, FusedSequence(r, np.full_like(r, -1)), (), None) for r in ids.astype(np.int32)]

        def run_jax(new: int):
            tokens, _, _ = engine.generate(params, requests, [SamplingParams(new)] * batch)
            assert all(len(t) == new for t in tokens)
            return tokens

        t_ids = torch.from_numpy(ids)

        def run_torch(new: int):
            with torch.no_grad():
                out = ref.llm.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                                       min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out.shape[1] == args.prompt + new
            return out[:, args.prompt:].tolist()

        same = run_jax(args.new) == run_torch(args.new)  # warms up generate(new); then generate(1):
        run_jax(1), run_torch(1)
        runs = common.decode_beside_bandwidth({"nvila_jax": run_jax, "HF generate (PyTorch)": run_torch}, limits,
                                              args.new, args.repeats)
        for name, r in runs.items():
            steps_per_s = 1.0 / r.best
            rows.append((str(batch), name, f"{batch * steps_per_s:.1f}", f"{steps_per_s:.2f}",
                         f"{weight_bytes * steps_per_s / 1e9:.2f}", r.limit_range(), r.of_limit(weight_bytes)))
        speed_up = runs["HF generate (PyTorch)"].best / runs["nvila_jax"].best
        print(f"batch {batch}: greedy tokens identical in both frameworks: {same}; "
              f"speed-up over HF generate: {speed_up:.2f}x", flush=True)
    print(f"\ndecode, Qwen2.5-0.5B shape ({args.layers} layers), float32, {weight_bytes / 1e9:.2f} GB of weights per "
          f"step, prompt {args.prompt} tokens, {args.new} new tokens per row")
    print(common.report(rows, ("batch", "framework", "tokens/s (best)", "steps/s (best)", "weights GB/s (best)",
                               "read bandwidth beside the runs, GB/s", "of read bandwidth (best / median run)")))


if __name__ == "__main__":
    main()
