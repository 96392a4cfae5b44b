"""x [M, K] @ w [K, N] for batched decoding on a CPU (M <= 16 rows, float32) with a weight-streaming kernel.

XLA's CPU GEMM reads the weights at well under the memory bandwidth when M is a handful of rows (batched
decoding: one row per sequence), while a matrix-vector product streams them. `kernels/cpu/rows_matmul.cc`
reads the weight once in its stored layout for up to 16 rows (BENCHMARKS.md, "Inference", decode). It is
compiled on first use and registered with XLA by `cpu_library`; without a compiler, without AVX-512, or on
another backend, `available()` is False (logged once) and callers use XLA's dot.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from nvila_jax.kernels import cpu_library

MAX_ROWS = 16
TARGET = "nvila_rows_matmul"


def available() -> bool:
    """True when the kernel can run here: a CPU backend with AVX-512 and a working C++ compiler."""
    return cpu_library.register("rows_matmul", "NvilaRowsMatmul", TARGET, "XLA's dot")


def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] in float32 with the kernel (M <= MAX_ROWS; check `available()` first). No
    gradient: inference only."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0] or x.shape[0] > MAX_ROWS:
        raise ValueError(f"rows_matmul expects x [M <= {MAX_ROWS}, K] and w [K, N], got {x.shape} and {w.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), w.astype(jnp.float32))


class RowsDotGeneral:
    """A flax `dot_general_cls` for inference (NVILA's `llm_dot_general_cls`): a float32 dense-layer product
    of 2 to MAX_ROWS rows (a decode step of 2 to 16 sequences) goes to the kernel when it is available;
    everything else (one row: XLA's matrix-vector product streams as fast; prefill; other dtypes; batch
    dimensions) to `lax.dot_general`."""

    def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                 preferred_element_type=None) -> jax.Array:
        (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
        free = lhs.ndim - len(lhs_contract)
        rows = math.prod(lhs.shape[:free])
        dense_layer = (not lhs_batch and tuple(lhs_contract) == tuple(range(free, lhs.ndim))
                       and tuple(rhs_contract) == tuple(range(len(rhs_contract))))
        if (dense_layer and 2 <= rows <= MAX_ROWS and lhs.dtype == rhs.dtype == jnp.float32
                and preferred_element_type in (None, jnp.float32) and available()):
            k = math.prod(lhs.shape[free:])
            out = rows_matmul(lhs.reshape(rows, k), rhs.reshape(k, -1))
            return out.reshape(lhs.shape[:free] + rhs.shape[len(rhs_contract):])
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
