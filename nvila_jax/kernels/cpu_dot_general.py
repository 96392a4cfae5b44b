"""The flax `dot_general_cls` of inference on a CPU: each float32 product goes to the kernel made for its
number of rows, `rows_matmul` (1-16 rows: a decode step, weight-streaming) or `blas_matmul` (more: prefill,
the vision encoder, OpenBLAS's GEMM), and to `lax.dot_general` where neither can run or applies. A SwiGLU
MLP's gate and up products of more rows go with their activation to `swiglu_matmul` (`CpuDotGeneral.swiglu`),
and a product added to the residual stream goes with the sum to `blas_matmul` (`CpuDotGeneral.residual_add`)."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from nvila_jax.kernels import blas_matmul, rows_matmul, swiglu_matmul


def _kernel_for(rows: int, transposed: bool) -> Callable | None:
    """The matmul of a product with `rows` rows of x (w [N, K] when `transposed`), None for XLA's dot."""
    if rows <= (rows_matmul.MAX_TRANSPOSED_ROWS if transposed else rows_matmul.MAX_ROWS):
        return rows_matmul.rows_matmul if rows_matmul.available() else None
    return blas_matmul.blas_matmul if blas_matmul.available() else None


class CpuDotGeneral:
    """A flax `dot_general_cls` for inference (NVILA's `vision_dot_general_cls`, `llm_dot_general_cls` and
    `llm_logits_dot_general_cls`): a float32 product of a dense layer's kernel (contracted on its leading axes)
    or of a [N, K] matrix contracted on its last axis (the tied LM head) goes to a CPU kernel when one is
    available; everything else (other dtypes, batch dimensions, other layouts) to `lax.dot_general`. No
    gradient: inference only."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                 preferred_element_type=None) -> jax.Array:
        (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
        free = lhs.ndim - len(lhs_contract)
        rows = math.prod(lhs.shape[:free])
        lhs_trailing = not lhs_batch and tuple(lhs_contract) == tuple(range(free, lhs.ndim))
        dense_layer = lhs_trailing and tuple(rhs_contract) == tuple(range(len(rhs_contract)))
        transposed = lhs_trailing and rhs.ndim == 2 and tuple(rhs_contract) == (1,)
        float32 = lhs.dtype == rhs.dtype == jnp.float32 and preferred_element_type in (None, jnp.float32)
        matmul = _kernel_for(rows, transposed) if (dense_layer or transposed) and float32 and rows else None
        if matmul is None:
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
        k = math.prod(lhs.shape[free:])
        out = matmul(lhs.reshape(rows, k), rhs if transposed else rhs.reshape(k, -1), transposed)
        return out.reshape(lhs.shape[:free] + (rhs.shape[:1] if transposed else rhs.shape[len(rhs_contract):]))

    @classmethod
    def swiglu(cls, x: jax.Array, wg: jax.Array, wu: jax.Array, dtype) -> jax.Array:
        """silu(x @ wg) * (x @ wu) for x [..., K] and wg, wu [K, F] (a SwiGLU MLP's gate and up kernels), in
        `dtype` as flax's dense layers compute. Float32 products of more rows than a decode step's go to the
        fused kernel (the two products are never written out); the rest are two products through this class."""
        x, wg, wu = promote_dtype(x, wg, wu, dtype=dtype)
        rows = math.prod(x.shape[:-1])
        if x.dtype == jnp.float32 and rows > rows_matmul.MAX_ROWS and swiglu_matmul.available():
            out = swiglu_matmul.swiglu_matmul(x.reshape(rows, x.shape[-1]), wg, wu)
            return out.reshape(x.shape[:-1] + wg.shape[1:])
        dims = (((x.ndim - 1,), (0,)), ((), ()))
        return jax.nn.silu(cls()(x, wg, dims)) * cls()(x, wu, dims)

    @classmethod
    def residual_add(cls, x: jax.Array, h: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
        """x + h @ kernel for a bias-free dense layer's kernel [*in, N] contracted with h's trailing axes (Qwen2's
        o_proj and down_proj on the residual stream x), the product in `dtype` as flax's dense layers compute.
        Float32 with more rows than a decode step's: one GEMM that accumulates into x's buffer (the sum costs no
        pass of its own); otherwise the product through this class, then the sum."""
        h, kernel = promote_dtype(h, kernel, dtype=dtype)
        n_in = kernel.ndim - 1
        rows, k = math.prod(h.shape[:h.ndim - n_in]), math.prod(kernel.shape[:-1])
        if x.dtype == h.dtype == jnp.float32 and rows > rows_matmul.MAX_ROWS and blas_matmul.available():
            out = blas_matmul.blas_matmul(h.reshape(rows, k), kernel.reshape(k, -1), add=x.reshape(rows, -1))
            return out.reshape(x.shape)
        dims = ((tuple(range(h.ndim - n_in, h.ndim)), tuple(range(n_in))), ((), ()))
        return x + cls()(h, kernel, dims)
