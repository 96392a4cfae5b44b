"""LLM prefill and decode on a GPU in bfloat16 with a Qwen2.5-0.5B-shaped LLM: nvila_jax's engine against HF
transformers (PyTorch, sdpa attention) on the same GPU and the same weights, with achieved FLOP/s against
the GPU's measured bf16 matmul rate and weight bytes/s against its measured read bandwidth.

    python benchmarks/gpu_inference.py [--tokens 2048] [--batches 1,8,32] [--layers 24] [--repeats 5]

The CPU benchmarks (prefill.py, decode.py) are the issue's float32 measurements; this is their bf16 GPU
counterpart, timed the same way: prefill = the engine's jitted prefill vs the HF forward with a cache and
`logits_to_keep=1`; decode time = time of `--new` tokens minus the time of one, both frameworks. The row
"nvila_jax (sampling step)" runs the same greedy requests through the step that can also sample (a device-side
conditional per step), which the engine compiles only when some request samples.
"""

from __future__ import annotations

import argparse

import inference_common as common  # noqa: F401  (test helpers on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import torch

from nvila_jax.accounting import llm_decode_weight_bytes, llm_prefill_flops
from nvila_jax.inference.engine import Engine, PrefillInputs, _decode_steps, _prefill
from nvila_jax.inference.request import Request
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.model import inference_module
from nvila_jax.models.qwen2 import KVCache
from nvila_jax.text.fusion import FusedSequence


