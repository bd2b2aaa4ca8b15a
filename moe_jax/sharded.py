"""NNX state on a mesh: each variable's sharding from its logical axis names, sharded creation.

Every parameter (and optimizer moment) carries its logical axis names as the `out_sharding`
metadata of its `nnx.Variable` (`moe_jax.layers`); the rules table (`moe_jax.mesh`) turns them
into a `PartitionSpec` on the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.mesh import (
    AnyMesh,
    Rules,
    axis_size,
    check_divisible,
    current_mesh,
    logical_rules,
    logical_to_spec,
    spec_entry,
)


def _variable_spec(variable: nnx.Variable, rules: Rules) -> PartitionSpec:
    names = variable.get_metadata().get("out_sharding")
    if not names:
        return PartitionSpec()
    return logical_to_spec(tuple(names), rules)


def state_shardings(tree: Any, mesh: AnyMesh, rules: Any = None) -> Any:
    """`NamedSharding`s for an NNX state (or module): each Variable's logical names via `rules`.

    Works for `nnx.state(model)` and `nnx.state(optimizer)` alike (optimizer moments carry their
    parameter's names; counters have none and are replicated). Returns the same tree with each
    Variable's value replaced by its `NamedSharding`; plain arrays are replicated.
    """
    rules = logical_rules(rules)
    if isinstance(tree, nnx.Module | nnx.Optimizer):
        tree = nnx.state(tree)

    def sharding(path: tuple, leaf: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            spec = _variable_spec(leaf, rules)
            value = leaf.get_value()
            if hasattr(value, "shape"):
                check_divisible(value.shape, spec, mesh, f"variable {jax.tree_util.keystr(path)}")
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map_with_path(
        sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


def constrain(x: jax.Array, names: tuple[str | None, ...], rules: Any = None) -> jax.Array:
    """`x` held to the sharding that its dims' logical `names` give on the mesh set with
    `jax.set_mesh` (`jax.lax.with_sharding_constraint`); unchanged without a mesh, and a dim
    that does not split evenly (a batch of one when decoding) stays whole."""
    mesh = current_mesh()
    if mesh is None:
        return x
    entries = []
    for size, entry in zip(x.shape, logical_to_spec(names, rules)):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        entries.append(entry if size % axis_size(mesh, axes) == 0 else None)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))


def create_sharded(constructor: Callable[[], Any], mesh: Mesh, rules: Any = None) -> Any:
    """Build an NNX module (or optimizer) with every parameter born on its shards.

    `constructor()` runs abstractly first (`nnx.eval_shape`) to learn the state's shapes and
    logical names; then one `jax.jit` of the constructor, its state
    constrained to the `state_shardings`, materialises each array directly in its sharded layout
    (no full copy on one device). The mesh is set (`jax.set_mesh`) and the rules are installed as
    Flax's logical axis rules while that runs, so Variables created with eager sharding also
    resolve.
    Optimizers too: `create_sharded(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)`.
    """
    rules = logical_rules(rules)
    flax_rules = tuple((logical, spec_entry(axes)) for logical, axes in rules)
    # the shapes and names first, every name resolved to no mesh axis: Flax resolves each dim's
    # names on their own, without dropping a mesh axis an earlier dim took (FSDP's expert
    # weights), and `state_shardings` resolves them as the rules mean
    replicated = tuple((logical, None) for logical, _ in rules)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(replicated):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
    shardings = state_shardings(abstract_state, mesh, rules)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(flax_rules):

        @jax.jit
        def init_state() -> Any:
            state = nnx.state(constructor())
            return jax.lax.with_sharding_constraint(state, shardings)

        state = init_state()
    return nnx.merge(graphdef, state)


def shard_module(module: Any, mesh: Mesh, rules: Any = None) -> Any:
    """Move an existing NNX module's (or optimizer's) arrays onto their shards, in place.

    For a model built on one device (or restored); `create_sharded` avoids the full copy.
    Returns the module.
    """
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))
    return module
