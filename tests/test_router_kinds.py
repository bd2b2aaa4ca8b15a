"""The routers of issue 24 in the MoE layer: every dispatch backend that can express them against
the dense reference, in training (where BASE and S-BASE balance), and expert parallelism on 8
fake devices against one device (outputs and gradients)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import dispatch, experts, layers, parallel
from moe_jax.config import default_config
from tests.tolerances import assert_trees_close

NEW_ROUTERS = ("soft_moe", "base_layer", "sinkhorn", "remoe", "cosine", "forced_balanced")
# Soft MoE's slots mix tokens, which only the einsum backend computes
BACKENDS = {router: ("einsum", "gather", "dropless") for router in NEW_ROUTERS}
BACKENDS["soft_moe"] = ("einsum",)
BATCH, LENGTH, D_MODEL, NUM_EXPERTS, GROUP_SIZE = 8, 8, 8, 8, 8


def _config(router, backend, strategy="shard_map"):
    config = default_config()
    config.model.d_model, config.model.d_ff = D_MODEL, 16
    moe = config.moe
    moe.num_experts, moe.group_size, moe.router, moe.backend = (
        NUM_EXPERTS,
        GROUP_SIZE,
        router,
        backend,
    )
    moe.k = 1 if router == "base_layer" else 2
    moe.router_jitter, moe.min_capacity, moe.expert_capacity = 0.0, 1, 0
    if router == "soft_moe":
        moe.expert_capacity = 1
    config.mesh.expert_parallelism = strategy
    return config


@pytest.mark.parametrize(
    "router, backend", [(r, b) for r in NEW_ROUTERS for b in BACKENDS[r]], ids=str
)
def test_training_forward_matches_the_dense_reference(router, backend):
    layer = layers.MoeFeedForward(_config(router, backend), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 6, D_MODEL))  # groups of 8 and of 4 + padding
    y, aux = layer(x, deterministic=False)
    grouped, grouping = dispatch.group_tokens(x, group_size=GROUP_SIZE)
    route, _ = layer.router(
        grouped,
        capacity=layer.capacity(GROUP_SIZE, False),
        deterministic=False,
        padding_mask=grouping.valid,
    )
    expert_fn = lambda p, xe: experts.ffn(p, xe, activation="gated-gelu")
    want = grouping(dispatch.dense_reference(grouped, route, expert_fn, layer.expert_params()))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(aux))
    if router == "base_layer":  # balanced: group 0's 8 tokens one per expert, nothing dropped
        assert float(aux.fraction_tokens_dropped) == 0.0


@functools.cache
def _split_layers(strategy, routers):
    split = []
    for router in routers:
        backend = "einsum" if router == "soft_moe" else "gather"
        layer = layers.MoeFeedForward(_config(router, backend, strategy), nnx.Rngs(0))
        split.append(nnx.split(layer, nnx.Param, ...))
    return tuple(split)


def _train_outputs_and_grads(split_layers, x, cotangent):
    """Per router, in training mode: y and the gradients of sum(y * cotangent) plus its losses
    with respect to the parameters and x, all in one jit."""

    def one_layer(graphdef, params, rest, x):
        def objective(params, x):
            y, aux = nnx.merge(graphdef, params, rest, copy=True)(x, deterministic=False)
            losses = aux.load_balancing_loss + aux.router_z_loss + aux.router_l1_loss
            return jnp.sum(y * cotangent) + losses, y

        (_, y), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(params, x)
        return {"y": y, "grads": grads}

    @jax.jit
    def run(states, x):
        return [
            one_layer(graphdef, params, rest, x)
            for (graphdef, _, _), (params, rest) in zip(split_layers, states)
        ]

    return run([(params, rest) for _, params, rest in split_layers], x)


# GSPMD runs the new routers' own dispatch code only for Soft MoE (dense slot mixing); the
# others route per device as under shard_map and then dispatch through the classic slot view
@pytest.mark.parametrize(
    "strategy, routers", [("shard_map", NEW_ROUTERS), ("gspmd", ("soft_moe",))], ids=str
)
def test_expert_parallel_training_matches_one_device(strategy, routers):
    """Data 2 x expert 4: each device routes (balances, mixes) its own group, then the experts'
    slots cross the mesh; outputs and gradients equal the one-device run."""
    key_x, key_cotangent = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (BATCH, LENGTH, D_MODEL))
    cotangent = jax.random.normal(key_cotangent, (BATCH, LENGTH, D_MODEL))
    split_layers = _split_layers(strategy, routers)
    expected = jax.device_get(_train_outputs_and_grads(split_layers, x, cotangent))
    mesh = parallel.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        sharded = [
            (graphdef, *jax.device_put(states, parallel.state_shardings(states, mesh)))
            for graphdef, *states in split_layers
        ]
        actual = _train_outputs_and_grads(
            sharded, jax.device_put(x, parallel.batch_sharding(mesh, ndim=3)), cotangent
        )
    for router, got, want in zip(routers, jax.device_get(actual), expected, strict=True):
        assert_trees_close(got, want, num_summed=BATCH * LENGTH, err_msg=router)
