"""Device mesh from config and partition specs named by dimension letters.

The mesh has axes ("data", "fsdp", "tensor"). Batches are split over ("data", "fsdp");
parameters are split over "fsdp" along the model dimension (ZeRO-3 style) and over
"tensor" along heads / MLP hidden / vocab (Megatron style).

A spec is named by the dimensions of the array it shards, one letter each:
  b batch, t time (query), s slot (key), d model, v vocab, n query heads, k kv heads,
  h head_dim, f MLP hidden, l layers.
A dimension whose size the mesh axes do not divide is left replicated (see `fit_spec`),
so one set of rules serves every model size and mesh.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXIS = MESH_AXES[0]  # pure data parallelism: parameters are never sharded over it
BATCH_AXES = ("data", "fsdp")

AxisNames = tuple[str | tuple[str, ...] | None, ...]


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Mesh axes per array dimension, for parameters and activations."""

    # Parameters.
    embed_vd: AxisNames = ("tensor", "fsdp")
    lm_head_dv: AxisNames = ("fsdp", "tensor")
    q_proj_dnh: AxisNames = ("fsdp", "tensor", None)
    kv_proj_dkh: AxisNames = ("fsdp", "tensor", None)
    o_proj_nhd: AxisNames = ("tensor", None, "fsdp")
    q_bias_nh: AxisNames = ("tensor", None)
    kv_bias_kh: AxisNames = ("tensor", None)
    ffw_df: AxisNames = ("fsdp", "tensor")
    ffw_fd: AxisNames = ("tensor", "fsdp")
    norm_d: AxisNames = (None,)
    norm_h: AxisNames = (None,)
    # Activations.
    embed_lookup_vd: AxisNames = ("tensor", None)
    act_btd: AxisNames = (BATCH_AXES, None, None)
    act_btnh: AxisNames = (BATCH_AXES, None, "tensor", None)
    act_btf: AxisNames = (BATCH_AXES, None, "tensor")
    act_btv: AxisNames = (BATCH_AXES, None, "tensor")
    # A KV cache layer: keys [b, k, h, s], values [b, k, s, h].
    kv_cache: AxisNames = (BATCH_AXES, "tensor", None, None)


DEFAULT_RULES = ShardingRules()
# Rows split over every device, weights whole on each: the in-process sampler's mesh on
# CPU devices (one decode loop per core; ctu.backend.add_cpu_xla_flags).
DATA_PARALLEL = {"data": -1, "fsdp": 1, "tensor": 1}


def make_mesh(mesh_config: Mapping[str, int] | Any, devices=None) -> Mesh:
    """A mesh with axes ("data", "fsdp", "tensor") from a section {data, fsdp, tensor}.

    At most one size may be -1: it takes the devices the others leave.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    asked = dict(zip(MESH_AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(size == 0 or size < -1 for size in sizes):
        raise ValueError(f"mesh {asked}: sizes must be positive, with at most one -1.")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {asked}: {len(devices)} devices are not a multiple of {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {asked} needs {math.prod(sizes)} devices, found {len(devices)}; "
            "use -1 for one axis to take the rest."
        )
    # Auto axes: shardings are hints to the compiler, constraints placed where they matter.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def fit_spec(names: AxisNames, shape: tuple[int, ...], mesh_shape: Mapping[str, int]):
    """The PartitionSpec for `names`, leaving replicated any dimension the axes don't divide."""
    if len(names) != len(shape):
        raise ValueError(f"sharding {names} has {len(names)} dims, array has shape {shape}.")
    fitted = []
    for axes, size in zip(names, shape, strict=True):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = []
        for axis in axes:
            if (
                axis in mesh_shape
                and size % (math.prod(mesh_shape[a] for a in kept) * mesh_shape[axis]) == 0
            ):
                kept.append(axis)
        fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*fitted)


def shard(x: jax.Array, names: AxisNames) -> jax.Array:
    """Constrains an activation's sharding under the current mesh; a no-op without one,
    and inside a shard_map (manual axes: the data-parallel decode loops), where each
    device already holds just its part."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if AxisType.Manual in mesh.axis_types:
        return x
    return jax.lax.with_sharding_constraint(x, fit_spec(names, x.shape, mesh.shape))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension over ("data", "fsdp"), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    """How many ways a batch is split: its row count must be a multiple of this."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def kv_cache_shardings(mesh: Mesh, cache, rules: ShardingRules = DEFAULT_RULES):
    """NamedShardings for a KVCache (abstract or concrete), one per layer's k and v.

    Every layer array is `[batch, kv_heads, ., .]` (ctu/models/cache.py): rows over the
    batch axes, kv heads over "tensor", slots and head_dim whole. The token ids of a
    smear model's cache, `[batch, slots]`, have their rows split the same way.
    """

    def one(x):
        names = rules.kv_cache if x.ndim == len(rules.kv_cache) else (rules.kv_cache[0], None)
        return NamedSharding(mesh, fit_spec(names, tuple(x.shape), mesh.shape))

    return jax.tree.map(one, cache)


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for an nnx State / Module (abstract or concrete) from its metadata.

    Variables without sharding metadata are replicated.
    """
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def one(variable):
        names = variable.get_metadata().get("out_sharding") or (None,) * variable.ndim
        spec = fit_spec(tuple(names), tuple(variable.shape), mesh.shape)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded_optimizer(model: nnx.Module, tx, mesh: Mesh, wrt=nnx.Param) -> nnx.Optimizer:
    """An `nnx.Optimizer` for `model` (already on `mesh`) whose state is born sharded.

    Every state leaf, the scalar step counts included, is placed on `mesh` as the
    jitted update step will return it, so the step compiles once, not a second time
    when the first update's outputs come back with mesh shardings.
    """

    @nnx.jit
    def create(model):
        optimizer = nnx.Optimizer(model, tx, wrt=wrt)
        state = nnx.state(optimizer)
        nnx.update(optimizer, jax.lax.with_sharding_constraint(state, state_shardings(state, mesh)))
        return optimizer

    with jax.set_mesh(mesh):
        return create(model)


def create_sharded_model(config, mesh: Mesh, rngs: nnx.Rngs, rules: ShardingRules = DEFAULT_RULES):
    """A `ctu.models.Qwen` whose parameters are created inside jit, already sharded."""
    from ctu.models.qwen import Qwen  # models import this module; import here, not at the top

    abstract = nnx.eval_shape(lambda: Qwen(config, rngs=nnx.Rngs(0), rules=rules))
    shardings = state_shardings(abstract, mesh)

    @nnx.jit
    def create(rngs):
        model = Qwen(config, rngs=rngs, rules=rules)
        state = nnx.state(model)
        nnx.update(model, jax.lax.with_sharding_constraint(state, shardings))
        return model

    with jax.set_mesh(mesh):
        return create(rngs)
