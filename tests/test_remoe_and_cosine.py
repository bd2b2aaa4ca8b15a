"""ReMoE (ReLU routing) and X-MoE (cosine routing) against hand-computed cases: the routing,
ReMoE's load-balanced L1 penalty and its gradient, the L1 controller step, and the layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import cosine_routing, dispatch, layers, losses, relu_routing, routing
from moe_jax.config import default_config

# G=1, T=3, E=3. Gates ReLU(logits): t0 (1, 0, 0.5), t1 (0, 2, 0), t2 (0.3, 0.4, 0).
LOGITS = np.array([[[1.0, -1.0, 0.5], [-2.0, 2.0, 0.0], [0.3, 0.4, -0.1]]], np.float32)


def test_relu_routing_literal():
    # every positive gate is a choice: e0 takes t0, t2 (1, 0.3); e1 t1, t2 (2, 0.4); e2 t0 (0.5)
    route = relu_routing.relu_routing(LOGITS, capacity=None)
    np.testing.assert_array_equal(route.token_index, [[[0, 2, -1], [1, 2, -1], [0, -1, -1]]])
    np.testing.assert_allclose(
        route.weight, [[[1.0, 0.3, 0.0], [2.0, 0.4, 0.0], [0.5, 0.0, 0.0]]], rtol=1e-6
    )
    np.testing.assert_array_equal(route.expert_index, [[[0, -1, 2], [-1, 1, -1], [0, 1, -1]]])
    np.testing.assert_allclose(route.probs, np.maximum(LOGITS, 0.0))


def test_relu_routing_capacity_keeps_earlier_tokens_and_counts_drops():
    # C = 1: each expert keeps its first token (e0 t0, e1 t1, e2 t0), so t2 loses both its
    # choices: 2 of the 5 requested assignments dropped, 1 of 3 tokens in no slot
    route = relu_routing.relu_routing(LOGITS, capacity=1)
    np.testing.assert_array_equal(route.token_index, [[[0], [1], [0]]])
    metrics = routing.router_metrics(route)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 2 / 5, rtol=1e-6)
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 1 / 3, rtol=1e-6)


def test_gate_sparsity_literal():
    # 5 of 9 gates positive: S = 4/9; without t2 (padding): 3 of 6, S = 1/2
    gates = np.maximum(LOGITS, 0.0)
    np.testing.assert_allclose(relu_routing.gate_sparsity(gates), 4 / 9, rtol=1e-6)
    mask = np.array([[1, 1, 0]])
    np.testing.assert_allclose(relu_routing.gate_sparsity(gates, mask), 0.5, rtol=1e-6)


@pytest.mark.parametrize(
    "sparsity, expected",
    # target 1 - k / E = 1 - 1/4 = 0.75: below it lambda *= 1.2, above it lambda /= 1.2
    [(0.5, 0.01 * 1.2), (0.9, 0.01 / 1.2), (0.75, 0.01)],
)
def test_l1_controller_step(sparsity, expected):
    new = relu_routing.update_l1_coefficient(0.01, sparsity, target_sparsity=0.75, rate=1.2)
    np.testing.assert_allclose(new, expected, rtol=1e-6)


@pytest.mark.parametrize(
    "change, message", [({"target_sparsity": 1.0}, "target_sparsity"), ({"rate": 1.0}, "rate")]
)
def test_l1_controller_rejects_bad_settings(change, message):
    with pytest.raises(ValueError, match=message):
        relu_routing.update_l1_coefficient(0.01, 0.5, **{"target_sparsity": 0.5, **change})


def test_load_balanced_l1_literal_and_gradient():
    # k = 1, E = 3, T = 3. Active fractions (2/3, 2/3, 1/3), so f = (E / k) * fraction =
    # (2, 2, 1). L = (1 / T) sum_t sum_e f_e R[t, e] = (2 * 1 + 1 * 0.5 + 2 * 2 + 2 * 0.3 +
    # 2 * 0.4) / 3 = 7.9 / 3. f carries no gradient: dL / dlogit[t, e] = f_e / T where the
    # gate is positive, else 0.
    def l1(logits):
        route = relu_routing.relu_routing(logits, capacity=None)
        return losses.relu_l1_loss(route.probs, route.expert_index, k=1)

    np.testing.assert_allclose(l1(LOGITS), 7.9 / 3, rtol=1e-6)
    expected = np.array([[[2, 0, 1], [0, 2, 0], [2, 2, 0]]]) / 3
    np.testing.assert_allclose(jax.grad(l1)(jnp.asarray(LOGITS)), expected, rtol=1e-6)


def _config(router, **moe):
    config = default_config()
    config.model.d_model, config.model.d_ff = 8, 16
    config.moe.num_experts, config.moe.group_size, config.moe.router = 4, 8, router
    config.moe.router_jitter = 0.0
    for key, value in moe.items():
        config.moe[key] = value
    return config


def test_remoe_layer_reports_lambda_times_l1_and_steps_lambda_in_training_only():
    layer = layers.MoeFeedForward(_config("remoe", k=1, remoe_l1_init=0.01), nnx.Rngs(0))
    param_paths = [path for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))]
    assert ("router", "l1_coefficient") not in param_paths
    # a positive kernel on positive inputs opens every gate: sparsity 0 < target 1 - 1/4
    layer.router.kernel[...] = jnp.full((8, 4), 0.1)
    x = jnp.abs(jax.random.normal(jax.random.key(0), (2, 4, 8))) + 0.1
    _, aux = layer(x, deterministic=True)
    np.testing.assert_allclose(layer.router.l1_coefficient[...], 0.01)
    grouped, _ = dispatch.group_tokens(x, group_size=8)
    route, _ = layer.router(grouped, capacity=None, deterministic=True)
    want = 0.01 * losses.relu_l1_loss(route.probs, route.expert_index, k=1)
    np.testing.assert_allclose(aux.router_l1_loss, want, rtol=1e-6)
    _, train_aux = layer(x, deterministic=False)
    np.testing.assert_allclose(train_aux.router_l1_loss, want, rtol=1e-6)  # lambda before the step
    np.testing.assert_allclose(layer.router.l1_coefficient[...], 0.012, rtol=1e-6)

    def loss(model):
        return model(x, deterministic=False)[1].router_l1_loss

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(layer)
    assert float(jnp.abs(grads["router"]["kernel"][...]).max()) > 0
    np.testing.assert_allclose(layer.router.l1_coefficient[...], 0.012 * 1.2, rtol=1e-6)


def test_cosine_logits_literal():
    # W = I, so x W = (3, 4) -> (0.6, 0.8); experts (1, 0) and (0, 2) -> (1, 0), (0, 1);
    # tau = 0.5: logits (0.6, 0.8) / 0.5 = (1.2, 1.6). Doubling W changes nothing (a cosine).
    x = jnp.array([[[3.0, 4.0]]])
    embeddings = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # [D, E]
    log_tau = jnp.log(0.5)
    logits = cosine_routing.cosine_logits(x, jnp.eye(2), embeddings, log_tau)
    np.testing.assert_allclose(logits[0, 0], [1.2, 1.6], rtol=1e-5)
    doubled = cosine_routing.cosine_logits(x, 2.0 * jnp.eye(2), embeddings, log_tau)
    np.testing.assert_allclose(doubled, logits, rtol=1e-6)


def test_cosine_layer_learns_projection_embeddings_and_temperature():
    layer = layers.MoeFeedForward(_config("cosine", cosine_dim=3), nnx.Rngs(0))
    router = layer.router
    assert router.projection[...].shape == (8, 3) and router.expert_embeddings[...].shape == (3, 4)
    np.testing.assert_allclose(jnp.exp(router.log_temperature[...]), 0.07, rtol=1e-6)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))

    def loss(model):
        y, aux = model(x, deterministic=True)
        return jnp.sum(y**2) + aux.load_balancing_loss

    grads = nnx.grad(loss)(layer)["router"]
    for name in ("projection", "expert_embeddings", "log_temperature"):
        assert float(jnp.abs(grads[name][...]).max()) > 0, name
