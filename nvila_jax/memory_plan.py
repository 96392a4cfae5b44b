"""Per-device memory of a training or inference setup, computed from shapes alone (jax.eval_shape: nothing
is allocated, so NVILA-8B on 64 devices is planned on a laptop).

- parameters and gradients: every parameter's shard under the rules table (nvila_jax.sharding) on the mesh;
- optimizer state: the AdamW state of nvila_jax.train.optimizer, moments split like their parameters;
- activations: the residuals the backward pass keeps (what jax.vjp saves under the model's remat policy) for
  one device's share of the batch: rows and tiles split over data x fsdp, MLP hiddens, LLM attention heads
  and the vocabulary over tensor where they divide; with remat, plus the one layer rebuilt at a time;
- KV cache (inference): keys and values [layers, rows, length, kv_heads, head_dim], split like the cache.
Not counted: XLA's temporary buffers, FSDP weights all-gathered in flight, fragmentation: keep a margin.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from nvila_jax import sharding
from nvila_jax.config import NVILAConfig

GIB = 1024**3
MODULES = ("vision_tower", "projector", "llm")


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    name: str
    bytes_per_device: int
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    title: str
    rows: tuple[MemoryRow, ...]

    @property
    def total(self) -> int:
        return sum(r.bytes_per_device for r in self.rows)

    def warning(self, device_memory_gib: float | None) -> str | None:
        """A sentence when the plan does not fit a device of `device_memory_gib` GiB, else None."""
        if device_memory_gib and self.total > device_memory_gib * GIB:
            return (f"WARNING: {self.total / GIB:.1f} GiB per device exceeds the {device_memory_gib:g} GiB of device "
                    "memory: use more fsdp/tensor devices, fewer rows per device or remat")
        return None

    def table(self, device_memory_gib: float | None = None) -> str:
        """The plan as a Markdown table (title, one row per component, the total), then any warning."""
        lines = [self.title, "", "| component | per device | detail |", "| --- | ---: | --- |"]
        lines += [f"| {r.name} | {format_bytes(r.bytes_per_device)} | {r.detail} |" for r in self.rows]
        share = (f"{100 * self.total / (device_memory_gib * GIB):.0f}% of {device_memory_gib:g} GiB"
                 if device_memory_gib else "")
        lines.append(f"| **total** | **{format_bytes(self.total)}** | {share} |")
        warning = self.warning(device_memory_gib)
        return "\n".join(lines + ([f"\n{warning}"] if warning else []))


# ---------------------------------------------------------------------------------------------- bytes
def format_bytes(n: int) -> str:
    unit, size = next(((u, s) for u, s in (("GiB", GIB), ("MiB", 1024**2)) if n >= s), ("KiB", 1024))
    return f"{n / size:.2f} {unit}"


def format_count(n: int) -> str:
    unit, size = next(((u, s) for u, s in (("B", 10**9), ("M", 10**6)) if n >= s), ("K", 10**3))
    return f"{n / size:.2f} {unit}"


def shard_bytes(shape: Sequence[int], dtype: Any, spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> int:
    """Bytes of one device's shard of an array split by a fitted `spec` (its mesh axes divide evenly)."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    ways = [math.prod(axis_sizes[a] for a in ((e,) if isinstance(e, str) else tuple(e or ()))) for e in entries]
    return math.prod(d // w for d, w in zip(shape, ways)) * jnp.dtype(dtype).itemsize


def _tree_bytes(abstract: Any, specs: Any, axis_sizes: Mapping[str, int]) -> int:
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(shard_bytes(a.shape, a.dtype, s, axis_sizes) for a, s in zip(jax.tree.leaves(abstract), spec_leaves))


def _count(tree: Any) -> int:
    return sum(math.prod(a.shape) for a in jax.tree.leaves(tree))


def residual_bytes(fn: Any, *args: Any) -> int:
    """Bytes the backward pass of `fn` keeps: its residuals, not counting its own arguments. `args` may be
    abstract (jax.ShapeDtypeStruct)."""
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, origin in saved_residuals(fn, *args)
               if not origin.startswith("from the argument"))


