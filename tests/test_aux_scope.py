"""Where the balancing loss counts its statistics (`loss.aux_scope`): DeepSeek-V3's sequence-wise
loss and the global-batch loss on hand-computed cases, the layer's regrouping against the loss
of the regrouped arrays, and the global loss on 8 fake devices against one device."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import dispatch, layers, losses, parallel
from moe_jax.config import default_config
from tests.tolerances import assert_trees_close

# B=2 sequences of L=2 tokens, E=2, top-1. Sequence 0: probs (0.7, 0.3), (0.6, 0.4), both
# choose e0; sequence 1: (0.2, 0.8) chooses e1, (0.5, 0.5) chooses e0.
PROBS = np.array([[[0.7, 0.3], [0.6, 0.4]], [[0.2, 0.8], [0.5, 0.5]]], np.float32)
TOP1 = np.array([[[0], [0]], [[1], [0]]])


def test_sequence_scope_is_deepseek_v3_sequence_wise_loss():
    # DeepSeek-V3 Eqs. 17-20 per sequence: f_i = E / (K T) * count_i, P_i = mean of s'_i,
    # L = sum_i f_i P_i. Sequence 0: f = (2, 0), P = (0.65, 0.35): 1.3. Sequence 1: f = (1, 1),
    # P = (0.35, 0.65): 1.0. Mean over the batch's sequences: 1.15. (For K = 1 this is the
    # Switch form E * sum_i fraction_i P_i; for K > 1 the Switch form is K times DeepSeek's.)
    np.testing.assert_allclose(losses.load_balancing_loss(PROBS, TOP1), 1.15, rtol=1e-6)


def test_global_scope_counts_the_whole_batch():
    # Qiu et al. 2025: f_i over the global batch. 4 tokens: fractions (3/4, 1/4), mean probs
    # ((0.7 + 0.6 + 0.2 + 0.5) / 4, ...) = (0.5, 0.5): E * sum_i f_i P_i = 2 * (0.375 + 0.125)
    # = 1.0, below the per-sequence 1.15: sequence 0's imbalance is balanced by sequence 1.
    flat = losses.load_balancing_loss(PROBS.reshape(1, 4, 2), TOP1.reshape(1, 4, 1))
    np.testing.assert_allclose(flat, 1.0, rtol=1e-6)


B, L, M, E = 2, 8, 8, 4


def _config(router="tokens_choose", scope="group", **moe):
    config = default_config()
    config.model.d_model, config.model.d_ff = M, 16
    config.moe.num_experts, config.moe.group_size, config.moe.router = E, 4, router
    config.moe.router_jitter, config.moe.k = 0.0, 2 if router == "gshard_top2" else 1
    config.loss.aux_scope = scope
    for key, value in moe.items():
        config.moe[key] = value
    return config


def _scoped_loss(layer, x, mask, scope):
    """The oracle: the router kind's loss of its routing, regrouped by hand."""
    grouped, grouping = dispatch.group_tokens(x, group_size=4)  # [G=4, T=4, M]
    real = grouping.group(mask)
    route, _ = layer.router(grouped, capacity=None, deterministic=True, padding_mask=real)
    arrays = (route.probs, route.expert_index, real)
    if scope == "sequence":
        arrays = tuple(a.reshape(B, L, *a.shape[2:]) for a in arrays)
    elif scope == "global":
        arrays = tuple(a.reshape(1, B * L, *a.shape[2:]) for a in arrays)
    kind = layer.router_kind
    if kind == "remoe":
        return layer.router.l1_coefficient[...] * losses.relu_l1_loss(*arrays, k=1)
    if kind == "gshard_top2":
        return losses.gshard_aux_loss(*arrays)
    if kind == "aux_free":
        return losses.deepseek_balance_loss(*arrays)
    return losses.load_balancing_loss(*arrays)


@pytest.mark.parametrize("router", ["tokens_choose", "gshard_top2", "cosine", "aux_free", "remoe"])
def test_layer_counts_balance_over_its_scope(router):
    x = jax.random.normal(jax.random.key(0), (B, L, M))
    mask = jnp.arange(L)[None, :] < jnp.array([[8], [6]])  # sequence 1 ends in padding
    values = {}
    for scope in ("group", "sequence", "global"):
        layer = layers.MoeFeedForward(_config(router, scope, remoe_l1_init=1.0), nnx.Rngs(0))
        _, aux = layer(x, deterministic=True, padding_mask=mask)
        values[scope] = aux.router_l1_loss if router == "remoe" else aux.load_balancing_loss
        if router == "aux_free" and scope == "group":
            assert float(values[scope]) == 0.0  # no loss, as before scopes existed
        else:
            want = _scoped_loss(layer, x, mask, scope)
            np.testing.assert_allclose(values[scope], want, rtol=1e-6)
    assert len({round(float(v), 6) for v in values.values()}) == 3, values


@pytest.mark.parametrize("router", ["experts_choose", "hash", "soft_moe", "noisy_top_k"])
def test_routers_without_a_scoped_loss_refuse_other_scopes(router):
    with pytest.raises(ValueError, match=f"router '{router}' has none to count"):
        layers.MoeFeedForward(_config(router, "global"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="Unknown loss.aux_scope 'batch'"):
        layers.MoeFeedForward(_config("tokens_choose", "batch"), nnx.Rngs(0))


# 8 sequences of 8 tokens in groups of 8: one group per device on every mesh below
MESH_BATCH, MESH_LENGTH = 8, 8


@functools.cache
def _split_layer(scope, strategy="shard_map"):
    config = _config("tokens_choose", scope, group_size=8, num_experts=8, backend="gather")
    config.mesh.expert_parallelism = strategy
    return nnx.split(layers.MoeFeedForward(config, nnx.Rngs(0)), nnx.Param, ...)


def _loss_and_grads(graphdef, params, rest, x):
    def balance(params, x):
        return nnx.merge(graphdef, params, rest)(x, deterministic=True)[1].load_balancing_loss

    return jax.jit(jax.value_and_grad(balance, argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("strategy", ["shard_map", "gspmd"])
def test_global_loss_on_8_devices_equals_the_single_device_whole_batch_loss(strategy):
    """Data 2 x expert 4: each device routes its own group, and the global loss (its value and
    gradients) equals the one-device loss over the whole batch, and differs from the per-group
    loss."""
    x = jax.random.normal(jax.random.key(1), (MESH_BATCH, MESH_LENGTH, M))
    graphdef, params, rest = _split_layer("global", strategy)
    want_loss, want_grads = jax.device_get(_loss_and_grads(graphdef, params, rest, x))
    group_loss, _ = _loss_and_grads(*_split_layer("group", strategy), x)
    assert abs(float(group_loss) - float(want_loss)) > 1e-3
    mesh = parallel.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        states = jax.device_put((params, rest), parallel.state_shardings((params, rest), mesh))
        sharded_x = jax.device_put(x, parallel.batch_sharding(mesh, ndim=3))
        loss, grads = _loss_and_grads(graphdef, *states, sharded_x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    assert_trees_close(jax.device_get(grads), want_grads, num_summed=MESH_BATCH * MESH_LENGTH)
