"""Time forward + backward of MoeFeedForward per backend against the equal-FLOP dense FFN.

Each MoE layer (tokens-choose top-K router, E experts of width H) is compared with a dense
FFN of width K * H and the same activation, in the same process and dtype: both do the same
useful ("active") expert FLOPs, so the ratio is the price of routing, dispatch and capacity
padding. Capacity factors are stated over the balanced load: CF 1.0 gives every expert
`CF * K * T / E` slots per group.

    python experiments/benchmark_moe.py --experts 8,32,128 --k 2 --backends gather,dropless

Every configuration is compiled first; then `--rounds` rounds each time every configuration
once, in turn, so that a slow spell of a shared machine falls on all of them alike. Prints one
Markdown table row per configuration (median ms per step, tokens/s, achieved GFLOP/s of the
active FLOPs, the ratio to the dense FFN, XLA's peak-memory estimate), then for each activation
and K the best backend per E, its ratio to dense and its time relative to the smallest E.

`--platform` (default `any`: JAX's default backend) names the backend to run on, `cpu`, `gpu`
or `tpu`, or `accelerator` for whichever GPU or TPU is present; it fails at once when that
backend is not there. The header says what the platform changes: `dropless` lowers to the
blocked sort on a CPU and to `jax.lax.ragged_dot` on a GPU or TPU (`moe_jax.ragged`), and the
allocator of "Speed on a CPU" (README) matters on a CPU only.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import experts, layers
from moe_jax.config import default_config

# not a dispatch backend: the stacked expert FFN alone, on the rows the experts would receive
EXPERTS_ONLY = "experts-only"
PLATFORMS = ("any", "accelerator", "cpu", "gpu", "tpu")
_PLATFORM_NOTES = {
    "cpu": "dropless = blocked sort (moe_jax.blocked); the allocator matters (README)",
    "gpu": "dropless = jax.lax.ragged_dot (moe_jax.ragged)",
    "tpu": "dropless = jax.lax.ragged_dot (moe_jax.ragged)",
}


def add_platform_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        default="any",
        choices=PLATFORMS,
        help="backend to run on; 'accelerator': the GPU or TPU present (default: JAX's)",
    )


def select_platform(parser: argparse.ArgumentParser, platform: str) -> str:
    """Makes `platform` JAX's default backend, or exits with a message when it is absent.

    Returns the backend's platform and what it changes for MoE layers, for the header line.
    """
    present = jax.default_backend()
    if platform == "accelerator" and present == "cpu":
        parser.error(
            "--platform accelerator: JAX finds only a CPU; on a GPU host install "
            "'jax[cuda12]', on a Cloud TPU VM 'jax[tpu]' (README, 'Installing for a GPU or TPU')."
        )
    if platform in ("cpu", "gpu", "tpu"):
        try:
            jax.devices(platform)
        except RuntimeError:
            parser.error(f"--platform {platform}: JAX has no {platform} backend here ({present}).")
        jax.config.update("jax_default_device", jax.devices(platform)[0])
        present = platform
    return f"platform {present}: {_PLATFORM_NOTES.get(present, 'no notes')}"


class Case(NamedTuple):
    """One timed configuration; `num_experts` is None for the dense FFN."""

    activation: str
    k: int
    num_experts: int | None
    backend: str
    step: Any
    inputs: tuple[Any, jax.Array]
    peak_gib: float


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


def _module_loss(module, *, moe: bool):
    """A mean-square loss (plus the balancing loss) of `module`'s output, and its params."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        model = nnx.merge(graphdef, params, rest)
        if moe:
            y, aux = model(x, deterministic=False)
            return jnp.mean(y.astype(jnp.float32) ** 2) + 1e-2 * aux.load_balancing_loss
        return jnp.mean(model(x, deterministic=False).astype(jnp.float32) ** 2)

    return loss, params


def _experts_only(args, *, num_experts: int, k: int, activation: str):
    """The loss of `experts.ffn` alone on `x: [E, N, M]`, N = CF * K * tokens / E rows per expert.

    No router, dispatch or combine: the same stacked matmuls the gather backend runs, so the
    difference to a gather row is the price of routing, and its growth with E is the matmuls'.
    """
    rows = math.ceil(args.capacity_factor * k * args.tokens / num_experts)
    key_params, key_rows = jax.random.split(jax.random.PRNGKey(1))
    params = experts.init_ffn_params(
        key_params,
        d_model=args.d_model,
        d_ff=args.d_ff,
        activation=activation,
        num_experts=num_experts,
    )
    expert_rows = jax.random.normal(key_rows, (num_experts, rows, args.d_model))  # [E, N, M]
    dtype = jnp.dtype(args.dtype)

    def loss(params, x):
        return jnp.mean(experts.ffn(params, x, activation=activation, dtype=dtype) ** 2)

    return loss, params, expert_rows.astype(dtype)


def _compile(loss, params, x) -> tuple[Any, tuple[Any, jax.Array], float]:
    """`grad(loss)` w.r.t. params and input, compiled and warmed up; its inputs; XLA's GiB."""
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    memory = compiled.memory_analysis()
    peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes) / 2**30 if memory else 0.0
    jax.block_until_ready(compiled(params, x))
    return compiled, (params, x), peak


