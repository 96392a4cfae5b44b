"""Kernels: per op a pure-JAX reference (test oracle and fallback) and the accelerated versions."""

from nvila_jax.kernels.space_to_channel import space_to_channel

__all__ = ["space_to_channel"]
