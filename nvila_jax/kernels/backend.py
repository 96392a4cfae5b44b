"""What the default device can run: the facts every kernel dispatcher decides on, in one place.

The dispatchers never import a GPU/TPU-only module at import time, so `nvila_jax.kernels` imports on any
machine (and without grain/orbax); the Pallas modules are imported when a kernel is first traced.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import jax

IMPLS = ("auto", "xla", "pallas")

# XLA's CPU code generator targets 256-bit vectors by default, even on AVX-512 machines; its own loops (softmax
# exponentials, norms, activations; the GEMM library is not affected) run ~25% faster at 512 bits there. A CPU
# without 512-bit vectors caps the preference at what it has.
CPU_COMPILER_OPTIONS = {"xla_cpu_prefer_vector_width": 512}

logger = logging.getLogger("nvila_jax.kernels")


def check_impl(impl: str, allowed: tuple[str, ...] = IMPLS) -> None:
    if impl not in allowed:
        raise ValueError(f"unknown impl {impl!r}; expected one of {allowed}")


def platform() -> str:
    """'cpu', 'gpu' or 'tpu' for the default backend (CUDA and ROCm both report 'gpu')."""
    return jax.default_backend()


class cpu_tuned_jit:  # noqa: N801  (used like jax.jit)
    """`jax.jit(fun, **jit_kwargs)`, compiled with CPU_COMPILER_OPTIONS when the default backend is a CPU.

    The backend is looked up at each call, not at import (importing must not start a backend: multi-host
    runs initialise jax.distributed first), and other backends never see xla_cpu_* options. Attributes
    (`lower`, `eval_shape`, ...) are the chosen jitted function's; both jitted versions live as long as this
    object, so its compile cache is shared by every caller."""

    def __init__(self, fun: Callable, **jit_kwargs: Any) -> None:
        self._tuned = jax.jit(fun, compiler_options=CPU_COMPILER_OPTIONS, **jit_kwargs)
        self._plain = jax.jit(fun, **jit_kwargs)
        functools.update_wrapper(self, fun)

    def _chosen(self) -> Callable:
        return self._tuned if platform() == "cpu" else self._plain

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._chosen()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chosen(), name)


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
