"""SigLIP vision tower as NVILA uses it: patch embedding + learned positions + pre-LN encoder layers.

NVILA takes `hidden_states[select_layer]` (-2) without the post-LayerNorm, so only the layers feeding that
output exist here: the unused last layer and post-LayerNorm are never computed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nvila_jax.config import SiglipConfig
from nvila_jax.models.layers import KERNEL_INIT, Dtype, dense, dot_product_attention, layer_norm, stack_layers


class SiglipEncoderLayer(nn.Module):
    config: SiglipConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dot_general_cls: Any = None  # the linears' product (inference: kernels.cpu_dot_general)

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, dot_general_cls=self.dot_general_cls)
        heads, hd = c.num_attention_heads, c.head_dim
        norm_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = layer_norm(c.layer_norm_eps, "embed", name="layer_norm1", **norm_kw)(x)
        q, k, v = (
            dense((heads, hd), ("embed", "heads", "head_dim"), name=n, **kw)(h) for n in ("q_proj", "k_proj", "v_proj")
        )
        attn = dot_product_attention(q, k, v, None, hd**-0.5)
        x = x + dense(c.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj", **kw)(attn)
        h = layer_norm(c.layer_norm_eps, "embed", name="layer_norm2", **norm_kw)(x)
        h = dense(c.intermediate_size, ("embed", "mlp"), name="fc1", **kw)(h)
        h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=True), ("tiles", "length", "mlp"))
        x = x + dense(c.hidden_size, ("mlp", "embed"), name="fc2", **kw)(h)
        return nn.with_logical_constraint(x, ("tiles", "length", "embed")), None


class SiglipVisionTower(nn.Module):
    """pixels [N, S, S, 3] in [-1, 1] -> feature maps [N, S/p, S/p, hidden] after `num_layers` layers."""

    config: SiglipConfig
    num_layers: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    dot_general_cls: Any = None  # the encoder layers' linears (inference: kernels.cpu_dot_general)

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        c = self.config
        n, size, _, ch = pixels.shape
        if size != c.image_size or pixels.shape[2] != c.image_size or ch != c.num_channels:
            raise ValueError(
                f"vision tower expects pixels [N, {c.image_size}, {c.image_size}, {c.num_channels}], got {pixels.shape}"
            )
        p, g = c.patch_size, c.grid_size
        patches = pixels.astype(self.dtype).reshape(n, g, p, g, p, ch).transpose(0, 1, 3, 2, 4, 5)
        kernel = self.param(
            "patch_kernel",  # HWIO, i.e. the conv weight OIHW transposed (2, 3, 1, 0)
            nn.with_logical_partitioning(KERNEL_INIT, (None, None, None, "embed")),
            (p, p, ch, c.hidden_size),
            self.param_dtype,
        )
        bias = self.param(
            "patch_bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (c.hidden_size,),
            self.param_dtype,
        )
        pos = self.param(
            "position_embedding", nn.with_logical_partitioning(KERNEL_INIT, (None, "embed")), (g * g, c.hidden_size),
            self.param_dtype,
        )
        x = jnp.einsum("nhwijc,ijcd->nhwd", patches, jnp.asarray(kernel, self.dtype))
        x = x.reshape(n, g * g, c.hidden_size) + jnp.asarray(bias, self.dtype) + jnp.asarray(pos, self.dtype)
        x = nn.with_logical_constraint(x, ("tiles", "length", "embed"))
        if self.num_layers:
            layers = stack_layers(SiglipEncoderLayer, self.num_layers, self.remat, (nn.broadcast,))
            x, _ = layers(c, self.dtype, self.param_dtype, self.dot_general_cls, name="layers")(x, None)
        return x.reshape(n, g, g, c.hidden_size)
