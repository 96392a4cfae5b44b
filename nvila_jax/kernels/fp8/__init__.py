"""FP8 matmuls: the NVILA FP8 training recipe for the LLM's large linears, the scaled FP8 GEMM behind it
(reference / XLA / Hopper Pallas), and weight-only quantized linears for inference."""

from nvila_jax.kernels.fp8.gemm import scaled_matmul, scaled_matmul_reference
from nvila_jax.kernels.fp8.linear import (FP8_META, Fp8Config, Fp8DotGeneral, describe, fp8_matmul, llm_dot_general_cls,
                                         resolve_gemm)
from nvila_jax.kernels.fp8.quantize import E4M3, E5M2, dequantize, quantize, quantize_dynamic, scale_from_amax
from nvila_jax.kernels.fp8.weight_only import WeightOnlyDotGeneral, quantize_llm_weights, weight_only_dot_general_cls

__all__ = [
    "E4M3",
    "E5M2",
    "FP8_META",
    "Fp8Config",
    "Fp8DotGeneral",
    "WeightOnlyDotGeneral",
    "dequantize",
    "describe",
    "fp8_matmul",
    "llm_dot_general_cls",
    "quantize",
    "quantize_dynamic",
    "quantize_llm_weights",
    "resolve_gemm",
    "scale_from_amax",
    "scaled_matmul",
    "scaled_matmul_reference",
    "weight_only_dot_general_cls",
]
