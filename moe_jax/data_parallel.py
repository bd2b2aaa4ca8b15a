"""The batch split over devices: its shardings, its checks, and routing each device's groups.

The batch (and with it the routing groups) splits along its leading dim over the mesh axes of
the 'batch' rule (`moe_jax.mesh`). Routing is per group, so a sharded run equals a
single-device run only when no group straddles two devices: the single-device reference must
use the same group size, and the batch is split along whole groups (the number of groups G must
divide evenly over the batch mesh axes, and each device's share of the batch must hold whole
groups, i.e. `(B / shards) * L` a multiple of the group size). A bad split fails before
compiling with a ValueError naming both numbers.

Each device routes its own groups with `per_device_groups` (a `jax.shard_map` over the batch
axes): under plain `jax.jit`, XLA gathers the router's `top_k` input onto every device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax.mesh import AnyMesh, axis_size, current_mesh, logical_to_spec, mesh_axes_of


def batch_spec(ndim: int, rules: Any = None) -> PartitionSpec:
    """`PartitionSpec` of a batch array: leading dim over the 'batch' mesh axes, rest replicated."""
    return logical_to_spec(("batch",) + (None,) * (ndim - 1), rules)


def batch_sharding(mesh: AnyMesh, rules: Any = None, ndim: int = 2) -> NamedSharding:
    """`NamedSharding` of a batch array (`[B, ...]`, B split over the 'batch' mesh axes)."""
    return NamedSharding(mesh, batch_spec(ndim, rules))


def batch_shards(mesh: AnyMesh, rules: Any = None) -> int:
    """How many ways the batch (and the groups) split: product of the 'batch' mesh axes."""
    return axis_size(mesh, mesh_axes_of("batch", rules))


def check_batch(batch_size: int, mesh: AnyMesh, rules: Any = None) -> None:
    """Raise a ValueError naming both numbers unless `batch_size` splits over the batch axes."""
    shards = batch_shards(mesh, rules)
    if batch_size % shards:
        raise ValueError(
            f"batch size {batch_size} does not divide by {shards}, the number of devices along "
            f"the batch mesh axes {mesh_axes_of('batch', rules)}; use a multiple of {shards}."
        )


def check_groups(num_groups: int, mesh: AnyMesh, rules: Any = None) -> None:
    """Raise a ValueError naming both numbers unless `num_groups` splits over the batch axes."""
    shards = batch_shards(mesh, rules)
    if num_groups % shards:
        raise ValueError(
            f"{num_groups} routing groups do not divide by {shards}, the number of devices along "
            f"the batch mesh axes {mesh_axes_of('batch', rules)}; a group must not straddle "
            f"devices, so choose batch size and group size giving a multiple of {shards} groups."
        )


def per_device_groups(
    fn: Callable[..., Any],
    *group_arrays: Any,
    rng: jax.Array | None = None,
    rules: Any = None,
    mesh: AnyMesh | None = None,
) -> Any:
    """Run a per-group function on each device's own groups: `fn(*local_arrays)`.

    Routers are per group, but XLA's SPMD partitioner gathers a `top_k` over a batch-sharded
    array onto every device (measured on CPU, jax 0.10), so a router under plain `jax.jit`
    computes every group everywhere. Inside `jax.shard_map` each device routes only its
    `G / shards` groups and nothing is communicated.

    Args:
      fn: maps arrays with leading dim G (its `[G_local, ...]` slices) to a pytree whose leaves
        all have leading dim G (e.g. a `Routing`); it may close over replicated arrays.
      *group_arrays: arrays `[G, ...]` (or None), split over the 'batch' mesh axes.
      rng: optional key; `fn` then gets `rng=` a key folded with the device's group-shard
        index, so random draws differ between devices (they cannot equal a single-device run).
      rules, mesh: the logical-axis rules and mesh (None: defaults / the `jax.set_mesh` mesh).

    Without a mesh, or with one batch shard, it simply calls `fn`.
    """
    mesh = current_mesh() if mesh is None else mesh
    extra = {} if rng is None else {"rng": rng}
    if mesh is None or batch_shards(mesh, rules) == 1:
        return fn(*group_arrays, **extra)
    num_groups = next(a.shape[0] for a in group_arrays if a is not None)
    check_groups(num_groups, mesh, rules)
    batch_axes = mesh_axes_of("batch", rules)
    group_spec = batch_spec(1, rules)

    def local(*arrays: Any) -> Any:
        if rng is None:
            return fn(*arrays)
        return fn(*arrays, rng=jax.random.fold_in(rng, jax.lax.axis_index(batch_axes)))

    return jax.shard_map(
        local, mesh=mesh, in_specs=(group_spec,) * len(group_arrays), out_specs=group_spec
    )(*group_arrays)
