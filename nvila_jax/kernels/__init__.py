"""Kernels: per op a pure-JAX reference (test oracle and fallback) and the accelerated versions, behind
one dispatcher per op (impl="auto" | "xla" | "pallas"). See docs/kernels.md."""

from nvila_jax.kernels import fp8
from nvila_jax.kernels.space_to_channel import space_to_channel, space_to_channel_layer_norm

__all__ = ["fp8", "space_to_channel", "space_to_channel_layer_norm"]
