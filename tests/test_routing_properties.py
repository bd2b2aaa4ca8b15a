"""Hypothesis property tests: routers against a loop-based NumPy reference, plus slot invariants.

Each test draws its static configuration (shape, k, capacity, flags) from a short list, so the
(jitted) router compiles once per configuration and every example after that reuses it; the
variety comes from the random logits (sometimes rounded to integers, which makes ties), the
random padding and the several groups routed independently in one call.
"""

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax import routing

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)

# (G, T, E) shapes; capacities below include 1, C < T, C > T and None (C = T).
WIDE, NARROW = (3, 8, 4), (2, 5, 3)
# (shape, k, capacity, batch_prioritized, normalize)
TOKENS_CHOOSE_CONFIGS = [
    (WIDE, 1, 2, False, "none"),
    (WIDE, 2, 3, True, "topk"),
    (WIDE, 4, None, False, "none"),
    (NARROW, 2, 1, False, "topk"),
    (NARROW, 1, 7, True, "none"),
    (NARROW, 3, 2, True, "none"),
]


def softmax(logits):
    """Float64 softmax over the last axis."""
    shifted = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def reference_fill(expert_index, weights, keep, num_experts, capacity, token_order):
    """Loop oracle: for each group, choice by choice, tokens in `token_order`, first come first
    served until an expert holds `capacity` tokens."""
    num_groups, _, k = expert_index.shape
    token_index = -np.ones((num_groups, num_experts, capacity), np.int32)
    slot_weight = np.zeros((num_groups, num_experts, capacity), np.float32)
    for g in range(num_groups):
        filled = [0] * num_experts
        for choice in range(k):
            for t in token_order[g]:
                e = expert_index[g, t, choice]
                if keep[g, t, choice] and filled[e] < capacity:
                    token_index[g, e, filled[e]] = t
                    slot_weight[g, e, filled[e]] = weights[g, t, choice]
                    filled[e] += 1
    return token_index, slot_weight


def reference_top_k(scores, selection_scores, k, capacity, batch_prioritized, normalize, real):
    """NumPy top-k routing with the tokens_choose priority rules."""
    num_groups, num_tokens, num_experts = scores.shape
    # Stable descending sort: ties go to the lower expert index, like lax.top_k.
    expert_index = np.argsort(-selection_scores, axis=-1, kind="stable")[..., :k]
    weights = np.take_along_axis(scores, expert_index, axis=-1)
    if normalize == "topk":
        weights = weights / weights.sum(-1, keepdims=True)
    if batch_prioritized:
        first = np.take_along_axis(selection_scores, expert_index[..., :1], -1)[..., 0]
        token_order = np.argsort(-first, axis=-1, kind="stable")
    else:
        token_order = np.tile(np.arange(num_tokens), (num_groups, 1))
    keep = np.broadcast_to(real[..., None], expert_index.shape)
    capacity = num_tokens if capacity is None else capacity
    token_index, slot_weight = reference_fill(
        expert_index, weights, keep, num_experts, capacity, token_order
    )
    return expert_index, token_index, slot_weight


def check_slot_invariants(result, k, capacity, real, every_choice_wanted=True):
    """Invariants every tokens-choose Routing must satisfy. `every_choice_wanted` is False when
    a router may skip a choice without capacity (GShard's random second choice)."""
    token_index = np.asarray(result.token_index)
    weight = np.asarray(result.weight)
    expert_index = np.asarray(result.expert_index)
    num_groups, num_experts, num_slots = token_index.shape
    num_tokens = real.shape[1]
    assert num_slots == (num_tokens if capacity is None else capacity)
    assert np.all((token_index >= -1) & (token_index < num_tokens))
    assert np.all(weight[token_index < 0] == 0.0)
    for g in range(num_groups):
        slots_of_token = np.zeros(num_tokens, int)
        for e in range(num_experts):
            held = token_index[g, e]
            filled = held[held >= 0]
            # Filled slots form a prefix, and no token sits twice in one expert.
            assert np.all(held[: len(filled)] >= 0) and np.all(held[len(filled) :] == -1)
            assert len(set(filled.tolist())) == len(filled)
            assert np.all(real[g, filled])  # padding never takes a slot
            slots_of_token[filled] += 1
            # Choice rank of each held token for this expert never decreases along the slots:
            # every first choice outranks every second choice.
            rank = [int(np.where(expert_index[g, t] == e)[0][0]) for t in filled]
            assert rank == sorted(rank)
            # A choice of rank r dropped at e means e was full: no later rank got in.
            dropped_ranks = [
                int(np.where(expert_index[g, t] == e)[0][0])
                for t in range(num_tokens)
                if real[g, t] and e in expert_index[g, t] and t not in filled
            ]
            if dropped_ranks and every_choice_wanted:
                assert len(filled) == num_slots
                assert max(rank, default=-1) <= min(dropped_ranks)
        assert np.all(slots_of_token <= k)
        if capacity is None and every_choice_wanted:
            assert np.all(slots_of_token[real[g]] == k)


