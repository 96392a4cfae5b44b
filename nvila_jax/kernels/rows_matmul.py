"""x [M, K] @ w for decoding on a CPU (1 <= M <= 16 rows, float32) with a weight-streaming kernel.

A decode step is bound by reading the weights. XLA's CPU GEMM packs the weight and reads it at well under the
memory bandwidth when M is a handful of rows (batched decoding: one row per sequence), and even its
matrix-vector product streams a [4864, 896] matrix at ~60% of it. `kernels/cpu/rows_matmul.cc` reads the
weight once, in its stored layout: w [K, N] (dense layers) or w [N, K] (`transposed`: the tied LM head's
embedding table), for up to 16 rows in one pass (BENCHMARKS.md, "Inference", decode). It is compiled on first
use and registered with XLA by `cpu_library`; without a compiler, without AVX-512, or on another backend,
`available()` is False (logged once) and callers use XLA's dot.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvila_jax.kernels import cpu_library

MAX_ROWS = 16
MAX_TRANSPOSED_ROWS = 8  # w [N, K]: beyond, the x rows of a long K no longer stay in the L1 cache
TARGET = "nvila_rows_matmul"


def available() -> bool:
    """True when the kernel can run here: a CPU backend with AVX-512 and a working C++ compiler."""
    return cpu_library.register("rows_matmul", "NvilaRowsMatmul", TARGET, "XLA's dot")


def rows_matmul(x: jax.Array, w: jax.Array, transposed: bool = False) -> jax.Array:
    """x [M, K] @ w [K, N] (1 <= M <= MAX_ROWS), or x @ w.T for w [N, K] with `transposed` (1 <= M <=
    MAX_TRANSPOSED_ROWS), in float32 with the kernel (check `available()` first). No gradient: inference only."""
    contracted = w.shape[1] if transposed and w.ndim == 2 else w.shape[0]
    max_rows = MAX_TRANSPOSED_ROWS if transposed else MAX_ROWS
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != contracted or not 1 <= x.shape[0] <= max_rows:
        layout = "[N, K] (transposed)" if transposed else "[K, N]"
        raise ValueError(f"rows_matmul expects x [M in 1..{max_rows}, K] and w {layout}, got {x.shape} and "
                         f"{w.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transposed else w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x.astype(jnp.float32), w.astype(jnp.float32), transposed=transposed)
