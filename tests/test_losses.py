"""Hand-computed literal cases, invariants and transforms for moe_jax.losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses, routing

# G=1, T=2, E=2; both tokens choose e0 (top-1).
PROBS = np.array([[[0.7, 0.3], [0.6, 0.4]]], np.float32)
TOP1 = np.array([[[0], [0]]])


def uniform_case(num_groups, num_tokens, num_experts, k):
    """Uniform probs and distinct choices (t + j) mod E for choice j."""
    probs = np.full((num_groups, num_tokens, num_experts), 1.0 / num_experts, np.float32)
    choice = (np.arange(num_tokens)[:, None] + np.arange(k)[None, :]) % num_experts
    return probs, np.broadcast_to(choice, (num_groups, num_tokens, k))


# ---------------------------------------------------------------- load_balancing_loss


def test_load_balancing_literal_top1():
    # f = fraction of tokens choosing e = (1, 0); P = mean prob = (.65, .35).
    # E**2 * mean_e(f * P) = 4 * (.65 + 0) / 2 = 1.3.
    np.testing.assert_allclose(losses.load_balancing_loss(PROBS, TOP1), 1.3, rtol=1e-6)


def test_load_balancing_literal_top2():
    # probs t0 (.5, .3, .2), t1 (.2, .2, .6); choices t0 {e0, e1}, t1 {e2, e0}.
    # f = (2/2, 1/2, 1/2); P = (.35, .25, .4); sum f * P = .35 + .125 + .2 = .675;
    # E**2 * mean = 9 * .675 / 3 = 2.025.
    probs = np.array([[[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]])
    expert_index = np.array([[[0, 1], [2, 0]]])
    np.testing.assert_allclose(losses.load_balancing_loss(probs, expert_index), 2.025, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_load_balancing_uniform_is_k(k):
    # P = 1/E for every expert and sum_e f_e = K, so E**2 * mean_e(f_e / E) = K.
    probs, expert_index = uniform_case(2, 8, 4, k)
    np.testing.assert_allclose(losses.load_balancing_loss(probs, expert_index), k, rtol=1e-6)


def test_load_balancing_padding_and_groups():
    # Group 0: the top-1 literal plus a padding token t2 that would change f and P: 1.3.
    # Without the mask: f = (2/3, 1/3), P = (1.4/3, 1.6/3):
    # 4 * (2/3 * 1.4/3 + 1/3 * 1.6/3) / 2 = 2 * 4.4 / 9 = .97778.
    # Group 1: uniform probs, balanced top-1: 1.0. Mean over groups: (1.3 + 1.0) / 2 = 1.15.
    probs = np.array([[[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]], [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]])
    expert_index = np.array([[[0], [0], [1]], [[0], [1], [0]]])
    mask = np.array([[1, 1, 0], [1, 1, 0]])
    np.testing.assert_allclose(
        losses.load_balancing_loss(probs[:1], expert_index[:1]), 2 * 4.4 / 9, rtol=1e-6
    )
    np.testing.assert_allclose(
        losses.load_balancing_loss(probs, expert_index, mask), 1.15, rtol=1e-6
    )


def test_load_balancing_gradient_literal():
    # d loss / d probs[g, t, e] = E**2 / (G * E) * f[g, e] / T = 4 / 2 * (1, 0) / 2 = (1, 0).
    grad = jax.grad(losses.load_balancing_loss)(PROBS, TOP1)
    np.testing.assert_allclose(grad, [[[1.0, 0.0], [1.0, 0.0]]], rtol=1e-6)


# ---------------------------------------------------------------- gshard_aux_loss


def test_gshard_aux_loss_uses_first_choice_only():
    # Second choices (e1) are ignored: the top-1 literal, 1.3. GShard's own normalisation
    # (1/E) sum_e (c_e / S) m_e = (1/2) (1 * .65 + 0 * .35) = .325; ours is E**2 = 4 times it.
    top2 = np.array([[[0, 1], [0, 1]]])
    np.testing.assert_allclose(losses.gshard_aux_loss(PROBS, top2), 1.3, rtol=1e-6)
    np.testing.assert_allclose(losses.gshard_aux_loss(PROBS, top2), 4 * 0.325, rtol=1e-6)
    # Uniform routing gives 1 whatever K.
    probs, expert_index = uniform_case(2, 8, 4, 2)
    np.testing.assert_allclose(losses.gshard_aux_loss(probs, expert_index), 1.0, rtol=1e-6)


# ---------------------------------------------------------------- importance_load_loss


def test_importance_load_literal():
    # importance = sum_t probs = (1.3, .7): mean 1, variance (.09 + .09) / 2 = .09, CV^2 .09.
    # load = tokens per expert = (2, 0): mean 1, variance 1, CV^2 1. Total 1.09.
    np.testing.assert_allclose(losses.importance_load_loss(PROBS, TOP1), 1.09, rtol=1e-6)


def test_importance_load_gradient_literal():
    # Only importance carries gradient: d(var / mean^2) / d importance_e with mean 1, var .09,
    # E=2: d var = (importance_e - mean) = (.3, -.3); d mean^2 = 2 mean / E = (1, 1);
    # (d var * mean^2 - var * d mean^2) / mean^4 = (.3 - .09, -.3 - .09) = (.21, -.39) per token.
    grad = jax.grad(losses.importance_load_loss)(PROBS, TOP1)
    np.testing.assert_allclose(grad, [[[0.21, -0.39], [0.21, -0.39]]], rtol=1e-5)


def test_importance_load_balanced_is_zero_and_padding_excluded():
    probs, expert_index = uniform_case(2, 8, 4, 2)
    np.testing.assert_allclose(losses.importance_load_loss(probs, expert_index), 0.0, atol=1e-12)
    # A padding token that would unbalance both statistics changes nothing.
    probs = np.concatenate([PROBS, [[[0.0, 1.0]]]], axis=1)
    expert_index = np.concatenate([TOP1, [[[1]]]], axis=1)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(
        losses.importance_load_loss(probs, expert_index, mask), 1.09, rtol=1e-6
    )


# ---------------------------------------------------------------- router_z_loss


@pytest.mark.parametrize("num_experts", [2, 8])
def test_router_z_loss_zero_logits_is_log_e_squared(num_experts):
    np.testing.assert_allclose(
        losses.router_z_loss(np.zeros((2, 3, num_experts))), math.log(num_experts) ** 2, rtol=1e-6
    )


def test_router_z_loss_literal_with_padding():
    # t0 logits (0, ln 3): logsumexp = ln(1 + 3) = ln 4; t1 (0, 0): ln 2.
    # Mean of squares: ((ln 4)^2 + (ln 2)^2) / 2; with t1 masked: (ln 4)^2.
    logits = np.array([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    expected = (math.log(4.0) ** 2 + math.log(2.0) ** 2) / 2
    np.testing.assert_allclose(losses.router_z_loss(logits), expected, rtol=1e-6)
    mask = np.array([[True, False]])
    np.testing.assert_allclose(losses.router_z_loss(logits, mask), math.log(4.0) ** 2, rtol=1e-6)
    # d/d logits = 2 logsumexp * softmax / N: t0 2 ln 4 (.25, .75) / 2 = ln 4 (.25, .75);
    # t1 ln 2 (.5, .5).
    grad = jax.grad(losses.router_z_loss)(logits)
    expected_grad = [[[0.25 * math.log(4), 0.75 * math.log(4)], [0.5 * math.log(2)] * 2]]
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)


def test_router_z_loss_bfloat16_in_float32():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4)) * 10, jnp.bfloat16)
    loss = losses.router_z_loss(logits)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, losses.router_z_loss(logits.astype(jnp.float32)))


# ---------------------------------------------------------------- transforms and validation

LOGITS = (2.0 * np.random.default_rng(3).normal(size=(2, 6, 4))).astype(np.float32)
MASK = np.array([[1, 1, 1, 1, 0, 0], [1, 0, 1, 1, 1, 1]])


def routed_losses(logits, padding_mask):
    """Every loss of a top-2 routing, as a function of the logits (a gradient path)."""
    result = routing.tokens_choose(logits, k=2, capacity=3)
    return jnp.stack(
        [
            losses.load_balancing_loss(result.probs, result.expert_index, padding_mask),
            losses.gshard_aux_loss(result.probs, result.expert_index, padding_mask),
            losses.importance_load_loss(result.probs, result.expert_index, padding_mask),
            losses.router_z_loss(logits, padding_mask),
        ]
    )


def test_losses_under_jit_and_vmap():
    np.testing.assert_allclose(
        jax.jit(routed_losses)(LOGITS, MASK), routed_losses(LOGITS, MASK), rtol=1e-6
    )
    batch = np.stack([LOGITS, -LOGITS])
    batched = jax.jit(jax.vmap(routed_losses, in_axes=(0, None)))(batch, MASK)
    np.testing.assert_allclose(batched[1], routed_losses(-LOGITS, MASK), rtol=1e-6)


def test_losses_gradients_reach_logits():
    # Each loss's gradient is nonzero and matches central differences along random directions.
    jacobian = np.asarray(jax.jit(jax.jacobian(routed_losses))(LOGITS, MASK))  # [4, G, T, E]
    values = jax.jit(routed_losses)
    rng = np.random.default_rng(4)
    eps = 1e-3
    for _ in range(3):
        direction = rng.normal(size=LOGITS.shape).astype(np.float32)
        numeric = values(LOGITS + eps * direction, MASK) - values(LOGITS - eps * direction, MASK)
        expected = np.einsum("lgte,gte->l", jacobian, direction)
        np.testing.assert_allclose(numeric / (2 * eps), expected, rtol=1e-2, atol=2e-3)
    assert np.all(np.max(np.abs(jacobian), axis=(1, 2, 3)) > 1e-3)
    # Padding tokens get no gradient from any loss.
    np.testing.assert_array_equal(jacobian[:, ~MASK.astype(bool)], 0.0)


def test_losses_reject_bad_shapes():
    with pytest.raises(ValueError, match="probs"):
        losses.load_balancing_loss(PROBS[0], TOP1)
    with pytest.raises(ValueError, match="expert_index"):
        losses.gshard_aux_loss(PROBS, TOP1[0])
    with pytest.raises(ValueError, match="expert_index"):
        losses.importance_load_loss(PROBS, np.zeros((1, 3, 1), np.int32))
    with pytest.raises(ValueError, match="logits"):
        losses.router_z_loss(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="padding_mask"):
        losses.load_balancing_loss(PROBS, TOP1, np.ones((1, 3)))
    with pytest.raises(ValueError, match="padding_mask"):
        losses.router_z_loss(np.zeros((1, 2, 2)), np.ones((2,)))
