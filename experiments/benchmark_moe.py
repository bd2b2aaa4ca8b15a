"""Time forward + backward of MoeFeedForward per backend against the equal-FLOP dense FFN.

Each MoE layer (tokens-choose top-K router, E experts of width H) is compared with a dense
FFN of width K * H and the same activation, in the same process and dtype: both do the same
useful ("active") expert FLOPs, so the ratio is the price of routing, dispatch and capacity
padding. Capacity factors are stated over the balanced load: CF 1.0 gives every expert
`CF * K * T / E` slots per group.

    python experiments/benchmark_moe.py --experts 8,32,128 --k 2 --backends gather,dropless

Prints one Markdown table row per configuration: ms per step (median), tokens/s, achieved
GFLOP/s of the active FLOPs, the ratio to the dense FFN, and XLA's peak-memory estimate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import experts, layers
from moe_jax.config import default_config


def _config(args, *, num_experts: int, k: int, activation: str, backend: str):
    config = default_config()
    config.model.d_model = args.d_model
    config.model.d_ff = args.d_ff
    config.model.ffn_activation = activation
    config.model.dtype = args.dtype
    config.moe.num_experts = num_experts
    config.moe.k = k
    config.moe.backend = backend
    config.moe.group_size = args.group_size
    # the config's factor counts tokens; over the balanced load of K choices it is CF * K
    config.moe.capacity_factor_train = args.capacity_factor * k
    config.moe.min_capacity = 1
    config.moe.router_jitter = 0.0
    config.moe.normalize = "topk"
    return config


def _time(step, params, x, steps: int) -> tuple[float, float]:
    """Median seconds per call and XLA's memory estimate (GiB) of the compiled step."""
    compiled = jax.jit(step).lower(params, x).compile()
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**30 if memory else 0.0
    jax.block_until_ready(compiled(params, x))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak


def _train_step(module, *, moe: bool):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        model = nnx.merge(graphdef, params, rest)
        if moe:
            y, aux = model(x, deterministic=False)
            return jnp.mean(y.astype(jnp.float32) ** 2) + 1e-2 * aux.load_balancing_loss
        return jnp.mean(model(x, deterministic=False).astype(jnp.float32) ** 2)

    return jax.grad(loss, argnums=(0, 1)), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048, help="expert hidden width H")
    parser.add_argument("--experts", default="8,32,128")
    parser.add_argument("--k", default="2")
    parser.add_argument("--backends", default="gather,dropless,einsum")
    parser.add_argument("--activations", default="swiglu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--group-size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    batch, length = args.tokens // 512, 512
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, length, args.d_model))
    x = x.astype(jnp.dtype(args.dtype))
    print(
        f"tokens {batch * length}, M {args.d_model}, H {args.d_ff}, {args.dtype}, "
        f"CF {args.capacity_factor} over the balanced load, group {args.group_size}, "
        f"{jax.devices()[0].device_kind}"
    )
    print("| act | E | K | backend | ms | tokens/s | GFLOP/s | x dense | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for activation in args.activations.split(","):
        matrices = 3 if experts.is_gated(activation) else 2
        for k in (int(v) for v in args.k.split(",")):
            # forward 2 FLOPs per multiply-add, backward twice the forward
            flops = 3 * 2 * batch * length * args.d_model * k * args.d_ff * matrices
            config = _config(args, num_experts=8, k=k, activation=activation, backend="gather")
            dense = layers.FeedForward(config, nnx.Rngs(0), d_ff=k * args.d_ff)
            step, params = _train_step(dense, moe=False)
            dense_s, dense_gib = _time(step, params, x, args.steps)
            row = f"| {activation} | - | {k} | dense (H={k}x{args.d_ff}) | {dense_s * 1e3:.0f} "
            print(
                row + f"| {batch * length / dense_s:.0f} | {flops / dense_s / 1e9:.0f} | 1.00 "
                f"| {dense_gib:.2f} |",
                flush=True,
            )
            for num_experts in (int(v) for v in args.experts.split(",")):
                for backend in args.backends.split(","):
                    config = _config(
                        args, num_experts=num_experts, k=k, activation=activation, backend=backend
                    )
                    layer = layers.MoeFeedForward(config, nnx.Rngs(0))
                    step, params = _train_step(layer, moe=True)
                    seconds, gib = _time(step, params, x, args.steps)
                    print(
                        f"| {activation} | {num_experts} | {k} | {backend} | {seconds * 1e3:.0f} "
                        f"| {batch * length / seconds:.0f} | {flops / seconds / 1e9:.0f} "
                        f"| {seconds / dense_s:.2f} | {gib:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
