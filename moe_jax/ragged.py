"""Dropless expert computation for TPU and GPU: assignments sorted by expert, `ragged_dot`.

Pure JAX (no Flax). Every filled slot of a `Routing` becomes one row; rows are sorted by expert
(`blocked.block_layout` with blocks of one row, so no padding between experts) and each expert
FFN matmul is one `jax.lax.ragged_dot` over all rows with the experts' row counts as
`group_sizes`. Memory is O(rows * M) with rows = G * T * K for a tokens-choose router (the
routing's own slot indices are integers); the backward pass is `ragged_dot`'s own transpose
rules (two more ragged dots), so nothing is dense over the experts.

Why `ragged_dot` and not a Pallas kernel (megablox, tokamax): it is part of JAX, lowers to the
`chlo.ragged_dot` composite that XLA:TPU and XLA:GPU implement as grouped matmuls (megablox-like
on TPU), needs no extra package, and exports from a CPU host for both platforms. A Pallas kernel
can only be lowered for the platform it is written for and could not be checked on this host.

On CPU, XLA decomposes `ragged_dot` into a dense matmul per group (slow), so
`dispatch.dispatch_combine` runs `moe_jax.blocked` there (`jax.lax.platform_dependent`); calling
`dropless` here directly on CPU is correct, only slow, which is how the tests check it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from moe_jax import blocked


def ragged_matmul(x: jax.Array, w: jax.Array, *, group_sizes: jax.Array) -> jax.Array:
    """`x: [R, A]` rows sorted by expert, `w: [E, A, B]` -> f32[R, B].

    Rows `sum(group_sizes[:e])` up to `sum(group_sizes[:e + 1])` meet `w[e]`; rows past
    `sum(group_sizes)` give zero.
    """
    return jax.lax.ragged_dot(
        x, w, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32
    )  # [R, B]


def dropless(
    x: jax.Array, routing: Any, expert_fn: Callable[..., jax.Array], expert_params: Any
) -> jax.Array:
    """Every filled slot of `routing` through its expert with ragged dots: f32[G, T, M].

    `expert_fn(expert_params, rows: [R, M], matmul=...)` is called once with the ragged matmul.
    """
    layout = blocked.block_layout(routing, block_size=1)
    rows = blocked.gather_rows(x, layout)  # [R, M]
    matmul = functools.partial(ragged_matmul, group_sizes=layout.group_rows)
    out = expert_fn(expert_params, rows, matmul=matmul)  # [R, M]
    return blocked.combine_rows(out, layout, x.shape[:2])  # [G, T, M]
