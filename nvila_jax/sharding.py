"""Device meshes and the one table that maps the models' logical axis names to mesh axes.

Every parameter and large activation in nvila_jax/models carries logical axis names ("embed", "mlp",
"batch", ...). `LOGICAL_AXIS_RULES` below is the only place where those names meet the mesh axes
`data`, `fsdp` and `tensor`:
- FSDP: weights are split on their model width ("embed") over `fsdp`, in the LLM and the vision tower;
- tensor parallelism: attention heads, MLP hiddens and the vocabulary are split over `tensor`;
- data: examples ("batch") and independent tiles / video frames ("tiles") are split over `data` x `fsdp`.
The rules are ordered (flax semantics): a mesh axis already used by an earlier dimension of the same array
is skipped, so an activation [batch, length, embed] is split on batch only, while a kernel [embed, mlp] is
split over (fsdp, tensor).

Arrays placed on a mesh (parameters, inputs, outputs) must divide evenly: a dimension that its mesh axes do
not divide stays whole on the axes that do not fit (`fit_spec`), e.g. NVILA-8B's vocabulary of 151651 rows
is never split. Constraints inside a jitted program may be uneven; XLA pads them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nvila_jax.config import NVILAConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name -> mesh axes, in priority order. Every name used in nvila_jax/models appears here.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations (listed first so that batch-like dimensions claim data x fsdp before "embed" can)
    ("batch", BATCH_AXES),
    ("tiles", BATCH_AXES),
    ("length", None),
    ("kv_length", None),
    # parameters (and the feature dimensions of activations)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


class MeshShapeError(ValueError):
    """A mesh shape that does not fit the devices or names an unknown axis."""


# ---------------------------------------------------------------------------------------------- meshes
def parse_mesh_shape(spec: Mapping[str, int] | Sequence[int] | str | None) -> dict[str, int]:
    """{"data": d, "fsdp": f, "tensor": t} from a mapping, a 3-sequence, or a string "data=2,fsdp=-1" / "2,2,2".

    Missing axes are 1; None means FSDP over every device ({"fsdp": -1}); one axis may be -1 (the rest).
    """
    if spec is None:
        return {"data": 1, "fsdp": -1, "tensor": 1}
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",") if p.strip()]
        if all("=" in p for p in parts):
            spec = {k.strip(): _int(v, f"mesh shape {spec!r}") for k, v in (p.split("=", 1) for p in parts)}
        elif not any("=" in p for p in parts):
            spec = [_int(p, f"mesh shape {spec!r}") for p in parts]
        else:
            raise MeshShapeError(f"mesh shape {spec!r}: use either 'data=2,fsdp=2,tensor=2' or '2,2,2'")
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise MeshShapeError(f"mesh shape {dict(spec)} names unknown axes {sorted(unknown)}; "
                                 f"the axes are {MESH_AXES}")
        shape = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    else:
        if len(spec) != len(MESH_AXES):
            raise MeshShapeError(f"mesh shape {tuple(spec)} must have {len(MESH_AXES)} sizes for {MESH_AXES}")
        shape = dict(zip(MESH_AXES, (int(s) for s in spec)))
    bad = {a: s for a, s in shape.items() if s == 0 or s < -1}
    if bad or list(shape.values()).count(-1) > 1:
        raise MeshShapeError(f"mesh shape {shape}: sizes must be positive, with at most one -1 (fill the rest)")
    return shape


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise MeshShapeError(f"{where}: {text!r} is not an integer") from None


def resolve_mesh_shape(spec: Mapping[str, int] | Sequence[int] | str | None, num_devices: int) -> dict[str, int]:
    """The mesh shape with -1 filled in so that the sizes multiply to `num_devices`."""
    shape = parse_mesh_shape(spec)
    fixed = math.prod(s for s in shape.values() if s != -1)
    if -1 in shape.values():
        if num_devices % fixed:
            raise MeshShapeError(f"mesh shape {shape}: {num_devices} devices are not divisible by {fixed}")
        shape = {a: (num_devices // fixed if s == -1 else s) for a, s in shape.items()}
    if math.prod(shape.values()) != num_devices:
        raise MeshShapeError(f"mesh shape {shape} has {math.prod(shape.values())} devices but "
                             f"{num_devices} are available; use -1 for one axis to fill the rest")
    return shape


def make_mesh(spec: Mapping[str, int] | Sequence[int] | str | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: every device of every process).

    `tensor` is the innermost axis (neighbouring devices, the fastest links), `data` the outermost (across
    hosts). Auto axes let XLA propagate shardings from the logical constraints (JAX_NOTES.md).
    """
    devs = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devs))
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    sizes = tuple(shape[a] for a in MESH_AXES)
    if devices is None:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=axis_types)
    return Mesh(np.asarray(devs, dtype=object).reshape(sizes), MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Makes `mesh` the current mesh and `rules` the logical axis rules: programs traced inside apply the
    models' logical constraints (outside, `nn.with_logical_constraint` is a no-op)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def per_device_attention(attention: Callable) -> Callable:
    """`attention(q, k, v, mask, scale)` run on each device's rows (and, where both divide, its share of query
    and KV heads) when traced under `activate`; unchanged otherwise.

    XLA cannot split attention written as a loop over work items (nvila_jax.models.layers.blocked_attention)
    by rows: every device would run the whole batch. Rows and heads are independent, so shard_map gives
    each device exactly its share, with the same numbers."""

    @functools.wraps(attention)
    def run(q: jax.Array, k: jax.Array, v: jax.Array, mask: Any, scale: float) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        rules = nn.get_logical_axis_rules()
        if mesh.empty or not rules:
            return attention(q, k, v, mask, scale)
        sizes = dict(mesh.shape)
        # q heads are grouped over KV heads: splitting both by a divisor of the KV head count keeps groups whole
        spec = fit_spec(logical_to_mesh_spec(("batch", "q_heads"), rules), (q.shape[0], k.shape[2]), sizes)
        rows, heads = tuple(spec) + (None,) * (2 - len(spec))
        qkv = PartitionSpec(rows, None, heads)
        if mask is None:
            fn = jax.shard_map(lambda q, k, v: attention(q, k, v, None, scale), mesh=mesh,
                               in_specs=(qkv, qkv, qkv), out_specs=qkv, check_vma=False)
            return fn(q, k, v)
        fn = jax.shard_map(lambda q, k, v, m: attention(q, k, v, m, scale), mesh=mesh,
                           in_specs=(qkv, qkv, qkv, PartitionSpec(rows)), out_specs=qkv, check_vma=False)
        return fn(q, k, v, mask)

    return run


# ---------------------------------------------------------------------------------------------- specs
def logical_to_mesh_spec(names: Sequence[str | None] | PartitionSpec, rules: Rules = LOGICAL_AXIS_RULES
                         ) -> PartitionSpec:
    """Mesh PartitionSpec of one array from its logical axis names (unknown names stay unsplit)."""
    return nn.logical_to_mesh_axes(tuple(names), rules)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], axis_sizes: Mapping[str, int]) -> PartitionSpec:
    """`spec` with, per dimension, only the leading mesh axes whose product divides the dimension's size."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept: list[str] = []
        for a in axes:
            if dim % (math.prod(axis_sizes[k] for k in kept) * axis_sizes[a]):
                break
            kept.append(a)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def logical_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int],
                     rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """NamedSharding for an array of `shape` whose dimensions have the logical `names`."""
    return NamedSharding(mesh, fit_spec(logical_to_mesh_spec(names, rules), shape, mesh.shape))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
    """Sharding of a per-example input [batch, ...]: examples over data x fsdp, the rest whole."""
    return logical_sharding(mesh, ("batch",) + (None,) * (len(shape) - 1), shape, rules)


# ---------------------------------------------------------------------------------------------- parameters
def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


@functools.lru_cache(maxsize=16)
def _abstract_boxed_params(config: NVILAConfig, param_dtype: Any) -> Any:
    from nvila_jax.models.nvila import init_params

    return jax.eval_shape(lambda rng: init_params(config, rng, param_dtype), jax.random.key(0))


def abstract_params(config: NVILAConfig, param_dtype: Any = jnp.float32) -> Any:
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct tree) without allocating anything."""
    return nn.meta.unbox(_abstract_boxed_params(config, jnp.dtype(param_dtype)))


