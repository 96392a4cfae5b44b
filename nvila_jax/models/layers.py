"""Building blocks shared by the vision tower, projector and LLM: dense layers and norms that carry
logical axis names, attention with segment/slot masking, and layer stacking (scan + remat).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
KERNEL_INIT = nn.initializers.normal(stddev=0.02)

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


class _DenseAxes(nn.LogicallyPartitioned):
    """flax's logical box for DenseGeneral kernels and biases. DenseGeneral initialises them flattened to 2-D
    and unboxes once before reshaping; with a mesh active, flax would then constrain the flat array with the
    N-d names (a rank error), so the constraint applies only once the value has its real rank."""

    def unbox(self, apply_constraint: bool = True) -> Any:
        return super().unbox(apply_constraint and jnp.ndim(self.value) == len(self.names))


def _dense_axes(init: Callable, axes: tuple[str | None, ...]) -> Callable:
    return lambda *args, **kwargs: _DenseAxes(init(*args, **kwargs), axes)


def dense(
    features: int | Sequence[int],
    axes: tuple[str | None, ...],
    *,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str | None = None,
    use_bias: bool = True,
    axis: int | Sequence[int] = -1,
    dot_general_cls: Any = None,
) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel (and bias) carry the logical axis names `axes` (input dims, then output)."""
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_dense_axes(KERNEL_INIT, axes),
        bias_init=_dense_axes(nn.initializers.zeros_init(), axes[-n_out:]),
        dot_general_cls=dot_general_cls,
        name=name,
    )


def layer_norm(eps: float, axis_name: str, *, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
        name=name,
    )


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, cast back, then scale (HF order of operations)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)), (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query sees, described by small per-token arrays instead of a [T, S] matrix.

    A query sees a key when both have the same non-zero segment id and, if causal, the key's slot is not
    after the query's. Segment 0 marks padding; packed samples use different segment ids; a KV cache marks
    its unwritten slots with 0.
    """

    q_segment: jax.Array  # [B, T] int32
    kv_segment: jax.Array  # [B, S] int32
    q_slot: jax.Array  # [B, T] int32
    kv_slot: jax.Array  # [B, S] int32
    causal: bool = True

    def dense(self) -> jax.Array:
        """The [B, T, S] boolean mask."""
        m = (self.q_segment[:, :, None] == self.kv_segment[:, None, :]) & (self.kv_segment[:, None, :] > 0)
        if self.causal:
            m &= self.kv_slot[:, None, :] <= self.q_slot[:, :, None]
        return m


jax.tree_util.register_dataclass(
    AttentionMask, data_fields=["q_segment", "kv_segment", "q_slot", "kv_slot"], meta_fields=["causal"]
)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask | None, scale: float
) -> jax.Array:
    """Grouped-query attention, softmax in float32. q [B,T,H,Dh], k/v [B,S,KVH,Dh] -> [B,T,H,Dh]."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    qg = q.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask.dense()[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def stack_layers(
    layer_cls: type[nn.Module],
    num_layers: int,
    remat: str,
    in_axes: tuple[Any, ...],
) -> type[nn.Module]:
    """Scans `layer_cls` over a stacked leading "layers" axis of its parameters (and of per-layer inputs
    with in_axes 0, such as KV caches), optionally rematerialised with a named policy."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    if remat != "none":
        layer_cls = nn.remat(layer_cls, policy=REMAT_POLICIES[remat], prevent_cse=False)
    return nn.scan(
        layer_cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=in_axes,
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
