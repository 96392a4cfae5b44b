"""Weight-only quantized LLM linears for inference: int8 or FP8 (E4M3) kernels with one float32 scale per
output channel, dequantized on the fly (activations stay in the model's dtype).

Decoding is bound by the bytes of weights read per token, so halving them (bf16 -> 8 bit) is the point;
the accuracy cost is measured by benchmarks/kernels_weight_only.py and reported in BENCHMARKS.md.

Use:
    qparams = quantize_llm_weights(params, "int8")
    model = NVILA(cfg, llm_dot_general_cls=weight_only_dot_general_cls())
The quantized kernels keep their parameter paths; each quantized linear gains a sibling
`WeightOnlyDotGeneral_0/scale` of shape [layers, *output dims]. Embeddings, norms, biases and the LM head
stay unquantized.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.kernels.fp8.linear import dense_layout
from nvila_jax.kernels.fp8.quantize import E4M3, fp8_max

WEIGHT_FORMATS = ("int8", "fp8")
SCALE_SCOPE = "WeightOnlyDotGeneral_0"
# Qwen2 decoder linears -> number of leading (input) dims of their kernels after the stacked layer axis.
LLM_LINEAR_INPUT_DIMS = {"q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1,
                         "down_proj": 1}


def quantize_kernel(kernel: jax.Array, n_in: int, fmt: str) -> tuple[jax.Array, jax.Array]:
    """Per-output-channel symmetric quantization of a stacked kernel [layers, *in_dims, *out_dims]:
    (q in int8/E4M3, scale [layers, *out_dims]) with kernel ~= q * scale."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weight-only format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    w = kernel.astype(jnp.float32)
    a = jnp.max(jnp.abs(w), axis=tuple(range(1, 1 + n_in)))
    qmax = 127.0 if fmt == "int8" else fp8_max(E4M3)
    scale = jnp.where(a > 0, a / qmax, 1.0)
    x = w / jnp.expand_dims(scale, tuple(range(1, 1 + n_in)))
    if fmt == "int8":
        return jnp.clip(jnp.round(x), -127, 127).astype(jnp.int8), scale
    return jnp.clip(x, -qmax, qmax).astype(E4M3), scale


def quantize_llm_weights(params: Any, fmt: str = "int8") -> Any:
    """A copy of the (unboxed) NVILA params with every Qwen2 decoder linear quantized (see module doc)."""
    try:
        layers = params["llm"]["layers"]
    except (KeyError, TypeError):
        raise ValueError("quantize_llm_weights expects NVILA params with params['llm']['layers']") from None
    new_layers = dict(layers)
    for name, n_in in LLM_LINEAR_INPUT_DIMS.items():
        if name not in layers or "kernel" not in layers[name]:
            raise ValueError(f"quantize_llm_weights: params['llm']['layers'] has no {name}/kernel")
        q, scale = quantize_kernel(layers[name]["kernel"], n_in, fmt)
        new_layers[name] = dict(layers[name], kernel=q, **{SCALE_SCOPE: {"scale": scale}})
    return dict(params, llm=dict(params["llm"], layers=new_layers))


class WeightOnlyDotGeneral(nn.Module):
    """DenseGeneral's dot with an 8-bit kernel: DenseGeneral has already cast the kernel to the compute
    dtype (exact for int8 and E4M3 values); the per-output-channel scale applies to the product."""

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if dense_layout(lhs.shape, rhs.shape, dimension_numbers) is None:
            raise ValueError("WeightOnlyDotGeneral supports plain Dense dots (no batch dims)")
        n_in = len(dimension_numbers[0][0])
        scale = self.param("scale", nn.initializers.ones_init(), rhs.shape[n_in:], jnp.float32)
        y = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                preferred_element_type=preferred_element_type)
        return (y.astype(jnp.float32) * scale).astype(y.dtype)


def weight_only_dot_general_cls() -> type[WeightOnlyDotGeneral]:
    """What to pass as NVILA(llm_dot_general_cls=...) for params from `quantize_llm_weights`."""
    return WeightOnlyDotGeneral