def param_logical_specs(config: NVILAConfig) -> Any:
    """The logical axis names of every parameter, as a tree of PartitionSpecs of names."""
    return nn.get_partition_spec(_abstract_boxed_params(config, jnp.dtype(jnp.float32)))


def param_mesh_specs(config: NVILAConfig, axis_sizes: Mapping[str, int], rules: Rules = LOGICAL_AXIS_RULES,
                     param_dtype: Any = jnp.float32) -> Any:
    """Mesh PartitionSpec of every parameter for a mesh of `axis_sizes` (fitted to the parameter shapes)."""
    shapes = abstract_params(config, param_dtype)
    return jax.tree.map(lambda names, a: fit_spec(logical_to_mesh_spec(names, rules), a.shape, axis_sizes),
                        param_logical_specs(config), shapes, is_leaf=_is_spec)


def param_shardings(config: NVILAConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """NamedSharding of every parameter on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_mesh_specs(config, mesh.shape, rules),
                        is_leaf=_is_spec)


def abstract_sharded_params(config: NVILAConfig, mesh: Mesh, param_dtype: Any = jnp.float32,
                            rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """ShapeDtypeStructs that carry the target shardings: the restore target for Orbax (any saving mesh)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_params(config, param_dtype), param_shardings(config, mesh, rules))


