"""Meshes, logical-axis rules, sharded model creation, and expert parallelism.

Mesh axes are `('data', 'expert', 'model')`, always `AxisType.Auto` (GSPMD propagates shardings
between the constraints we place). Parameters and activations name their dimensions with
*logical* axes (`batch, length, embed, mlp, heads, kv, vocab, expert`); one rules table
(`config.mesh.rules`) maps each logical axis to zero, one or several mesh axes.

Expert parallelism replaces the local `dispatch -> experts -> combine` of `moe_jax.dispatch` with
`expert_parallel_dispatch_combine`, which has the same inputs plus the mesh facts:

- `'shard_map'` (default): inside `jax.shard_map` each device holds its own groups
  `x: [G_local, T, M]` and their routing, builds `[E, G_local, C, M]`, exchanges it with
  `jax.lax.all_to_all` over the expert mesh axis (it then holds `[E_local, G_local * X, C, M]`
  for its `E_local = E / X` experts, X the expert-axis size), runs its experts (hidden dim H
  possibly split over `'model'`, with a `psum` over `'model'` after `wo`), and sends the outputs
  back with a second `all_to_all` before combining.
- `'gspmd'`: the same maths under `jax.jit` with sharding constraints only: `[E, G, C, M]` is
  constrained first along G and then along E, and XLA inserts the all-to-all.

The dropless backend under `'shard_map'` has no `[E, G, C, M]` buffer: each device sorts its own
groups' assignments by expert and exchanges only rows (`moe_jax.exchange`: `ragged_all_to_all`
on TPU/GPU, on CPU an `all_to_all` padded to the largest load a peer can receive); with groups
split over devices but no expert axis, each device sorts and computes its own groups (no
communication). Under `'gspmd'` it runs as `'gather'` with C = T (logged). Expert dropout keys
are folded with the device's position on the whole mesh inside `shard_map`, so every expert
and model shard draws its own mask.

Routing is per group, so a sharded run equals a single-device run only when no group straddles
two devices: the single-device reference must use the same group size, and the batch is split
along whole groups (the number of groups G must divide evenly over the batch mesh axes, and each
device's share of the batch must hold whole groups, i.e. `(B / shards) * L` a multiple of the
group size). A bad split fails before compiling with a ValueError naming both numbers.

Each device routes its own groups with `per_device_groups` (a `jax.shard_map` over the batch
axes): under plain `jax.jit`, XLA gathers the router's `top_k` input onto every device.

Wiring: `MoeFeedForward.experts_impl` is the layer's hook for dispatch -> experts -> combine.
Every MoE layer starts with an `ExpertParallel` built from its config, which uses the
expert-parallel path whenever the mesh set with `jax.set_mesh` has an expert axis larger than 1,
and the local `dispatch.dispatch_combine` otherwise. `enable_expert_parallelism(model, config,
mesh)` pins a given mesh (for code that runs outside `jax.set_mesh`) on every MoE layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from moe_jax import dispatch, exchange
from moe_jax.routing import Routing

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "expert", "model")
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "expert")
EXPERT_PARALLELISM = ("shard_map", "gspmd")

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]
AnyMesh = Mesh | jax.sharding.AbstractMesh

# Logical axis -> mesh axes. Groups (and so the batch) split over data and expert devices; the
# hidden dims of FFNs and experts, attention heads and the vocabulary over 'model'.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("length", ()),
    ("embed", ()),
    ("mlp", ("model",)),
    ("heads", ("model",)),
    ("kv", ()),
    ("vocab", ("model",)),
    ("expert", ("expert",)),
)


# ----------------------------------------------------------------------------------- meshes


def make_mesh(
    data: int = -1, expert: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `('data', 'expert', 'model')` mesh with Auto axes over `devices` (default: all).

    One size may be -1: it takes the devices the other two leave. Raises a ValueError when the
    sizes' product differs from the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "expert": expert, "model": model}
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must be an int >= 1 or -1, got {size!r}.")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got -1 for {fill}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(
                f"cannot fill mesh axis {fill[0]!r}: {len(devices)} devices do not divide by "
                f"the other axes' product {known} ({_describe(sizes)})."
            )
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices but "
            f"{len(devices)} are available; make the product equal {len(devices)} or use -1."
        )
    shape = tuple(int(sizes[name]) for name in MESH_AXES)
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def mesh_from_config(config: Any, *, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` with the sizes of `config.mesh` (data, expert, model)."""
    mesh_config = config.mesh
    return make_mesh(mesh_config.data, mesh_config.expert, mesh_config.model, devices=devices)


