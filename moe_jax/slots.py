"""Capacity slots: a group's prioritised expert choices -> which token fills each expert slot.

Pure JAX (no Flax), the slot filling every capacity router of `moe_jax.routing` shares. Shapes:
G groups, T tokens per group, E experts, K choices per token, C capacity (a static int), N
assignments of one group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The order in which a group's K * T choices take slots (see `route_choices`).
FILL_ORDERS = ("choice", "token")


def fill_slots(
    expert: jax.Array,
    token: jax.Array,
    weight: jax.Array,
    keep: jax.Array,
    *,
    num_experts: int,
    capacity: int,
) -> tuple[jax.Array, jax.Array]:
    """Places assignments, given in priority order, into expert slots (one group).

    Args:
      expert: i32[N] expert of each assignment; token: i32[N] its token; weight: f32[N] its
        combine weight; keep: bool[N] False for assignments that must take no slot.
    Returns:
      token_index i32[E, C] (-1 = empty) and weight f32[E, C] (0.0 = empty).
    """
    num_assignments = expert.shape[0]
    # Skipped assignments queue at the sentinel expert E, past every real one.
    queue = jnp.where(keep, expert, num_experts)  # [N]
    # A stable sort lays the queues end to end, each in priority order; an assignment's place in
    # its queue is its sorted position minus the number of assignments to lower experts.
    order = jnp.argsort(queue, stable=True)  # [N]
    queue_length = jnp.zeros(num_experts + 1, jnp.int32).at[queue].add(1)  # [E + 1]
    queue_start = jnp.cumsum(queue_length) - queue_length  # [E + 1]
    position_sorted = jnp.arange(num_assignments, dtype=jnp.int32) - queue_start[queue[order]]
    position = jnp.zeros(num_assignments, jnp.int32).at[order].set(position_sorted)  # [N]
    # Out-of-range rows (sentinel expert) and columns (position >= C) are dropped by the scatter.
    slot = jnp.minimum(position, capacity)
    token_index = jnp.full((num_experts, capacity), -1, jnp.int32)  # [E, C]
    token_index = token_index.at[queue, slot].set(token.astype(jnp.int32), mode="drop")
    slot_weight = jnp.zeros((num_experts, capacity), jnp.float32)
    slot_weight = slot_weight.at[queue, slot].set(weight, mode="drop")  # [E, C]
    return token_index, slot_weight


def route_choices(
    expert_index: jax.Array,
    weight: jax.Array,
    keep: jax.Array,
    *,
    num_experts: int,
    capacity: int,
    fill_order: str = "choice",
    token_order: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fills slots with a group's choices in priority order.

    fill_order 'choice' (GShard, T5X): every token's first choice, then every token's second,
    and so on, so whether a token keeps its second expert depends on later tokens' first
    choices. 'token': token by token, each token's k choices together in rank order, so a
    token's slots depend only on the tokens ranked before it (causal in position order).

    Args:
      expert_index: i32[G, T, K] experts chosen; weight: f32[G, T, K] their combine weights;
        keep: bool[G, T, K] which choices may take a slot.
      fill_order: 'choice' | 'token'.
      token_order: i32[G, T] token priority (default: position order).
    Returns:
      token_index i32[G, E, C] and weight f32[G, E, C].
    """
    num_groups, num_tokens, k = expert_index.shape
    token = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (num_groups, num_tokens))
    if token_order is not None:
        token = token_order.astype(jnp.int32)
        take = lambda a: jnp.take_along_axis(a, token_order[..., None], axis=1)  # [G, T, K]
        expert_index, weight, keep = take(expert_index), take(weight), take(keep)
    if fill_order == "choice":
        flat = lambda a: jnp.swapaxes(a, 1, 2).reshape(num_groups, k * num_tokens)  # [G, K*T]
        token = jnp.tile(token, (1, k))  # [G, K*T]
    else:
        flat = lambda a: a.reshape(num_groups, num_tokens * k)  # [G, T*K]
        token = jnp.repeat(token, k, axis=1)  # [G, T*K]
    fill = lambda e, t, w, m: fill_slots(e, t, w, m, num_experts=num_experts, capacity=capacity)
    return jax.vmap(fill)(flat(expert_index), token, flat(weight), flat(keep))
