"""Soft MoE: the paper's dispatch and combine weights on hand-computed cases, their sums, the
einsum backend against the slot-by-slot oracle, gradients, and the layer's and stack's checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from moe_jax import dispatch, experts, layers, models, soft_moe
from moe_jax.config import default_config

# G=1, T=2, E=2 experts with S=1 slot: logits ln [[1, 3], [3, 1]].
SLOT_LOGITS = np.log(np.array([[[[1.0], [3.0]], [[3.0], [1.0]]]], np.float32))  # [1, 2, 2, 1]


def _scaling_expert(params, xe):
    """Expert e multiplies its rows by params['scale'][e]: `xe: [E, N, M]`."""
    return xe * params["scale"][:, None, None]


def test_dispatch_and_combine_weights_literal():
    # dispatch: softmax over the 2 tokens of each slot: e0 gets exp = (1, 3) -> (1/4, 3/4),
    # e1 gets (3, 1) -> (3/4, 1/4). combine: softmax over each token's 2 slots: t0 (1, 3) ->
    # (1/4, 3/4), t1 (3, 1) -> (3/4, 1/4).
    route = soft_moe.soft_moe_routing(SLOT_LOGITS)
    np.testing.assert_allclose(route.dispatch_weight[0, :, :, 0], [[0.25, 0.75], [0.75, 0.25]])
    np.testing.assert_allclose(route.combine_weight[0, :, :, 0], [[0.25, 0.75], [0.75, 0.25]])
    np.testing.assert_allclose(route.probs[0], [[0.25, 0.75], [0.75, 0.25]])


@pytest.mark.parametrize("reference", [False, True], ids=["einsum", "slot_loop"])
def test_soft_moe_output_literal(reference):
    # x0 = (1, 0), x1 = (0, 1). Slot inputs: e0: 1/4 x0 + 3/4 x1 = (0.25, 0.75); e1: (0.75,
    # 0.25). Experts scale by 2 and 10: (0.5, 1.5) and (7.5, 2.5). Outputs: y0 = 1/4 (0.5, 1.5)
    # + 3/4 (7.5, 2.5) = (5.75, 2.25); y1 = 3/4 (0.5, 1.5) + 1/4 (7.5, 2.5) = (2.25, 1.75).
    route = soft_moe.soft_moe_routing(SLOT_LOGITS)
    x = jnp.eye(2)[None]  # [1, 2, 2]
    params = {"scale": jnp.array([2.0, 10.0])}
    if reference:
        y = dispatch.dense_reference(x, route, _scaling_expert, params)
    else:
        y = dispatch.dispatch_combine(x, route, _scaling_expert, params, backend="einsum")
    np.testing.assert_allclose(y, [[[5.75, 2.25], [2.25, 1.75]]], rtol=1e-6)


def test_logits_are_scaled_cosines_of_normalised_inputs_and_slots():
    # x = (3, 4) -> (0.6, 0.8); slot vectors (1, 0) and (0, 2) -> (0, 1); scale 2:
    # logits 2 * (0.6, 0.8) = (1.2, 1.6)
    x = jnp.array([[[3.0, 4.0]]])
    slots = jnp.array([[[1.0], [0.0]], [[0.0], [2.0]]])  # [M=2, E=2, S=1]
    logits = soft_moe.soft_moe_logits(x, slots, jnp.float32(2.0))
    np.testing.assert_allclose(logits[0, 0, :, 0], [1.2, 1.6], rtol=1e-5)


def test_weights_sum_to_one_and_padding_takes_no_part():
    # dispatch sums to 1 over each slot's real tokens, combine to 1 over each real token's E * S
    # slots; padding tokens get 0 in both, and the real tokens' weights are those of the group
    # without the padding (the oracle: the same logits cut to the real tokens)
    logits = jax.random.normal(jax.random.key(0), (2, 5, 3, 2)) * 2.0
    mask = np.arange(5)[None, :] < np.array([[5], [3]])
    route = soft_moe.soft_moe_routing(logits, mask)
    np.testing.assert_allclose(route.dispatch_weight.sum(1), np.ones((2, 3, 2)), rtol=1e-6)
    np.testing.assert_allclose(route.combine_weight.sum((2, 3)), mask.astype(float), rtol=1e-6)
    np.testing.assert_array_equal(route.dispatch_weight[1, 3:], 0.0)
    cut = soft_moe.soft_moe_routing(logits[1:, :3])
    np.testing.assert_allclose(route.dispatch_weight[1, :3], cut.dispatch_weight[0], rtol=1e-6)
    np.testing.assert_allclose(route.combine_weight[1, :3], cut.combine_weight[0], rtol=1e-6)


def test_gradients_reach_inputs_slots_and_scale():
    """Reverse-mode gradients of the layer's maths match finite differences (check_grads)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 4, 3)).astype(np.float64)
    slots = rng.normal(size=(3, 2, 2)).astype(np.float64)
    params = {"scale": np.array([0.5, -1.5])}

    def output(x, slots, scale):
        route = soft_moe.soft_moe_routing(soft_moe.soft_moe_logits(x, slots, scale))
        y = dispatch.dispatch_combine(
            x.astype(jnp.float32), route, _scaling_expert, params, backend="einsum"
        )
        return jnp.sum(jnp.sin(y))

    check_grads(output, (x, slots, np.float64(1.3)), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_soft_metrics_literal():
    # probs (1/4, 3/4) and (3/4, 1/4): confidence 3/4, each expert half the combine weight, all
    # slots computed (load 1/2 each), nothing dropped
    metrics = soft_moe.soft_metrics(soft_moe.soft_moe_routing(SLOT_LOGITS))
    np.testing.assert_allclose(metrics["router_confidence"], 0.75)
    np.testing.assert_allclose(metrics["expert_load_routed"], [0.5, 0.5])
    np.testing.assert_allclose(metrics["expert_load"], [0.5, 0.5])
    assert float(metrics["fraction_tokens_dropped"]) == 0.0 and metrics["expert_usage"] == 1.0


def _config(**moe):
    config = default_config()
    config.model.d_model, config.model.d_ff = 8, 16
    config.moe.num_experts, config.moe.group_size, config.moe.router = 4, 8, "soft_moe"
    for key, value in moe.items():
        config.moe[key] = value
    return config


@pytest.mark.parametrize("backend", ["gather", "dropless"])
def test_layer_refuses_backends_that_move_whole_tokens(backend):
    with pytest.raises(ValueError, match=f"backend '{backend}' moves whole tokens"):
        layers.MoeFeedForward(_config(backend=backend), nnx.Rngs(0))
    route = soft_moe.soft_moe_routing(SLOT_LOGITS)
    with pytest.raises(ValueError, match="use backend 'einsum'"):
        dispatch.dispatch_combine(jnp.eye(2)[None], route, _scaling_expert, {}, backend=backend)


def test_layer_slot_count_is_fixed_at_build_time():
    # expert_capacity when set; else the capacity of group_size = 8 tokens over 4 experts at
    # capacity_factor_train 1.25: max(min_capacity 1, round(2.5) = 2) = 2
    layer = layers.MoeFeedForward(_config(expert_capacity=3), nnx.Rngs(0))
    assert layer.router.slots[...].shape == (8, 4, 3) and layer.capacity(16, True) == 3
    layer = layers.MoeFeedForward(_config(min_capacity=1), nnx.Rngs(0))
    assert layer.router.slots[...].shape == (8, 4, 2)
    layer.dropless = True  # decode's switch keeps Soft MoE's slots
    assert layer.capacity(8, True) == 2
    with pytest.raises(ValueError, match="set moe.expert_capacity"):
        layers.MoeFeedForward(_config(group_size=0), nnx.Rngs(0))


def test_layer_output_equals_the_slot_by_slot_oracle_and_trains_its_router():
    layer = layers.MoeFeedForward(_config(expert_capacity=2, router_jitter=0.0), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 4, 8))
    y, aux = layer(x, deterministic=True)
    grouped, grouping = dispatch.group_tokens(x, group_size=8)
    route, logits = layer.router(grouped, capacity=2, deterministic=True)
    assert isinstance(route, soft_moe.SoftRouting) and logits is None
    expert_fn = lambda p, xe: experts.ffn(p, xe, activation="gated-gelu")
    want = grouping(dispatch.dense_reference(grouped, route, expert_fn, layer.expert_params()))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
    assert float(aux.load_balancing_loss) == 0.0 and float(aux.router_z_loss) == 0.0

    grads = nnx.grad(lambda model: jnp.sum(model(x, deterministic=True)[0] ** 2))(layer)
    assert float(jnp.abs(grads["router"]["slots"][...]).max()) > 0
    assert float(jnp.abs(grads["router"]["scale"][...])) > 0


def _micro_model_config(kind, **moe):
    config = _config(expert_capacity=2, **moe)
    model = config.model
    model.kind, model.vocab_size, model.num_heads, model.head_dim = kind, 32, 2, 4
    model.num_layers, model.num_encoder_layers, model.num_decoder_layers = 2, 2, 2
    return config


def test_causal_stacks_refuse_soft_moe():
    with pytest.raises(ValueError, match="'soft_moe' .Soft MoE. mixes the whole group.*causal"):
        models.build_model(_micro_model_config("decoder"), rngs=nnx.Rngs(0))
    config = _micro_model_config("encoder_decoder", decoder_router="tokens_choose")
    model = models.build_model(config, rngs=nnx.Rngs(0))
    kinds = {m.router_kind for _, m in nnx.iter_graph(model.encoder) if hasattr(m, "router_kind")}
    assert kinds == {"soft_moe"}