def _describe(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set with `jax.set_mesh`, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


# ------------------------------------------------------------------------------------ rules


def _as_mesh_axes(logical: str, value: Any) -> MeshAxes:
    if value is None:
        axes: MeshAxes = ()
    elif isinstance(value, str):
        axes = (value,)
    else:
        axes = tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(
                f"rule {logical!r} -> {value!r} names mesh axis {axis!r}; mesh axes are "
                f"{MESH_AXES}."
            )
    return axes


def logical_rules(rules: Any = None) -> Rules:
    """Normalise a rules table to `((logical, (mesh_axis, ...)), ...)`.

    Accepts None (`DEFAULT_RULES`), a full config (uses `config.mesh.rules`), a mapping such as
    `config.mesh.rules` (values: None, a mesh axis name, or a tuple of them), or a sequence of
    `(logical, mesh_axes)` pairs. Logical axes missing from the table keep their default rule.
    """
    if rules is None:
        return DEFAULT_RULES
    if hasattr(rules, "mesh") and hasattr(rules.mesh, "rules"):
        rules = rules.mesh.rules
    pairs = rules.items() if hasattr(rules, "items") else rules
    table = dict(DEFAULT_RULES)
    for logical, value in pairs:
        table[str(logical)] = _as_mesh_axes(str(logical), value)
    return tuple(table.items())


def mesh_axes_of(logical: str, rules: Any = None) -> MeshAxes:
    """The mesh axes a logical axis maps to (empty: replicated)."""
    table = dict(logical_rules(rules))
    if logical not in table:
        raise ValueError(f"unknown logical axis {logical!r}; the rules know {tuple(table)}.")
    return table[logical]


def _spec_entry(axes: MeshAxes) -> str | MeshAxes | None:
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def logical_to_spec(names: Sequence[str | None], rules: Any = None) -> PartitionSpec:
    """`PartitionSpec` for an array whose dims carry logical `names` (None: replicated dim).

    A mesh axis is used at most once per array: a later dim that maps to an axis an earlier dim
    already uses drops that axis.
    """
    table = dict(logical_rules(rules))
    used: set[str] = set()
    entries = []
    for name in names:
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; the rules know {tuple(table)}.")
        axes = tuple(axis for axis in table[name] if axis not in used)
        used.update(axes)
        entries.append(_spec_entry(axes))
    return PartitionSpec(*entries)


def axis_size(mesh: AnyMesh, axes: Sequence[str]) -> int:
    """Product of the mesh's sizes along `axes` (1 for none)."""
    return math.prod(mesh.shape[axis] for axis in axes)


def _spec_axes(entry: Any) -> MeshAxes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: AnyMesh, what: str) -> None:
    """Raise a ValueError naming the numbers if a dim of `shape` does not split evenly."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        axes = _spec_axes(entry)
        shards = axis_size(mesh, axes)
        if size % shards:
            raise ValueError(
                f"{what}: dim {dim} has size {size}, which does not divide by {shards} "
                f"(mesh axes {axes}); change the size or the mesh/rules."
            )


# -------------------------------------------------------------------------------- shardings


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


def create_sharded(constructor: Callable[[], Any], mesh: Mesh, rules: Any = None) -> Any:
    """Build an NNX module (or optimizer) with every parameter born on its shards.

    `constructor()` runs abstractly first (`nnx.eval_shape`) to learn the state's shapes and
    logical names; then one `jax.jit` of the constructor, its state constrained to the
    `state_shardings`, materialises each array directly in its sharded layout (no full copy on
    one device). The mesh is set (`jax.set_mesh`) and the rules are installed as Flax's logical
    axis rules while `constructor` runs, so Variables created with eager sharding also resolve.
    Optimizers too: `create_sharded(lambda: nnx.Optimizer(model, tx, wrt=nnx.Param), mesh)`.
    """
    rules = logical_rules(rules)
    flax_rules = tuple((logical, _spec_entry(axes)) for logical, axes in rules)
    with jax.set_mesh(mesh), flax_spmd.logical_axis_rules(flax_rules):
        abstract = nnx.eval_shape(constructor)
        graphdef, abstract_state = nnx.split(abstract)
        shardings = state_shardings(abstract_state, mesh, rules)

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
    _check_groups(num_groups, mesh, rules)
    batch_axes = mesh_axes_of("batch", rules)
    group_spec = batch_spec(1, rules)

    def local(*arrays: Any) -> Any:
        if rng is None:
            return fn(*arrays)
        return fn(*arrays, rng=jax.random.fold_in(rng, jax.lax.axis_index(batch_axes)))

    return jax.shard_map(
        local, mesh=mesh, in_specs=(group_spec,) * len(group_arrays), out_specs=group_spec
    )(*group_arrays)


# ----------------------------------------------------------------------- expert parallelism


def expert_axis_size(mesh: AnyMesh | None, rules: Any = None) -> int:
    """Devices the experts are split over (product of the 'expert' rule's mesh axes); 1 if none."""
    if mesh is None or mesh.empty:
        return 1
    return axis_size(mesh, mesh_axes_of("expert", rules))


def uses_expert_parallelism(mesh: AnyMesh | None, rules: Any = None) -> bool:
    """True when `mesh` splits experts over more than one device."""
    return expert_axis_size(mesh, rules) > 1


def _check_groups(num_groups: int, mesh: AnyMesh, rules: Any) -> None:
    shards = batch_shards(mesh, rules)
    if num_groups % shards:
        raise ValueError(
            f"{num_groups} routing groups do not divide by {shards}, the number of devices along "
            f"the batch mesh axes {mesh_axes_of('batch', rules)}; a group must not straddle "
            f"devices, so choose batch size and group size giving a multiple of {shards} groups."
        )


def _check_experts(num_experts: int, mesh: AnyMesh, rules: Any) -> None:
    expert_devices = expert_axis_size(mesh, rules)
    if num_experts % expert_devices:
        raise ValueError(
            f"num_experts={num_experts} does not divide by {expert_devices}, the size of the "
            f"expert mesh axes {mesh_axes_of('expert', rules)}; use a multiple of "
            f"{expert_devices} experts or a smaller expert axis."
        )


def _expert_param_specs(param_axes: Any, rules: Any, keep: tuple[str, ...] | None) -> Any:
    """Specs of the expert weights from their logical names; only `keep` axes split (None: all)."""

    def spec(names: tuple[str | None, ...]) -> PartitionSpec:
        if keep is not None:
            names = tuple(name if name in keep else None for name in names)
        return logical_to_spec(names, rules)

    return jax.tree.map(spec, param_axes, is_leaf=lambda x: isinstance(x, tuple))


def expert_parallel_dispatch_combine(
    x: jax.Array,
    routing: Routing,
    expert_fn: dispatch.ExpertFn,
    expert_params: Any,
    *,
    param_axes: Any,
    rules: Any = None,
    mesh: AnyMesh | None = None,
    strategy: str = "shard_map",
    backend: str = "gather",
    rng: jax.Array | None = None,
) -> jax.Array:
    """`dispatch.dispatch_combine` with the experts split over the mesh: f32[G, T, M].

    Args:
      x: f32[G, T, M] grouped tokens (G splits over the 'batch' mesh axes).
      routing: the `Routing` of those groups (token_index, weight: [G, E, C]; probs [G, T, E]).
      expert_fn: `expert_fn(params, xe: [E_local, N, M]) -> [E_local, N, M]`, called on each
        device's experts. Must be linear in its last matmul (so a hidden dim split over 'model'
        can be summed after `wo`). Random draws take the key `rng` as `dropout_rng=`.
      expert_params: pytree of stacked expert weights, every leaf `[E, ...]`.
      param_axes: same tree as `expert_params` with a tuple of logical names per leaf, e.g.
        `{'wi': ('expert', 'embed', 'mlp'), 'wo': ('expert', 'mlp', 'embed')}`.
      rules: logical-axis rules (`config.mesh.rules`); None: `DEFAULT_RULES`.
      mesh: the mesh; None: the one set with `jax.set_mesh`.
      strategy: `'shard_map'` (explicit all_to_all) or `'gspmd'` (sharding constraints).
      backend: `'einsum'`, `'gather'` or `'dropless'`. Dropless with `'shard_map'` exchanges
        sorted rows (`moe_jax.exchange`); with `'gspmd'` it runs as `'gather'` over C = T slots
        (logged), so the caller routes with capacity None.
      rng: key for the experts' random draws (expert dropout), passed to `expert_fn` as
        `dropout_rng`; inside `shard_map` it is folded with the device's position on the whole
        mesh, so every expert and model shard draws its own mask (reproducible per key).
    """
    if strategy not in EXPERT_PARALLELISM:
        raise ValueError(
            f"Unknown expert parallelism {strategy!r}; use one of {EXPERT_PARALLELISM}."
        )
    mesh = current_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("expert parallelism needs a mesh: pass mesh= or use jax.set_mesh(mesh).")
    dispatch.check_backend(backend)
    rules = logical_rules(rules)
    _check_experts(routing.token_index.shape[1], mesh, rules)
    _check_groups(x.shape[0], mesh, rules)
    if strategy == "gspmd":
        if backend == "dropless":
            logger.info("dropless under gspmd expert parallelism runs as 'gather' with C = T")
            backend = "gather"
        return _gspmd_dispatch_combine(
            x, routing, _bind_rng(expert_fn, rng), expert_params, param_axes, rules, mesh, backend
        )
    return _shard_map_dispatch_combine(
        x, routing, expert_fn, expert_params, param_axes, rules, mesh, backend, rng
    )


def _bind_rng(expert_fn: dispatch.ExpertFn, rng: jax.Array | None) -> dispatch.ExpertFn:
    """`expert_fn` with `dropout_rng=rng` bound (unchanged when rng is None)."""
    return expert_fn if rng is None else functools.partial(expert_fn, dropout_rng=rng)


def _device_rng(rng: jax.Array | None, mesh: AnyMesh) -> jax.Array | None:
    """Inside `shard_map`: `rng` folded with the device's index over all mesh axes."""
    if rng is None:
        return None
    return jax.random.fold_in(rng, jax.lax.axis_index(tuple(mesh.axis_names)))


def _shard_map_dispatch_combine(
    x: jax.Array,
    routing: Routing,
    expert_fn: dispatch.ExpertFn,
    expert_params: Any,
    param_axes: Any,
    rules: Rules,
    mesh: AnyMesh,
    backend: str,
    rng: jax.Array | None = None,
) -> jax.Array:
    batch_axes = mesh_axes_of("batch", rules)
    expert_axes = mesh_axes_of("expert", rules)
    hidden_axes = tuple(a for a in mesh_axes_of("mlp", rules) if a not in expert_axes)
    if not set(expert_axes) <= set(batch_axes):
        raise ValueError(
            f"shard_map expert parallelism needs the groups split over the expert mesh axes "
            f"{expert_axes}, but the 'batch' rule maps to {batch_axes}; add them to it."
        )
    if set(hidden_axes) & set(batch_axes) and axis_size(mesh, hidden_axes) > 1:
        raise ValueError(
            f"the 'mlp' rule's mesh axes {hidden_axes} also split the batch ({batch_axes}); "
            f"expert hidden units and groups need different mesh axes."
        )
    uses_hidden = any(
        "mlp" in names
        for names in jax.tree.leaves(param_axes, is_leaf=lambda x: isinstance(x, tuple))
    )
    sum_axes = hidden_axes if uses_hidden else ()
    group_spec = batch_spec(1, rules)
    param_specs = _expert_param_specs(param_axes, rules, keep=("expert", "mlp"))
    num_peers = axis_size(mesh, expert_axes)
    if backend == "dropless" and num_peers > 1:
        # the bound is linear in the number of groups, so the global one splits evenly
        per_peer = exchange.rows_per_peer(routing, num_peers) // batch_shards(mesh, rules)
        logger.info("dropless expert parallelism: padded all_to_all of %d rows per peer", per_peer)
    elif backend == "dropless":
        logger.info("dropless data parallelism: each device sorts its own groups")

    def local(x_local: jax.Array, routing_local: Routing, params_local: Any) -> jax.Array:
        expert_fn_local = _bind_rng(expert_fn, _device_rng(rng, mesh))
        if backend == "dropless":
            if num_peers == 1:
                y = dispatch.dispatch_combine(
                    x_local, routing_local, expert_fn_local, params_local, backend=backend
                )
            else:
                y = exchange.dropless_exchange(
                    x_local,
                    routing_local,
                    expert_fn_local,
                    params_local,
                    expert_axes=expert_axes,
                    num_peers=num_peers,
                )  # [Gl, T, M]
            # partial sums over H shards
            return jax.lax.psum(y, sum_axes) if sum_axes else y
        expert_in = dispatch.dispatch(x_local, routing_local, backend=backend)  # [E, Gl, C, M]
        # send expert block j to expert device j; receive my experts' slots from every device
        expert_in = jax.lax.all_to_all(
            expert_in, expert_axes, split_axis=0, concat_axis=1, tiled=True
        )  # [E/X, X*Gl, C, M]
        local_experts, groups, capacity, d_model = expert_in.shape
        flat_in = expert_in.reshape(local_experts, groups * capacity, d_model)  # [E/X, N, M]
        expert_out = expert_fn_local(params_local, flat_in)  # [E/X, N, M]
        if sum_axes:
            expert_out = jax.lax.psum(expert_out, sum_axes)  # partial sums over H shards
        expert_out = expert_out.reshape(local_experts, groups, capacity, -1)  # [E/X, X*Gl, C, M]
        expert_out = jax.lax.all_to_all(
            expert_out, expert_axes, split_axis=1, concat_axis=0, tiled=True
        )  # [E, Gl, C, M]
        return dispatch.combine(expert_out, routing_local, backend=backend)  # [Gl, T, M]

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(group_spec, group_spec, param_specs),
        out_specs=group_spec,
    )(x, routing, expert_params)


