"""Scaled FP8 GEMM: (a @ b_t.T) * a_scale * b_scale, one entry point over the reference, XLA and Pallas.

Operands are K-major (a [M, K], b_t [N, K]), the layout every FP8 GEMM on NVIDIA hardware wants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nvila_jax.kernels import backend

# "auto" picks the Mosaic GPU kernel on Hopper only if benchmarks/kernels_fp8.py measured it faster than
# XLA's FP8 dot_general (cuBLASLt); see BENCHMARKS.md, section "Kernels and FP8".
AUTO_PALLAS_ON_HOPPER = False

_NT = (((1,), (1,)), ((), ()))


def scaled_matmul_reference(a, b_t, a_scale, b_scale, out_dtype=jnp.float32) -> jax.Array:
    """The oracle: dequantize to float32 and multiply at full float32 precision."""
    y = jax.lax.dot_general(a.astype(jnp.float32), b_t.astype(jnp.float32), _NT,
                            precision=jax.lax.Precision.HIGHEST)
    return (y * (a_scale * b_scale)).astype(out_dtype)


def scaled_matmul_xla(a, b_t, a_scale, b_scale, out_dtype=jnp.bfloat16) -> jax.Array:
    """FP8 operands straight into dot_general with float32 accumulation: cuBLASLt's FP8 GEMM on sm_89+,
    an exact emulation on CPU. Mixed E5M2 x E4M3 operands are allowed (the backward pass)."""
    y = jax.lax.dot_general(a, b_t, _NT, preferred_element_type=jnp.float32)
    return (y * (a_scale * b_scale)).astype(out_dtype)


def pallas_applies(a: jax.Array, b_t: jax.Array) -> bool:
    """Whether the Hopper kernel takes these operands (both E4M3, tile-aligned shapes)."""
    from nvila_jax.kernels.fp8.pallas_hopper import DEFAULT_TILES

    e4m3 = a.dtype == jnp.float8_e4m3fn and b_t.dtype == jnp.float8_e4m3fn
    return e4m3 and DEFAULT_TILES.fits(a.shape[0], b_t.shape[0], a.shape[1])


def scaled_matmul(a, b_t, a_scale, b_scale, out_dtype=jnp.bfloat16, impl: str = "auto",
                  interpret: bool = False) -> jax.Array:
    """(a [M, K] @ b_t [N, K].T) * a_scale * b_scale -> [M, N] out_dtype, accumulated in float32.

    impl: "xla" (dot_general on FP8 operands), "pallas" (the Hopper Mosaic GPU kernel: E4M3 operands,
    tile-aligned shapes; interpret=True runs it on CPU with jax >= 0.11), "auto" (Pallas on Hopper where
    it applies and was measured faster, else XLA).
    """
    backend.check_impl(impl)
    if impl == "auto":
        use_pallas = backend.is_hopper() and AUTO_PALLAS_ON_HOPPER and pallas_applies(a, b_t)
        impl = "pallas" if use_pallas else "xla"
    if impl == "xla":
        return scaled_matmul_xla(a, b_t, a_scale, b_scale, out_dtype)
    if not interpret and not backend.is_hopper():
        raise ValueError("impl='pallas' needs a Hopper GPU (sm_90) or interpret=True; "
                         f"the default backend is {backend.platform()!r}")
    from nvila_jax.kernels.fp8.pallas_hopper import fp8_matmul_nt

    return fp8_matmul_nt(a, b_t, a_scale, b_scale, out_dtype=jnp.dtype(out_dtype), interpret=interpret)
