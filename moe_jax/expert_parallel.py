"""Expert parallelism: dispatch -> experts -> combine with the experts split over the mesh.

`expert_parallel_dispatch_combine` replaces the local `dispatch.dispatch_combine`, with the same
inputs plus the mesh facts; the groups split over the 'batch' mesh axes (`moe_jax.data_parallel`):

- `'shard_map'` (default): inside `jax.shard_map` each device holds its own groups
  `x: [G_local, T, M]` and their routing, builds `[E, G_local, C, M]`, exchanges it with
  `jax.lax.all_to_all` over the expert mesh axis (it then holds `[E_local, G_local * X, C, M]`
  for its `E_local = E / X` experts, X the expert-axis size), runs its experts (hidden dim H
  possibly split over `'model'`, with a `psum` over `'model'` after `wo`), and sends the outputs
  back with a second `all_to_all` before combining. An expert weight with no 'mlp' axis (the
  output bias `bo`) is whole on every H shard, so it is zeroed on all of them but the first,
  and the psum adds it once.
- `'gspmd'`: the same maths under `jax.jit` with sharding constraints only: `[E, G, C, M]` is
  constrained first along G and then along E, and XLA inserts the all-to-all.

The dropless backend under `'shard_map'` has no `[E, G, C, M]` buffer: each device sorts its own
groups' assignments by expert and exchanges only rows (`moe_jax.exchange`: `ragged_all_to_all`
on TPU/GPU, on CPU an `all_to_all` padded to the largest load a peer can receive); with groups
split over devices but no expert axis, each device sorts and computes its own groups (no
communication). Under `'gspmd'` it runs as `'gather'` with C = T (logged). Expert dropout keys
are folded with the device's position on the whole mesh inside `shard_map`, so every expert
and model shard draws its own mask.

Wiring: `MoeFeedForward.experts_impl` is the layer's hook for dispatch -> experts -> combine.
Every MoE layer builds an `ExpertParallel` from its config (rules and strategy) when it is
created, and nothing sets it afterwards. When the layer is traced, the hook reads the mesh set
with `jax.set_mesh` (or `jax.sharding.use_abstract_mesh`), and the layer hands it the logical
axis names of its expert weights, read from their `out_sharding` metadata: the names are written
once, where the parameters are created. Without a mesh, or on a mesh that neither splits the
experts nor (for dropless) the groups, the hook runs the local `dispatch.dispatch_combine`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from moe_jax import dispatch, exchange, soft_moe
from moe_jax.data_parallel import batch_shards, batch_spec, check_groups
from moe_jax.mesh import (
    DEFAULT_RULES,
    AnyMesh,
    Rules,
    axis_size,
    current_mesh,
    logical_rules,
    logical_to_spec,
    mesh_axes_of,
)
from moe_jax.routing import Routing
from moe_jax.soft_moe import SoftRouting

logger = logging.getLogger(__name__)

EXPERT_PARALLELISM = ("shard_map", "gspmd")


def expert_axis_size(mesh: AnyMesh | None, rules: Any = None) -> int:
    """Devices the experts are split over (product of the 'expert' rule's mesh axes); 1 if none."""
    if mesh is None or mesh.empty:
        return 1
    return axis_size(mesh, mesh_axes_of("expert", rules))


def uses_expert_parallelism(mesh: AnyMesh | None, rules: Any = None) -> bool:
    """True when `mesh` splits experts over more than one device."""
    return expert_axis_size(mesh, rules) > 1


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
    routing: Routing | SoftRouting,
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
      routing: the `Routing` of those groups (token_index, weight: [G, E, C]; probs [G, T, E]),
        or Soft MoE's `SoftRouting` (einsum backend; its S slots per expert take C's place).
      expert_fn: `expert_fn(params, xe: [E_local, N, M]) -> [E_local, N, M]`, called on each
        device's experts. Must be linear in its last matmul (so a hidden dim split over 'model'
        can be summed after `wo`), and take the weights without an 'mlp' axis (an output
        bias) as terms added to its output, which is where they are kept on one H shard only.
        Random draws take the key `rng` as `dropout_rng=`.
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
    if isinstance(routing, SoftRouting):
        soft_moe.check_backend(backend)
    rules = logical_rules(rules)
    _check_experts(routing.probs.shape[-1], mesh, rules)
    check_groups(x.shape[0], mesh, rules)
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
    # whole on every H shard (an output bias): kept on the first, so the psum adds it once
    unsplit_hidden = jax.tree.map(
        lambda names: "mlp" not in names, param_axes, is_leaf=lambda x: isinstance(x, tuple)
    )
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
        if sum_axes and any(jax.tree.leaves(unsplit_hidden)):
            first_shard = jax.lax.axis_index(sum_axes) == 0
            params_local = jax.tree.map(
                lambda leaf, unsplit: jnp.where(first_shard, leaf, 0) if unsplit else leaf,
                params_local,
                unsplit_hidden,
            )
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


# ------------------------------------------------------------------ the layers' hook


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """The `MoeFeedForward.experts_impl` hook: expert-parallel dispatch -> experts -> combine.

    Called as `impl(x: [G, T, M], routing, expert_fn, expert_params, *, param_axes, backend,
    rng=None)`: `param_axes` maps each expert weight's name to its logical axis names (the
    layer reads them from the weights' `out_sharding` metadata), `rng` is the experts' dropout
    key (given to `expert_fn` as `dropout_rng`). At trace time it reads the mesh set with
    `jax.set_mesh`: with an expert axis larger than 1, or for the dropless backend with the
    groups split over devices (shard_map strategy), it runs `expert_parallel_dispatch_combine`;
    otherwise the local `dispatch.dispatch_combine`. Frozen and hashable, so it can sit in a
    module's static state.

    Attributes:
      rules: normalised logical-axis rules.
      strategy: `'shard_map'` or `'gspmd'` (`config.mesh.expert_parallelism`).
    """

    rules: Rules = DEFAULT_RULES
    strategy: str = "shard_map"

    @classmethod
    def from_config(cls, config: Any) -> ExpertParallel:
        """Rules and strategy from `config.mesh`."""
        strategy = config.mesh.expert_parallelism
        if strategy not in EXPERT_PARALLELISM:
            raise ValueError(
                f"Unknown config.mesh.expert_parallelism {strategy!r}; use one of "
                f"{EXPERT_PARALLELISM}."
            )
        return cls(rules=logical_rules(config), strategy=strategy)

    def __call__(
        self,
        x: jax.Array,
        routing: Routing,
        expert_fn: dispatch.ExpertFn,
        expert_params: Any,
        *,
        param_axes: Mapping[str, tuple[str | None, ...] | None],
        backend: str,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        mesh = current_mesh()
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
        unnamed = [key for key in expert_params if not param_axes.get(key)]
        if unnamed:
            raise ValueError(
                f"expert weights {unnamed} carry no logical axis names, so they cannot be split "
                f"over the mesh; create them with nnx.Param(value, out_sharding=names), e.g. "
                f"names ('expert', 'embed', 'mlp')."
            )
        return expert_parallel_dispatch_combine(
            x,
            routing,
            expert_fn,
            expert_params,
            param_axes={key: tuple(param_axes[key]) for key in expert_params},
            rules=self.rules,
            mesh=mesh,
            strategy=self.strategy,
            backend=backend,
            rng=rng,
        )
