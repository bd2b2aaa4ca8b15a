"""Tokens per second of cached decoding against recomputing the prefix at every step.

    python -m experiments.benchmark_decode --new-tokens=256 --batch=1 --repeats=3

The model is `configs/switch.py:tiny` (decoder-only, 4 layers of d_model 128, 8 experts at every
other FFN) with random weights. Both ways decode greedily inside one jit-compiled
`jax.lax.while_loop`/`fori_loop`, so neither pays Python overhead per token:
- cached: `moe_jax.decode.generate` (one token per step through the key/value cache);
- recompute: every step runs the full forward pass over a fixed buffer of prompt + new tokens
  (static shape, one compilation; causal attention makes the later padding harmless) and reads
  the logits at the current position. This is decoding without a cache.
The recompute route routes as evaluation does (eval capacity factor: a dropless full pass would
give every expert T slots and make the MoE layers quadratic in length, which is not what a
no-cache decoder would run), so a few tokens may differ from the dropless cached route; the
share of equal tokens is printed.
Times exclude compilation (a warm-up call first) and are the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax import decode, models
from moe_jax.config import load_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
    return load_config_file(os.path.join(ROOT, "configs", "switch.py") + ":tiny")


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_length", "new_tokens"))
def _recompute(graphdef, state, tokens, *, prompt_length: int, new_tokens: int):
    model = nnx.merge(graphdef, state)

    def step(t, tokens):
        logits, _ = model(tokens, deterministic=True)  # [B, P + N, V], the whole buffer again
        next_token = jnp.argmax(logits[:, t - 1], axis=-1).astype(jnp.int32)
        return tokens.at[:, t].set(next_token)

    tokens = jax.lax.fori_loop(prompt_length, prompt_length + new_tokens, step, tokens)
    return tokens[:, prompt_length:]


def recompute_generate(model, prompts: np.ndarray, new_tokens: int) -> jax.Array:
    batch, prompt_length = prompts.shape
    tokens = jnp.zeros((batch, prompt_length + new_tokens), jnp.int32).at[:, :prompt_length]
    graphdef, state = nnx.split(model)
    return _recompute(
        graphdef,
        state,
        tokens.set(jnp.asarray(prompts)),
        prompt_length=prompt_length,
        new_tokens=new_tokens,
    )


def best_time(fn, repeats: int) -> tuple[float, np.ndarray]:
    out = np.asarray(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = np.asarray(jax.block_until_ready(fn()))
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    config = tiny_config()
    model = models.build_model(config, rngs=nnx.Rngs(0))
    prompts = np.random.default_rng(0).integers(3, 259, (args.batch, args.prompt_length))
    cached_time, cached = best_time(
        lambda: decode.generate(model, prompts, max_new_tokens=args.new_tokens), args.repeats
    )
    recompute_time, recomputed = best_time(
        lambda: recompute_generate(model, prompts, args.new_tokens), args.repeats
    )
    agree = float(np.mean(cached == recomputed))
    tokens = args.batch * args.new_tokens
    print(
        f"{jax.devices()[0].platform}: batch {args.batch}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens; same tokens: {agree:.0%}"
    )
    print("| decoding | seconds | tokens/s |")
    print("|---|---|---|")
    print(f"| KV cache | {cached_time:.3f} | {tokens / cached_time:.0f} |")
    print(f"| recompute the prefix | {recompute_time:.3f} | {tokens / recompute_time:.0f} |")
    print(f"speed-up: {recompute_time / cached_time:.1f}x")


if __name__ == "__main__":
    main()
