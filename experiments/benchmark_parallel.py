"""Expert parallelism on fake CPU devices: step time per token, and all_to_all bytes vs theory.

    python experiments/benchmark_parallel.py [--batch 16 --length 64 --repeats 10 --json out.json]

For each mesh (data, expert, model) in (1,1,1), (8,1,1), (2,4,1), (1,8,1), (2,2,2) and each
expert-parallel strategy ('shard_map', 'gspmd'), one `MoeFeedForward` layer runs a training step
(forward + gradients of params and input) under `jax.jit`. Reported:

- `us/token`: median wall time of the step over `--repeats` runs, divided by B * L tokens.
- `a2a bytes`: all_to_all bytes of one forward pass, summed over devices: every all-to-all of
  the compiled (per-device SPMD) HLO, its operand bytes times the device count.
- `theory`: `2 * G * E * C * M * itemsize`, the dispatched tensor `[E, G, C, M]` sent out and
  back once. With a 'model' axis of size P every model replica sends its own copy, so the
  measured total is P times the theory.

The 8 devices are faked on the host's CPU cores (`--xla_force_host_platform_device_count=8`), so
step times measure partitioning overheads on a shared CPU, not a real interconnect.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import config as config_lib
from moe_jax import layers, parallel, routing

MESHES = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2)]
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1}


def layer_config(args: argparse.Namespace, strategy: str):
    config = config_lib.default_config()
    config.model.d_model = args.d_model
    config.model.d_ff = args.d_ff
    config.moe.num_experts = args.experts
    config.moe.k = args.k
    config.moe.group_size = args.group_size
    config.moe.capacity_factor_eval = args.capacity_factor
    config.moe.backend = args.backend
    config.mesh.expert_parallelism = strategy
    return config


def all_to_all_bytes(hlo_text: str) -> int:
    """Bytes of all all-to-all results in a compiled per-device HLO module (one device)."""
    total = 0
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(\(.*?\)|\S+)\s+all-to-all(?:-start)?\(", line)
        if not match:
            continue
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += size * _DTYPE_BYTES[dtype]
    return total


def run_mesh(args, mesh_shape, strategy, x_host, cotangent_host):
    config = layer_config(args, strategy)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = parallel.make_mesh(*mesh_shape, devices=devices)
    layer = parallel.create_sharded(
        lambda: layers.MoeFeedForward(config, rngs=nnx.Rngs(0)), mesh, config
    )
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    x = jax.device_put(x_host, parallel.batch_sharding(mesh, config, ndim=3))
    cotangent = jax.device_put(cotangent_host, parallel.batch_sharding(mesh, config, ndim=3))

    def forward(params, x):
        return nnx.merge(graphdef, params, rest)(x, deterministic=True)[0]

    @jax.jit
    def step(params, x, cotangent):
        def loss(params, x):
            return jnp.sum(forward(params, x) * cotangent)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    with jax.set_mesh(mesh):
        forward_hlo = jax.jit(forward).lower(params, x).compile().as_text()
        started = time.perf_counter()
        compiled = step.lower(params, x, cotangent).compile()
        compile_s = time.perf_counter() - started
        step_hlo = compiled.as_text()
        jax.block_until_ready(compiled(params, x, cotangent))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            jax.block_until_ready(compiled(params, x, cotangent))
            times.append(time.perf_counter() - started)

    num_groups = args.batch * args.length // args.group_size
    capacity = routing.expert_capacity(
        args.group_size, args.experts, args.capacity_factor, min_capacity=config.moe.min_capacity
    )
    theory = 2 * num_groups * args.experts * capacity * args.d_model * 4
    num_devices = len(devices)
    return {
        "mesh": list(mesh_shape),
        "strategy": strategy,
        "us_per_token": 1e6 * statistics.median(times) / (args.batch * args.length),
        "compile_s": compile_s,
        "a2a_bytes_forward": all_to_all_bytes(forward_hlo) * num_devices,
        "a2a_bytes_step": all_to_all_bytes(step_hlo) * num_devices,
        "theory_bytes": theory,
        "model_replicas": mesh_shape[2],
        "G": num_groups,
        "C": capacity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--d_ff", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--group_size", type=int, default=64)
    parser.add_argument("--capacity_factor", type=float, default=2.0)
    parser.add_argument("--backend", default="gather")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}; check XLA_FLAGS.")

    rng = np.random.default_rng(0)
    shape = (args.batch, args.length, args.d_model)
    x = rng.standard_normal(shape, dtype=np.float32)
    cotangent = rng.standard_normal(shape, dtype=np.float32)
    rows = []
    for mesh_shape in MESHES:
        strategies = ("shard_map", "gspmd") if mesh_shape[1] > 1 else ("shard_map",)
        for strategy in strategies:
            row = run_mesh(args, mesh_shape, strategy, x, cotangent)
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(
        f"\nB={args.batch} L={args.length} M={args.d_model} H={args.d_ff} E={args.experts} "
        f"k={args.k} T={args.group_size} capacity_factor={args.capacity_factor} "
        f"backend={args.backend}, float32, jax {jax.__version__}\n"
    )
    print("| mesh (d,e,m) | strategy | us/token | compile s | a2a bytes fwd | theory | fwd+bwd |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        strategy = row["strategy"] if row["mesh"][1] > 1 else "local (no expert axis)"
        print(
            f"| {tuple(row['mesh'])} | {strategy} | {row['us_per_token']:.2f} | "
            f"{row['compile_s']:.1f} | {row['a2a_bytes_forward']:,} | "
            f"{row['theory_bytes'] * row['model_replicas']:,} | {row['a2a_bytes_step']:,} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
