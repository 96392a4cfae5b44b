"""Where the GPU's prefill and decode time goes (bf16, Qwen2.5-0.5B shape, random weights): the engine's
prefill with each attention path forced, and the engine's decode step timed three ways.

    python benchmarks/gpu_breakdown.py [--tokens 2048,8192] [--batches 1,8] [--layers 24] [--repeats 5]

Prefill: "dispatch" is the attention that `dot_product_attention` picks (blocked past one 512x512 block),
"dense" XLA's whole-softmax path, "cudnn" `jax.nn.dot_product_attention(implementation="cudnn")` with the
same boolean mask; last-position logits are compared with the dispatched path's. Decode (prompt 128 per
row, greedy), one step per call and the engine's steps per call on an accelerator: the jitted steps dispatched
back to back for `--steps` tokens (device time, host out of the loop), the Python dispatch alone (time until
the last call is queued), and each call's output read on the host one call behind, as `Engine.generate` does.
"""

from __future__ import annotations

import argparse
import time

import inference_common as common  # noqa: F401  (test helpers on sys.path)
import jax
import jax.numpy as jnp
import numpy as np

from nvila_jax.inference.engine import (ACCELERATOR_STEPS_PER_CALL, Engine, PrefillInputs, _advance, _decode_steps,
                                        _prefill)
from nvila_jax.inference.request import Request
from nvila_jax.inference.sampling import SamplingParams
from nvila_jax.model import inference_module
from nvila_jax.models import layers
from nvila_jax.models.qwen2 import KVCache
from nvila_jax.text.fusion import FusedSequence


def cudnn_attention(q, k, v, mask, scale):
    """cuDNN's fused attention through jax.nn with the mask as a [B, 1, T, S] boolean."""
    visible = None if mask is None else mask.dense()[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=visible, scale=scale, implementation="cudnn")


ATTENTION_PATHS = {
    "dispatch": {},
    "dense": {"_dense_fits": lambda q, k: True},
    "cudnn": {"_dense_fits": lambda q, k: False, "xla_attention": cudnn_attention},
}


def prefill_rows(module, cfg, params, tokens: int, repeats: int) -> list[tuple[str, ...]]:
    ids = np.random.default_rng(tokens).integers(0, 151000, (1, tokens)).astype(np.int32)
    inputs = PrefillInputs(jnp.asarray(ids), jnp.full((1, tokens), -1, jnp.int32),
                           jnp.arange(tokens, dtype=jnp.int32)[None], jnp.ones((1, tokens), jnp.int32),
                           jnp.zeros((0, cfg.llm.hidden_size), jnp.bfloat16))
    rows, reference = [], None
    for i, (name, patch) in enumerate(ATTENTION_PATHS.items()):
        saved = {attr: getattr(layers, attr) for attr in patch}
        for attr, value in patch.items():
            setattr(layers, attr, value)
        cache_len = tokens + 64 + 16 * i  # a shape of its own: the patched path is traced, not taken from a cache

        def run():
            logits, cache = _prefill(module, params, inputs, KVCache.init(cfg.llm, 1, cache_len, jnp.bfloat16))
            jax.block_until_ready((logits, cache))
            return np.asarray(logits, np.float32)[0]

        try:
            logits = run()
            best, median = common.timed(run, repeats, warmup=1)
        except Exception as err:  # noqa: BLE001  (a path this GPU or jax version cannot run is reported)
            rows.append((str(tokens), name, "-", "-", f"unavailable: {type(err).__name__}: {str(err)[:80]}"))
            continue
        finally:
            for attr, value in saved.items():
                setattr(layers, attr, value)
        reference = logits if reference is None else reference
        diff = float(np.abs(logits - reference).max() / np.abs(reference).max())
        rows.append((str(tokens), name, f"{best * 1e3:.1f}", f"{median * 1e3:.1f}", f"{diff:.1e}"))
    return rows


def decode_rows(module, cfg, params, batch: int, steps: int, repeats: int) -> list[tuple[str, ...]]:
    prompt, cache_len = 128, 256
    engine = Engine(cfg, module, stop_token_ids=(), pad_id=0)
    ids = np.random.default_rng(batch).integers(0, 151000, (batch, prompt)).astype(np.int32)
    requests = [Request(r, FusedSequence(r, np.full_like(r, -1)), (), None) for r in ids]
    inputs = engine.build_inputs(requests, *engine.visual_tokens(params, requests), batch)
    max_new = [cache_len - prompt] * batch

    def start():
        """The engine's state and cache after prefill and the first token, as `Engine.generate` starts."""
        state = engine.initial_state(requests, [SamplingParams(m) for m in max_new], batch, max_new)
        logits, cache = engine.prefill(params, inputs, KVCache.init(cfg.llm, batch, cache_len, jnp.bfloat16))
        state, _ = _advance(state, logits, False)
        return jax.block_until_ready((state, cache))

    def back_to_back(read: bool, per_call: int) -> tuple[float, float]:
        """(seconds per token until the last call is queued, seconds per token until it is done)."""
        state, cache = start()
        t0 = time.perf_counter()
        pending = None
        for _ in range(steps // per_call):
            state, cache, out = _decode_steps(module, params, state, cache, False, per_call)
            if read and pending is not None:
                np.asarray(pending.tokens)
            pending = out
        t1 = time.perf_counter()
        jax.block_until_ready((state, cache))
        return (t1 - t0) / steps, (time.perf_counter() - t0) / steps

    rows = []
    for per_call in (1, ACCELERATOR_STEPS_PER_CALL):
        back_to_back(True, per_call)  # compiles
        best = {read: min((back_to_back(read, per_call) for _ in range(repeats)), key=lambda r: r[1])
                for read in (False, True)}
        rows += [(str(batch), str(per_call), "steps back to back", f"{best[False][1] * 1e3:.2f}"),
                 (str(batch), str(per_call), "Python dispatch alone", f"{best[False][0] * 1e3:.2f}"),
                 (str(batch), str(per_call), "host reads each call (as the engine)", f"{best[True][1] * 1e3:.2f}")]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="2048,8192", help="prefill lengths")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    p.add_argument("--layers", type=int, default=24, help="LLM depth (Qwen2.5-0.5B has 24)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    print(f"jax {jax.__version__} devices {jax.devices()}", flush=True)
    cfg = common.bench_config(vision_layers=1, llm_layers=args.layers)
    _, params = common.reference_and_params(cfg)
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    module = inference_module(cfg, jnp.bfloat16)

    rows = [row for n in args.tokens.split(",") for row in prefill_rows(module, cfg, params, int(n), args.repeats)]
    print(f"\nprefill, bf16, {args.layers} layers, by attention path")
    print(common.report(rows, ("tokens", "attention", "best ms", "median ms", "logits vs dispatch (of largest)")),
          flush=True)
    rows = [row for b in args.batches.split(",") for row in decode_rows(module, cfg, params, int(b), args.steps,
                                                                        args.repeats)]
    print(f"\ndecode step, bf16, {args.layers} layers, prompt 128, greedy, {args.steps} steps per measurement")
    print(common.report(rows, ("batch", "steps per call", "measured", "ms per token step (best)")))


if __name__ == "__main__":
    main()
