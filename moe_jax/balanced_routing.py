"""Balanced routers: BASE layers, Sinkhorn (S-BASE), and a forced balanced pattern.

Pure JAX (no Flax). Every router here returns a `routing.Routing` (the slot view), so every
dispatch backend and expert parallelism take them as they take the classic routers. Shapes as
in `moe_jax.routing`: G groups, T tokens per group, E experts, K choices per token, C capacity;
R is the number of real (non-padding) tokens of a group.

- `balanced_assignment`: each token to one expert, every expert getting R/E tokens (exactly
  when E divides R, else floor or ceil), maximising the summed scores: an auction (Bertsekas).
- `base_layer`: BASE layers (Lewis et al. 2021, arXiv 2103.16716): the balanced assignment in
  training, greedy top-1 in evaluation; the expert's output is gated by sigmoid(logit).
- `sinkhorn` and `sinkhorn_top_k`: S-BASE (Clark et al. 2022, arXiv 2202.01169): a few
  Sinkhorn iterations make exp(logits) a balanced transport plan, and each token takes its
  top-k of the plan in training (its top-k of the gates in evaluation).
- `forced_balanced`: a fixed round-robin pattern that ignores the logits, for benchmarks and
  memory checks of the balanced cost (MaxText, Megatron and torchtitan have such a switch).

The balancing routers look at the whole group in training, so a token's expert there depends
on the group's other tokens, later ones included; in evaluation (`balanced=False`) each token
routes on its own logits. The papers train decoder LMs this way, and causal stacks accept them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from moe_jax.routing import (
    Routing,
    check_int,
    choose_top_k,
    float_logits,
    real_token_mask,
    static_capacity,
)
from moe_jax.slots import fill_slots, route_choices

# bids of the auction in its first rounds raise prices by at least (score range) / this
_EPSILON_DIVISOR = 50.0


def balanced_quota(real: jax.Array, num_experts: int) -> jax.Array:
    """i32[G, E] tokens each expert takes: R // E, plus one for the first R % E experts.

    `real` is bool[G, T] (True for real tokens); the quotas of a group sum to its R.
    """
    num_real = jnp.sum(real, axis=1, dtype=jnp.int32)[:, None]  # [G, 1]
    expert = jnp.arange(num_experts, dtype=jnp.int32)[None, :]  # [1, E]
    return num_real // num_experts + (expert < num_real % num_experts)  # [G, E]


def balanced_capacity(num_tokens: int, num_experts: int) -> int:
    """ceil(T / E): the most tokens a balanced assignment gives one expert of a T-token group."""
    return math.ceil(num_tokens / num_experts)


def _place_prices(owner: jax.Array, paid: jax.Array, quota: jax.Array) -> tuple:
    """f32[E] lowest and second-lowest price among each expert's quota of places (one group).

    A place never taken costs 0; a taken place costs what its holder paid (always > 0). An
    expert with no such place prices it +inf.
    """
    num_experts = quota.shape[0]
    held = jax.nn.one_hot(owner, num_experts, dtype=jnp.bool_)  # [T, E]; -1 holds nothing
    held_price = jnp.where(held, paid[:, None], jnp.inf)  # [T, E]
    held_price = jnp.concatenate([held_price, jnp.full((1, num_experts), jnp.inf)])  # [T+1, E]
    negated, _ = jax.lax.top_k(-held_price.T, 2)  # [E, 2]
    lowest_held, second_held = -negated[:, 0], -negated[:, 1]
    free = quota - jnp.sum(held, axis=0)  # [E]
    lowest = jnp.where(free >= 1, 0.0, lowest_held)
    second = jnp.where(free >= 2, 0.0, jnp.where(free == 1, lowest_held, second_held))
    return lowest, second


def _top_per_expert(
    target: jax.Array, amount: jax.Array, room: jax.Array, *, capacity: int
) -> jax.Array:
    """bool[T]: whether each token is among the `room[e]` highest `amount`s aimed at expert
    `target` (ties go to the lower token index); target E aims at no expert."""
    num_tokens = target.shape[0]
    num_experts = room.shape[0]
    order = jnp.argsort(-amount, stable=True)  # tokens by descending amount
    slots, _ = fill_slots(
        target[order],
        order,
        jnp.zeros(num_tokens, jnp.float32),
        target[order] < num_experts,
        num_experts=num_experts,
        capacity=capacity,
    )  # [E, C] tokens in descending amount
    slots = jnp.where(jnp.arange(capacity)[None, :] < room[:, None], slots, -1)
    # empty slots (-1) scatter into the out-of-range row T, which the scatter drops
    index = jnp.where(slots >= 0, slots, num_tokens).reshape(-1)  # [E*C]
    return jnp.zeros(num_tokens, jnp.bool_).at[index].set(True, mode="drop")


def _auction(
    scores: jax.Array,
    real: jax.Array,
    quota: jax.Array,
    epsilon: jax.Array,
    *,
    max_rounds: int,
) -> jax.Array:
    """i32[T] expert of each token (-1 for padding) of one group; see `balanced_assignment`."""
    num_tokens, num_experts = scores.shape
    capacity = balanced_capacity(num_tokens, num_experts)  # no quota is larger
    real_scores = jnp.where(real[:, None], scores, jnp.nan)
    spread = jnp.nanmax(real_scores) - jnp.nanmin(real_scores)
    spread = jnp.where(jnp.isfinite(spread), spread, 0.0) + epsilon
    tokens = jnp.arange(num_tokens)

    def unassigned(owner: jax.Array) -> jax.Array:
        return real & (owner < 0)

    def bid_round(state):
        owner, paid, rounds = state
        lowest, second = _place_prices(owner, paid, quota)
        value = scores - lowest  # [T, E] what each expert's cheapest place is worth
        best = jnp.argmax(value, axis=-1)  # [T]
        best_value = value[tokens, best]
        others = jnp.max(jnp.where(jax.nn.one_hot(best, num_experts) > 0, -jnp.inf, value), -1)
        # the runner-up: another expert, or the best expert's second place; a token with no
        # other choice bids as if the runner-up were worth a whole score range less
        runner_up = jnp.maximum(others, scores[tokens, best] - second[best])
        runner_up = jnp.maximum(runner_up, best_value - spread)
        bid = scores[tokens, best] - runner_up + epsilon  # [T]
        bidding = unassigned(owner)
        # each expert accepts its highest bids, one per round once it has no two free places
        free = quota - jnp.sum(jax.nn.one_hot(owner, num_experts, dtype=jnp.int32), axis=0)
        accepted = _top_per_expert(
            jnp.where(bidding, best, num_experts),
            jnp.where(bidding, bid, -jnp.inf),
            jnp.maximum(free, 1),
            capacity=capacity,
        )
        # holders and accepted bidders: each expert keeps its quota of the highest amounts
        target = jnp.where(owner >= 0, owner, jnp.where(accepted, best, num_experts))
        amount = jnp.where(owner >= 0, paid, jnp.where(accepted, bid, -jnp.inf))
        kept = _top_per_expert(target, amount, quota, capacity=capacity)
        return jnp.where(kept, target, -1), jnp.where(kept, amount, 0.0), rounds + 1

    def bidding_left(state):
        owner, _, rounds = state
        return jnp.any(unassigned(owner)) & (rounds < max_rounds)

    # carries made *_like the inputs keep their per-device type inside shard_map
    start = (jnp.full_like(real, -1, jnp.int32), jnp.zeros_like(scores[:, 0]), 0)
    owner, _, _ = jax.lax.while_loop(bidding_left, bid_round, start)
    # tokens the rounds left unassigned fill the free places in expert order
    left = unassigned(owner)
    free = quota - jnp.sum(jax.nn.one_hot(owner, num_experts, dtype=jnp.int32), axis=0)
    rank = jnp.cumsum(left) - 1  # [T] place in the queue of leftover tokens
    leftover_expert = jnp.searchsorted(jnp.cumsum(free), rank, side="right")  # [T]
    return jnp.where(left, leftover_expert, owner).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("epsilon", "max_rounds"))
def balanced_assignment(
    scores: jax.Array,
    padding_mask: jax.Array | None = None,
    *,
    epsilon: float | None = None,
    max_rounds: int = 200,
) -> jax.Array:
    """Each real token to one expert, expert e taking exactly `balanced_quota` tokens, by an
    auction for the largest total score (Bertsekas 1988; BASE layers, Lewis et al. 2021).

    Expert e is `quota[e]` identical places. In each round every unassigned token bids for the
    cheapest place of the expert worth most to it (score minus that place's price), raising
    the price by the margin over its runner-up plus `epsilon`; an expert accepts its highest
    bids (as many as it has free places, or one), displacing the holders who paid least, who
    bid again. When every token holds a place, each is within `epsilon` of its best choice at
    the final prices, so the total score is within R * epsilon of the optimum, and optimal when
    scores are integers and epsilon < 1 / R. If `max_rounds` end the auction first, the tokens
    still unassigned fill the free places in expert order, so the balance is always exact.
    Not differentiable (the scores pass through `stop_gradient`).

    Args:
      scores: f32[G, T, E] token-expert affinities (router logits).
      padding_mask: f32|bool[G, T], 0 for padding tokens (assigned -1, taking no place).
      epsilon: the bid increment (> 0); None: the group's score range / 50 (at least 1e-6).
      max_rounds: bidding rounds at most (static).
    Returns:
      i32[G, T] expert of each token, -1 for padding.
    """
    scores = jax.lax.stop_gradient(float_logits(scores))
    num_groups, num_tokens, num_experts = scores.shape
    max_rounds = check_int("max_rounds", max_rounds, 0)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    if epsilon is None:
        real_scores = jnp.where(real[..., None], scores, jnp.nan)
        spread = jnp.nanmax(real_scores, axis=(1, 2)) - jnp.nanmin(real_scores, axis=(1, 2))
        epsilon = jnp.maximum(jnp.nan_to_num(spread) / _EPSILON_DIVISOR, 1e-6)  # [G]
    elif not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}; it is the auction's bid step.")
    epsilon = jnp.broadcast_to(jnp.asarray(epsilon, jnp.float32), (num_groups,))  # [G]
    quota = balanced_quota(real, num_experts)  # [G, E]
    auction = functools.partial(_auction, max_rounds=max_rounds)
    return jax.vmap(auction)(scores, real, quota, epsilon)


@functools.partial(jax.jit, static_argnames=("capacity", "balanced", "epsilon", "max_rounds"))
def base_layer(
    logits: jax.Array,
    *,
    capacity: int | None,
    balanced: bool,
    padding_mask: jax.Array | None = None,
    epsilon: float | None = None,
    max_rounds: int = 200,
) -> Routing:
    """BASE layers (Lewis et al. 2021): one expert per token, gated by sigmoid(logit).

    With `balanced` (training) the token-expert assignment is `balanced_assignment` of the
    logits (a linear assignment with R/E tokens per expert); without it (evaluation, as the
    paper tests) each token takes its top-1 expert, greedily. The combine weight is
    sigmoid(logits[t, a_t]) for the assigned expert a_t (the paper's layer output
    h_t + sigmoid(h_t . w_{a_t}) f_{a_t}(h_t)), so the router learns through the gate only.
    Slots fill in position order.

    Args:
      logits: f32[G, T, E] router logits.
      capacity: C (static int >= 1), or None for C = T. Balanced routing needs
        C >= ceil(T / E), what an expert can receive.
      balanced: the auction (training) or greedy top-1 (evaluation).
      padding_mask: f32|bool[G, T], 0 for padding tokens.
      epsilon, max_rounds: of `balanced_assignment`.
    Returns:
      Routing with probs = softmax(logits) f32[G, T, E] and expert_index i32[G, T, 1] (0 for
      padding, which takes no slot).
    """
    logits = float_logits(logits)
    num_groups, num_tokens, num_experts = logits.shape
    capacity = static_capacity(capacity, num_tokens)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    if balanced:
        needed = balanced_capacity(num_tokens, num_experts)
        if capacity < needed:
            raise ValueError(
                f"base_layer's balanced assignment gives an expert up to ceil(T / E) = {needed} "
                f"tokens, but capacity is {capacity}; use capacity >= {needed} or None."
            )
        expert = balanced_assignment(logits, real, epsilon=epsilon, max_rounds=max_rounds)
    else:
        expert = jnp.argmax(logits, axis=-1)  # [G, T]
    expert_index = jnp.maximum(expert, 0)[..., None].astype(jnp.int32)  # [G, T, 1]
    gate = jax.nn.sigmoid(jnp.take_along_axis(logits, expert_index, axis=-1))  # [G, T, 1]
    token_index, weight = route_choices(
        expert_index, gate, real[..., None], num_experts=num_experts, capacity=capacity
    )
    return Routing(token_index, weight, jax.nn.softmax(logits, axis=-1), expert_index)


@functools.partial(jax.jit, static_argnames=("num_iterations",))
def sinkhorn(
    logits: jax.Array, padding_mask: jax.Array | None = None, *, num_iterations: int
) -> jax.Array:
    """exp(logits) scaled by Sinkhorn iterations into a balanced transport plan, f32[G, T, E].

    P[g, t, e] = exp(logits[g, t, e] + a[g, t] + b[g, e]); each iteration first sets a so that
    every real token's row sums to 1, then b so that every expert's column sums to R / E
    (Sinkhorn & Knopp 1967; Megatron-LM's `sinkhorn` router does the same in the linear domain
    with rows summing to 1/T and columns to 1/E, a constant factor from this). As iterations
    grow, the rows also converge to 1: the plan becomes doubly stochastic up to that scale.
    Padding rows are 0 and take no column mass. Computed in the log domain, in float32.

    Args:
      logits: f32[G, T, E]. padding_mask: f32|bool[G, T], 0 for padding tokens.
      num_iterations: row-then-column normalisations (static, >= 1).
    """
    logits = float_logits(logits)
    num_groups, num_tokens, num_experts = logits.shape
    num_iterations = check_int("num_iterations", num_iterations, 1)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))[..., None]  # [G, T, 1]
    masked = jnp.where(real, logits, -jnp.inf)
    num_real = jnp.sum(real, axis=1, keepdims=True)  # [G, 1, 1]
    log_column_mass = jnp.log(jnp.maximum(num_real, 1) / num_experts)

    def iteration(_, scales: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        _, column = scales
        row = -jax.nn.logsumexp(masked + column, axis=-1, keepdims=True)  # [G, T, 1]
        row = jnp.where(real, row, 0.0)
        log_mass = jax.nn.logsumexp(masked + row, axis=1, keepdims=True)  # [G, 1, E]
        column = jnp.where(num_real > 0, log_column_mass - log_mass, 0.0)
        return row, column

    # carries made *_like the logits keep their per-device type inside shard_map
    start = (jnp.zeros_like(logits[..., :1]), jnp.zeros_like(logits[:, :1, :]))
    row, column = jax.lax.fori_loop(0, num_iterations, iteration, start)
    return jnp.exp(masked + row + column)  # [G, T, E]


@functools.partial(
    jax.jit,
    static_argnames=("k", "capacity", "balanced", "num_iterations", "normalize", "fill_order"),
)
def sinkhorn_top_k(
    logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    balanced: bool,
    num_iterations: int = 10,
    normalize: str = "none",
    fill_order: str = "choice",
    padding_mask: jax.Array | None = None,
) -> Routing:
    """S-BASE (Clark et al. 2022): top-k of the Sinkhorn plan in training, of the gates in eval.

    With `balanced` (training) each token picks the k experts with the largest entries of
    `sinkhorn(logits)` (no gradient flows through the plan); without it (evaluation) the k with
    the largest gates. The gates, which weight the chosen experts and carry the router's
    gradient, are sigmoid(logits) for k = 1 (BASE's gate) and softmax(logits) for k > 1, as in
    Megatron-LM's sinkhorn router; `normalize='topk'` renormalises the k chosen gates. Slot
    filling is that of `routing.tokens_choose`. S-BASE uses no balancing loss.

    Args:
      logits: f32[G, T, E]; k, capacity, normalize, fill_order, padding_mask: as in
        `routing.tokens_choose`.
      balanced: select on the Sinkhorn plan (training) or on the gates (evaluation).
      num_iterations: of `sinkhorn` (static, >= 1).
    Returns:
      Routing with probs = softmax(logits) f32[G, T, E] and expert_index i32[G, T, K].
    """
    logits = float_logits(logits)
    probs = jax.nn.softmax(logits, axis=-1)  # [G, T, E]
    gates = jax.nn.sigmoid(logits) if k == 1 else probs
    selection = gates
    if balanced:
        plan = sinkhorn(logits, padding_mask, num_iterations=num_iterations)
        selection = jax.lax.stop_gradient(plan)
    expert_index, token_index, weight = choose_top_k(
        gates,
        selection,
        k=k,
        capacity=capacity,
        batch_prioritized=False,
        normalize=normalize,
        fill_order=fill_order,
        padding_mask=padding_mask,
    )
    return Routing(token_index, weight, probs, expert_index)


@functools.partial(jax.jit, static_argnames=("k", "capacity", "normalize", "fill_order"))
def forced_balanced(
    logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    normalize: str = "none",
    fill_order: str = "choice",
    padding_mask: jax.Array | None = None,
) -> Routing:
    """A fixed balanced pattern for benchmarks: real token number r takes experts
    (r * k + j) mod E, j = 0..k-1, whatever its logits (torchtitan's round robin).

    Every expert gets floor or ceil of R * k / E choices of the group (exactly R * k / E when E
    divides it), so with C >= that no token is dropped, and a benchmark or an ahead-of-time
    compile measures the balanced cost without a trained router. The weights are the router
    probabilities softmax(logits) of the fixed experts (renormalised with `normalize='topk'`),
    so the router's cost and gradient stay in the program. Slot filling is that of
    `routing.tokens_choose` (a token's choices in ascending expert order).

    Args:
      logits: f32[G, T, E]; k (1 <= k <= E), capacity, normalize, fill_order, padding_mask:
        as in `routing.tokens_choose`.
    Returns:
      Routing with probs = softmax(logits) f32[G, T, E] and expert_index i32[G, T, K].
    """
    logits = float_logits(logits)
    num_groups, num_tokens, num_experts = logits.shape
    k = check_int("k", k, 1, num_experts)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    rank = jnp.cumsum(real, axis=1) - 1  # [G, T] number of the real token
    pattern = (rank[..., None] * k + jnp.arange(k)) % num_experts  # [G, T, K]
    # the pattern's k experts score 1, the rest 0, so the top-k selection picks exactly them
    chosen = jnp.sum(jax.nn.one_hot(pattern, num_experts), axis=-2)  # [G, T, E]
    probs = jax.nn.softmax(logits, axis=-1)  # [G, T, E]
    expert_index, token_index, weight = choose_top_k(
        probs,
        chosen,
        k=k,
        capacity=capacity,
        batch_prioritized=False,
        normalize=normalize,
        fill_order=fill_order,
        padding_mask=padding_mask,
    )
    return Routing(token_index, weight, probs, expert_index)
