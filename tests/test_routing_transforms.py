"""Every router under jax.jit, jax.vmap over an extra batch axis and jax.grad, and in bfloat16.

The routers are jitted functions themselves; `check_gradient` also runs each one inside an outer
jit (of value_and_grad) and compares the value with the direct call. Gradients are checked
against central finite differences along random directions (the routing decisions do not change
within the step); the finite differences reuse the compiled value_and_grad.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import balanced_routing, relu_routing, routing

# G=2, T=5, E=3, C=2.
LOGITS = (2.0 * np.random.default_rng(0).normal(size=(2, 5, 3))).astype(np.float32)
BATCH = np.stack([LOGITS, np.flip(LOGITS, axis=1)])  # [2, G, T, E]
BIAS = np.array([0.0, 0.3, -0.2], np.float32)
# A fixed random cotangent for the combine weights f32[G, E, C].
WEIGHT_PROBE = np.random.default_rng(1).normal(size=(2, 3, 2)).astype(np.float32)
KEY = jax.random.key(0)

ROUTERS = {
    "tokens_choose": lambda x: routing.tokens_choose(
        x, k=2, capacity=2, batch_prioritized=True, normalize="topk"
    ),
    "gshard_random": lambda x: routing.gshard_top2(x, capacity=2, rng=KEY),
    "experts_choose": lambda x: routing.experts_choose(x, capacity=2),
    "biased_top_k": lambda x: routing.biased_top_k(x, BIAS, k=2, capacity=2),
    "base_layer": lambda x: balanced_routing.base_layer(x, capacity=2, balanced=True),
    "sinkhorn_top_k": lambda x: balanced_routing.sinkhorn_top_k(
        x, k=2, capacity=2, balanced=True, num_iterations=3
    ),
    "relu_routing": lambda x: relu_routing.relu_routing(x, capacity=2),
    "forced_balanced": lambda x: balanced_routing.forced_balanced(x, k=2, capacity=2),
}
# GShard's sampled second expert has its own gradient path (weights of a drawn expert).
GRADIENT_ROUTERS = {
    **ROUTERS,
    "gshard_sampling": lambda x: routing.gshard_top2(
        x, capacity=2, rng=KEY, second_policy="sampling"
    ),
}


def assert_tree_close(actual, expected, rtol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-7)


def check_gradient(f, args, eps=1e-3, num_directions=3):
    """Under an outer jit, value_and_grad of scalar f(*args) gives the direct call's value, a
    gradient that is nonzero for each argument, and matches central differences along random
    directions d: (f(a + eps d) - f(a - eps d)) / (2 eps) = <grad, d>."""
    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=tuple(range(len(args)))))
    value, grads = value_and_grad(*args)
    np.testing.assert_allclose(value, f(*args), rtol=1e-6)
    grads = [np.asarray(g) for g in grads]
    assert all(np.max(np.abs(g)) > 1e-3 for g in grads)  # reaches every argument
    rng = np.random.default_rng(5)
    for _ in range(num_directions):
        directions = [rng.normal(size=a.shape).astype(np.float32) for a in args]
        plus, _ = value_and_grad(*[a + eps * d for a, d in zip(args, directions)])
        minus, _ = value_and_grad(*[a - eps * d for a, d in zip(args, directions)])
        expected = sum(float(np.vdot(g, d)) for g, d in zip(grads, directions))
        np.testing.assert_allclose((plus - minus) / (2 * eps), expected, rtol=1e-2, atol=2e-3)


def stack_calls(f, inputs):
    """f applied to each element of inputs, outputs stacked: the vmap oracle."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *[f(x) for x in inputs])


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_under_vmap(name):
    router = ROUTERS[name]
    assert_tree_close(jax.vmap(router)(BATCH), stack_calls(router, BATCH))


@pytest.mark.parametrize("name", sorted(GRADIENT_ROUTERS))
def test_router_gradient_under_jit(name):
    router = GRADIENT_ROUTERS[name]
    check_gradient(lambda x: jnp.sum(router(x).weight * WEIGHT_PROBE), (LOGITS,))


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_routes_bfloat16_in_float32(name):
    router = ROUTERS[name]
    logits16 = LOGITS.astype(jnp.bfloat16)
    result = router(logits16)
    assert result.weight.dtype == jnp.float32 and result.probs.dtype == jnp.float32
    assert_tree_close(result, router(logits16.astype(np.float32)))


def test_hash_routing_under_jit_and_vmap():
    token_ids = np.arange(20, dtype=np.int32).reshape(2, 2, 5)  # [batch, G, T]
    route = lambda ids: routing.hash_routing(ids, num_experts=3, capacity=2)
    assert_tree_close(jax.jit(route)(token_ids[0]), route(token_ids[0]))
    assert_tree_close(jax.vmap(route)(token_ids), stack_calls(route, token_ids))


def test_to_masks_and_metrics_under_vmap_and_grad():
    def summarize(x):
        result = ROUTERS["tokens_choose"](x)
        dispatch, combine = routing.to_masks(result, num_tokens=5)
        return dispatch, combine, routing.router_metrics(result)

    assert_tree_close(jax.vmap(summarize)(BATCH), stack_calls(summarize, BATCH))
    # Gradient through the dense combine tensor reaches the logits.
    check_gradient(lambda x: jnp.sum(summarize(x)[1] * WEIGHT_PROBE[:, None, :, :]), (LOGITS,))


def test_noisy_top_k_under_vmap_and_grad():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)  # [G, T, M]
    w_gate = rng.normal(size=(4, 3)).astype(np.float32)
    w_noise = rng.normal(size=(4, 3)).astype(np.float32)
    noisy = lambda x, w_gate, w_noise: routing.noisy_logits(x, w_gate, w_noise, KEY)
    batched = jax.vmap(noisy, in_axes=(0, None, None))(np.stack([x, -x]), w_gate, w_noise)
    np.testing.assert_allclose(batched[1], noisy(-x, w_gate, w_noise), rtol=1e-6)
    # Noisy top-k gating end to end: gradients reach both weight matrices.
    probe = lambda w_gate, w_noise: jnp.sum(
        routing.tokens_choose(noisy(x, w_gate, w_noise), k=2, capacity=3).weight[..., 0]
    )
    check_gradient(probe, (w_gate, w_noise))


def test_update_expert_bias_under_jit_and_vmap():
    loads = np.array([[5.0, 1.0, 3.0], [1.0, 1.0, 4.0]], np.float32)
    update = lambda bias, load: routing.update_expert_bias(bias, load, rate=0.01)
    np.testing.assert_allclose(jax.jit(update)(BIAS, loads[0]), update(BIAS, loads[0]))
    # Means 3 and 2: (-, +, 0) and (+, +, -).
    batched = jax.vmap(update, in_axes=(None, 0))(BIAS, loads)
    np.testing.assert_allclose(batched, BIAS + 0.01 * np.array([[-1, 1, 0], [1, 1, -1]]))
