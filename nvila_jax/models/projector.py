"""The multimodal projector: k x k space-to-channel, then the MLP of the official `mm_projector_type`.

Layer layouts mirror the official `nn.Sequential`, and parameters are named `layers_{index}` after the
position there, so the official keys `layers.{index}.*` map one to one (`linear` is a bare `layers`).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.config import ConfigError, ProjectorConfig
from nvila_jax.kernels import space_to_channel, space_to_channel_layer_norm
from nvila_jax.models.layers import Dtype, dense, layer_norm

PROJECTOR_LN_EPS = 1e-5  # torch.nn.LayerNorm default


class LayerSpec(NamedTuple):
    kind: str  # "stc", "ln", "dense", "gelu"
    size: int = 0  # stc: k; ln: width; dense: output width


def projector_layout(cfg: ProjectorConfig) -> tuple[LayerSpec, ...]:
    """The official layer sequence of a projector type, with widths (C = mm_hidden_size, D = LLM width)."""
    t, c, d = cfg.projector_type, cfg.mm_hidden_size, cfg.hidden_size
    gelu = LayerSpec("gelu")
    if t in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return (LayerSpec("stc", 2), LayerSpec("ln", 4 * c), LayerSpec("dense", d), gelu, LayerSpec("dense", d))
    if t == "mlp_downsample_3x3_fix":
        return (LayerSpec("stc", 3), LayerSpec("ln", 9 * c), LayerSpec("dense", 3 * c), gelu, LayerSpec("ln", 3 * c),
                LayerSpec("dense", d), gelu, LayerSpec("dense", d))
    if t == "linear":
        return (LayerSpec("dense", d),)
    if t == "identity":
        return ()
    m = re.fullmatch(r"mlp(\d+)x_gelu", t)
    if m:
        return (LayerSpec("dense", d),) + (gelu, LayerSpec("dense", d)) * (int(m.group(1)) - 1)
    raise ConfigError(f"unknown mm_projector_type {t!r}")


def layer_name(cfg: ProjectorConfig, index: int) -> str:
    """Parameter scope of layer `index` (`layers` for the bare nn.Linear of type `linear`)."""
    return "layers" if cfg.projector_type == "linear" else f"layers_{index}"


class STCLayerNorm(nn.Module):
    """k x k space-to-channel then the first LayerNorm, as one fused kernel call (the dispatcher picks XLA
    or Pallas); its parameters are that LayerNorm's `scale` and `bias`, so the parameter tree is unchanged."""

    k: int
    axis_name: str
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = self.k * self.k * x.shape[-1]
        init = lambda f: nn.with_logical_partitioning(f, (self.axis_name,))  # noqa: E731
        scale = self.param("scale", init(nn.initializers.ones_init()), (d,), self.param_dtype)
        bias = self.param("bias", init(nn.initializers.zeros_init()), (d,), self.param_dtype)
        return space_to_channel_layer_norm(x.astype(self.dtype), self.k, scale, bias, PROJECTOR_LN_EPS, impl=self.impl)


class Projector(nn.Module):
    """feature maps [N, h, w, C] -> visual tokens [N, ceil(h/k) * ceil(w/k), D] (row-major tokens)."""

    config: ProjectorConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    stc_impl: str = "auto"
    dot_general_cls: Any = None  # the dense layers' product (inference: kernels.cpu_dot_general)

    @nn.compact
    def __call__(self, maps: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = maps.astype(self.dtype)
        if x.shape[-1] != self.config.mm_hidden_size:
            raise ValueError(f"projector expects {self.config.mm_hidden_size} channels, got {x.shape[-1]}")
        layout = projector_layout(self.config)
        if not layout or layout[0].kind != "stc":
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        # Logical name of x's feature axis: dense layers alternate embed -> mlp -> embed (column- then
        # row-parallel), so no kernel names one logical axis twice (sharding rules need distinct names).
        axis = "embed"
        fused_ln = -1
        for i, spec in enumerate(layout):
            name = layer_name(self.config, i)
            if i == fused_ln:
                continue
            if spec.kind == "stc" and i + 1 < len(layout) and layout[i + 1].kind == "ln":
                fused_ln = i + 1
                x = STCLayerNorm(spec.size, axis, self.stc_impl, name=layer_name(self.config, i + 1), **kw)(x)
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            elif spec.kind == "stc":
                x = space_to_channel(x, spec.size, impl=self.stc_impl)
                x = x.reshape(x.shape[0], -1, x.shape[-1])
            elif spec.kind == "ln":
                x = layer_norm(PROJECTOR_LN_EPS, axis, name=name, **kw)(x)
            elif spec.kind == "dense":
                out_axis = "mlp" if axis == "embed" else "embed"
                x = dense(spec.size, (axis, out_axis), name=name, dot_general_cls=self.dot_general_cls, **kw)(x)
                axis = out_axis
            else:
                x = jax.nn.gelu(x, approximate=False)
            x = nn.with_logical_constraint(x, ("tiles", "length", None))
        return x
