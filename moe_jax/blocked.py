"""Dropless expert computation: assignments sorted by expert into fixed-size row blocks.

Pure JAX (no Flax). Every filled slot of a `Routing` becomes one row. Rows are sorted by expert
and each expert's run is padded to a multiple of `block_size`, so every block of rows belongs to
exactly one expert and the number of blocks is bounded statically by
`ceil(assignments / block_size) + E`. `block_matmul` multiplies each block by its expert's
weight in a loop over blocks (no weight copies per block in the batched sense, no dense compute
over all experts); blocks past the last used one are skipped at run time. Its gradient is written
by hand (`jax.custom_vjp`) so that weight gradients accumulate in place per expert.

`jax.lax.ragged_dot` does the same job on TPU/GPU (`moe_jax.ragged`, which reuses this layout
with blocks of one row), but on CPU it computes every group densely (about 7x the equal-FLOP
matmul at E=8, 120x at E=64), so `dispatch.dispatch_combine` runs this module on CPU only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

DEFAULT_BLOCK_SIZE = 64


class BlockLayout(NamedTuple):
    """Where each assignment sits among the sorted, block-padded rows.

    Attributes:
      row_token: i32[R] flat token (g * T + t) of each row, -1 for a padding row; R = nb * b.
      row_weight: f32[R] combine weight of each row, 0.0 for a padding row.
      block_expert: i32[nb] the expert of each block.
      block_used: bool[nb] False for the unused blocks after the last expert's run.
      group_rows: i32[E] rows of each expert's run, padding included (a multiple of b); with
        `block_size=1` the number of assignments per expert, the `group_sizes` of a ragged dot.
    """

    row_token: jax.Array
    row_weight: jax.Array
    block_expert: jax.Array
    block_used: jax.Array
    group_rows: jax.Array


def block_layout(routing: Any, *, block_size: int) -> BlockLayout:
    """Sort the filled slots of `routing` by expert into blocks of `block_size` rows."""
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
    num_groups, num_experts, capacity = routing.token_index.shape
    num_tokens = routing.probs.shape[1]
    max_assignments = num_groups * num_experts * capacity
    if routing.expert_index is not None:
        max_assignments = min(max_assignments, routing.expert_index.size)
    # each expert's run wastes less than one block on padding (none with blocks of one row)
    slack = num_experts if block_size > 1 else 0
    num_blocks = min(
        math.ceil(max_assignments / block_size) + slack,
        num_experts * math.ceil(num_groups * capacity / block_size),
    )
    num_rows = num_blocks * block_size

    # slots in (expert, group, slot) order, so each expert's slots are contiguous
    token_index = jnp.transpose(routing.token_index, (1, 0, 2))  # [E, G, C]
    filled = (token_index >= 0).reshape(num_experts, -1)  # [E, G*C]
    group_offset = (jnp.arange(num_groups) * num_tokens)[None, :, None]  # [1, G, 1]
    flat_token = (token_index + group_offset).reshape(num_experts, -1)  # [E, G*C]
    slot_weight = jnp.transpose(routing.weight, (1, 0, 2)).reshape(num_experts, -1)  # [E, G*C]

    counts = jnp.sum(filled, axis=1)  # [E]
    padded_counts = -(-counts // block_size) * block_size  # [E]
    run_end = jnp.cumsum(padded_counts)  # [E]
    rank = jnp.cumsum(filled, axis=1) - 1  # [E, G*C]
    # unfilled slots write to the extra row `num_rows`, cut off below
    dest = jnp.where(filled, (run_end - padded_counts)[:, None] + rank, num_rows)  # [E, G*C]
    dest = dest.reshape(-1)
    row_token = jnp.full((num_rows + 1,), -1, jnp.int32).at[dest].set(flat_token.reshape(-1))
    row_weight = jnp.zeros((num_rows + 1,), slot_weight.dtype).at[dest].set(slot_weight.reshape(-1))

    block_start = jnp.arange(num_blocks) * block_size  # [nb]
    block_expert = jnp.searchsorted(run_end, block_start, side="right")  # [nb]
    return BlockLayout(
        row_token=row_token[:num_rows],
        row_weight=row_weight[:num_rows],
        block_expert=jnp.minimum(block_expert, num_experts - 1).astype(jnp.int32),
        block_used=block_start < run_end[-1],
        group_rows=padded_counts.astype(jnp.int32),
    )


def _varying_axes(*arrays: jax.Array) -> set[str]:
    """The `shard_map` axes along which any of `arrays` differs between devices."""
    return set().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))


def varying_zeros(shape: tuple[int, ...], dtype: Any, *like: jax.Array) -> jax.Array:
    """Zeros that vary over the same `shard_map` axes as `like` (so branches' types agree)."""
    axes = _varying_axes(*like)
    zeros = jnp.zeros(shape, dtype)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _cotangent_for(grad: jax.Array, primal: jax.Array) -> jax.Array:
    """`grad` summed over the `shard_map` axes along which `primal` is the same on every device.

    A weight replicated over 'data' collects its gradient from every data shard; this is the
    psum that JAX's own transpose would insert, written here for the hand-written backward.
    """
    extra = _varying_axes(grad) - _varying_axes(primal)
    return jax.lax.psum(grad, tuple(sorted(extra))) if extra else grad


def _block_product(x_block: jax.Array, w: jax.Array, expert: jax.Array) -> jax.Array:
    """`x_block: [b, A] @ w[expert]: [A, B] -> f32[b, B]`."""
    return jnp.dot(x_block, w[expert], preferred_element_type=jnp.float32)


@jax.custom_vjp
def block_matmul(
    x: jax.Array, w: jax.Array, block_expert: jax.Array, block_used: jax.Array
) -> jax.Array:
    """`x: [nb, b, A]`, `w: [E, A, B]` -> f32[nb, b, B], block i times `w[block_expert[i]]`.

    Unused blocks (`block_used` False) give zero and cost nothing.
    """

    def one_block(operands):
        x_block, expert, used = operands
        return jax.lax.cond(
            used,
            lambda: _block_product(x_block, w, expert),
            lambda: varying_zeros((x.shape[1], w.shape[2]), jnp.float32, x_block, w),
        )

    return jax.lax.map(one_block, (x, block_expert, block_used))  # [nb, b, B]


def _block_matmul_fwd(x, w, block_expert, block_used):
    return block_matmul(x, w, block_expert, block_used), (x, w, block_expert, block_used)


def _block_matmul_bwd(residuals, grad_out):
    x, w, block_expert, block_used = residuals
    w_t = jnp.swapaxes(w, 1, 2)  # [E, B, A]
    grad_out = grad_out.astype(x.dtype)

    def one_block(grad_w, operands):
        x_block, g_block, expert, used = operands

        def used_block(grad_w):
            grad_x = _block_product(g_block, w_t, expert)  # [b, A]
            update = jnp.dot(x_block.T, g_block, preferred_element_type=jnp.float32)  # [A, B]
            return grad_w.at[expert].add(update), grad_x

        def unused_block(grad_w):
            return grad_w, varying_zeros(x_block.shape, jnp.float32, g_block, w)

        return jax.lax.cond(used, used_block, unused_block, grad_w)

    grad_w = varying_zeros(w.shape, jnp.float32, x, grad_out)
    grad_w, grad_x = jax.lax.scan(one_block, grad_w, (x, grad_out, block_expert, block_used))
    grad_x, grad_w = _cotangent_for(grad_x, x), _cotangent_for(grad_w, w)
    return grad_x.astype(x.dtype), grad_w.astype(w.dtype), None, None


block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def dropless(
    x: jax.Array,
    routing: Any,
    expert_fn: Callable[..., jax.Array],
    expert_params: Any,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Every filled slot of `routing` through its expert, no capacity buffer: f32[G, T, M].

    `expert_fn(expert_params, x_blocks: [nb, b, M], matmul=...)` is called once with the block
    matmul, so the expert maths is the same function the capacity backends use.
    """
    layout = block_layout(routing, block_size=block_size)
    rows = gather_rows(x, layout)  # [R, M]
    x_blocks = rows.reshape(-1, block_size, rows.shape[-1])  # [nb, b, M]
    matmul = functools.partial(
        _apply_block_matmul, block_expert=layout.block_expert, block_used=layout.block_used
    )
    out = expert_fn(expert_params, x_blocks, matmul=matmul)  # [nb, b, M]
    return combine_rows(out.reshape(-1, out.shape[-1]), layout, x.shape[:2])  # [G, T, M]


def gather_rows(x: jax.Array, layout: BlockLayout) -> jax.Array:
    """The token of each row of `layout`: `x: [G, T, M]` -> `[R, M]`, zero for padding rows."""
    flat_x = x.reshape(-1, x.shape[-1])  # [G*T, M]
    filled = layout.row_token >= 0  # [R]
    return jnp.where(filled[:, None], flat_x[jnp.maximum(layout.row_token, 0)], 0)  # [R, M]


def combine_rows(out: jax.Array, layout: BlockLayout, group_shape: tuple[int, int]) -> jax.Array:
    """Weight each row's expert output and add it to its token: `[R, M]` -> f32[G, T, M]."""
    num_groups, num_tokens = group_shape
    out = out * layout.row_weight[:, None]  # [R, M]
    target = jnp.where(layout.row_token >= 0, layout.row_token, num_groups * num_tokens)  # [R]
    y = jnp.zeros((num_groups * num_tokens + 1, out.shape[-1]), jnp.float32)
    y = y.at[target].add(out.astype(jnp.float32))[:-1]  # [G*T, M]
    return y.reshape(num_groups, num_tokens, -1)  # [G, T, M]


def _apply_block_matmul(
    x: jax.Array, w: jax.Array, *, block_expert: jax.Array, block_used: jax.Array
) -> jax.Array:
    """`block_matmul` with the layout bound, in the `matmul(x, w)` form `experts.ffn` takes."""
    return block_matmul(x, w, block_expert, block_used)
