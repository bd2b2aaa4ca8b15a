"""Grouping tokens, and dispatch -> experts -> combine over a `Routing` (pure JAX, no Flax).

Three backends compute the same function
`y[g, t] = sum over slots (e, c) holding token t of weight[g, e, c] * expert_e(x[g, t])`:

- `'einsum'`: GShard Algorithm 2 (Lepikhin et al. 2020): dense one-hot dispatch/combine tensors
  `[G, T, E, C]` contracted with einsums. TPU-friendly; costs `G*T*E*C*M` extra FLOPs.
- `'gather'`: index gather of each slot's token into `[E, G, C, M]`, scatter-add back. No
  `[G, T, E, C]` tensor; the cheapest capacity-based backend on CPU.
- `'dropless'`: every assigned slot sorted by expert, no padding up to a capacity; pair it with
  a router run at `capacity=None` (C = T) so that nothing is dropped. The implementation is
  chosen when the program is lowered (`jax.lax.platform_dependent`): on CPU fixed-size row
  blocks with block matmuls (`moe_jax.blocked`), on TPU and GPU one `jax.lax.ragged_dot` per
  expert matmul (`moe_jax.ragged`), so a program exported from a CPU host for a TPU carries the
  ragged one.

Soft MoE's `soft_moe.SoftRouting` (slots that mix every token, not one token each) goes through
the einsum backend only: `dispatch`, `combine`, `dispatch_combine` and `dense_reference` take it
in place of a `Routing`, and the other backends refuse it.

Dropped tokens (in no slot) get zero here; the layer's residual connection carries them.
`dispatch` and `combine` are the two halves of the capacity-based backends, public so expert
parallelism can put an `all_to_all` between them.

The expert function is called as `expert_fn(expert_params, xe)` with `xe: [E, N, M]` and must
return `[E, N, M]`; for `'dropless'` it is called as `expert_fn(expert_params, rows,
matmul=...)` (rows `[nb, b, M]` blocks on CPU, `[R, M]` elsewhere), so it must take the `matmul`
keyword (`functools.partial(experts.ffn, ...)` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax import blocked, ragged, soft_moe
from moe_jax.routing import Routing, to_masks
from moe_jax.soft_moe import SoftRouting

BACKENDS = ("einsum", "gather", "dropless")
CAPACITY_BACKENDS = ("einsum", "gather")

ExpertFn = Callable[..., jax.Array]


def check_backend(backend: str, allowed: tuple[str, ...] = BACKENDS) -> None:
    """Raise a ValueError naming the allowed backends if `backend` is not one of them."""
    if backend not in allowed:
        raise ValueError(f"Unknown dispatch backend {backend!r}; use one of {allowed}.")


class Grouping(NamedTuple):
    """How `[B, L]` tokens were cut into `[G, T]` groups; calling it ungroups an output.

    Attributes:
      batch, length: B and L of the original tokens.
      num_groups, group_size: G and T; G * T >= B * L, the last group padded at its end.
    """

    batch: int
    length: int
    num_groups: int
    group_size: int

    @property
    def num_padding(self) -> int:
        """Padding tokens appended after the B * L real ones."""
        return self.num_groups * self.group_size - self.batch * self.length

    @property
    def valid(self) -> jax.Array:
        """bool[G, T]: True for real tokens, False for padding."""
        return self.group(jnp.ones((self.batch, self.length), jnp.bool_))

    def group(self, a: jax.Array) -> jax.Array:
        """`a: [B, L, ...] -> [G, T, ...]`, padding with zeros (False for bool) like the tokens."""
        num_tokens = self.batch * self.length
        flat = a.reshape((num_tokens, *a.shape[2:]))  # [B*L, ...]
        flat = jnp.pad(flat, [(0, self.num_padding)] + [(0, 0)] * (a.ndim - 2))  # [G*T, ...]
        return flat.reshape((self.num_groups, self.group_size, *a.shape[2:]))  # [G, T, ...]

    def __call__(self, y: jax.Array) -> jax.Array:
        """`y: [G, T, ...] -> [B, L, ...]`, dropping the padding tokens."""
        flat = y.reshape((self.num_groups * self.group_size, *y.shape[2:]))  # [G*T, ...]
        flat = flat[: self.batch * self.length]  # [B*L, ...]
        return flat.reshape((self.batch, self.length, *y.shape[2:]))  # [B, L, ...]


def group_tokens(x: jax.Array, *, group_size: int) -> tuple[jax.Array, Grouping]:
    """Cut `x: [B, L, M]` into contiguous groups of `group_size` tokens.

    When B * L is smaller than `group_size`, all tokens form one group of B * L. When it does not
    divide, the last group is padded with zero tokens; route with `grouping.valid` as the padding
    mask so the padding takes no expert slot, and `grouping(y)` removes it again.

    Returns:
      x: [G, T, M] grouped tokens, and the `Grouping` (callable: `[G, T, M] -> [B, L, M]`).
    """
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an int >= 1, got {group_size!r}.")
    batch, length = x.shape[:2]
    num_tokens = batch * length
    tokens_per_group = min(group_size, num_tokens)
    num_groups = math.ceil(num_tokens / tokens_per_group)
    grouping = Grouping(batch, length, num_groups, tokens_per_group)
    return grouping.group(x), grouping


def _slot_tokens(x: jax.Array, token_index: jax.Array) -> jax.Array:
    """`x: [G, T, M]`, `token_index: i32[G, E, C]` -> `[G, E, C, M]`, zero for empty slots."""
    rows = jax.vmap(lambda xg, ig: xg[jnp.maximum(ig, 0)])(x, token_index)  # [G, E, C, M]
    return jnp.where((token_index >= 0)[..., None], rows, jnp.zeros((), x.dtype))


def dispatch(x: jax.Array, routing: Routing | SoftRouting, *, backend: str) -> jax.Array:
    """Gather each expert's tokens: `x: [G, T, M]` -> `[E, G, C, M]` (empty slots are zero).

    `backend` is `'einsum'` or `'gather'` (the dropless backend has no fixed-capacity buffer);
    a `SoftRouting` gives Soft MoE's slot mixtures `[E, G, S, M]` (einsum only).
    """
    if isinstance(routing, SoftRouting):
        soft_moe.check_backend(backend)
        return soft_moe.dispatch(x, routing)  # [E, G, S, M]
    check_backend(backend, CAPACITY_BACKENDS)
    if backend == "einsum":
        dispatch_mask, _ = to_masks(routing, x.shape[1])  # [G, T, E, C]
        return jnp.einsum("gtec,gtm->egcm", dispatch_mask.astype(x.dtype), x)  # [E, G, C, M]
    return jnp.transpose(_slot_tokens(x, routing.token_index), (1, 0, 2, 3))  # [E, G, C, M]


def combine(expert_out: jax.Array, routing: Routing | SoftRouting, *, backend: str) -> jax.Array:
    """Weight and sum each token's expert outputs: `[E, G, C, M]` -> f32[G, T, M].

    Tokens in no slot get zero. `backend` is `'einsum'` or `'gather'` (`'einsum'` for a
    `SoftRouting`).
    """
    if isinstance(routing, SoftRouting):
        soft_moe.check_backend(backend)
        return soft_moe.combine(expert_out, routing)  # [G, T, M]
    check_backend(backend, CAPACITY_BACKENDS)
    num_tokens = routing.probs.shape[1]
    if backend == "einsum":
        _, combine_weights = to_masks(routing, num_tokens)  # [G, T, E, C]
        return jnp.einsum(
            "gtec,egcm->gtm", combine_weights, expert_out, preferred_element_type=jnp.float32
        )  # [G, T, M]
    slot_weight = jnp.transpose(routing.weight, (1, 0, 2))[..., None]  # [E, G, C, 1]
    weighted = (slot_weight * expert_out).astype(jnp.float32)  # [E, G, C, M]
    weighted = jnp.transpose(weighted, (1, 0, 2, 3))  # [G, E, C, M]
    # empty slots (-1) scatter into an extra row T that is cut off afterwards
    target = jnp.where(routing.token_index >= 0, routing.token_index, num_tokens)  # [G, E, C]

    def scatter_group(rows: jax.Array, index: jax.Array) -> jax.Array:
        out = jnp.zeros((num_tokens + 1, rows.shape[-1]), jnp.float32)  # [T + 1, M]
        return out.at[index.reshape(-1)].add(rows.reshape(-1, rows.shape[-1]))

    return jax.vmap(scatter_group)(weighted, target)[:, :num_tokens]  # [G, T, M]


def dispatch_combine(
    x: jax.Array,
    routing: Routing | SoftRouting,
    expert_fn: ExpertFn,
    expert_params: Any,
    *,
    backend: str,
    block_size: int = blocked.DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """Route `x: [G, T, M]` through the experts: f32[G, T, M] (dropped tokens give zero).

    Args:
      x: grouped tokens.
      routing: slots from a router (`moe_jax.routing`), or Soft MoE's `SoftRouting`.
      expert_fn: `expert_fn(expert_params, xe: [E, N, M]) -> [E, N, M]`; see the module doc.
      expert_params: pytree of stacked expert weights, every leaf with leading axis E.
      backend: `'einsum'`, `'gather'` or `'dropless'`.
      block_size: rows per block of the dropless backend.
    """
    check_backend(backend)
    if isinstance(routing, SoftRouting):
        soft_moe.check_backend(backend)
    if backend == "dropless":
        return dropless(x, routing, expert_fn, expert_params, block_size=block_size)
    expert_in = dispatch(x, routing, backend=backend)  # [E, G, C, M]
    num_experts, num_groups, capacity, d_model = expert_in.shape
    flat_in = expert_in.reshape(num_experts, num_groups * capacity, d_model)  # [E, G*C, M]
    expert_out = expert_fn(expert_params, flat_in)  # [E, G*C, M]
    expert_out = expert_out.reshape(num_experts, num_groups, capacity, -1)  # [E, G, C, M]
    return combine(expert_out, routing, backend=backend)


def dropless(
    x: jax.Array,
    routing: Routing,
    expert_fn: ExpertFn,
    expert_params: Any,
    *,
    block_size: int = blocked.DEFAULT_BLOCK_SIZE,
) -> jax.Array:
    """The dropless backend, f32[G, T, M]: `blocked` when lowered for CPU, `ragged` elsewhere."""
    return jax.lax.platform_dependent(
        x,
        routing,
        expert_params,
        cpu=lambda x, routing, params: blocked.dropless(
            x, routing, expert_fn, params, block_size=block_size
        ),
        default=lambda x, routing, params: ragged.dropless(x, routing, expert_fn, params),
    )


def dense_reference(
    x: jax.Array, routing: Routing | SoftRouting, expert_fn: ExpertFn, expert_params: Any
) -> jax.Array:
    """The oracle: run every expert on every token, then keep each token's slot weights.

    `y[g, t] = sum_e (sum_c weight[g, e, c] * [token_index[g, e, c] == t]) * expert_e(x[g, t])`,
    a Python loop over experts with no dispatch tensor and no gather. f32[G, T, M]. For a
    `SoftRouting`, `_soft_reference`.
    """
    if isinstance(routing, SoftRouting):
        return _soft_reference(x, routing, expert_fn, expert_params)
    num_groups, num_tokens, d_model = x.shape
    num_experts = routing.token_index.shape[1]
    positions = jnp.arange(num_tokens)
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        params_e = jax.tree.map(lambda leaf, e=e: leaf[e : e + 1], expert_params)
        out_e = expert_fn(params_e, x.reshape(1, num_groups * num_tokens, d_model))  # [1, G*T, M]
        out_e = out_e.reshape(num_groups, num_tokens, -1)  # [G, T, M]
        holds = routing.token_index[:, e, :, None] == positions  # [G, C, T]
        token_weight = jnp.sum(jnp.where(holds, routing.weight[:, e, :, None], 0.0), axis=1)
        y = y + token_weight[..., None] * out_e  # [G, T, M]
    return y


def _soft_reference(
    x: jax.Array, routing: SoftRouting, expert_fn: ExpertFn, expert_params: Any
) -> jax.Array:
    """Soft MoE's oracle, slot by slot in Python loops: slot (e, s) takes
    `sum_t dispatch_weight[g, t, e, s] * x[g, t]` as a weighted sum of token rows, runs expert e
    on it alone, and adds `combine_weight[g, t, e, s]` times the result to every token t."""
    num_groups, num_tokens, d_model = x.shape
    _, _, num_experts, num_slots = routing.dispatch_weight.shape
    y = jnp.zeros(x.shape, jnp.float32)
    for e in range(num_experts):
        params_e = jax.tree.map(lambda leaf, e=e: leaf[e : e + 1], expert_params)
        for s in range(num_slots):
            mix = jnp.sum(routing.dispatch_weight[:, :, e, s, None] * x, axis=1)  # [G, M]
            out = expert_fn(params_e, mix[None])[0]  # [G, M]
            y = y + routing.combine_weight[:, :, e, s, None] * out[:, None, :]  # [G, T, M]
    return y
