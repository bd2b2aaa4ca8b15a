"""Parallelism: the public namespace of the modules that each do one job.

- `moe_jax.mesh`: the `('data', 'expert', 'model')` mesh (`make_mesh`, `mesh_from_config`,
  `current_mesh`) and the logical-axis rules that map array dims onto it (`logical_rules`,
  `mesh_axes_of`, `logical_to_spec`, `axis_size`, `check_divisible`).
- `moe_jax.data_parallel`: the batch split over the 'batch' mesh axes (`batch_spec`,
  `batch_sharding`, `batch_shards`, `check_batch`, `check_groups`) and routing each device's own
  groups (`per_device_groups`).
- `moe_jax.sharded`: NNX state on a mesh from its variables' logical names
  (`state_shardings`, `create_sharded`, `shard_module`), and activations held to their logical
  names' sharding (`constrain`).
- `moe_jax.expert_parallel`: dispatch -> experts -> combine with the experts split over the
  mesh (`expert_parallel_dispatch_combine`, `'shard_map'` or `'gspmd'`), and the MoE layers'
  hook `ExpertParallel`, which reads the mesh set with `jax.set_mesh` when the layer is traced.
"""

from moe_jax.data_parallel import (
    batch_sharding,
    batch_shards,
    batch_spec,
    check_batch,
    check_groups,
    per_device_groups,
)
from moe_jax.expert_parallel import (
    EXPERT_PARALLELISM,
    ExpertParallel,
    expert_axis_size,
    expert_parallel_dispatch_combine,
    uses_expert_parallelism,
)
from moe_jax.mesh import (
    DEFAULT_RULES,
    LOGICAL_AXES,
    MESH_AXES,
    AnyMesh,
    MeshAxes,
    Rules,
    axis_size,
    check_divisible,
    current_mesh,
    logical_rules,
    logical_to_spec,
    make_mesh,
    mesh_axes_of,
    mesh_from_config,
)
from moe_jax.sharded import constrain, create_sharded, shard_module, state_shardings

__all__ = [
    "DEFAULT_RULES",
    "EXPERT_PARALLELISM",
    "LOGICAL_AXES",
    "MESH_AXES",
    "AnyMesh",
    "ExpertParallel",
    "MeshAxes",
    "Rules",
    "axis_size",
    "batch_shards",
    "batch_sharding",
    "batch_spec",
    "check_batch",
    "check_divisible",
    "check_groups",
    "constrain",
    "create_sharded",
    "current_mesh",
    "expert_axis_size",
    "expert_parallel_dispatch_combine",
    "logical_rules",
    "logical_to_spec",
    "make_mesh",
    "mesh_axes_of",
    "mesh_from_config",
    "per_device_groups",
    "shard_module",
    "state_shardings",
    "uses_expert_parallelism",
]
