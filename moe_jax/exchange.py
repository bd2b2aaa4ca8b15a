"""Dropless expert parallelism inside `jax.shard_map`: sorted rows exchanged between devices.

Pure JAX (no Flax). Called on one device's groups inside a `shard_map` whose expert mesh axes
split the E experts over X devices (E_local = E / X each):

1. the device's filled slots become rows sorted by expert (`blocked.block_layout`, blocks of one
   row), so the rows bound for each peer are one contiguous run, `[R, M]`;
2. each peer's run goes to that peer, and each device then holds the rows of its own experts
   from every device, `[X, S, M]`;
3. those rows run through the local experts with the dropless backend (blocked on CPU, ragged
   dots on TPU/GPU, chosen when lowered), and go back the same way;
4. each row's output, times its slot weight, is added to its token.

Buffer size. Shapes are static under `jit`, while the per-peer load is known only at run time,
so a peer's buffer has the largest load any routing can give it: a token picks K distinct
experts, at most min(K, E_local) of them on one peer, so S = G_local * T * min(K, E_local) rows
(also at most the R rows the device has). This is E / (X * min(K, E_local)) times smaller than
the C = T capacity buffers of the gather path (`[E, G_local, T, M]`); with E_local = 1 (one
expert per device) it is the same, because one peer can then really receive every token.

Transport, chosen when the program is lowered (`jax.lax.platform_dependent`): on TPU and GPU
`jax.lax.ragged_all_to_all` sends only the filled rows of each run into the `[X, S, M]`
buffers; XLA:CPU cannot compile it (DESIGN.md, Sec. 7), so on CPU the runs travel zero-padded
to S rows through `jax.lax.all_to_all`. Either way one `all_to_all` of the `[X, E_local]` row
counts comes first, and the outputs go back the same way they came.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from moe_jax import blocked, dispatch
from moe_jax.routing import Routing


def rows_per_peer(routing: Routing, num_peers: int) -> int:
    """S, the static bound on the rows one device sends one peer (see the module doc)."""
    num_groups, num_experts, capacity = routing.token_index.shape
    local_experts = num_experts // num_peers
    bound = num_groups * local_experts * capacity  # every local expert's slots full
    if routing.expert_index is not None:
        num_tokens, k = routing.expert_index.shape[1:]
        bound = min(bound, num_groups * num_tokens * min(k, local_experts))
    return bound


def _received_routing(counts: jax.Array, rows_per_peer: int) -> Routing:
    """Slot view of the received rows `[X, S, M]`: peer q's run holds `counts[q]` rows per expert.

    Each peer is a group of S "tokens" (its rows), each routed to one local expert with weight 1.
    """
    num_peers, local_experts = counts.shape
    start = jnp.cumsum(counts, axis=1) - counts  # [X, E_local] first row of each expert's run
    slot = jnp.arange(rows_per_peer)  # [S]
    filled = slot[None, None, :] < counts[..., None]  # [X, E_local, S]
    token_index = jnp.where(filled, start[..., None] + slot, -1)  # [X, E_local, S]
    row = jnp.arange(rows_per_peer)[None, :, None]  # [1, S, 1]
    run_end = jnp.cumsum(counts, axis=1)[:, None, :]  # [X, 1, E_local]
    row_expert = jnp.minimum(jnp.sum(row >= run_end, axis=-1), local_experts - 1)  # [X, S]
    return Routing(
        token_index=token_index.astype(jnp.int32),
        weight=filled.astype(jnp.float32),
        probs=jnp.zeros((num_peers, rows_per_peer, local_experts), jnp.float32),
        expert_index=row_expert[..., None].astype(jnp.int32),  # [X, S, 1]
    )


def dropless_exchange(
    x: jax.Array,
    routing: Routing,
    expert_fn: Callable[..., jax.Array],
    expert_params: Any,
    *,
    expert_axes: tuple[str, ...],
    num_peers: int,
) -> jax.Array:
    """One device's share of dropless expert parallelism: f32[G_local, T, M] (inside shard_map).

    Args:
      x: [G_local, T, M] this device's groups.
      routing: their routing over all E experts (token_index, weight: [G_local, E, C]).
      expert_fn: the dropless expert function (`expert_fn(params, rows, matmul=...)`).
      expert_params: this device's experts, every leaf `[E_local, ...]`.
      expert_axes: the mesh axes the experts split over; `num_peers` X, their total size.
    """
    num_groups, num_tokens, d_model = x.shape
    num_experts = routing.token_index.shape[1]
    local_experts = num_experts // num_peers
    per_peer = rows_per_peer(routing, num_peers)
    layout = blocked.block_layout(routing, block_size=1)
    rows = blocked.gather_rows(x, layout)  # [R, M] sorted by expert
    counts = layout.group_rows.reshape(num_peers, local_experts)  # [X, E_local] rows I send
    peer_rows = jnp.sum(counts, axis=1)  # [X]
    peer_start = jnp.cumsum(peer_rows) - peer_rows  # [X] first row of each peer's run
    row_peer = layout.block_expert // local_experts  # [R]
    slot = jnp.arange(rows.shape[0]) - peer_start[row_peer]  # [R] position in the peer's run
    # where each of my rows sits in the [X, S] buffers; padding rows point past the end
    dest = jnp.where(layout.block_used, row_peer * per_peer + slot, num_peers * per_peer)  # [R]

    def exchange(a: jax.Array) -> jax.Array:
        return jax.lax.all_to_all(a, expert_axes, split_axis=0, concat_axis=0, tiled=True)

    received_counts = exchange(counts)  # [X, E_local] rows each peer sends me, per local expert
    received_rows = jnp.sum(received_counts, axis=1)  # [X]
    # my run starts at my_index * S in every peer's buffer, and theirs at peer * S in mine
    my_slot = jnp.full((num_peers,), jax.lax.axis_index(expert_axes) * per_peer, jnp.int32)
    buffer_start = jnp.arange(num_peers, dtype=jnp.int32) * per_peer  # [X]

    def padded_send(rows):
        send = jnp.zeros((num_peers * per_peer + 1, d_model), rows.dtype).at[dest].set(rows)
        return exchange(send[:-1].reshape(num_peers, per_peer, d_model))  # [X, S, M]

    def ragged_send(rows):
        buffer = blocked.varying_zeros((num_peers * per_peer, d_model), rows.dtype, rows)
        received = jax.lax.ragged_all_to_all(
            rows, buffer, peer_start, peer_rows, my_slot, received_rows, axis_name=expert_axes
        )
        return received.reshape(num_peers, per_peer, d_model)  # [X, S, M]

    def padded_return(out):
        return exchange(out)  # [X, S, M]

    def ragged_return(out):
        flat = out.reshape(num_peers * per_peer, -1)  # [X*S, M]
        returned = jax.lax.ragged_all_to_all(
            flat,
            blocked.varying_zeros(flat.shape, flat.dtype, flat),
            buffer_start,
            received_rows,
            my_slot,
            peer_rows,
            axis_name=expert_axes,
        )
        return returned.reshape(out.shape)  # [X, S, M]

    received = jax.lax.platform_dependent(rows, cpu=padded_send, default=ragged_send)
    local_routing = _received_routing(received_counts, per_peer)
    out = dispatch.dropless(received, local_routing, expert_fn, expert_params)  # [X, S, M]
    returned = jax.lax.platform_dependent(out, cpu=padded_return, default=ragged_return)
    returned = returned.reshape(num_peers * per_peer, -1)  # [X*S, M] my rows' outputs
    row_out = returned[jnp.minimum(dest, num_peers * per_peer - 1)]  # [R, M]
    return blocked.combine_rows(row_out, layout, (num_groups, num_tokens))  # [G_local, T, M]
