"""What the default device can run: the facts every kernel dispatcher decides on, in one place.

The dispatchers never import a GPU/TPU-only module at import time, so `nvila_jax.kernels` imports on any
machine (and without grain/orbax); the Pallas modules are imported when a kernel is first traced.
"""

from __future__ import annotations

import functools
import logging

import jax

IMPLS = ("auto", "xla", "pallas")

# Options for the jitted inference programs. XLA's CPU code generator targets 256-bit vectors by default, even
# on AVX-512 machines; its own loops (softmax exponentials, norms, activations; the GEMM library is not
# affected) run ~25% faster at 512 bits there. A CPU without 512-bit vectors caps the preference at what it
# has, and other backends ignore xla_cpu_* options.
INFERENCE_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

logger = logging.getLogger("nvila_jax.kernels")


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"unknown impl {impl!r}; expected one of {allowed}")


def platform() -> str:
    """'cpu', 'gpu' or 'tpu' for the default backend (CUDA and ROCm both report 'gpu')."""
    return jax.default_backend()


@functools.lru_cache(maxsize=None)
def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first CUDA device, None when the default backend is not an NVIDIA GPU."""
    if platform() != "gpu":
        return None
    cc = getattr(jax.devices()[0], "compute_capability", None)
    if not cc:
        return None
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)


def is_hopper() -> bool:
    """True on sm_90 (H100/H200): the target of the Mosaic GPU FP8 GEMM (wgmma with FP8 operands)."""
    return gpu_compute_capability() == (9, 0)


def has_fp8_tensor_cores() -> bool:
    """FP8 matrix units: NVIDIA sm_89 (Ada) and newer. Elsewhere an FP8 GEMM is emulated and slow."""
    cc = gpu_compute_capability()
    return cc is not None and cc >= (8, 9)


@functools.lru_cache(maxsize=None)
def log_once(message: str) -> None:
    """Log a dispatch decision once per process (traces repeat; the message does not need to)."""
    logger.info(message)
