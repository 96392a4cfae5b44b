"""x [M, K] @ w for prefill and the vision encoder on a CPU (float32, many rows) with OpenBLAS's SGEMM.

XLA's CPU GEMM (YNNPACK) runs the prefill and vision-encoder products at 250-300 GFLOP/s on the project's
2-core AVX-512 VM, OpenBLAS at 290-330 (BENCHMARKS.md, "Inference"). `kernels/cpu/blas_matmul.cc` calls
scipy-openblas32 (OpenBLAS as packaged for numpy/SciPy; a copy of its own, apart from numpy's) single-threaded
in each thread of XLA's intra-op pool, on a block of rows or columns each, so no second thread pool competes
for the cores. `blas_matmul(x, w, add=r)` is r + x @ w with the sum done by the GEMM itself (a residual
stream's update: no separate pass over the [M, N] arrays). It is compiled on first use and registered with
XLA by `cpu_library`; without a compiler, or scipy-openblas32, or on another backend `available()` is False
(logged once) and callers use XLA's dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvila_jax.kernels import cpu_library
from nvila_jax.kernels.backend import log_once

TARGET = "nvila_blas_matmul"
ADD_TARGET = "nvila_blas_matmul_add"


@functools.lru_cache(maxsize=None)
def _openblas_flags() -> tuple[str, ...] | None:
    """Compiler and linker flags for scipy-openblas32 (headers, library, run path); None (logged) without it."""
    try:
        import scipy_openblas32 as openblas
    except ImportError:
        log_once("blas_matmul: scipy-openblas32 is not installed; using XLA's dot")
        return None
    lib_dir = openblas.get_lib_dir()
    return (f"-I{openblas.get_include_dir()}", f"-L{lib_dir}", f"-l{openblas.get_library()}", f"-Wl,-rpath,{lib_dir}")


def available() -> bool:
    """True when the kernel can run here: a CPU backend, scipy-openblas32 and a working C++ compiler."""
    flags = _openblas_flags()
    return (flags is not None
            and cpu_library.register("blas_matmul", "NvilaBlasMatmul", TARGET, "XLA's dot", flags)
            and cpu_library.register("blas_matmul", "NvilaBlasMatmulAdd", ADD_TARGET, "XLA's dot", flags))


def blas_matmul(x: jax.Array, w: jax.Array, transposed: bool = False, add: jax.Array | None = None) -> jax.Array:
    """x [M, K] @ w [K, N], or x @ w.T for w [N, K] with `transposed`, in float32 with OpenBLAS (check
    `available()` first); plus `add` [M, N] when given, accumulated by the GEMM into that operand's buffer
    (XLA reuses it for the result when nothing else reads it afterwards, else copies it first). No gradient:
    inference only."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1 if transposed else 0]:
        layout = "[N, K] (transposed)" if transposed else "[K, N]"
        raise ValueError(f"blas_matmul expects x [M, K] and w {layout}, got {x.shape} and {w.shape}")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0] if transposed else w.shape[1]), jnp.float32)
    x, w = x.astype(jnp.float32), w.astype(jnp.float32)
    if add is None:
        return jax.ffi.ffi_call(TARGET, out)(x, w, transposed=transposed)
    if add.shape != out.shape:
        raise ValueError(f"blas_matmul: `add` must have the product's shape {out.shape}, got {add.shape}")
    call = jax.ffi.ffi_call(ADD_TARGET, out, input_output_aliases={2: 0})
    return call(x, w, add.astype(jnp.float32), transposed=transposed)