def init_params_sharded(config: NVILAConfig, rng: jax.Array, mesh: Mesh, param_dtype: Any = jnp.float32,
                        rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Random parameters created directly in their shards (no full copy on any one device); the values
    equal the unsharded `init_params`."""
    from nvila_jax.models.nvila import init_params

    # Traced without the logical rules: DenseGeneral initialises its kernel flat and would have the
    # kernel's N-d constraint applied to the flat array. The out_shardings place every parameter.
    init = jax.jit(lambda r: nn.meta.unbox(init_params(config, r, param_dtype)),
                   out_shardings=param_shardings(config, mesh, rules))
    return init(rng)


def shard_params(params: Any, config: NVILAConfig, mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Places host or single-device parameters on `mesh` (every process must pass the same values)."""
    params = nn.meta.unbox(params)
    shardings = param_shardings(config, mesh, rules)
    try:
        return jax.tree.map(jax.device_put, params, shardings)
    except ValueError as e:
        raise ValueError(f"parameters do not match the tree of a {config.name!r} model: {e}") from None


def map_opt_state(tx: Any, opt_state: Any, param_tree: Any, other: Any) -> Any:
    """An optax state's tree with every parameter-shaped entry (Adam's moments) replaced by the matching leaf
    of `param_tree` (a sharding or spec per parameter) and every other leaf (step counts) by `other`."""
    import optax

    masked = lambda x: isinstance(x, optax.MaskedNode)  # entries of masked-out (frozen / no-decay) leaves
    return optax.tree_map_params(tx, lambda v, s: v if masked(v) else s, opt_state, param_tree,
                                 transform_non_params=lambda _: other,
                                 is_leaf=lambda x: masked(x) or isinstance(x, (NamedSharding, PartitionSpec)))


def opt_state_shardings(tx: Any, opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optax state (or its abstract shape): moments split like their parameters, the rest
    replicated."""
    return map_opt_state(tx, opt_state, param_shardings, replicated(mesh))


def train_state_shardings(state: Any, config: NVILAConfig, mesh: Mesh, tx: Any,
                          rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Shardings of a train state (nvila_jax.train.step.TrainState or its abstract shape): parameters by the
    rules table, optimizer moments like their parameters, the rest (step, RNG) replicated."""
    params = param_shardings(config, mesh, rules)
    rest = jax.tree.map(lambda _: replicated(mesh), state)
    return rest.replace(params=params, opt_state=opt_state_shardings(tx, state.opt_state, params, mesh))


def step_batch_shardings(mesh: Mesh, arrays: Mapping[str, Any], rules: Rules = LOGICAL_AXIS_RULES
                         ) -> dict[str, NamedSharding]:
    """Shardings of a training step's arrays [accumulation, ...] (nvila_jax.data.packing): token arrays
    split over rows, tiles over the tiles axis (as the train step constrains them), the small visual-plan
    arrays whole."""
    from nvila_jax.train.step import TOKEN_KEYS

    def names(key: str, ndim: int) -> tuple[str | None, ...]:
        if key in TOKEN_KEYS:
            return (None, "batch", "length")
        if key == "tiles":
            return (None, "tiles") + (None,) * (ndim - 2)
        return (None,) * ndim

    return {k: logical_sharding(mesh, names(k, len(a.shape)), a.shape, rules) for k, a in arrays.items()}


# ---------------------------------------------------------------------------------------------- KV cache
KV_CACHE_AXES = ("batch", "kv_heads", "kv_length", "head_dim")  # each layer's keys (values) in KVCache


def kv_cache_shardings(mesh: Mesh, cache: Any, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Shardings of a `KVCache` (or its abstract shape): rows over data x fsdp, KV heads over tensor."""
    from nvila_jax.models.qwen2 import KVCache

    per_layer = (logical_sharding(mesh, KV_CACHE_AXES, cache.k[0].shape, rules),) * len(cache.k)  # same shapes
    return KVCache(k=per_layer, v=per_layer, segment_ids=logical_sharding(mesh, ("batch", "kv_length"),
                                                            cache.segment_ids.shape, rules),
                   index=replicated(mesh))