@st.composite
def random_inputs(draw, shape, allow_ties=True):
    """Logits f32[G, T, E] (rounded to integers half the time, making ties) and bool[G, T]
    real-token mask (all real, or about 20% padding)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    logits = 2.0 * rng.normal(size=shape)
    if allow_ties and draw(st.booleans()):
        logits = np.round(logits)
    real = np.ones(shape[:2], bool)
    if draw(st.booleans()):
        real = rng.random(shape[:2]) < 0.8
    return logits.astype(np.float32), real


@st.composite
def tokens_choose_problems(draw, configs=TOKENS_CHOOSE_CONFIGS):
    shape, *options = draw(st.sampled_from(configs))
    return (*draw(random_inputs(shape)), *options)


@PROPERTY_SETTINGS
@given(problem=tokens_choose_problems())
def test_tokens_choose_matches_reference(problem):
    logits, real, k, capacity, batch_prioritized, normalize = problem
    result = routing.tokens_choose(
        logits,
        k=k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
        normalize=normalize,
        padding_mask=real,
    )
    check_slot_invariants(result, k, capacity, real)
    probs = np.asarray(result.probs)
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-5)
    expert_index, token_index, weight = reference_top_k(
        probs, probs, k, capacity, batch_prioritized, normalize, real
    )
    np.testing.assert_array_equal(result.expert_index, expert_index)
    np.testing.assert_array_equal(result.token_index, token_index)
    np.testing.assert_allclose(result.weight, weight, rtol=1e-6)


@PROPERTY_SETTINGS
@given(
    config=st.sampled_from([(WIDE, 3, "all"), (WIDE, 2, "random"), (NARROW, None, "sampling")]),
    data=st.data(),
)
def test_gshard_top2_properties(config, data):
    shape, capacity, policy = config
    logits, real = data.draw(random_inputs(shape))
    result = routing.gshard_top2(
        logits, capacity=capacity, rng=jax.random.key(7), second_policy=policy, padding_mask=real
    )
    check_slot_invariants(result, 2, capacity, real, every_choice_wanted=policy != "random")
    expert_index = np.asarray(result.expert_index)
    assert np.all(expert_index[..., 0] != expert_index[..., 1])
    probs = np.asarray(result.probs)
    gates = np.take_along_axis(probs, expert_index, axis=-1)
    gates = gates / gates.sum(-1, keepdims=True)
    order = np.tile(np.arange(shape[1]), (shape[0], 1))
    num_slots = shape[1] if capacity is None else capacity
    if policy == "all":
        # Every second choice is wanted: exactly the loop oracle on both choices.
        keep = np.broadcast_to(real[..., None], expert_index.shape)
        token_index, weight = reference_fill(expert_index, gates, keep, shape[2], num_slots, order)
        np.testing.assert_array_equal(result.token_index, token_index)
        np.testing.assert_allclose(result.weight, weight, rtol=1e-6)
    # First choices fill first, so they sit exactly where the oracle on first choices alone puts
    # them, whatever the policy does with the seconds; any later slot holds a second choice.
    first_only, first_weight = reference_fill(
        expert_index[..., :1], gates[..., :1], real[..., None], shape[2], num_slots, order
    )
    is_first_slot = np.arange(num_slots) < np.sum(first_only >= 0, axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.where(is_first_slot, result.token_index, -1), first_only)
    np.testing.assert_allclose(np.where(is_first_slot, result.weight, 0.0), first_weight, rtol=1e-6)


@PROPERTY_SETTINGS
@given(config=st.sampled_from([(WIDE, 1), (WIDE, 8), (NARROW, 3)]), data=st.data())
def test_experts_choose_matches_reference(config, data):
    shape, capacity = config
    logits, real = data.draw(random_inputs(shape))
    result = routing.experts_choose(logits, capacity=capacity, padding_mask=real)
    probs = np.asarray(result.probs)
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-5)
    for g in range(shape[0]):
        real_tokens = np.flatnonzero(real[g])
        for e in range(shape[2]):
            # Real tokens by descending probability (stable: ties by position).
            ranked = real_tokens[np.argsort(-probs[g, real_tokens, e], kind="stable")][:capacity]
            expected = np.full(capacity, -1)
            expected[: len(ranked)] = ranked
            np.testing.assert_array_equal(result.token_index[g, e], expected)
            expected_weight = np.zeros(capacity, np.float32)
            expected_weight[: len(ranked)] = probs[g, ranked, e]
            np.testing.assert_allclose(result.weight[g, e], expected_weight, rtol=1e-6)
        if len(real_tokens) >= capacity:  # Expert Choice fills every slot
            assert np.all(np.asarray(result.token_index[g]) >= 0)
    assert np.all(np.diff(np.asarray(result.weight), axis=-1) <= 0)  # descending slots


@PROPERTY_SETTINGS
@given(
    config=st.sampled_from([(WIDE, 2, 3, "sigmoid", "topk"), (NARROW, 1, None, "softmax", "none")]),
    bias_seed=st.integers(0, 99),
    data=st.data(),
)
def test_biased_top_k_matches_reference(config, bias_seed, data):
    shape, k, capacity, score, normalize = config
    # Continuous logits: the NumPy scores below may differ from XLA's in the last bit, which
    # would only matter at an exact tie.
    logits, real = data.draw(random_inputs(shape, allow_ties=False))
    bias = np.random.default_rng(bias_seed).normal(size=shape[2]).astype(np.float32) * 0.3
    result = routing.biased_top_k(
        logits, bias, k=k, capacity=capacity, score=score, normalize=normalize, padding_mask=real
    )
    check_slot_invariants(result, k, capacity, real)
    if score == "sigmoid":
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    else:
        scores = softmax(logits)
    expert_index, token_index, weight = reference_top_k(
        scores, scores + bias, k, capacity, False, normalize, real
    )
    np.testing.assert_array_equal(result.expert_index, expert_index)
    np.testing.assert_array_equal(result.token_index, token_index)
    np.testing.assert_allclose(result.weight, weight, rtol=1e-5)
    np.testing.assert_allclose(result.probs, scores / scores.sum(-1, keepdims=True), rtol=1e-5)


@PROPERTY_SETTINGS
@given(config=st.sampled_from([(WIDE, 2), (NARROW, None)]), data=st.data())
def test_hash_routing_matches_reference(config, data):
    (num_groups, num_tokens, num_experts), capacity = config
    _, real = data.draw(random_inputs((num_groups, num_tokens, num_experts)))
    token_ids = data.draw(
        st.lists(st.integers(0, 2**31 - 1), min_size=num_groups * num_tokens, unique=True)
    )
    token_ids = np.array(token_ids[: num_groups * num_tokens]).reshape(num_groups, num_tokens)
    result = routing.hash_routing(
        token_ids, num_experts=num_experts, capacity=capacity, padding_mask=real
    )
    check_slot_invariants(result, 1, capacity, real)

    def python_hash(token_id):
        hashed = (int(token_id) * 0x9E3779B1) % 2**32
        return (hashed ^ (hashed >> 16)) % num_experts

    expert_index = np.vectorize(python_hash)(token_ids)[..., None]
    np.testing.assert_array_equal(result.expert_index, expert_index)
    token_index, weight = reference_fill(
        expert_index,
        np.ones(expert_index.shape, np.float32),
        real[..., None],
        num_experts,
        num_tokens if capacity is None else capacity,
        np.tile(np.arange(num_tokens), (num_groups, 1)),
    )
    np.testing.assert_array_equal(result.token_index, token_index)
    np.testing.assert_array_equal(result.weight, weight)


@PROPERTY_SETTINGS
@given(problem=tokens_choose_problems(TOKENS_CHOOSE_CONFIGS[:4]))
def test_router_metrics_properties(problem):
    logits, real, k, capacity, batch_prioritized, normalize = problem
    result = routing.tokens_choose(
        logits,
        k=k,
        capacity=capacity,
        batch_prioritized=batch_prioritized,
        normalize=normalize,
        padding_mask=real,
    )
    metrics = routing.router_metrics(result, real)
    token_index = np.asarray(result.token_index)
    filled = token_index >= 0
    load = np.asarray(metrics["expert_load"])
    np.testing.assert_allclose(load.sum(), 1.0 if filled.any() else 0.0, rtol=1e-6)
    np.testing.assert_allclose(load * filled.sum(), filled.sum(axis=(0, 2)), rtol=1e-5)
    # Assignments: K per real token, of which `filled` got a slot.
    requested = k * real.sum()
    expected = (requested - filled.sum()) / max(requested, 1)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], expected, atol=1e-6)
    placed_tokens = [set(token_index[g][filled[g]].tolist()) for g in range(real.shape[0])]
    dropped = sum(real[g, t] and t not in placed_tokens[g] for g, t in np.ndindex(real.shape))
    expected = dropped / max(real.sum(), 1)
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], expected, atol=1e-6)
    np.testing.assert_allclose(metrics["expert_usage"], np.mean(filled.any(axis=(0, 2))))
    top1 = np.asarray(result.probs).max(-1)
    expected = (top1 * real).sum() / max(real.sum(), 1)
    np.testing.assert_allclose(metrics["router_confidence"], expected, rtol=1e-5)


def test_hash_expert_is_exact_for_large_ids():
    # 2**31 - 1: (2**31 - 1) * 0x9E3779B1 mod 2**32 must wrap, not overflow to a float.
    token_id = 2**31 - 1
    hashed = (token_id * 0x9E3779B1) % 2**32
    expected = (hashed ^ (hashed >> 16)) % 1000
    assert int(routing.hash_expert(np.array([token_id], np.int32), 1000)[0]) == expected
