"""One process of the two-process test (`tests/test_multihost.py`), and the shared computation.

Run as `python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR` with
`XLA_FLAGS=--xla_force_host_platform_device_count=4` and `JAX_PLATFORMS=cpu` in the
environment: it joins the distributed runtime on 127.0.0.1:PORT (gloo collectives), builds an
expert-parallel MoE layer on a `data=2 x expert=4` mesh over both processes' devices, feeds it
its own half of the global batch, and process 0 writes the global output and gradients to
`OUT_DIR/result.npz`. The test runs `compute` in its own single 8-device process as the oracle.
"""

from __future__ import annotations

import logging
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import config as config_lib
from moe_jax import layers, multihost, parallel

MESH_SHAPE = (2, 4, 1)
BATCH, LENGTH, D_MODEL, D_FF, NUM_EXPERTS = 8, 8, 8, 16, 8


def layer_config():
    """Top-2 tokens-choose routing with one slot per expert per group: tokens are dropped."""
    config = config_lib.default_config()
    config.model.d_model = D_MODEL
    config.model.d_ff = D_FF
    config.moe.num_experts = NUM_EXPERTS
    config.moe.k = 2
    config.moe.group_size = LENGTH
    config.moe.min_capacity = 1
    config.moe.capacity_factor_eval = 0.5
    config.moe.backend = "gather"
    config.mesh.data, config.mesh.expert, config.mesh.model = MESH_SHAPE
    return config


def global_inputs() -> tuple[np.ndarray, np.ndarray]:
    """The global batch x f32[B, L, M] and a cotangent of the same shape, same on every process."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, LENGTH, D_MODEL), dtype=np.float32)
    cotangent = rng.standard_normal((BATCH, LENGTH, D_MODEL), dtype=np.float32)
    return x, cotangent


def compute() -> dict[str, np.ndarray]:
    """Output and gradients of the layer on this run's mesh, gathered to every process."""
    config = layer_config()
    mesh = parallel.mesh_from_config(config)
    layer = parallel.create_sharded(
        lambda: layers.MoeFeedForward(config, rngs=nnx.Rngs(0)), mesh, config
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    x, cotangent = global_inputs()
    per_process = BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    x, cotangent = multihost.global_batch((x[rows], cotangent[rows]), mesh, config)

    @jax.jit
    def output_and_grads(params, x, cotangent):
        def loss(params, x):
            y, aux = nnx.merge(graphdef, params, rest)(x, deterministic=True)
            return jnp.sum(y * cotangent) + aux.load_balancing_loss, y

        (_, y), (grad_params, grad_x) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return {"y": y, "grad_x": grad_x, "grad_params": grad_params}

    with jax.set_mesh(mesh):
        result = output_and_grads(params, x, cotangent)
    flat = {"y": result["y"], "grad_x": result["grad_x"]}
    for path, variable in nnx.to_flat_state(result["grad_params"]):
        flat["grad/" + "/".join(map(str, path))] = variable.get_value()
    return {key: np.asarray(value) for key, value in multihost.to_host(flat).items()}


def main(process_id: int, num_processes: int, port: int, out_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    multihost.initialize(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=30)
    result = compute()
    # each process proposes a different step; all must restore process 0's
    result["agreed_step"] = np.array(multihost.agree_on_step(10 + process_id))
    result["process_count"] = np.array(jax.process_count())
    result["device_count"] = np.array(jax.device_count())
    multihost.sync("results_ready")
    if multihost.is_main_process():
        np.savez(os.path.join(out_dir, "result.npz"), **result)
    multihost.log_main("logged by process %d of %d", process_id, num_processes)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
