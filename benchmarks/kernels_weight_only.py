"""Weight-only 8-bit LLM linears for inference: accuracy cost against the unquantized model, and (on a
GPU) the decode-step time.

    python benchmarks/kernels_weight_only.py

Accuracy: a random-weight Qwen2 decoder (no released checkpoint is reachable here) scores 8 x 256 random
tokens; reported per format: relative L2 error of the logits, KL(p_ref || p_quant) per token and
agreement of the greedy (top-1) token. Decode: batch 1 step with a 2048-slot KV cache of a 4-layer
Qwen2.5-7B-shaped decoder (the weight bytes per token dominate, as in the full model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_common import device_name, init_qwen2, time_fn
from nvila_jax.config import Qwen2Config
from nvila_jax.kernels import backend, fp8
from nvila_jax.models.qwen2 import KVCache, Qwen2LM


def _quantized(params, fmt):
    """Qwen2LM params with quantized decoder linears (quantize_llm_weights works on the NVILA tree)."""
    return fp8.quantize_llm_weights({"llm": params}, fmt)["llm"] if fmt else params


def accuracy(cfg: Qwen2Config) -> None:
    b, t = 8, 256
    ids = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)
    base = Qwen2LM(cfg)
    params = init_qwen2(base, 1, 2)["params"]

    def logits(model, p):
        x = model.apply({"params": p}, ids, method=Qwen2LM.embed)
        h, _ = model.apply({"params": p}, x, pos, seg)
        return model.apply({"params": p}, h, method=Qwen2LM.logits)

    ref = jax.jit(lambda p: logits(base, p))(params)
    logp_ref = jax.nn.log_softmax(ref)
    print(f"accuracy: random-weight Qwen2 (d={cfg.hidden_size}, {cfg.num_hidden_layers} layers), {b}x{t} tokens, "
          "float32 compute, reference = unquantized")
    print(f"{'format':8s} {'rel logit err':>13s} {'KL/token':>10s} {'top-1 agree':>11s}")
    quant_model = Qwen2LM(cfg, dot_general_cls=fp8.weight_only_dot_general_cls())
    for fmt in fp8.weight_only.WEIGHT_FORMATS:
        out = jax.jit(lambda p: logits(quant_model, p))(_quantized(params, fmt))
        rel = jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)
        kl = jnp.mean(jnp.sum(jnp.exp(logp_ref) * (logp_ref - jax.nn.log_softmax(out)), -1))
        agree = jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1))
        print(f"{fmt:8s} {float(rel):13.2e} {float(kl):10.2e} {float(agree) * 100:10.1f}%", flush=True)


def decode_speed() -> None:
    cfg = Qwen2Config(vocab_size=32768, hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
                      num_attention_heads=28, num_key_value_heads=4, head_dim=128)
    ids = jnp.zeros((1, 1), jnp.int32)
    seg = jnp.ones((1, 1), jnp.int32)
    print(f"\ndecode step on {device_name()}: 4-layer Qwen2.5-7B-shaped decoder, batch 1, bf16 activations")
    base = Qwen2LM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = init_qwen2(base, 1, 1)["params"]
    times = {}
    for fmt in (None, "int8", "fp8"):
        model = base if fmt is None else Qwen2LM(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                 dot_general_cls=fp8.weight_only_dot_general_cls())
        p = _quantized(params, fmt)
        cache = KVCache.init(cfg, 1, 2048, jnp.bfloat16)
        cache = cache.replace(index=jnp.asarray(1024, jnp.int32))

        @jax.jit
        def step(p, cache):
            x = model.apply({"params": p}, ids, method=Qwen2LM.embed)
            h, _ = model.apply({"params": p}, x, jnp.full((1, 1), 1024), seg, cache)
            return model.apply({"params": p}, h, method=Qwen2LM.logits)

        name = fmt or "bf16"
        times[name] = time_fn(step, p, cache, iters=50)
        print(f"{name:6s} {times[name] * 1e6:8.0f} us/step  speed-up vs bf16 {times['bf16'] / times[name]:.2f}x",
              flush=True)


def main() -> None:
    accuracy(Qwen2Config(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64))
    if backend.platform() == "gpu":
        decode_speed()


if __name__ == "__main__":
    main()