# ---------------------------------------------------------------------------------------------- activations
def per_device_model(config: NVILAConfig, tensor: int) -> NVILAConfig:
    """The model as one device of a `tensor`-way group sees its activations (as the rules table splits them):
    MLP hiddens, LLM attention heads and the vocabulary divided where they divide; widths whole. (SigLIP
    heads stay whole here: its head width is derived from the model width.)"""
    if tensor == 1:
        return config

    def divide(n: int) -> int:
        return n // tensor if n % tensor == 0 else n

    llm = config.llm
    heads_split = llm.num_attention_heads % tensor == 0 and llm.num_key_value_heads % tensor == 0
    llm = dataclasses.replace(
        llm, intermediate_size=divide(llm.intermediate_size), vocab_size=divide(llm.vocab_size),
        num_attention_heads=divide(llm.num_attention_heads) if heads_split else llm.num_attention_heads,
        num_key_value_heads=divide(llm.num_key_value_heads) if heads_split else llm.num_key_value_heads)
    vision = dataclasses.replace(config.vision, intermediate_size=divide(config.vision.intermediate_size))
    return dataclasses.replace(config, llm=llm, vision=vision)


def _loss_residuals(cfg: NVILAConfig, remat: str, compute_dtype: Any, param_dtype: Any, trainable: Sequence[str],
                    rows: int, seq_len: int, tiles: int, loss_chunk: int) -> int:
    """Residuals of the training loss of one micro-batch (nvila_jax.train.step.micro_batch_nll: tiles ->
    Dynamic-S2 visual tokens -> LLM -> float32 cross-entropy) w.r.t. the trainable parameters."""
    from nvila_jax.data.packing import BatchShape, VisualGeometry, array_spec
    from nvila_jax.models.nvila import NVILA
    from nvila_jax.train.step import micro_batch_nll

    module = NVILA(cfg, dtype=compute_dtype, remat=remat)
    geom = VisualGeometry.from_config(cfg)
    micro = {k: jax.ShapeDtypeStruct(shape, dtype)
             for k, (shape, dtype) in array_spec(geom, BatchShape(rows, seq_len, tiles)).items()}
    params = sharding.abstract_params(cfg, param_dtype)

    def loss(train_params, frozen, micro):  # frozen modules enter as constants, as in the train step
        return micro_batch_nll(module, {**jax.lax.stop_gradient(frozen), **train_params}, micro, geom,
                               loss_chunk).sum()

    return residual_bytes(loss, {k: v for k, v in params.items() if k in trainable},
                          {k: v for k, v in params.items() if k not in trainable}, micro)


def _with_layers(cfg: NVILAConfig, llm_layers: int, vision_layers: int) -> NVILAConfig:
    return dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_hidden_layers=llm_layers),
                               vision=dataclasses.replace(cfg.vision, num_hidden_layers=vision_layers),
                               select_layer=vision_layers)


def _rebuilt_layer_bytes(cfg: NVILAConfig, *args: Any) -> int:
    """What backward rebuilds at once under remat: the larger of one LLM layer's and one ViT layer's
    residuals without remat (the loss's residuals with one layer more, minus those without it)."""
    base = _loss_residuals(_with_layers(cfg, 1, 1), "none", *args)
    llm = _loss_residuals(_with_layers(cfg, 2, 1), "none", *args) - base
    vit = _loss_residuals(_with_layers(cfg, 1, 2), "none", *args) - base
    return max(llm, vit)


# ---------------------------------------------------------------------------------------------- plans
def _mesh_title(sizes: Mapping[str, int]) -> str:
    return (f"mesh data={sizes['data']} fsdp={sizes['fsdp']} tensor={sizes['tensor']} "
            f"({math.prod(sizes.values())} devices)")


