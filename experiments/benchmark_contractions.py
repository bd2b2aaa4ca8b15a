"""Time each dense contraction site before and after issue 14's rows form, forward + backward.

Every dense contraction of the models runs through `experts.dense_matmul`, which flattens the
leading dims into rows and does one 2-D matmul. "before" compiles the same module with that
helper swapped for the einsum each site wrote before (`...a,ab->...b` on `[B, L, M]`), so both
columns time the real modules: the dense FFN (`layers.FeedForward`), the T5 attention block
(`attention.MultiHeadAttention`, causal self-attention), the Llama-style block
(`rope_attention.GroupedQueryAttention`) and the untied and tied logits.

    python experiments/benchmark_contractions.py --rounds 5

Compiled first, then timed round-robin (`benchmark_moe`'s helpers), so the before/after ratio
of a site comes from interleaved calls of one process.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, NamedTuple
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.benchmark_moe import _compile, _measure
from moe_jax import attention, experts, layers, models, rope_attention
from moe_jax.config import default_config

FORMS = ("before", "after")


class _Timed(NamedTuple):
    """What `benchmark_moe._measure` reads of a case: the compiled step and its inputs."""

    step: Any
    inputs: tuple[Any, jax.Array]


SITES = ("ffn", "attention", "gqa-attention", "logits", "tied-logits")


def einsum_form(x: jax.Array, w: jax.Array, *, contracted: int = 1) -> jax.Array:
    """The contraction as the sites wrote it before issue 14: one einsum over x's own dims."""
    lead, inner = "ijkl"[: x.ndim - contracted], "mn"[:contracted]
    rest = "pq"[: w.ndim - contracted]
    spec = f"{lead}{inner},{inner}{rest}->{lead}{rest}"
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)


def _form(form: str):
    """A context in which every site's `dense_matmul` is the `form` one."""
    if form == "after":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in (attention, rope_attention, models):
        stack.enter_context(mock.patch.object(module, "dense_matmul", einsum_form))
    stack.enter_context(mock.patch.object(experts, "dense_matmul", einsum_form))
    return stack


def _config(args):
    config = default_config()
    model = config.model
    model.d_model, model.d_ff, model.vocab_size = args.d_model, args.d_ff, args.vocab
    model.num_heads, model.head_dim, model.num_kv_heads = args.heads, args.d_model // args.heads, 0
    model.ffn_activation, model.dtype, model.dropout_rate = "swiglu", args.dtype, 0.0
    return config


def _site_loss(site: str, config):
    """(loss(params, x), params): a mean square of the site module's output."""
    rngs = nnx.Rngs(0)
    if site == "ffn":
        module = layers.FeedForward(config, rngs)
    elif site == "attention":
        module = attention.MultiHeadAttention(config, rngs=rngs)
    elif site == "gqa-attention":
        module = rope_attention.GroupedQueryAttention(config, rngs=rngs)
    elif site == "logits":
        module = models.OutputLogits(config, rngs=rngs)
    else:
        module = models.Embedding(config, rngs=rngs)
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    def loss(params, x):
        bound = nnx.merge(graphdef, params, rest)
        batch, length = x.shape[:2]
        mask = attention.attention_mask(key_valid=jnp.ones((batch, length), bool), causal=True)
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
        if site == "ffn":
            y = bound(x)
        elif site == "attention":
            y = bound(x, x, mask=mask, deterministic=True)
        elif site == "gqa-attention":
            y = bound(x, mask=mask, positions=positions, deterministic=True)
        elif site == "logits":
            y = bound(x)
        else:
            y = bound.attend(x)
        return jnp.mean(y.astype(jnp.float32) ** 2)

    return loss, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--sites", default=",".join(SITES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sites = args.sites.split(",")
    unknown = sorted(set(sites) - set(SITES))
    if unknown:
        parser.error(f"unknown --sites {unknown}; use some of {SITES}.")

    config = _config(args)
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, args.seq_len, args.d_model))
    x = x.astype(jnp.dtype(args.dtype))
    print(
        f"x [{args.batch}, {args.seq_len}, {args.d_model}], d_ff {args.d_ff} (SwiGLU), "
        f"{args.heads} heads, vocab {args.vocab}, {args.dtype}, fwd+bwd, median of "
        f"{args.rounds} round-robin rounds, {jax.devices()[0].device_kind}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    cases, names = [], []
    for site in sites:
        for form in FORMS:
            with _form(form):
                step, inputs, _ = _compile(*_site_loss(site, config), x)
            cases.append(_Timed(step, inputs))
            names.append((site, form))
    seconds, _ = _measure(cases, args.rounds)
    print("| site | before ms | after ms | before / after |")
    print("|---|---|---|---|")
    for index, site in enumerate(sites):
        before, after = seconds[2 * index], seconds[2 * index + 1]
        print(f"| {site} | {before * 1e3:.1f} | {after * 1e3:.1f} | {before / after:.2f} |")


if __name__ == "__main__":
    main()
