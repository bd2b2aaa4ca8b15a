"""BASE layers, Sinkhorn (S-BASE) and forced balanced routing against hand-computed cases, a
brute-force optimum, the closed form of a 2 x 2 Sinkhorn limit, and their gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import balanced_routing, routing

# G=1, T=4, E=2. Every token's top-1 is e0. Moving token t to e1 costs s[t, 0] - s[t, 1] =
# (4, 4, 1, 1), so the balanced optimum (two tokens each) moves t2 and t3: total 5 + 4 + 2 + 0
# = 11; every other balanced assignment totals at most 8.
SCORES_4X2 = np.array([[[5.0, 1.0], [4.0, 0.0], [3.0, 2.0], [1.0, 0.0]]], np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def test_balanced_quota_splits_the_real_tokens():
    # R = 7 real tokens over E = 3: 7 // 3 = 2 each, and the first 7 % 3 = 1 expert one more;
    # a group of 6 real tokens: 2 each
    real = np.arange(8)[None, :] < np.array([[7], [6]])
    quota = balanced_routing.balanced_quota(jnp.asarray(real), 3)
    np.testing.assert_array_equal(quota, [[3, 2, 2], [2, 2, 2]])


def test_balanced_assignment_literal_optimum():
    assignment = balanced_routing.balanced_assignment(SCORES_4X2)
    np.testing.assert_array_equal(assignment, [[0, 0, 1, 1]])


def test_balanced_assignment_is_exact_with_padding_and_uneven_counts():
    # two groups of T = 9: all 9 real (3 per expert) and 7 real (3, 2, 2); padding gets -1
    scores = jax.random.normal(jax.random.key(0), (2, 9, 3)) * 3.0
    mask = np.arange(9)[None, :] < np.array([[9], [7]])
    assignment = np.asarray(balanced_routing.balanced_assignment(scores, mask))
    assert np.all(assignment[1, 7:] == -1) and np.all(assignment[mask] >= 0)
    np.testing.assert_array_equal(np.bincount(assignment[0], minlength=3), [3, 3, 3])
    np.testing.assert_array_equal(np.bincount(assignment[1][mask[1]], minlength=3), [3, 2, 2])


def test_balanced_assignment_finds_the_brute_force_optimum_on_integer_scores():
    """Bertsekas: with integer scores and epsilon < 1 / R the auction's assignment is optimal.
    Oracle: the best of all 90 balanced assignments of T = 6 tokens to E = 3 experts (2 each),
    for five groups of random integer scores at once."""
    scores = np.random.default_rng(3).integers(0, 10, size=(5, 6, 3)).astype(np.float32)
    assignment = np.asarray(
        balanced_routing.balanced_assignment(scores, epsilon=0.1, max_rounds=1000)
    )
    patterns = set(itertools.permutations([0, 0, 1, 1, 2, 2]))
    for group, chosen in zip(scores, assignment):
        np.testing.assert_array_equal(np.bincount(chosen, minlength=3), [2, 2, 2])
        best = max(group[np.arange(6), list(p)].sum() for p in patterns)
        assert group[np.arange(6), chosen].sum() == best


def test_balanced_assignment_stays_exact_when_the_rounds_run_out():
    # no bidding round at all: every token is left over and the free places fill in expert
    # order (t0, t1 -> e0; t2, t3 -> e1), whatever the scores prefer
    preferring_e1 = SCORES_4X2[..., ::-1]
    assignment = balanced_routing.balanced_assignment(preferring_e1, max_rounds=0)
    np.testing.assert_array_equal(assignment, [[0, 0, 1, 1]])


def test_base_layer_training_slots_and_sigmoid_gates():
    # balanced: e0 holds t0, t1 with sigmoid(5), sigmoid(4); e1 holds t2, t3 with sigmoid(2),
    # sigmoid(0) = 0.5 (the gates are of the assigned expert's logit)
    route = balanced_routing.base_layer(SCORES_4X2, capacity=2, balanced=True)
    np.testing.assert_array_equal(route.token_index, [[[0, 1], [2, 3]]])
    np.testing.assert_allclose(route.weight, _sigmoid([[[5.0, 4.0], [2.0, 0.0]]]), rtol=1e-6)
    np.testing.assert_array_equal(route.expert_index[..., 0], [[0, 0, 1, 1]])


def test_base_layer_evaluation_is_greedy_top1():
    # every token's top-1 is e0: its 4 slots take all of them, gates sigmoid(5, 4, 3, 1)
    route = balanced_routing.base_layer(SCORES_4X2, capacity=4, balanced=False)
    np.testing.assert_array_equal(route.token_index, [[[0, 1, 2, 3], [-1, -1, -1, -1]]])
    np.testing.assert_allclose(route.weight[0, 0], _sigmoid([5.0, 4.0, 3.0, 1.0]), rtol=1e-6)


def test_base_layer_refuses_capacity_below_the_balanced_share():
    with pytest.raises(ValueError, match=r"ceil\(T / E\) = 2 tokens, but capacity is 1"):
        balanced_routing.base_layer(SCORES_4X2, capacity=1, balanced=True)


def test_base_layer_gradient_is_the_sigmoid_derivative_at_the_assigned_expert():
    # d sigmoid(l) / dl = sigmoid(l) (1 - sigmoid(l)) at (t, a_t), zero elsewhere; the
    # assignment itself carries no gradient
    def total_weight(logits):
        return jnp.sum(balanced_routing.base_layer(logits, capacity=2, balanced=True).weight)

    grad = jax.grad(total_weight)(jnp.asarray(SCORES_4X2))
    gate = _sigmoid(SCORES_4X2)
    assigned = np.zeros_like(SCORES_4X2)
    assigned[0, [0, 1, 2, 3], [0, 0, 1, 1]] = 1.0
    np.testing.assert_allclose(grad, assigned * gate * (1 - gate), rtol=1e-5)


# exp(logits) = [[4, 1], [1, 1]]
LOG_2X2 = np.log(np.array([[[4.0, 1.0], [1.0, 1.0]]], np.float32))


def test_sinkhorn_one_iteration_literal():
    # rows to 1: [[4/5, 1/5], [1/2, 1/2]]; column sums 1.3 and 0.7 scaled to R / E = 1:
    # [[0.8 / 1.3, 0.2 / 0.7], [0.5 / 1.3, 0.5 / 0.7]] = [[8/13, 2/7], [5/13, 5/7]]
    plan = balanced_routing.sinkhorn(LOG_2X2, num_iterations=1)
    np.testing.assert_allclose(plan, [[[8 / 13, 2 / 7], [5 / 13, 5 / 7]]], rtol=1e-6)


def test_sinkhorn_converges_to_the_doubly_stochastic_closed_form():
    # scaling keeps the cross ratio P00 P11 / (P01 P10) = (4 * 1) / (1 * 1) = 4, and a doubly
    # stochastic 2 x 2 matrix is [[x, 1 - x], [1 - x, x]]: x / (1 - x) = sqrt(4), x = 2/3
    plan = balanced_routing.sinkhorn(LOG_2X2, num_iterations=60)
    np.testing.assert_allclose(plan, [[[2 / 3, 1 / 3], [1 / 3, 2 / 3]]], rtol=1e-5)


def test_sinkhorn_rows_sum_to_one_and_columns_to_the_expert_share():
    # G = 2 groups of T = 8 with R = 8 and 6 real tokens, E = 4: real rows sum to 1, each
    # column to R / E (2 and 1.5), padding rows are 0
    logits = jax.random.normal(jax.random.key(1), (2, 8, 4)) * 2.0
    mask = np.arange(8)[None, :] < np.array([[8], [6]])
    plan = np.asarray(balanced_routing.sinkhorn(logits, mask, num_iterations=200))
    np.testing.assert_allclose(plan.sum(-1), mask.astype(np.float32), atol=1e-5)
    np.testing.assert_allclose(plan.sum(1), [[2.0] * 4, [1.5] * 4], rtol=1e-5)


# four tokens that all prefer e0, by margins d = (2, 1.5, 1, 0.5). The converged plan's rows are
# sigmoid(d + c) for e0 with c = -1.25, which makes the e0 column sum to 2:
# sigmoid(0.75) + sigmoid(0.25) + sigmoid(-0.25) + sigmoid(-0.75) = 2; so t0, t1 lean to e0 and
# t2, t3 to e1
PREFER_E0 = np.array([[[2.0, 0.0], [1.5, 0.0], [1.0, 0.0], [0.5, 0.0]]], np.float32)


def test_sinkhorn_top1_balances_in_training_and_is_greedy_in_evaluation():
    train = balanced_routing.sinkhorn_top_k(
        PREFER_E0, k=1, capacity=None, balanced=True, num_iterations=20
    )
    np.testing.assert_array_equal(train.expert_index[..., 0], [[0, 0, 1, 1]])
    # k = 1 gates are sigmoid(logit): t2 and t3 get sigmoid(0) = 0.5 from e1
    np.testing.assert_allclose(
        train.weight, [[[_sigmoid(2.0), _sigmoid(1.5), 0, 0], [0.5, 0.5, 0, 0]]], rtol=1e-6
    )
    evaluation = balanced_routing.sinkhorn_top_k(PREFER_E0, k=1, capacity=None, balanced=False)
    np.testing.assert_array_equal(evaluation.expert_index[..., 0], [[0, 0, 0, 0]])


def test_sinkhorn_top2_gates_are_softmax_probabilities():
    logits = jax.random.normal(jax.random.key(2), (1, 6, 3))
    route = balanced_routing.sinkhorn_top_k(
        logits, k=2, capacity=None, balanced=True, num_iterations=5
    )
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    gates = np.take_along_axis(probs, np.asarray(route.expert_index), axis=-1)  # [1, 6, 2]
    placed = np.sort(np.asarray(route.weight)[route.token_index >= 0])
    np.testing.assert_allclose(placed, np.sort(gates.reshape(-1)), rtol=1e-6)


def test_forced_balanced_round_robin_literal():
    # T = 4 real tokens, E = 4, k = 2: token r takes experts (2r, 2r + 1) mod 4: t0 {0, 1},
    # t1 {2, 3}, t2 {0, 1}, t3 {2, 3}; every expert gets exactly R k / E = 2; with t1 padding
    # the real tokens renumber: t0 {0, 1}, t2 {2, 3}, t3 {0, 1}
    logits = jax.random.normal(jax.random.key(3), (1, 4, 4))
    route = balanced_routing.forced_balanced(logits, k=2, capacity=None)
    np.testing.assert_array_equal(route.expert_index, [[[0, 1], [2, 3], [0, 1], [2, 3]]])
    np.testing.assert_array_equal(routing.expert_assignments(route), [2, 2, 2, 2])
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    np.testing.assert_allclose(route.weight[0, 0, :2], probs[0, [0, 2], 0], rtol=1e-6)
    mask = np.array([[1, 0, 1, 1]])
    padded = balanced_routing.forced_balanced(logits, k=2, capacity=None, padding_mask=mask)
    np.testing.assert_array_equal(padded.expert_index[0, [0, 2, 3]], [[0, 1], [2, 3], [0, 1]])
    np.testing.assert_array_equal(routing.expert_assignments(padded, mask), [2, 2, 1, 1])