def plan_training(
    config: NVILAConfig,
    mesh_shape: Mapping[str, int] | Sequence[int] | str | None,
    num_devices: int,
    *,
    rows: int,
    seq_len: int,
    tiles_per_row: int,
    remat: str = "full",
    param_dtype: Any = jnp.float32,
    compute_dtype: Any = jnp.bfloat16,
    trainable: Sequence[str] = MODULES,
    loss_chunk: int = 0,
) -> MemoryPlan:
    """Per-device memory of a training step on `num_devices`: a global micro-batch of `rows` sequences of
    `seq_len` tokens, each with `tiles_per_row` ViT tiles; AdamW, the `remat` policy and the train step's
    `loss_chunk` (positions per cross-entropy chunk, 0: whole rows)."""
    from nvila_jax.models.layers import REMAT_POLICIES
    from nvila_jax.train.optimizer import make_optimizer

    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    sizes = sharding.resolve_mesh_shape(mesh_shape, num_devices)
    params = sharding.abstract_params(config, param_dtype)
    specs = sharding.param_mesh_specs(config, sizes, param_dtype=param_dtype)
    tx, _ = make_optimizer(params, trainable=trainable, learning_rate=1e-5, module_learning_rates=None,
                           total_steps=1, warmup_steps=0)
    opt_state = jax.eval_shape(tx.init, params)
    opt_specs = sharding.map_opt_state(tx, opt_state, specs, PartitionSpec())

    batch_ways = math.prod(sizes[a] for a in sharding.BATCH_AXES)
    local_rows = -(-rows // batch_ways)
    local_tiles = local_rows * tiles_per_row
    local_cfg = per_device_model(config, sizes["tensor"])
    local = (compute_dtype, param_dtype, tuple(trainable), local_rows, seq_len, local_tiles, loss_chunk)
    plan = [
        MemoryRow("parameters", _tree_bytes(params, specs, sizes),
                  f"{format_count(_count(params))} x {jnp.dtype(param_dtype).name}"),
        MemoryRow("gradients", sum(_tree_bytes(params[m], specs[m], sizes) for m in trainable),
                  f"trainable: {', '.join(trainable)}"),
        MemoryRow("optimizer state", _tree_bytes(opt_state, opt_specs, sizes),
                  "AdamW mu + nu, split like their parameters"),
        MemoryRow("activations saved for backward", _loss_residuals(local_cfg, remat, *local),
                  f"{local_rows} x {seq_len} tokens + {local_tiles} tiles per device, remat={remat}, "
                  f"{jnp.dtype(compute_dtype).name}, loss_chunk={loss_chunk}"),
    ]
    if remat != "none":
        plan.append(MemoryRow("layer rebuilt in backward", _rebuilt_layer_bytes(local_cfg, *local),
                              "the larger of one LLM / one ViT layer without remat"))
    title = (f"{config.name} training, {_mesh_title(sizes)}: global batch {rows} x {seq_len} tokens, "
             f"{tiles_per_row} tiles per row")
    return MemoryPlan(title, tuple(plan))


def plan_inference(
    config: NVILAConfig,
    mesh_shape: Mapping[str, int] | Sequence[int] | str | None,
    num_devices: int,
    *,
    rows: int,
    max_length: int,
    param_dtype: Any = jnp.bfloat16,
    cache_dtype: Any = jnp.bfloat16,
) -> MemoryPlan:
    """Per-device memory of serving `rows` sequences of up to `max_length` tokens: parameters + KV cache."""
    from nvila_jax.models.qwen2 import KVCache

    sizes = sharding.resolve_mesh_shape(mesh_shape, num_devices)
    params = sharding.abstract_params(config, param_dtype)
    specs = sharding.param_mesh_specs(config, sizes, param_dtype=param_dtype)
    cache = jax.eval_shape(lambda: KVCache.init(config.llm, rows, max_length, cache_dtype))
    layer_shape, layers = cache.k[0].shape, len(cache.k)
    spec = sharding.fit_spec(sharding.logical_to_mesh_spec(sharding.KV_CACHE_AXES), layer_shape, sizes)
    title = f"{config.name} inference, {_mesh_title(sizes)}: {rows} sequences x {max_length} tokens"
    return MemoryPlan(title, (
        MemoryRow("parameters", _tree_bytes(params, specs, sizes),
                  f"{format_count(_count(params))} x {jnp.dtype(param_dtype).name}"),
        MemoryRow("KV cache", 2 * layers * shard_bytes(layer_shape, cache.k[0].dtype, spec, sizes),
                  f"keys + values, {jnp.dtype(cache_dtype).name}, split {tuple(spec)}"),
    ))
