"""Routers: router logits -> `Routing`, the slot view of which token sits in which expert slot.

Pure JAX (no Flax). Every router returns a `Routing`; dispatch backends consume only that.
The capacity routers place their choices into slots with `moe_jax.slots.route_choices`.
Shapes: G groups, T tokens per group, E experts, K choices per token, C capacity (slots per
expert per group). C is always a static Python int.

The public functions (except `update_expert_bias` and the small helpers) are wrapped in `jax.jit`
with their configuration (k, capacity, flags) static, so an eager call compiles once per
configuration and shape; under an outer jit they are inlined.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.group_routing import GroupLimit, check_group_limit, restrict_to_groups
from moe_jax.slots import FILL_ORDERS, route_choices


class Routing(NamedTuple):
    """Which token fills each expert slot, and with what combine weight (a JAX pytree).

    Attributes:
      token_index: i32[G, E, C] token (0..T-1) in slot c of expert e; -1 marks an empty slot.
        Slots fill in priority order: slot 0 holds the highest-priority accepted token.
      weight: f32[G, E, C] combine weight of that slot; 0.0 for an empty slot.
      probs: f32[G, T, E] router probabilities (softmax of the logits unless a router says
        otherwise), for the load-balancing losses and metrics.
      expert_index: i32[G, T, K] the K experts each token chose, before capacity drops
        (tokens-choose routers); None for expert-choice routing. A router that gives tokens a
        varying number of experts (ReLU routing, `moe_jax.relu_routing`) has K = E and marks
        the unchosen entries -1.
    """

    token_index: jax.Array
    weight: jax.Array
    probs: jax.Array
    expert_index: jax.Array | None


def expert_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    min_capacity: int = 4,
    multiple_of: int = 1,
) -> int:
    """Slots per expert per group: `max(min_capacity, round(capacity_factor * T / E))`.

    The result is then rounded up to a multiple of `multiple_of`, and is never below 1. The factor
    counts tokens, not assignments (T5X/GShard): top-2 with room for both choices uses 2.0.
    """
    num_tokens = check_int("num_tokens", num_tokens, 1)
    num_experts = check_int("num_experts", num_experts, 1)
    if not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0, got {capacity_factor!r}; use 1.0-2.0 for typical runs."
        )
    min_capacity = check_int("min_capacity", min_capacity, 0)
    multiple_of = check_int("multiple_of", multiple_of, 1)
    capacity = max(1, min_capacity, int(round(capacity_factor * num_tokens / num_experts)))
    return multiple_of * math.ceil(capacity / multiple_of)


def check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """`value` as a Python int in [low, high], or a ValueError naming `name`."""
    try:
        value = operator.index(value)
    except TypeError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}.")
    return value


_NORMALIZE = ("none", "topk")
_SECOND_POLICIES = ("random", "all", "sampling")
_SCORES = ("softmax", "sigmoid")


def float_logits(logits: jax.Array) -> jax.Array:
    """Checks that logits are f32[G, T, E] (any float dtype in) and casts them to float32."""
    logits = jnp.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(
            f"logits must be rank 3 [G, T, E], got shape {logits.shape}; "
            "group tokens first (dispatch.group_tokens) or add a group axis."
        )
    return logits.astype(jnp.float32)


def static_capacity(capacity: int | None, num_tokens: int) -> int:
    """C as a static int: `capacity`, or T (no drops) when it is None."""
    if capacity is None:
        return num_tokens
    try:
        capacity = operator.index(capacity)
    except TypeError:
        raise ValueError(
            f"capacity must be a static Python int or None, got {capacity!r}; "
            "compute it with expert_capacity(...) outside jit."
        ) from None
    if capacity < 1:
        raise ValueError(
            f"capacity must be >= 1 (or None for no drops), got {capacity}: "
            "with no slots every token would be dropped."
        )
    return capacity


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """A ValueError naming `name` and the allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def real_token_mask(padding_mask: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """bool[G, T]: True for real tokens, False for padding (mask 0); all True for None.

    Raises ValueError unless padding_mask (any dtype, nonzero = real) has shape `shape`.
    """
    if padding_mask is None:
        return jnp.ones(shape, jnp.bool_)
    padding_mask = jnp.asarray(padding_mask)
    if padding_mask.shape != shape:
        raise ValueError(
            f"padding_mask must have shape [G, T] = {shape}, got {padding_mask.shape}."
        )
    return padding_mask.astype(jnp.bool_)


def choose_top_k(
    scores: jax.Array,
    selection_scores: jax.Array,
    *,
    k: int,
    capacity: int | None,
    batch_prioritized: bool,
    normalize: str,
    fill_order: str,
    padding_mask: jax.Array | None,
    group_limit: GroupLimit | None = None,
    routed_scaling: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k by `selection_scores` f32[G, T, E] (within the token's groups of `group_limit`),
    weighted by `scores` f32[G, T, E] (normalised, then times `routed_scaling`).

    Returns (expert_index i32[G, T, K], token_index i32[G, E, C], weight f32[G, E, C]).
    """
    num_groups, num_tokens, num_experts = scores.shape
    k = check_int("k", k, 1, num_experts)
    capacity = static_capacity(capacity, num_tokens)
    check_choice("normalize", normalize, _NORMALIZE)
    check_choice("fill_order", fill_order, FILL_ORDERS)
    if group_limit is not None:
        check_group_limit(group_limit, num_experts=num_experts, k=k)
    if not routed_scaling > 0:
        raise ValueError(f"routed_scaling must be > 0, got {routed_scaling!r}; 1.0 scales nothing.")
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    selection_scores = restrict_to_groups(selection_scores, group_limit)  # [G, T, E]
    _, expert_index = jax.lax.top_k(selection_scores, k)  # [G, T, K]
    top_scores = jnp.take_along_axis(scores, expert_index, axis=-1)  # [G, T, K]
    if normalize == "topk":
        top_scores = top_scores / jnp.sum(top_scores, axis=-1, keepdims=True)
    top_scores = top_scores * routed_scaling
    keep = jnp.broadcast_to(real[..., None], expert_index.shape)  # [G, T, K]
    token_order = None
    if batch_prioritized:
        # Descending first-choice score; the stable sort breaks ties by position.
        first_choice_score = jnp.take_along_axis(selection_scores, expert_index[..., :1], -1)
        token_order = jnp.argsort(-first_choice_score[..., 0], axis=-1, stable=True)  # [G, T]
    token_index, weight = route_choices(
        expert_index,
        top_scores,
        keep,
        num_experts=num_experts,
        capacity=capacity,
        fill_order=fill_order,
        token_order=token_order,
    )
    return expert_index, token_index, weight


_TOP_K_STATIC = ("k", "capacity", "batch_prioritized", "normalize", "fill_order")
_LIMITS_STATIC = ("group_limit", "routed_scaling")


@functools.partial(jax.jit, static_argnames=_TOP_K_STATIC + _LIMITS_STATIC)
def tokens_choose(
    logits: jax.Array,
    *,
    k: int,
    capacity: int | None,
    batch_prioritized: bool = False,
    normalize: str = "none",
    fill_order: str = "choice",
    padding_mask: jax.Array | None = None,
    group_limit: GroupLimit | None = None,
    routed_scaling: float = 1.0,
) -> Routing:
    """Each token picks its top-k experts by router probability (Switch k=1, ST-MoE k=2).

    Slots fill in priority order. With fill_order 'choice' (GShard, T5X) every first choice in
    the group goes before any second choice, within one choice by token position, or with
    `batch_prioritized` by descending top-1 probability (ties by position; Riquelme et al. 2021,
    ST-MoE). With 'token' each token places its k choices together, tokens in that same order:
    in position order this is causal (a token's slots never depend on later tokens), which
    'choice' is not for k >= 2. A choice that finds its expert full is dropped. Padding tokens
    take no slot and use no capacity. For k = 1 the two orders are the same.

    Args:
      logits: f32[G, T, E] router logits (any float dtype; routed in float32).
      k: experts per token, 1 <= k <= E.
      capacity: C, slots per expert per group (static int >= 1); None means C = T, no drops.
      batch_prioritized: rank tokens within a choice by top-1 probability.
      normalize: 'none' weights by the raw probability (T5X); 'topk' renormalises the top-k
        probabilities to sum to 1 (Mixtral/GShard), before drops.
      fill_order: 'choice' | 'token', see above.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
      group_limit: pick the k experts within each token's best expert groups
        (`moe_jax.group_routing`; DeepSeek-V2's group_limited_greedy with group score 'max');
        None: among all experts.
      routed_scaling: > 0, multiplies every combine weight after `normalize` (DeepSeek's
        routed_scaling_factor).
    Returns:
      Routing with probs = softmax(logits) f32[G, T, E] (padding included) and
      expert_index i32[G, T, K].
    """
    logits = float_logits(logits)
    probs = jax.nn.softmax(logits, axis=-1)  # [G, T, E]
    expert_index, token_index, weight = choose_top_k(
        probs,
        probs,
        k=k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
        normalize=normalize,
        fill_order=fill_order,
        padding_mask=padding_mask,
        group_limit=group_limit,
        routed_scaling=routed_scaling,
    )
    return Routing(token_index, weight, probs, expert_index)


def gshard_top2(
    logits: jax.Array,
    *,
    capacity: int | None,
    rng: jax.Array | None,
    second_policy: str = "random",
    threshold: float = 0.5,
    fill_order: str = "choice",
    padding_mask: jax.Array | None = None,
) -> Routing:
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1).

    The top-1 and second gates are renormalised, g / (g1 + g2). As in the paper, all first
    choices take slots before any second choice, each in position order (fill_order 'choice');
    fill_order 'token' places each token's two choices together, token by token in position
    order, which is causal (see `tokens_choose`). Second-choice policies:
    'random' keeps it iff u < g2 / threshold, u ~ U[0, 1), decided before it takes a slot
    (threshold 0.5 is the paper's 2 * g2 > u); 'all' keeps every second choice; 'sampling' draws
    the second expert from the router distribution without the first and keeps it.

    Args:
      logits: f32[G, T, E] router logits, E >= 2.
      capacity: C (static int >= 1), or None for C = T.
      rng: PRNG key; required by 'random' and 'sampling', unused by 'all'.
      second_policy: 'random' | 'all' | 'sampling'.
      threshold: > 0, see 'random'; a Python number or a traced scalar (not static, so
        changing it does not recompile).
      fill_order: 'choice' | 'token'.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      Routing with expert_index i32[G, T, 2] holding both choices before any drop.
    """
    check_choice("second_policy", second_policy, _SECOND_POLICIES)
    check_choice("fill_order", fill_order, FILL_ORDERS)
    if isinstance(threshold, (int, float)) and not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold!r}; the paper uses 0.5.")
    if rng is None and second_policy != "all":
        raise ValueError(f"rng must be a PRNG key for second_policy={second_policy!r}, got None.")
    return _gshard_top2(
        logits,
        rng,
        threshold,
        padding_mask,
        capacity=capacity,
        second_policy=second_policy,
        fill_order=fill_order,
    )


@functools.partial(jax.jit, static_argnames=("capacity", "second_policy", "fill_order"))
def _gshard_top2(
    logits: jax.Array,
    rng: jax.Array | None,
    threshold: jax.Array,
    padding_mask: jax.Array | None,
    *,
    capacity: int | None,
    second_policy: str,
    fill_order: str,
) -> Routing:
    """`gshard_top2` after its argument checks; see there."""
    logits = float_logits(logits)
    num_groups, num_tokens, num_experts = logits.shape
    if num_experts < 2:
        raise ValueError(
            f"gshard_top2 needs at least 2 experts (logits' last axis), got {num_experts}."
        )
    capacity = static_capacity(capacity, num_tokens)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    probs = jax.nn.softmax(logits, axis=-1)  # [G, T, E]
    _, expert_index = jax.lax.top_k(probs, 2)  # [G, T, 2]
    if second_policy == "sampling":
        first = jax.nn.one_hot(expert_index[..., 0], num_experts, dtype=jnp.bool_)  # [G, T, E]
        second = jax.random.categorical(rng, jnp.where(first, -jnp.inf, logits), axis=-1)  # [G, T]
        expert_index = jnp.stack([expert_index[..., 0], second.astype(jnp.int32)], axis=-1)
    gates = jnp.take_along_axis(probs, expert_index, axis=-1)  # [G, T, 2]
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    keep_second = real
    if second_policy == "random":
        uniform = jax.random.uniform(rng, (num_groups, num_tokens))  # [G, T]
        keep_second = real & (uniform < gates[..., 1] / threshold)
    keep = jnp.stack([real, keep_second], axis=-1)  # [G, T, 2]
    token_index, weight = route_choices(
        expert_index,
        gates,
        keep,
        num_experts=num_experts,
        capacity=capacity,
        fill_order=fill_order,
    )
    return Routing(token_index, weight, probs, expert_index)


@functools.partial(jax.jit, static_argnames=("capacity",))
def experts_choose(
    logits: jax.Array, *, capacity: int | None, padding_mask: jax.Array | None = None
) -> Routing:
    """Expert Choice (Zhou et al. 2022): each expert takes its top-C tokens of the group.

    probs = softmax over experts; slot c of expert e holds the token with the (c+1)-th highest
    probs[:, e] (ties by position), with weight = that probability. A token may sit in several
    experts or in none. Padding tokens are never chosen; when fewer than C real tokens exist the
    remaining slots stay empty. Encoder-only: experts see the whole group, future tokens too.

    Args:
      logits: f32[G, T, E] router logits.
      capacity: C, 1 <= C <= T (Zhou et al. use C = T * capacity_factor / E); None means C = T.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      Routing with expert_index None.
    """
    logits = float_logits(logits)
    num_groups, num_tokens, _ = logits.shape
    capacity = static_capacity(capacity, num_tokens)
    if capacity > num_tokens:
        raise ValueError(
            f"capacity must be <= tokens per group ({num_tokens}) for experts_choose, "
            f"got {capacity}; lower the capacity factor."
        )
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    probs = jax.nn.softmax(logits, axis=-1)  # [G, T, E]
    # Probabilities are >= 0, so -1 ranks every padding token below every real one.
    scores = jnp.where(real[..., None], probs, -1.0)
    top_scores, token_index = jax.lax.top_k(jnp.swapaxes(scores, 1, 2), capacity)  # [G, E, C]
    chosen_real = top_scores >= 0.0
    token_index = jnp.where(chosen_real, token_index, -1)
    weight = jnp.where(chosen_real, top_scores, 0.0)
    return Routing(token_index, weight, probs, None)


@functools.partial(jax.jit, static_argnames=("num_experts",))
def hash_expert(token_ids: jax.Array, num_experts: int) -> jax.Array:
    """The fixed hash of Hash Layers (Roller et al. 2021): i32[...] token ids -> i32[...] experts.

    h = (id * 0x9E3779B1) mod 2**32 (Knuth's multiplicative hash, golden-ratio constant), then
    h ^= h >> 16 to fold the well-mixed high bits into the low ones, and expert = h mod E.
    Consecutive ids therefore do not land on consecutive experts, unlike id mod E.
    """
    num_experts = check_int("num_experts", num_experts, 1)
    hashed = jnp.asarray(token_ids).astype(jnp.uint32) * jnp.uint32(0x9E3779B1)
    hashed = hashed ^ (hashed >> 16)
    return (hashed % jnp.uint32(num_experts)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_experts", "capacity"))
def hash_routing(
    token_ids: jax.Array,
    *,
    num_experts: int,
    capacity: int | None,
    padding_mask: jax.Array | None = None,
) -> Routing:
    """Hash routing: token id -> `hash_expert(id)`, weight 1.0, no parameters (Roller et al.).

    Args:
      token_ids: i32[G, T] vocabulary ids (non-negative).
      num_experts: E >= 1.
      capacity: C (static int >= 1), or None for C = T. Slots fill in position order.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      Routing with probs one-hot f32[G, T, E] and expert_index i32[G, T, 1].
    """
    token_ids = jnp.asarray(token_ids)
    if token_ids.ndim != 2 or not jnp.issubdtype(token_ids.dtype, jnp.integer):
        raise ValueError(
            "token_ids must be an integer array [G, T], "
            f"got {token_ids.dtype}{list(token_ids.shape)}."
        )
    num_experts = check_int("num_experts", num_experts, 1)
    num_groups, num_tokens = token_ids.shape
    capacity = static_capacity(capacity, num_tokens)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    expert_index = hash_expert(token_ids, num_experts)[..., None]  # [G, T, 1]
    probs = jax.nn.one_hot(expert_index[..., 0], num_experts, dtype=jnp.float32)  # [G, T, E]
    token_index, weight = route_choices(
        expert_index,
        jnp.ones(expert_index.shape, jnp.float32),
        real[..., None],
        num_experts=num_experts,
        capacity=capacity,
    )
    return Routing(token_index, weight, probs, expert_index)


@jax.jit
def noisy_logits(
    x: jax.Array, w_gate: jax.Array, w_noise: jax.Array, rng: jax.Array | None
) -> jax.Array:
    """Noisy top-k gating logits (Shazeer et al. 2017, eq. 4): x W_g + N(0,1) softplus(x W_n).

    Route them with `tokens_choose` for noisy top-k gating. With rng None (evaluation) it returns
    the clean logits x W_g.

    Args:
      x: f32[..., M] router inputs (cast to float32). w_gate, w_noise: f32[M, E].
      rng: PRNG key for the standard normal noise, or None.
    Returns:
      f32[..., E] logits.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    w_gate = jnp.asarray(w_gate).astype(jnp.float32)
    w_noise = jnp.asarray(w_noise).astype(jnp.float32)
    if w_gate.ndim != 2 or w_gate.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w_gate must be [M, E] with M = x.shape[-1] = {x.shape[-1]}, got {w_gate.shape}."
        )
    if w_noise.shape != w_gate.shape:
        raise ValueError(f"w_noise must match w_gate's shape {w_gate.shape}, got {w_noise.shape}.")
    highest = jax.lax.Precision.HIGHEST
    clean = jnp.einsum("...m,me->...e", x, w_gate, precision=highest)  # [..., E]
    if rng is None:
        return clean
    noise_scale = jax.nn.softplus(jnp.einsum("...m,me->...e", x, w_noise, precision=highest))
    return clean + jax.random.normal(rng, clean.shape) * noise_scale


@functools.partial(jax.jit, static_argnames=(*_TOP_K_STATIC, "score", *_LIMITS_STATIC))
def biased_top_k(
    logits: jax.Array,
    bias: jax.Array,
    *,
    k: int,
    capacity: int | None,
    score: str = "sigmoid",
    normalize: str = "topk",
    batch_prioritized: bool = False,
    fill_order: str = "choice",
    padding_mask: jax.Array | None = None,
    group_limit: GroupLimit | None = None,
    routed_scaling: float = 1.0,
) -> Routing:
    """Aux-loss-free balancing (DeepSeek-V3, Sec. 2.1.2): select by score + bias, weight by score.

    Scores are sigmoid(logits) (DeepSeek-V3) or softmax(logits). Each token picks the k experts
    with the highest score + bias; the bias only decides which experts are picked (so no gradient
    reaches it) and each pick's weight is the unbiased score, renormalised over the k picks with
    normalize='topk' (DeepSeek-V3) or raw with 'none', then times `routed_scaling`. With a
    `group_limit` (DeepSeek-V3: group score 'top2_sum') the picks lie in each token's best
    expert groups, the groups scored by the biased scores. Slot filling is that of
    `tokens_choose`.

    Args:
      logits: f32[G, T, E]; bias: f32[E], updated by `update_expert_bias` outside the gradient.
      k, capacity, normalize, batch_prioritized, fill_order, padding_mask, group_limit,
        routed_scaling: as in `tokens_choose`.
      score: 'sigmoid' | 'softmax'.
    Returns:
      Routing with probs = scores renormalised to sum to 1 over experts f32[G, T, E] (for the
      losses and metrics) and expert_index i32[G, T, K] the biased selection.
    """
    logits = float_logits(logits)
    bias = jnp.asarray(bias).astype(jnp.float32)
    if bias.shape != logits.shape[-1:]:
        raise ValueError(f"bias must be f32[E] = [{logits.shape[-1]}], got shape {bias.shape}.")
    check_choice("score", score, _SCORES)
    scores = jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits, axis=-1)
    expert_index, token_index, weight = choose_top_k(
        scores,
        scores + bias,
        k=k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
        normalize=normalize,
        fill_order=fill_order,
        padding_mask=padding_mask,
        group_limit=group_limit,
        routed_scaling=routed_scaling,
    )
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)  # [G, T, E]
    return Routing(token_index, weight, probs, expert_index)


@jax.jit
def expert_assignments(routing: Routing, padding_mask: jax.Array | None = None) -> jax.Array:
    """f32[E] count of tokens per expert: choices before capacity (tokens-choose routers), or
    filled slots when `expert_index` is None. Padding tokens (mask 0) are not counted."""
    num_groups, num_tokens, num_experts = routing.probs.shape
    if routing.expert_index is None:
        return jnp.sum(routing.token_index >= 0, axis=(0, 2)).astype(jnp.float32)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    chosen = jax.nn.one_hot(routing.expert_index, num_experts, dtype=jnp.float32)  # [G, T, K, E]
    return jnp.einsum("gtke,gt->e", chosen, real.astype(jnp.float32))


def update_expert_bias(
    bias: jax.Array,
    load: jax.Array | Routing,
    *,
    rate: float = 1e-3,
    padding_mask: jax.Array | None = None,
) -> jax.Array:
    """One DeepSeek-V3 bias step: b_e -= rate if expert e is overloaded, += rate if underloaded.

    Over/under is relative to the mean load over experts; an expert exactly at the mean keeps
    its bias. DeepSeek-V3 uses rate 0.001 (`gamma`) and updates after every training step.

    Args:
      bias: f32[E]. load: f32[E] tokens (or fractions) per expert, or a Routing whose
        `expert_assignments` are counted (padding excluded with padding_mask f32|bool[G, T]).
      rate: step size, >= 0 (a Python number, or a traced scalar for a schedule).
    Returns:
      f32[E] new bias.
    """
    if isinstance(rate, (int, float)) and not rate >= 0:
        raise ValueError(f"rate must be >= 0, got {rate!r}; DeepSeek-V3 uses 0.001.")
    if isinstance(load, Routing):
        load = expert_assignments(load, padding_mask)
    return _bias_step(bias, load, rate)


@jax.jit
def _bias_step(bias: jax.Array, load: jax.Array, rate: jax.Array) -> jax.Array:
    """f32[E] bias + rate * sign(mean(load) - load), the sign taken of sum(load) - E * load.

    That form is exact for token counts, so an expert exactly at the mean keeps its bias
    whatever rounding the backend gives the mean's division.
    """
    bias = jnp.asarray(bias).astype(jnp.float32)
    load = jnp.asarray(load).astype(jnp.float32)
    if bias.ndim != 1 or load.shape != bias.shape:
        raise ValueError(
            f"bias and load must both be f32[E], got bias {bias.shape} and load {load.shape}."
        )
    return bias + rate * jnp.sign(jnp.sum(load) - load.shape[0] * load)


def slots_per_token(routing: Routing) -> jax.Array:
    """i32[G, T]: how many slots each token fills."""
    num_groups, num_tokens, _ = routing.probs.shape
    # Empty slots (-1) scatter to the out-of-range row T, which the scatter drops.
    index = jnp.where(routing.token_index >= 0, routing.token_index, num_tokens)  # [G, E, C]
    index = index.reshape(num_groups, -1)  # [G, E*C]
    count = lambda i: jnp.zeros(num_tokens, jnp.int32).at[i].add(1, mode="drop")
    return jax.vmap(count)(index)  # [G, T]


@functools.partial(jax.jit, static_argnames=("num_tokens",))
def to_masks(routing: Routing, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Dense dispatch and combine tensors (GShard Algorithm 2) from the slot view.

    Returns:
      dispatch: bool[G, T, E, C], True where token t fills slot c of expert e.
      combine: f32[G, T, E, C], the slot's combine weight there, 0.0 elsewhere.
    """
    # one_hot of the empty marker -1 is all zeros, so empty slots dispatch nothing.
    dispatch = jax.nn.one_hot(routing.token_index, num_tokens, dtype=jnp.bool_)  # [G, E, C, T]
    dispatch = jnp.transpose(dispatch, (0, 3, 1, 2))  # [G, T, E, C]
    combine = jnp.where(dispatch, routing.weight[:, None, :, :], 0.0)  # [G, T, E, C]
    return dispatch, combine


@jax.jit
def router_metrics(routing: Routing, padding_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """Scalar routing diagnostics (f32) and the per-expert load f32[E]; padding tokens excluded.

    - fraction_tokens_dropped: real tokens that fill no slot, over real tokens.
    - fraction_assignments_dropped: tokens-choose routers: the requested assignments (K per
      real token, or its entries >= 0 for ReLU routing) that got no slot (capacity drops, and
      GShard's skipped second choices); expert choice (expert_index None): the E * C slots
      offered that stayed empty.
    - router_confidence: mean over real tokens of the top-1 router probability max_e probs.
    - expert_usage: fraction of experts that fill at least one slot.
    - expert_load: f32[E] filled slots per expert over all filled slots (sums to 1; zeros if
      nothing was routed).
    """
    num_groups, num_tokens, num_experts = routing.probs.shape
    real = real_token_mask(padding_mask, (num_groups, num_tokens)).astype(jnp.float32)
    num_real = jnp.sum(real)
    slots = slots_per_token(routing).astype(jnp.float32)  # [G, T]
    if routing.expert_index is None:
        requested = jnp.float32(routing.token_index.size)
        placed = jnp.sum(routing.token_index >= 0).astype(jnp.float32)
    else:
        chosen = jnp.sum(routing.expert_index >= 0, axis=-1)  # [G, T]
        requested = jnp.sum(chosen * real)
        placed = jnp.sum(slots * real)
    filled_per_expert = jnp.sum(routing.token_index >= 0, axis=(0, 2)).astype(jnp.float32)  # [E]
    return {
        "fraction_tokens_dropped": jnp.sum(real * (slots == 0)) / jnp.maximum(num_real, 1.0),
        "fraction_assignments_dropped": (requested - placed) / jnp.maximum(requested, 1.0),
        "router_confidence": jnp.sum(jnp.max(routing.probs, axis=-1) * real)
        / jnp.maximum(num_real, 1.0),
        "expert_usage": jnp.mean(filled_per_expert > 0),
        "expert_load": filled_per_expert / jnp.maximum(jnp.sum(filled_per_expert), 1.0),
    }