def synchronizer(device: str):
    """Waits for torch's queued work on `device` (nothing to wait for on a CPU)."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def gpu_limits(device: str, n: int) -> tuple[float, float]:
    """(best bf16 GEMM FLOP/s of torch and XLA on an n^3 product, best read bytes/s summing 4 GiB of bf16)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    sync = synchronizer(device)
    t_torch, _ = common.timed(lambda: (torch.mm(a, a), sync()), repeats=10, warmup=3)
    ja = jnp.asarray(a.float().cpu().numpy(), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    t_jax, _ = common.timed(lambda: mm(ja, ja).block_until_ready(), repeats=10, warmup=3)
    big = torch.randn(2**31, device=device, dtype=torch.bfloat16) if device == "cuda" else a.flatten()
    r_torch, _ = common.timed(lambda: (big.sum(dtype=torch.float32), sync()), repeats=10, warmup=3)
    jbig = jnp.ones(big.numel(), jnp.bfloat16)
    total = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    r_jax, _ = common.timed(lambda: total(jbig).block_until_ready(), repeats=10, warmup=3)
    return 2.0 * n**3 / min(t_torch, t_jax), 2.0 * big.numel() / min(r_torch, r_jax)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="prefill length")
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes")
    p.add_argument("--prompt", type=int, default=128, help="decode prompt tokens per row")
    p.add_argument("--new", type=int, default=32, help="decode tokens generated per row")
    p.add_argument("--layers", type=int, default=24, help="LLM depth (Qwen2.5-0.5B has 24)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul-size", type=int, default=8192, help="side of the square product the peak is read from")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"jax devices {jax.devices()}; torch device {device}"
          f" ({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'})", flush=True)
    peak, bandwidth = gpu_limits(device, args.matmul_size)
    print(f"measured: bf16 matmul {peak / 1e12:.0f} TFLOP/s, read bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    cfg = common.bench_config(vision_layers=1, llm_layers=args.layers)
    ref, params = common.reference_and_params(cfg)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    llm = ref.llm.to(device=device, dtype=torch.bfloat16)
    sync = synchronizer(device)
    module = inference_module(cfg, jnp.bfloat16)

    n = args.tokens
    ids = np.random.default_rng(0).integers(0, 151000, (1, n)).astype(np.int32)
    inputs = PrefillInputs(jnp.asarray(ids), jnp.full((1, n), -1, jnp.int32), jnp.arange(n, dtype=jnp.int32)[None],
                           jnp.ones((1, n), jnp.int32), jnp.zeros((0, cfg.llm.hidden_size), jnp.bfloat16))

    def prefill_jax():
        logits, cache = _prefill(module, params, inputs, KVCache.init(cfg.llm, 1, n + 64, jnp.bfloat16))
        jax.block_until_ready((logits, cache))
        return logits

    t_ids = torch.from_numpy(ids.astype(np.int64)).to(device)

    def prefill_torch():
        with torch.no_grad():
            out = llm(input_ids=t_ids, use_cache=True, logits_to_keep=1).logits
        sync()
        return out

    jax_logits, torch_logits = np.asarray(prefill_jax(), np.float32)[0], prefill_torch()[0, -1].float().cpu().numpy()
    diff = float(np.abs(jax_logits - torch_logits).max() / np.abs(torch_logits).max())
    flops = llm_prefill_flops(cfg.llm, n)
    rows = []
    for name, fn in (("nvila_jax", prefill_jax), ("HF transformers (PyTorch)", prefill_torch)):
        best, med = common.timed(fn, args.repeats, warmup=1)
        rows.append((name, f"{best * 1e3:.1f}", f"{med * 1e3:.1f}", f"{flops / best / 1e12:.0f}",
                     f"{flops / best / peak:.0%}"))
    print(f"\nprefill of {n} tokens, Qwen2.5-0.5B shape ({args.layers} layers), bf16, {flops / 1e12:.2f} TFLOP "
          f"(reference work); last-position logits differ by {diff:.1e} of their largest")
    print(common.report(rows, ("framework", "best ms", "median ms", "TFLOP/s", "of measured peak")))
    print(f"speed-up over PyTorch: {float(rows[1][1]) / float(rows[0][1]):.2f}x", flush=True)

    engine = Engine(cfg, module, stop_token_ids=(), pad_id=0)
    # The engine as it was before greedy batches got their own step: the sampling conditional compiled in.
    general = Engine(cfg, module, stop_token_ids=(), pad_id=0)
    general.decode_steps = lambda params, state, cache, _, n: _decode_steps(module, params, state, cache, True, n)
    weight_bytes = llm_decode_weight_bytes(cfg.llm, 2)
    rng = np.random.default_rng(0)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        ids = rng.integers(0, 151000, (batch, args.prompt))
        requests = [Request(r, FusedSequence(r, np.full_like(r, -1)), (), None) for r in ids.astype(np.int32)]
        t_ids = torch.from_numpy(ids).to(device)

        def run_jax(new: int, engine: Engine = engine):
            tokens, _, _ = engine.generate(params, requests, [SamplingParams(new)] * batch)
            return tokens

        def run_general(new: int):
            return run_jax(new, general)

        def run_torch(new: int):
            with torch.no_grad():
                out = llm.generate(input_ids=t_ids, attention_mask=torch.ones_like(t_ids), max_new_tokens=new,
                                   min_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[:, args.prompt:].tolist()

        a, b = run_jax(args.new), run_torch(args.new)
        assert run_general(args.new) == a, "the greedy step and the sampling-capable step chose different tokens"
        run_jax(1), run_general(1), run_torch(1)  # every length warmed up before decode_steps_per_s times them
        agree = float(np.mean([x == y for ra, rb in zip(a, b) for x, y in zip(ra[:4], rb[:4])]))
        for name, run in (("nvila_jax (sampling step)", run_general), ("nvila_jax", run_jax),
                          ("HF generate (PyTorch)", run_torch)):
            steps_per_s = common.decode_steps_per_s(run, args.new, args.repeats)
            rows.append((str(batch), name, f"{batch * steps_per_s:.0f}", f"{1e3 / steps_per_s:.2f}",
                         f"{weight_bytes * steps_per_s / 1e9:.0f}", f"{weight_bytes * steps_per_s / bandwidth:.0%}"))
        print(f"batch {batch}: first 4 greedy tokens agree on {agree:.0%} (bf16 rounding differs); speed-up over "
              f"HF generate: {float(rows[-2][2]) / float(rows[-1][2]):.2f}x", flush=True)
    print(f"\ndecode, Qwen2.5-0.5B shape ({args.layers} layers), bf16, {weight_bytes / 1e9:.2f} GB of weights per "
          f"step, prompt {args.prompt}, {args.new} new tokens per row")
    print(common.report(rows, ("batch", "framework", "tokens/s", "ms/step", "weights GB/s", "of read bandwidth")))


if __name__ == "__main__":
    main()
