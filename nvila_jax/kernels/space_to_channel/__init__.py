"""Space-to-channel token compression (STC): one entry point per op that picks an implementation.

`space_to_channel` is the projector's first layer; `space_to_channel_layer_norm` fuses it with the
LayerNorm that follows (one pass over the feature map instead of a transposed copy plus LayerNorm
passes). impl: "xla" runs the pure-JAX reference (also the fallback and the test oracle), "pallas" the
Pallas kernels (GPU, or any backend with interpret=True), "auto" the faster one for the backend and
shape as measured by benchmarks/kernels_stc.py (see docs/kernels.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from nvila_jax.kernels import backend
from nvila_jax.kernels.space_to_channel import pallas_triton
from nvila_jax.kernels.space_to_channel.reference import (
    space_to_channel_layer_norm_reference,
    space_to_channel_reference,
)

IMPLS = backend.IMPLS

# "auto" picks the Pallas kernels on CUDA GPUs only for the (op, k) where benchmarks/kernels_stc.py measured
# them faster than XLA on an H200 (BENCHMARKS.md, section "Kernels and FP8"); XLA everywhere else.
AUTO_PALLAS_ON_GPU = {"space_to_channel": (), "space_to_channel_layer_norm": (3,)}


def _check(x: jax.Array, k: int, impl: str) -> None:
    backend.check_impl(impl)
    if x.ndim != 4:
        raise ValueError(f"space_to_channel expects x of shape [B, H, W, C], got {x.shape}")
    if k < 1:
        raise ValueError(f"space_to_channel factor k must be >= 1, got {k}")


def _resolve(op: str, impl: str, x: jax.Array, k: int, interpret: bool) -> str:
    """'xla' or 'pallas' for this call; explains why when the request cannot run here."""
    g = pallas_triton.Geometry(*x.shape, k)
    fits = max(x.size, g.tokens * g.out_channels) <= pallas_triton.MAX_ELEMENTS
    if impl == "auto":
        if interpret:
            impl = "pallas"
        else:
            wins = backend.platform() == "gpu" and k in AUTO_PALLAS_ON_GPU[op]
            impl = "pallas" if wins and fits else "xla"
    if impl == "pallas":
        if not interpret and backend.platform() != "gpu":
            raise ValueError(f"{op}: impl='pallas' runs on a GPU (Pallas Triton backend) or with interpret=True; "
                             f"the default backend is {backend.platform()!r}")
        if not fits:
            raise ValueError(f"{op}: x {x.shape} has 2**31 elements or more; the Pallas kernels use int32 "
                             "offsets, use impl='xla'")
    return impl


def space_to_channel(x: jax.Array, k: int, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H/k), ceil(W/k), k*k*C] with zero padding at the bottom/right.

    Channels of an output token are ordered (row offset, column offset, channel), as NVILA's DownSample
    blocks. impl: "auto" | "xla" | "pallas"; `interpret` runs the Pallas kernels in interpreter mode (CPU
    testing). Differentiable on every path (the Pallas path's VJP is its own transpose kernel).
    """
    _check(x, k, impl)
    if _resolve("space_to_channel", impl, x, k, interpret) == "xla":
        return space_to_channel_reference(x, k)
    return _stc_pallas(x, k, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _stc_pallas(x: jax.Array, k: int, interpret: bool) -> jax.Array:
    return pallas_triton.stc_forward(x, k, interpret=interpret)


def _stc_pallas_fwd(x, k, interpret):
    # The zero-size residual carries x's static shape (H and W are not recoverable from the output).
    return _stc_pallas(x, k, interpret), jnp.zeros(x.shape[:3] + (0,), x.dtype)


def _stc_pallas_bwd(k, interpret, shape_carrier, g):
    shape = shape_carrier.shape[:3] + (g.shape[-1] // (k * k),)
    return (pallas_triton.stc_transpose(g, shape, k, interpret=interpret),)


_stc_pallas.defvjp(_stc_pallas_fwd, _stc_pallas_bwd)


def space_to_channel_layer_norm(
    x: jax.Array,
    k: int,
    scale: jax.Array,
    bias: jax.Array,
    eps: float = 1e-5,
    impl: str = "auto",
    interpret: bool = False,
) -> jax.Array:
    """LayerNorm(space_to_channel(x, k)) * scale + bias: [B, H, W, C] -> [B, Hk, Wk, k*k*C] in x.dtype.

    Statistics in float32 (centred variance, as torch.nn.LayerNorm); the zero padding takes part in each
    token's statistics, as in the reference where padding happens before the LayerNorm.
    """
    _check(x, k, impl)
    d = k * k * x.shape[-1]
    if scale.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"space_to_channel_layer_norm: scale/bias must have shape ({d},) for k={k} and "
                         f"C={x.shape[-1]}, got {scale.shape} and {bias.shape}")
    if _resolve("space_to_channel_layer_norm", impl, x, k, interpret) == "xla":
        return space_to_channel_layer_norm_reference(x, k, scale, bias, eps)
    return _stc_ln_pallas(x, scale, bias, k, eps, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _stc_ln_pallas(x, scale, bias, k, eps, interpret):
    return pallas_triton.stc_layer_norm_forward(x, k, scale, bias, eps, interpret=interpret)[0]


def _stc_ln_pallas_fwd(x, scale, bias, k, eps, interpret):
    y, mean, rstd = pallas_triton.stc_layer_norm_forward(x, k, scale, bias, eps, interpret=interpret)
    return y, (x, scale, bias, mean, rstd)


def _stc_ln_pallas_bwd(k, eps, interpret, res, dy):
    x, scale, bias, mean, rstd = res
    dx = pallas_triton.stc_layer_norm_backward_x(x, k, scale, mean, rstd, dy, interpret=interpret)
    # Parameter gradients are reductions over tokens; XLA fuses the STC gather into them.
    dy32 = dy.astype(jnp.float32).reshape(-1, dy.shape[-1])
    xhat = (space_to_channel_reference(x, k).astype(jnp.float32).reshape(dy32.shape) - mean[:, None]) * rstd[:, None]
    dscale = jnp.sum(dy32 * xhat, axis=0).astype(scale.dtype)
    dbias = jnp.sum(dy32, axis=0).astype(bias.dtype)
    return dx, dscale, dbias


_stc_ln_pallas.defvjp(_stc_ln_pallas_fwd, _stc_ln_pallas_bwd)

__all__ = [
    "IMPLS",
    "space_to_channel",
    "space_to_channel_layer_norm",
    "space_to_channel_layer_norm_reference",
    "space_to_channel_reference",
]
