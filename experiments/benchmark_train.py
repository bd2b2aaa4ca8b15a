"""Training throughput of a config: tokens/s, the step split into its parts, and model FLOP use.

    python -m experiments.benchmark_train --config=configs/dense.py:small --steps 5
    python -m experiments.benchmark_train --config=configs/dense.py:small --dtype bfloat16

Five compiled functions are timed round-robin (`benchmark_moe`'s helpers), `--steps` calls each:

- `f32 matmul` / `bf16 matmul`: one `[n, n] @ [n, n]` product, float32, and bfloat16 operands
  accumulated in float32: this CPU's matmul ceiling in the same run;
- `forward`: the evaluation step (the loss's forward pass, no gradient);
- `fwd+bwd`: the training step with an optimizer that does nothing (`optax.set_to_zero`);
- `step`: the full training step with the config's optimizer.

Backward is `fwd+bwd - forward` and the optimizer `step - fwd+bwd`. Model FLOPs per token are
counted from the config (decoder-only, `moe_jax.flops`): 2 per multiply-add of every active
matmul (attention projections, scores and context, the dense or top-K expert FFN, router,
logits; causal scores counted in full), three times that for forward + backward. MFU is those
FLOPs per step over the step time, against the f32 (and bf16) matmul rate measured here, and against
`--peak-tflops` when given (the chip's datasheet peak for the dtype, which a measured square
matmul of `--ceiling-size` may not reach on an accelerator). `--platform` is
`benchmark_moe`'s.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.benchmark_moe import _measure, add_platform_argument, select_platform
from moe_jax import experts, flops, optim, steps
from moe_jax.config import DECODER_KINDS, load_config_file
from moe_jax.models import build_model

PARTS = ("f32 matmul", "bf16 matmul", "forward", "fwd+bwd", "step")


class _Timed(NamedTuple):
    """What `benchmark_moe._measure` reads of a case: the compiled step and its inputs."""

    step: Any
    inputs: tuple


def model_flops_per_token(config) -> float:
    """Forward FLOPs per token of the active matmuls of a decoder-only `config`."""
    length = config.train.seq_len
    return flops.forward_flops(config, batch_size=1, length=length) / length


def _batch(config) -> dict[str, jax.Array]:
    """A synthetic batch of `train.batch_size` full sequences of `train.seq_len` random tokens."""
    shape = (config.train.batch_size, config.train.seq_len)
    tokens = jax.random.randint(jax.random.PRNGKey(0), shape, 0, config.model.vocab_size)
    return {
        "inputs": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "weights": jnp.ones(shape, jnp.float32),
        "segment_ids": jnp.ones(shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(shape[1]), shape),
    }


def _compiled(function, *inputs) -> _Timed:
    """`function` jitted, compiled for `inputs` and run once."""
    compiled = jax.jit(function).lower(*inputs).compile()
    jax.block_until_ready(compiled(*inputs))
    return _Timed(compiled, inputs)


def _cases(config, ceiling_size: int) -> list[_Timed]:
    key_a, key_b = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(key_a, (ceiling_size, ceiling_size))
    b = jax.random.normal(key_b, (ceiling_size, ceiling_size))
    bf16 = (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    model = build_model(config, rngs=nnx.Rngs(config.seed))
    graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    optimizer, schedule = optim.make_optimizer(config.train)
    no_update = optax.set_to_zero()
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    plain = state._replace(opt_state=no_update.init(params))
    batch, rng = _batch(config), jax.random.PRNGKey(2)
    return [
        _compiled(experts.dense_matmul, a, b),
        _compiled(experts.dense_matmul, *bf16),
        _compiled(steps.make_eval_step(graphdef, rng_state, config), state, batch),
        _compiled(
            steps.make_train_step(graphdef, rng_state, no_update, schedule, config),
            plain,
            batch,
            rng,
        ),
        _compiled(
            steps.make_train_step(graphdef, rng_state, optimizer, schedule, config),
            state,
            batch,
            rng,
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/dense.py:small", help="PATH[:VARIANT]")
    parser.add_argument("--steps", type=int, default=5, help="timed calls of each part")
    parser.add_argument("--dtype", default=None, help="model.dtype override, e.g. bfloat16")
    parser.add_argument("--ceiling-size", type=int, default=2048, help="n of the n x n matmul")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the chip's peak TFLOP/s, for MFU"
    )
    add_platform_argument(parser)
    args = parser.parse_args()
    platform_line = select_platform(parser, args.platform)
    config = load_config_file(args.config)
    if config.model.kind not in DECODER_KINDS:
        parser.error(f"--config {args.config}: model.kind {config.model.kind!r} is not one of "
                     f"{DECODER_KINDS}; the FLOP count covers decoder-only models.")  # fmt: skip
    if args.dtype:
        config.model.dtype = args.dtype
    for override in args.set:
        key, _, value = override.partition("=")
        section, _, name = key.rpartition(".")
        parent = config[section] if section else config
        if name not in parent:
            parser.error(f"--set {override}: the config has no key {key!r}.")
        parent[name] = type(parent[name])(value)

    tokens = config.train.batch_size * config.train.seq_len
    print(
        f"{args.config}, model.dtype {config.model.dtype}, {tokens} tokens a step, median of "
        f"{args.steps} round-robin calls, {jax.devices()[0].device_kind}, "
        f"load average {os.getloadavg()[0]:.1f}; {platform_line}"
    )
    seconds, _ = _measure(_cases(config, args.ceiling_size), args.steps)
    times = dict(zip(PARTS, seconds, strict=True))
    ceiling_flops = 2 * args.ceiling_size**3
    rates = {name: ceiling_flops / times[name] for name in ("f32 matmul", "bf16 matmul")}
    if args.peak_tflops:
        rates[f"the peak of {args.peak_tflops:g} TFLOP/s"] = args.peak_tflops * 1e12
    step_flops = 3 * model_flops_per_token(config) * tokens
    model_rate = step_flops / times["step"]
    parts = {
        "forward": times["forward"],
        "backward": times["fwd+bwd"] - times["forward"],
        "optimizer": times["step"] - times["fwd+bwd"],
    }
    print("| quantity | value |")
    print("|---|---|")
    for name in ("f32 matmul", "bf16 matmul"):
        print(f"| {name} ceiling GFLOP/s | {rates[name] / 1e9:.1f} |")
    print(f"| step ms | {times['step'] * 1e3:.3f} |")
    for name, part_s in parts.items():
        print(f"| {name} ms | {part_s * 1e3:.3f} |")
    print(f"| tokens/s | {tokens / times['step']:.0f} |")
    print(f"| model FLOP per token, forward | {model_flops_per_token(config):.0f} |")
    print(f"| model GFLOP per step | {step_flops / 1e9:.1f} |")
    print(f"| model GFLOP/s | {model_rate / 1e9:.1f} |")
    for name, rate in rates.items():
        print(f"| MFU vs {name} | {model_rate / rate:.1%} |")


if __name__ == "__main__":
    main()
