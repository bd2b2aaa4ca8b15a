"""The code paths that differ when a run spans several processes (hosts).

With `jax.distributed.initialize`, every process runs the same program on its own local devices,
and `jax.devices()` lists the devices of all processes. What changes:

- Input: each process loads only its share of the global batch; `global_batch` assembles the
  shares into global `jax.Array`s with `jax.make_array_from_process_local_data`. The data loader
  must give process `p` the rows `p * B_local : (p + 1) * B_local` of the global batch (shard the
  input by `jax.process_index()`), and the mesh must give each process a contiguous block of the
  batch axes, which `parallel.make_mesh` does: it lays the devices out in `jax.devices()` order,
  process by process, with 'data' the slowest axis.
- Logging and files: only process 0 writes logs, metrics and summaries (`is_main_process`,
  `log_main`); every process computes the same metrics (they are global arrays).
- Checkpoints (orbax): saving and restoring are collective. Every process must call
  `CheckpointManager.save(step, ...)` and `restore(step, ...)` with the same step and the same
  state tree; each process writes the shards it holds, process 0 writes the metadata and
  finalises the step once all have written. So never guard a save with `is_main_process()`; pick
  the step to restore on one process and broadcast it (`agree_on_step`), and keep the directory
  on storage every process can reach (a shared filesystem or GCS). Files outside orbax (e.g. a
  config dump) are written by process 0 only, followed by `sync('name')` when others read them.

On one process all of these reduce to the single-host behaviour, so callers need no branches.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from moe_jax import parallel

logger = logging.getLogger("moe_jax")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    initialization_timeout: int = 300,
) -> None:
    """Start the JAX distributed runtime (once, before any computation).

    On TPU pods, SLURM and similar clusters JAX finds the arguments itself (leave them None). On
    CPU the cross-process collectives use gloo, which is selected here. Must run before the first
    JAX computation of the process; a second call does nothing.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout,
    )


def is_main_process() -> bool:
    """True on process 0, the one that logs and writes files outside checkpoints."""
    return jax.process_index() == 0


def log_main(message: str, *args: Any, level: int = logging.INFO) -> None:
    """`logging` on process 0 only (`message % args`, lazily formatted)."""
    if is_main_process():
        logger.log(level, message, *args)


def global_batch(local_batch: Any, mesh: jax.sharding.Mesh, rules: Any = None) -> Any:
    """Assemble each process's share `[B_local, ...]` into global arrays `[B_local * P, ...]`.

    `local_batch` is a pytree of NumPy arrays with the same leading size on every process; the
    result is sharded with `parallel.batch_sharding` (leading dim over the 'batch' mesh axes).
    Raises a ValueError naming both numbers when the global batch does not split over them.
    """
    leaves = jax.tree.leaves(local_batch)
    if not leaves:
        return local_batch
    local_size = np.shape(leaves[0])[0]
    for leaf in leaves:
        if np.shape(leaf)[0] != local_size:
            raise ValueError(
                f"every batch array needs the same leading size; got {np.shape(leaf)[0]} and "
                f"{local_size}."
            )
    global_size = local_size * jax.process_count()
    parallel.check_batch(global_size, mesh, rules)

    return multihost_utils.host_local_array_to_global_array(
        jax.tree.map(np.asarray, local_batch), mesh, parallel.batch_spec(1, rules)
    )


def to_host(tree: Any) -> Any:
    """Every global array of `tree` as a full NumPy array on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)


def sync(name: str) -> None:
    """Block until every process reaches the barrier `name` (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def agree_on_step(step: int | None) -> int | None:
    """Process 0's choice of a checkpoint step, broadcast so every process restores the same one.

    `None` (nothing to restore) is sent as -1 and returned as None everywhere.
    """
    if jax.process_count() == 1:
        return step
    chosen = multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step))
    chosen = int(chosen)
    return None if chosen < 0 else chosen
