"""Shared helpers of the kernels_* benchmarks: timing and the card's peak rates."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax

# Dense peak TFLOP/s by datasheet (SXM parts): (bf16, fp8). H200 has the H100's arithmetic.
PEAK_TFLOPS = {"H100": (989.0, 1979.0), "H200": (989.0, 1979.0)}


def device_name() -> str:
    return jax.devices()[0].device_kind


def peak_tflops() -> tuple[float, float] | None:
    kind = device_name()
    for key, peak in PEAK_TFLOPS.items():
        if key in kind:
            return peak
    return None


def time_fn(fn: Callable, *args, iters: int = 20, repeats: int = 5) -> float:
    """Seconds per call of fn(*args) (a jitted function): the median over `repeats` of `iters` calls
    dispatched back to back and synchronised once (launch latency overlaps with device work)."""
    jax.block_until_ready(fn(*args))  # compile and warm up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = [fn(*args) for _ in range(iters)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / iters)
    return statistics.median(times)


def init_qwen2(model, batch: int, length: int) -> dict:
    """Unboxed variables of a Qwen2LM with every parameter touched (embedding, stack, norm, LM head)."""
    import flax.linen as nn
    import jax.numpy as jnp

    ids = jnp.zeros((batch, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    seg = jnp.ones((batch, length), jnp.int32)

    def touch(m, ids, pos, seg):
        return m.logits(m(m.embed(ids), pos, seg)[0])

    return nn.meta.unbox(jax.jit(lambda key: model.init(key, ids, pos, seg, method=touch))(jax.random.key(0)))