def _gspmd_dispatch_combine(
    x: jax.Array,
    routing: Routing,
    expert_fn: dispatch.ExpertFn,
    expert_params: Any,
    param_axes: Any,
    rules: Rules,
    mesh: AnyMesh,
    backend: str,
) -> jax.Array:
    def constrain(a: jax.Array, spec: PartitionSpec) -> jax.Array:
        return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

    by_group = batch_spec(1, rules)
    # [E, G, C, M] split along E over the expert axes, and along G over what is left of batch
    by_expert = logical_to_spec(("expert", "batch"), rules)
    x = constrain(x, by_group)
    expert_in = dispatch.dispatch(x, routing, backend=backend)  # [E, G, C, M]
    expert_in = constrain(expert_in, PartitionSpec(None, *by_group))
    expert_in = constrain(expert_in, by_expert)  # XLA inserts the all-to-all here
    num_experts, num_groups, capacity, d_model = expert_in.shape
    flat_in = expert_in.reshape(num_experts, num_groups * capacity, d_model)  # [E, G*C, M]
    param_specs = _expert_param_specs(param_axes, rules, keep=None)
    expert_params = jax.tree.map(
        lambda leaf, spec: constrain(leaf, spec),
        expert_params,
        param_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    expert_out = expert_fn(expert_params, flat_in)  # [E, G*C, M]
    expert_out = expert_out.reshape(num_experts, num_groups, capacity, -1)  # [E, G, C, M]
    expert_out = constrain(expert_out, by_expert)
    expert_out = constrain(expert_out, PartitionSpec(None, *by_group))  # back to groups
    return constrain(dispatch.combine(expert_out, routing, backend=backend), by_group)


# ------------------------------------------------------------------ wiring into the layers

# Logical names of the stacked expert weights in the dict `MoeFeedForward.expert_params()`.
EXPERT_PARAM_AXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("wi", ("expert", "embed", "mlp")),
    ("wi_gate", ("expert", "embed", "mlp")),
    ("wo", ("expert", "mlp", "embed")),
)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """The `MoeFeedForward.experts_impl` hook: expert-parallel dispatch -> experts -> combine.

    Called as `impl(x: [G, T, M], routing, expert_fn, expert_params, *, backend, rng=None)`
    (`rng`: the experts' dropout key, given to `expert_fn` as `dropout_rng`). At trace time it
    looks at `mesh` (or, if None, the mesh set with `jax.set_mesh`): with an expert axis larger
    than 1, or for the dropless backend with the groups split over devices (shard_map strategy),
    it runs `expert_parallel_dispatch_combine`; otherwise the local `dispatch.dispatch_combine`.
    Frozen and hashable, so it can sit in a module's static state.

    Attributes:
      rules: normalised logical-axis rules.
      strategy: `'shard_map'` or `'gspmd'` (`config.mesh.expert_parallelism`).
      mesh: a fixed mesh, or None to use the context mesh when called.
      param_axes: `(name, logical axes)` of each expert weight.
    """

    rules: Rules = DEFAULT_RULES
    strategy: str = "shard_map"
    mesh: Mesh | None = None
    param_axes: tuple[tuple[str, tuple[str, ...]], ...] = EXPERT_PARAM_AXES

    @classmethod
    def from_config(cls, config: Any, mesh: Mesh | None = None) -> ExpertParallel:
        """Rules and strategy from `config.mesh`."""
        strategy = config.mesh.expert_parallelism
        if strategy not in EXPERT_PARALLELISM:
            raise ValueError(
                f"Unknown config.mesh.expert_parallelism {strategy!r}; use one of "
                f"{EXPERT_PARALLELISM}."
            )
        return cls(rules=logical_rules(config), strategy=strategy, mesh=mesh)

    def __call__(
        self,
        x: jax.Array,
        routing: Routing,
        expert_fn: dispatch.ExpertFn,
        expert_params: Any,
        *,
        backend: str,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        mesh = self.mesh if self.mesh is not None else current_mesh()
        # dropless sorts each device's own groups inside shard_map, experts split or not
        sharded_dropless = (
            backend == "dropless"
            and self.strategy == "shard_map"
            and mesh is not None
            and batch_shards(mesh, self.rules) > 1
        )
        if not uses_expert_parallelism(mesh, self.rules) and not sharded_dropless:
            return dispatch.dispatch_combine(
                x, routing, _bind_rng(expert_fn, rng), expert_params, backend=backend
            )
        names = dict(self.param_axes)
        missing = [key for key in expert_params if key not in names]
        if missing:
            raise ValueError(
                f"no logical axes for expert weights {missing}; add them to param_axes."
            )
        return expert_parallel_dispatch_combine(
            x,
            routing,
            expert_fn,
            expert_params,
            param_axes={key: names[key] for key in expert_params},
            rules=self.rules,
            mesh=mesh,
            strategy=self.strategy,
            backend=backend,
            rng=rng,
        )


def enable_expert_parallelism(model: Any, config: Any, mesh: Mesh | None = None) -> int:
    """Set the `experts_impl` hook of every MoE layer in `model` to `ExpertParallel`.

    The logical names of each layer's expert weights are read from their `out_sharding`
    metadata. `mesh=None` means the mesh set with `jax.set_mesh` when the model runs; without an
    expert axis > 1 the layers compute locally as before. Returns the number of layers set.
    """
    base = ExpertParallel.from_config(config, mesh)
    count = 0
    for _, module in nnx.iter_graph(model):
        if not hasattr(module, "experts_impl") or not hasattr(module, "expert_param_names"):
            continue
        axes = tuple(
            (name, tuple(getattr(module, name).get_metadata()["out_sharding"]))
            for name in module.expert_param_names()
        )
        module.experts_impl = dataclasses.replace(base, param_axes=axes)
        count += 1
    return count
