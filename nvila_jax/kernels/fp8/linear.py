"""FP8 training of the LLM's large linears: a custom-VJP FP8 matmul and the Flax `dot_general_cls` that
plugs it into the models' Dense layers (NVILA(llm_dot_general_cls=...) -> Qwen2LM -> Qwen2DecoderLayer).

Recipe (NVILA / COAT `QLinearTE`): forward y = (q8(x) @ q8(w)) * s_x * s_w with E4M3 operands; backward
dx = (q5(g) @ q8(w)^T) * s_g * s_w and dw = (q8(x)^T @ q5(g)) * s_x * s_g with E5M2 output gradients,
float32 accumulation, per-tensor scales s = amax / fp8_max. Only linears with min(in, out) >= a threshold
(3584 in NVILA) are quantized; the rest, embeddings, norms, attention and the vision tower stay in the
model's dtype. The quantized x and w are what the backward pass keeps (half the bytes of bf16).

Scaling: "dynamic" (the reference: each tensor's own amax, per step) or "delayed" (scales from the max of
an amax history of earlier steps, Transformer-Engine style). Delayed histories live in the "fp8_meta"
collection; the training step differentiates with respect to it, and the "gradient" it gets back is the
updated history (the overwrite-with-gradient convention): replace the collection with it after each step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.kernels import backend
from nvila_jax.kernels.fp8 import gemm as fp8_gemm
from nvila_jax.kernels.fp8.quantize import E4M3, E5M2, amax, quantize, scale_from_amax

FP8_META = "fp8_meta"
SCALINGS = ("dynamic", "delayed")
GEMMS = ("auto", "pallas", "xla", "bf16")
PATH_NAMES = {
    "pallas": "Hopper Pallas FP8 GEMM (Mosaic GPU wgmma) forward + XLA FP8 dot_general backward",
    "xla": "XLA FP8 dot_general",
    "bf16": "bf16 fallback (no FP8 matrix units: linears run unquantized)",
}


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """The training option. `gemm`: "auto" picks by device (Hopper: the Pallas kernel where it was measured
    faster, else XLA; other GPUs with FP8 units (sm_89+): XLA; CPU: XLA's exact emulation, slow, for tests;
    TPU and older GPUs: bf16), or force "pallas" | "xla" | "bf16"."""

    enabled: bool = False
    min_features: int = 3584
    scaling: str = "dynamic"
    amax_history_length: int = 16
    gemm: str = "auto"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ValueError(f"fp8 scaling {self.scaling!r}; expected one of {SCALINGS}")
        if self.gemm not in GEMMS:
            raise ValueError(f"fp8 gemm {self.gemm!r}; expected one of {GEMMS}")
        if self.amax_history_length < 1 or self.min_features < 0:
            raise ValueError("fp8 amax_history_length must be >= 1 and min_features >= 0, got "
                             f"{self.amax_history_length} and {self.min_features}")


def resolve_gemm(gemm: str = "auto") -> str:
    """The path FP8 linears take on the default device: "pallas", "xla" or "bf16"."""
    if gemm not in GEMMS:
        raise ValueError(f"fp8 gemm {gemm!r}; expected one of {GEMMS}")
    if gemm == "pallas" and not backend.is_hopper():
        raise ValueError(f"fp8 gemm='pallas' needs a Hopper GPU (sm_90); the default backend is "
                         f"{backend.platform()!r} {backend.gpu_compute_capability() or ''}")
    if gemm != "auto":
        return gemm
    plat = backend.platform()
    if plat == "cpu":
        return "xla"
    if plat == "gpu" and backend.has_fp8_tensor_cores():
        return "pallas" if backend.is_hopper() and fp8_gemm.AUTO_PALLAS_ON_HOPPER else "xla"
    return "bf16"


# ----------------------------------------------------------------------------------- the FP8 matmul
def _scale(t: jax.Array, history: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """(scale, this tensor's amax). With a history (delayed scaling) the scale comes from its max, or
    from the current amax while the history is still empty (first step)."""
    a = amax(t)
    past = jnp.max(history, initial=0.0)
    return scale_from_amax(jnp.where(past > 0, past, a), dtype), a


def _push(history: jax.Array, a: jax.Array) -> jax.Array:
    return jnp.concatenate([a[None], history[:-1]]) if history.size else history


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def fp8_matmul(x, w, x_history, w_history, g_history, gemm: str = "xla"):
    """x [M, K] @ w [K, N] through FP8 -> [M, N] in x.dtype. Histories are float32 amax histories for
    delayed scaling (shape [0] for dynamic scaling); their cotangents are the updated histories."""
    return _fp8_matmul_fwd(x, w, x_history, w_history, g_history, gemm)[0]


def _fp8_matmul_fwd(x, w, x_history, w_history, g_history, gemm):
    sx, ax = _scale(x, x_history, E4M3)
    sw, aw = _scale(w, w_history, E4M3)
    qx, qw = quantize(x, sx, E4M3), quantize(w, sw, E4M3)
    impl = "pallas" if gemm == "pallas" and fp8_gemm.pallas_applies(qx, qw.T) else "xla"
    y = fp8_gemm.scaled_matmul(qx, qw.T, sx, sw, out_dtype=x.dtype, impl=impl)
    dtypes = (jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))  # zero-size carriers of the dtypes
    return y, (qx, qw, sx, sw, _push(x_history, ax), _push(w_history, aw), g_history, dtypes)


def _fp8_matmul_bwd(gemm, res, g):
    qx, qw, sx, sw, x_history, w_history, g_history, (x_dt, w_dt) = res
    sg, ag = _scale(g, g_history, E5M2)
    qg = quantize(g, sg, E5M2)
    dx = fp8_gemm.scaled_matmul_xla(qg, qw, sg, sw, out_dtype=x_dt.dtype)  # contracts N
    dw = fp8_gemm.scaled_matmul_xla(qx.T, qg.T, sx, sg, out_dtype=w_dt.dtype)  # contracts M
    return dx, dw, x_history, w_history, _push(g_history, ag)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


# ----------------------------------------------------------------------------------- Flax plumbing
def dense_layout(lhs_shape, rhs_shape, dimension_numbers) -> tuple[int, int] | None:
    """(in_features, out_features) when the dot is a plain Dense (x's trailing dims contract with the
    kernel's leading dims, no batch dims); None otherwise."""
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = tuple(lc), tuple(rc)
    n = len(lc)
    if lb or rb or lc != tuple(range(len(lhs_shape) - n, len(lhs_shape))) or rc != tuple(range(n)):
        return None
    return math.prod(rhs_shape[:n]), math.prod(rhs_shape[n:])


class Fp8DotGeneral(nn.Module):
    """A `dot_general` for flax's DenseGeneral(dot_general_cls=...) that runs large linears in FP8."""

    config: Fp8Config

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        c = self.config
        layout = dense_layout(lhs.shape, rhs.shape, dimension_numbers)
        path = c.gemm if c.gemm != "auto" else resolve_gemm("auto")
        if layout is None or min(layout) < c.min_features or path == "bf16":
            return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                       preferred_element_type=preferred_element_type)
        k, n = layout
        if c.scaling == "delayed":
            zeros = lambda: jnp.zeros((c.amax_history_length,), jnp.float32)  # noqa: E731
            hx, hw, hg = (self.variable(FP8_META, name, zeros).value
                          for name in ("input_amax_history", "kernel_amax_history", "output_grad_amax_history"))
        else:
            hx = hw = hg = jnp.zeros((0,), jnp.float32)
        n_in = len(dimension_numbers[0][0])
        y = fp8_matmul(lhs.reshape(-1, k), rhs.reshape(k, n), hx, hw, hg, path)
        return y.reshape(lhs.shape[: lhs.ndim - n_in] + rhs.shape[n_in:])


def describe(config: Fp8Config) -> str:
    """One line: what the FP8 option quantizes and which path runs on the default device."""
    device = jax.devices()[0].device_kind if jax.devices() else backend.platform()
    return (f"FP8 LLM linears (min(in, out) >= {config.min_features}, {config.scaling} per-tensor scaling, "
            f"E4M3 x/w, E5M2 grads): {PATH_NAMES[resolve_gemm(config.gemm)]} on {device}")


def llm_dot_general_cls(config: Fp8Config | None) -> Any:
    """What to pass as NVILA(llm_dot_general_cls=...): None when FP8 is off, else the FP8 dot with its
    path resolved for this device. Logs which path runs."""
    if config is None or not config.enabled:
        return None
    path = resolve_gemm(config.gemm)
    backend.logger.info("%s", describe(config))
    return functools.partial(Fp8DotGeneral, config=dataclasses.replace(config, gemm=path))
