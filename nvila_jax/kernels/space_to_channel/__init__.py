"""Space-to-channel token compression (STC): one entry point that picks an implementation."""

from __future__ import annotations

import jax

from nvila_jax.kernels.space_to_channel.reference import space_to_channel_reference

IMPLS = ("auto", "xla")


def space_to_channel(x: jax.Array, k: int, impl: str = "auto", interpret: bool = False) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H/k), ceil(W/k), k*k*C] with zero padding at the bottom/right.

    impl: "xla" is the pure-JAX reference; "auto" picks the fastest implementation for the backend.
    `interpret` runs Pallas kernels in interpreter mode (CPU testing).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    if x.ndim != 4:
        raise ValueError(f"space_to_channel expects x of shape [B, H, W, C], got {x.shape}")
    if k < 1:
        raise ValueError(f"space_to_channel factor k must be >= 1, got {k}")
    del interpret  # no Pallas kernel is registered yet
    return space_to_channel_reference(x, k)
