"""Group-limited expert selection (DeepSeek-V2 and V3): a token picks its experts in a few groups.

Pure JAX (no Flax). The E experts split into `num_groups` groups of E / num_groups consecutive
experts (expert e is in group e // (E / num_groups)). Each token scores every group from its
selection scores, keeps its `topk_groups` best groups, and picks its top-k experts among the
experts of those groups only; the combine weights are unchanged by the limit. How a group is
scored (`GROUP_SCORES`):

- 'max': its highest score. DeepSeek-V2's `group_limited_greedy` on the softmax probabilities,
  and its device-limited routing (arXiv 2405.04434, Sec. 3.2), where the groups are the devices
  holding the experts and a token's experts lie on at most `topk_groups` of them.
- 'top2_sum': the sum of its two highest scores. DeepSeek-V3's node-limited routing (arXiv
  2412.19437, Sec. 2.1.2) on the biased affinities s + b that the aux-loss-free router selects
  by (`moe_jax.routing.biased_top_k`).

`moe_jax.routing.tokens_choose` and `biased_top_k` take a `GroupLimit` and pick their top-k from
`restrict_to_groups` of their selection scores.

What the device limit saves. DeepSeek sends a token once to each device its experts lie on, so
at most M copies leave it. moe_jax's expert-parallel exchanges have static shapes, one buffer
row per (token, expert) slot (`[E, G, C, M]`, or the dropless rows padded to the largest load
a peer can receive), so the limit leaves the compiled all-to-all bytes as they are (measured
with `moe_jax.hlo_stats` on 8 CPU devices, einsum and dropless backends: the same bytes with
and without it); it only bounds the devices each token's rows go to.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

GROUP_SCORES = ("max", "top2_sum")


class GroupLimit(NamedTuple):
    """Each token picks its experts within its `topk_groups` best of `num_groups` expert groups.

    Hashable, so it can be a static argument of a jitted router.

    Attributes:
      num_groups: groups of E / num_groups consecutive experts; E must divide by it.
      topk_groups: groups each token keeps, 1 <= topk_groups <= num_groups.
      group_score: 'max' | 'top2_sum', how a group is scored (see the module doc).
    """

    num_groups: int
    topk_groups: int
    group_score: str = "max"


def check_group_limit(limit: GroupLimit, *, num_experts: int, k: int) -> None:
    """A ValueError naming the values unless `limit` leaves every token room for its k experts."""
    num_groups, topk_groups, group_score = limit
    if not isinstance(num_groups, int) or num_groups < 1 or num_experts % num_groups:
        raise ValueError(
            f"num_groups={num_groups!r} must be an int >= 1 that divides num_experts="
            f"{num_experts}, so that every group holds the same number of experts."
        )
    if not isinstance(topk_groups, int) or not 1 <= topk_groups <= num_groups:
        raise ValueError(
            f"topk_groups={topk_groups!r} must be an int in [1, num_groups={num_groups}]: "
            f"each token keeps that many of the {num_groups} expert groups."
        )
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score must be one of {GROUP_SCORES}, got {group_score!r}.")
    group_size = num_experts // num_groups
    if group_score == "top2_sum" and group_size < 2:
        raise ValueError(
            f"group_score 'top2_sum' adds each group's two best scores, but num_experts="
            f"{num_experts} in num_groups={num_groups} leaves {group_size} expert per group."
        )
    if k > topk_groups * group_size:
        raise ValueError(
            f"k={k} experts per token do not fit in topk_groups={topk_groups} groups of "
            f"{group_size} experts (num_experts={num_experts}, num_groups={num_groups}): at "
            f"most {topk_groups * group_size}; raise topk_groups or lower k."
        )


@functools.partial(jax.jit, static_argnames=("limit",))
def group_limited_mask(selection_scores: jax.Array, limit: GroupLimit) -> jax.Array:
    """bool[G, T, E]: True for the experts of each token's `limit.topk_groups` best groups.

    Args:
      selection_scores: f32[G, T, E] the scores the router selects experts by (any leading
        axes); the group scores of `limit.group_score` are taken from them.
      limit: the grouping, checked by the caller (`check_group_limit`).
    Returns:
      bool[G, T, E]; ties between groups go to the lower group index, as `jax.lax.top_k`.
    """
    num_groups, topk_groups, group_score = limit
    *leading, num_experts = selection_scores.shape
    group_size = num_experts // num_groups
    grouped = selection_scores.reshape(*leading, num_groups, group_size)  # [G, T, N, E/N]
    if group_score == "max":
        group_scores = jnp.max(grouped, axis=-1)  # [G, T, N]
    else:
        group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [G, T, N]
    _, kept_groups = jax.lax.top_k(group_scores, topk_groups)  # [G, T, topk_groups]
    kept = jnp.any(jax.nn.one_hot(kept_groups, num_groups, dtype=jnp.bool_), axis=-2)  # [G, T, N]
    return jnp.repeat(kept, group_size, axis=-1)  # [G, T, E]


def restrict_to_groups(selection_scores: jax.Array, limit: GroupLimit | None) -> jax.Array:
    """f32[G, T, E] selection scores with the experts outside each token's kept groups at -inf
    (`group_limited_mask`), so that no top-k picks them; unchanged for `limit` None."""
    if limit is None:
        return selection_scores
    mask = group_limited_mask(selection_scores, limit)
    return jnp.where(mask, selection_scores, -jnp.inf)
