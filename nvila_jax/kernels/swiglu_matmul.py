"""silu(x @ wg) * (x @ wu) on a CPU for many rows (a SwiGLU MLP's gate, up and activation in prefill), float32.

`kernels/cpu/swiglu_matmul.cc` computes both products tile by tile (a GEMM of 14-row x 32-column register
tiles over panels of 16 gate and 16 up columns) and applies the activation in registers, so the two [M, F]
products are never written out and read back (docs/kernels.md). Compiled on first use and registered with XLA
by `cpu_library`; without a compiler, without AVX-512, or on another backend `available()` is False (logged
once) and callers compute the two products and the activation separately.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvila_jax.kernels import cpu_library

TARGET = "nvila_swiglu_matmul"


def available() -> bool:
    """True when the kernel can run here: a CPU backend with AVX-512 and a working C++ compiler."""
    return cpu_library.register("swiglu_matmul", "NvilaSwiGLUMatmul", TARGET, "separate products")


def swiglu_matmul(x: jax.Array, wg: jax.Array, wu: jax.Array) -> jax.Array:
    """silu(x @ wg) * (x @ wu) for x [M, K] and wg, wu [K, F], float32 (check `available()` first). No
    gradient: inference only."""
    if x.ndim != 2 or wg.ndim != 2 or wg.shape != wu.shape or x.shape[1] != wg.shape[0]:
        raise ValueError(f"swiglu_matmul expects x [M, K] and wg, wu [K, F], got {x.shape}, {wg.shape} and "
                         f"{wu.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], wg.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(*(a.astype(jnp.float32) for a in (x, wg, wu)))