def _compile_moe(args, x, *, num_experts: int, k: int, activation: str, backend: str):
    """`_compile` of one MoE layer, or of the expert FFN alone for `EXPERTS_ONLY`."""
    if backend == EXPERTS_ONLY:
        return _compile(*_experts_only(args, num_experts=num_experts, k=k, activation=activation))
    config = _config(args, num_experts=num_experts, k=k, activation=activation, backend=backend)
    return _compile(*_module_loss(layers.MoeFeedForward(config, nnx.Rngs(0)), moe=True), x)


def _cases(args, x) -> list[Case]:
    cases = []
    for activation in args.activations.split(","):
        for k in (int(v) for v in args.k.split(",")):
            config = _config(args, num_experts=8, k=k, activation=activation, backend="gather")
            dense = layers.FeedForward(config, nnx.Rngs(0), d_ff=k * args.d_ff)
            compiled = _compile(*_module_loss(dense, moe=False), x)
            cases.append(Case(activation, k, None, "dense", *compiled))
            for num_experts in (int(v) for v in args.experts.split(",")):
                for backend in args.backends.split(","):
                    compiled = _compile_moe(
                        args,
                        x,
                        num_experts=num_experts,
                        k=k,
                        activation=activation,
                        backend=backend,
                    )
                    cases.append(Case(activation, k, num_experts, backend, *compiled))
    return cases


def _measure(cases: list[Case], rounds: int) -> tuple[list[float], list[float]]:
    """Median wall seconds per step of every case, timed round-robin, and the page faults.

    Returns the medians and, per case, the mean number of minor page faults per step: memory
    the allocator handed back to the kernel and has to fault in (and zero) again.
    """
    times: list[list[float]] = [[] for _ in cases]
    faults = [0] * len(cases)
    for _ in range(rounds):
        for index, case in enumerate(cases):
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            jax.block_until_ready(case.step(*case.inputs))
            times[index].append(time.perf_counter() - start)
            faults[index] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    return [statistics.median(case_times) for case_times in times], [f / rounds for f in faults]


def _report(args, cases: list[Case], seconds: list[float], faults: list[float]) -> None:
    print("| act | E | K | backend | ms | tokens/s | GFLOP/s | x dense | peak GiB | faults/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    dense_s = best = None
    for case, case_s, case_faults in zip(cases, seconds, faults, strict=True):
        matrices = 3 if experts.is_gated(case.activation) else 2
        # forward 2 FLOPs per multiply-add, backward twice the forward
        flops = 3 * 2 * args.tokens * args.d_model * case.k * args.d_ff * matrices
        if case.num_experts is None:
            dense_s, best, alone = case_s, {}, {}
            summary.append((case.activation, case.k, dense_s, best, alone))
            name, num_experts = f"dense (H={case.k}x{args.d_ff})", "-"
        else:
            name, num_experts = case.backend, case.num_experts
            if case.backend == EXPERTS_ONLY:
                alone[case.num_experts] = case_s
            elif case_s < best.get(case.num_experts, ("", float("inf")))[1]:
                best[case.num_experts] = (case.backend, case_s)
        print(
            f"| {case.activation} | {num_experts} | {case.k} | {name} | {case_s * 1e3:.1f} "
            f"| {args.tokens / case_s:.0f} | {flops / case_s / 1e9:.0f} | {case_s / dense_s:.2f} "
            f"| {case.peak_gib:.2f} | {case_faults:.0f} |",
            flush=True,
        )
    for activation, k, dense_s, best, alone in summary:
        if best:
            print(f"\nbest backend, {activation} K={k}:")
            first_s = next(iter(best.values()))[1]
            for num_experts, (backend, case_s) in best.items():
                print(
                    f"  E={num_experts}: {backend} {case_s * 1e3:.0f} ms, {case_s / dense_s:.2f}x "
                    f"dense, {case_s / first_s:.2f}x its time at the first E"
                )
        if alone:
            print(f"\n{EXPERTS_ONLY}, {activation} K={k}:")
            first_s = next(iter(alone.values()))
            for num_experts, case_s in alone.items():
                print(f"  E={num_experts}: {case_s / first_s:.2f}x its time at the first E")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens = batch x seq_len")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=2048, help="expert hidden width H")
    parser.add_argument("--experts", default="8,32,128")
    parser.add_argument("--k", default="2")
    parser.add_argument(
        "--backends",
        default="gather,dropless,einsum",
        help=f"dispatch backends, and {EXPERTS_ONLY!r} for the expert FFN without routing",
    )
    parser.add_argument("--activations", default="swiglu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--group-size", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per configuration")
    add_platform_argument(parser)
    args = parser.parse_args()
    if args.tokens % args.seq_len:
        parser.error(f"--tokens {args.tokens} is not a multiple of --seq-len {args.seq_len}.")
    platform_line = select_platform(parser, args.platform)

    batch = args.tokens // args.seq_len
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, args.seq_len, args.d_model))
    x = x.astype(jnp.dtype(args.dtype))
    print(
        f"tokens {args.tokens}, M {args.d_model}, H {args.d_ff}, {args.dtype}, "
        f"CF {args.capacity_factor} over the balanced load, group {args.group_size}, "
        f"median of {args.rounds} round-robin rounds, {jax.devices()[0].device_kind}, "
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}; {platform_line}"
    )
    cases = _cases(args, x)
    _report(args, cases, *_measure(cases, args.rounds))


if __name__ == "__main__":
    main()
