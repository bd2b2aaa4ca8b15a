"""MoeFeedForward, Router and FeedForward: shapes, dtypes, randomness, capacity, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import dispatch, experts, layers
from moe_jax.config import default_config

B, L, M = 2, 6, 16


def _config(**moe):
    config = default_config()
    config.model.d_model = M
    config.model.d_ff = 32
    config.moe.group_size = 8
    config.moe.num_experts = 4
    for key, value in moe.items():
        config.moe[key] = value
    return config


def _x(dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(0), (B, L, M)).astype(dtype)


@pytest.mark.parametrize("router", layers.ROUTERS)
def test_every_router_kind_runs_and_matches_dense_reference(router):
    k = 1 if router == "base_layer" else 2  # BASE layers route one expert per token
    layer = layers.MoeFeedForward(_config(router=router, k=k, router_jitter=0.0), nnx.Rngs(0))
    ids = jnp.arange(B * L).reshape(B, L)
    y, aux = layer(_x(), deterministic=True, token_ids=ids)
    assert y.shape == (B, L, M) and y.dtype == jnp.float32
    assert aux.expert_load.shape == (4,)
    # oracle: the same routing through the per-expert loop
    grouped, grouping = dispatch.group_tokens(_x(), group_size=8)
    route, _ = layer.router(
        grouped,
        capacity=layer.capacity(8, True),
        deterministic=True,
        token_ids=grouping.group(ids),
        padding_mask=grouping.valid,
    )
    expert_fn = lambda p, xe: experts.ffn(p, xe, activation="gated-gelu")
    want = grouping(dispatch.dense_reference(grouped, route, expert_fn, layer.expert_params()))
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_bfloat16_model_keeps_router_float32():
    config = _config(k=2)
    config.model.dtype = "bfloat16"
    config.model.param_dtype = "bfloat16"
    layer = layers.MoeFeedForward(config, nnx.Rngs(0))
    assert layer.router.kernel[...].dtype == jnp.float32
    assert layer.wi[...].dtype == jnp.bfloat16
    y, aux = layer(_x(jnp.bfloat16), deterministic=False)
    assert y.dtype == jnp.bfloat16
    _, logits = layer.router(_x(jnp.bfloat16), capacity=4, deterministic=False)
    assert logits.dtype == jnp.float32 and aux.router_z_loss.dtype == jnp.float32


def test_jitter_only_in_training():
    eps = 0.1
    router = layers.Router(_config(router_jitter=eps), nnx.Rngs(0))
    x = jnp.abs(_x()) + 0.5
    _, eval_logits = router(x, capacity=4, deterministic=True)
    np.testing.assert_allclose(eval_logits, x @ router.kernel[...], rtol=1e-6)
    _, again = router(x, capacity=4, deterministic=True)
    np.testing.assert_array_equal(eval_logits, again)
    _, train_1 = router(x, capacity=4, deterministic=False)
    _, train_2 = router(x, capacity=4, deterministic=False)
    assert not np.allclose(train_1, eval_logits) and not np.allclose(train_1, train_2)
    # multiplicative noise in [1 - eps, 1 + eps]: a one-hot kernel column reads the noisy input
    router.kernel[...] = jnp.zeros((M, 4)).at[0, 0].set(1.0)
    _, one_hot = router(x, capacity=4, deterministic=False)
    ratio = np.asarray(one_hot[..., 0] / x[..., 0])
    assert np.all(ratio >= 1 - eps - 1e-6) and np.all(ratio <= 1 + eps + 1e-6)
    assert ratio.std() > 0.01


def test_shared_experts_are_added_to_routed_output():
    layer = layers.MoeFeedForward(_config(num_shared_experts=2), nnx.Rngs(0))
    assert layer.shared.wi[...].shape == (M, 2 * 32)  # S experts of width H = one of S * H
    y, _ = layer(_x())
    shared = layer.shared(_x())
    layer.experts_impl = lambda x, *args, **kwargs: jnp.zeros(x.shape, jnp.float32)
    only_shared, _ = layer(_x())
    np.testing.assert_allclose(only_shared, shared, rtol=1e-6)
    assert not np.allclose(y, shared)


def test_eval_capacity_factor_used_when_deterministic():
    config = _config(
        capacity_factor_train=0.25, capacity_factor_eval=4.0, min_capacity=1, router_jitter=0.0
    )
    layer = layers.MoeFeedForward(config, nnx.Rngs(0))
    # T = 8 tokens per group, E = 4: train round(0.25 * 8 / 4) = 0 -> min 1; eval 4 * 2 = 8
    assert layer.capacity(8, deterministic=False) == 1
    assert layer.capacity(8, deterministic=True) == 8
    _, train_aux = layer(_x(), deterministic=False)
    _, eval_aux = layer(_x(), deterministic=True)
    # 1 slot x 4 experts per group place at most 8 of the 12 real tokens: >= 1/3 dropped
    assert float(train_aux.fraction_tokens_dropped) >= 1 / 3 - 1e-6
    assert float(eval_aux.fraction_tokens_dropped) == 0.0


def test_padding_mask_tokens_get_no_expert():
    layer = layers.MoeFeedForward(_config(router_jitter=0.0), nnx.Rngs(0))
    mask = jnp.arange(L)[None, :] < jnp.array([[4], [6]])
    y, aux = layer(_x(), padding_mask=mask)
    np.testing.assert_array_equal(y[0, 4:], 0.0)
    assert float(jnp.abs(y[0, :4]).min()) > 0
    full, _ = layer(_x())
    assert float(aux.fraction_tokens_dropped) == 0.0 and full.shape == y.shape


def test_router_logit_max_is_the_largest_real_token_logit():
    layer = layers.MoeFeedForward(_config(router_jitter=0.0), nnx.Rngs(0))
    x = _x()
    # the largest logit sits on the last token; marking it padding must hide it
    x = x.at[1, -1].multiply(100.0)
    logits = np.einsum("blm,me->ble", np.asarray(x), np.asarray(layer.router.kernel[...]))
    _, aux = layer(x, deterministic=True)
    np.testing.assert_allclose(aux.router_logit_max, np.abs(logits).max(), rtol=1e-6)
    mask = jnp.ones((B, L), bool).at[1, -1].set(False)
    _, aux = layer(x, deterministic=True, padding_mask=mask)
    want = np.abs(logits)[np.asarray(mask)].max()
    np.testing.assert_allclose(aux.router_logit_max, want, rtol=1e-6)
    assert want < np.abs(logits).max()


def test_aux_free_bias_updates_in_training_only():
    layer = layers.MoeFeedForward(_config(router="aux_free", bias_update_rate=0.01), nnx.Rngs(0))
    param_paths = [path for path, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))]
    assert ("router", "kernel") in param_paths and ("router", "bias") not in param_paths
    # every token's logit for expert 0 is sum(x) > 8, the others 0: expert 0 takes all tokens
    # (load 12 > mean 3) and the rest none, and a 0.01 bias step cannot change that.
    layer.router.kernel[...] = jnp.zeros((M, 4)).at[:, 0].set(1.0)
    x = jnp.abs(_x()) + 0.5
    layer(x, deterministic=True)
    np.testing.assert_array_equal(layer.router.bias[...], 0.0)
    layer(x, deterministic=False)  # b_0 -= 0.01, others += 0.01
    np.testing.assert_allclose(layer.router.bias[...], [-0.01, 0.01, 0.01, 0.01], rtol=1e-6)

    def loss(model):
        y, aux = model(x, deterministic=False)
        return jnp.sum(y**2) + aux.router_z_loss

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.Param))(layer)
    grad_paths = [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(grads)]
    assert grad_paths and not any("bias" in path for path in grad_paths)
    # the update made inside nnx.grad comes out of it: a second step
    np.testing.assert_allclose(layer.router.bias[...], [-0.02, 0.02, 0.02, 0.02], rtol=1e-6)


def test_parameters_carry_logical_axis_names():
    layer = layers.MoeFeedForward(_config(num_shared_experts=1), nnx.Rngs(0))
    specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
    assert tuple(specs["wi"].get_value()) == ("expert", "embed", "mlp")
    assert tuple(specs["wi_gate"].get_value()) == ("expert", "embed", "mlp")
    assert tuple(specs["wo"].get_value()) == ("expert", "mlp", "embed")
    assert tuple(specs["router"]["kernel"].get_value()) == ("embed", None)
    assert tuple(specs["shared"]["wo"].get_value()) == ("mlp", "embed")


def test_gradients_flow_to_router_and_experts():
    layer = layers.MoeFeedForward(_config(k=2, backend="gather"), nnx.Rngs(0))

    def loss(model):
        y, aux = model(_x(), deterministic=True)
        return jnp.sum(y**2) + aux.load_balancing_loss

    grads = nnx.grad(loss)(layer)
    for name in ("wi", "wi_gate", "wo"):
        assert float(jnp.abs(grads[name][...]).max()) > 0
    assert float(jnp.abs(grads["router"]["kernel"][...]).max()) > 0


def test_dense_feed_forward_matches_experts_ffn_and_dropout_only_in_training():
    config = _config()
    config.model.dropout_rate = 0.5
    ffn = layers.FeedForward(config, nnx.Rngs(0), d_ff=24, activation="swiglu")
    params = {k: v[None] for k, v in ffn.params().items()}
    want = experts.ffn(params, _x().reshape(1, B * L, M), activation="swiglu")
    np.testing.assert_allclose(ffn(_x()), want.reshape(B, L, M), rtol=1e-5, atol=1e-6)
    assert not np.allclose(ffn(_x(), deterministic=False), want.reshape(B, L, M))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_experts": 2, "k": 3}, "moe.k"),
        ({"backend": "ragged"}, "dispatch backend"),
        ({"activation": "tanh"}, "activation"),
        ({"group_size": -1}, "group_size"),
        ({"router": "top1"}, "router"),
        ({"router": "gshard_top2", "k": 1}, "k=2"),
        ({"num_experts": 0}, "FeedForward"),
        ({"capacity_factor_eval": 0.0}, "capacity_factor_eval"),
        ({"router": "experts_choose", "backend": "dropless"}, "tokens-choose"),
    ],
)
def test_bad_configs_raise(change, message):
    with pytest.raises(ValueError, match=message):
        layers.MoeFeedForward(_config(**change), nnx.Rngs(0))


def test_group_per_sequence_with_absolute_capacity():
    """group_size=0 routes each sequence as one group; expert_capacity fixes the slots. Oracle:
    explicit groups of L tokens and the capacity factor that gives the same slot count."""
    per_sequence = layers.MoeFeedForward(_config(group_size=0, expert_capacity=1), nnx.Rngs(0))
    explicit = layers.MoeFeedForward(
        _config(group_size=L, capacity_factor_eval=4 / L, min_capacity=1), nnx.Rngs(0)
    )
    assert explicit.capacity(L, deterministic=True) == per_sequence.capacity(99, True) == 1
    y, aux = per_sequence(_x(), deterministic=True)
    y_explicit, aux_explicit = explicit(_x(), deterministic=True)
    np.testing.assert_allclose(y, y_explicit, rtol=1e-6)
    np.testing.assert_allclose(aux.expert_load, aux_explicit.expert_load)
    assert aux.fraction_tokens_dropped > 0


def test_hash_router_needs_token_ids():
    layer = layers.MoeFeedForward(_config(router="hash"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="token_ids"):
        layer(_x())
    y, _ = layer(_x(), token_ids=jnp.zeros((B, L), jnp.int32))
    # one id -> one expert for all 12 tokens; groups of 8 real + (4 real, 4 padding); eval
    # capacity round(2.0 * 8 / 4) = 4, so group 0 drops 4 tokens and group 1 none: 4 / 12.
    np.testing.assert_allclose(float(jnp.mean(jnp.all(y == 0, axis=-1))), 4 / 12)


def _gates(route, num_tokens):
    """f32[T, E] combine weight of each token in each expert (group 0), from the slot view."""
    gates = np.zeros((num_tokens, route.weight.shape[1]))
    for expert, slots in enumerate(np.asarray(route.token_index[0])):
        for slot, token in enumerate(slots):
            if token >= 0:
                gates[token, expert] = route.weight[0, expert, slot]
    return gates


def test_aux_free_router_follows_deepseek_v3_equations():
    # DeepSeek-V3 (Sec. 2.1.2): s_i = sigmoid(u^T e_i); g'_i = s_i if s_i + b_i is among the top-k
    # of {s_j + b_j}, else 0; g_i = g'_i / sum_j g'_j. Token 0 has u^T e = [2, 1, 0, -1], token 1
    # [0.5, -0.5, 1.5, 0]; the bias b = [0, 0, 0, 2] pulls expert 3 into both selections (k = 2),
    # but its weight is its unbiased affinity.
    # s(token 0) = [0.880797, 0.731059, 0.5, 0.268941]: picks 3 and 0,
    #   g = [0.880797, 0, 0, 0.268941] / 1.149738 = [0.766085, 0, 0, 0.233915];
    # s(token 1) = [0.622459, 0.377541, 0.817574, 0.5]: picks 3 and 2,
    #   g = [0, 0, 0.817574, 0.5] / 1.317574 = [0, 0, 0.620515, 0.379485].
    config = _config(router="aux_free", k=2)
    router = layers.Router(config, nnx.Rngs(0))
    kernel = np.zeros((M, 4), np.float32)
    kernel[0] = [2.0, 1.0, 0.0, -1.0]
    kernel[1] = [0.5, -0.5, 1.5, 0.0]
    router.kernel[...] = jnp.asarray(kernel)
    router.bias[...] = jnp.asarray([0.0, 0.0, 0.0, 2.0])
    x = jnp.eye(2, M)[None]  # [1, 2, M]: token t is the unit vector e_t
    route, _ = router(x, capacity=None, deterministic=True)
    want = [[0.766085, 0.0, 0.0, 0.233915], [0.0, 0.0, 0.620515, 0.379485]]
    np.testing.assert_allclose(_gates(route, 2), want, atol=1e-6)
    # moe.normalize is the tokens-choose routers' setting: 'none' (Switch's configs set it) leaves
    # the aux-free router's renormalised weights as they are
    config.moe.normalize = "none"
    other = layers.Router(config, nnx.Rngs(0))
    other.kernel[...], other.bias[...] = router.kernel[...], router.bias[...]
    route, _ = other(x, capacity=None, deterministic=True)
    np.testing.assert_allclose(_gates(route, 2), want, atol=1e-6)


def test_expert_load_before_and_after_capacity():
    # 12 tokens, k = 2: every token's first choice is expert 0 (logit 10) and its second is
    # expert 1 + t % 3 (logit 5). Eval capacity C = round(2.0 * 12 / 4) = 6: expert 0 fills 6 slots
    # and drops 6 tokens, experts 1..3 take their 4 tokens each. Routed (before capacity):
    # [12, 4, 4, 4] / 24; filled (after): [6, 4, 4, 4] / 18.
    config = _config(k=2, group_size=12, min_capacity=1, capacity_factor_eval=2.0)
    layer = layers.MoeFeedForward(config, nnx.Rngs(0))
    kernel = np.zeros((M, 4), np.float32)
    kernel[0, 0] = 10.0
    kernel[1:4, 1:4] = 5.0 * np.eye(3)
    layer.router.kernel[...] = jnp.asarray(kernel)
    x = np.zeros((1, 12, M), np.float32)
    x[0, :, 0] = 1.0
    x[0, np.arange(12), 1 + np.arange(12) % 3] = 1.0
    _, aux = layer(jnp.asarray(x), deterministic=True)
    np.testing.assert_allclose(aux.expert_load_routed, [0.5, 1 / 6, 1 / 6, 1 / 6], rtol=1e-6)
    np.testing.assert_allclose(aux.expert_load, [1 / 3, 2 / 9, 2 / 9, 2 / 9], rtol=1e-6)


@pytest.mark.parametrize(
    "k, message",
    [(0, "moe.k=0 routes each token to no expert; set moe.k >= 1"), (5, "lower k or add experts")],
)
def test_k_out_of_range_gets_the_right_advice(k, message):
    with pytest.raises(ValueError, match=message) as error:
        layers.MoeFeedForward(_config(k=k), nnx.Rngs(0))
    assert k > 0 or "lower k" not in str(error.value)


def test_expert_init_scale_scales_the_expert_weights_by_its_square_root():
    # variance scaling draws std sqrt(scale / fan_in): with the same keys, scale 0.1 gives the
    # scale-1.0 weights times sqrt(0.1); the router and other weights are unchanged
    usual = layers.MoeFeedForward(_config(), nnx.Rngs(0))
    small = layers.MoeFeedForward(_config(expert_init_scale=0.1), nnx.Rngs(0))
    for name in usual.expert_param_names():
        want = getattr(usual, name)[...] * np.sqrt(0.1)
        np.testing.assert_allclose(getattr(small, name)[...], want, rtol=1e-6)
    np.testing.assert_array_equal(small.router.kernel[...], usual.router.kernel[...])
    with pytest.raises(ValueError, match="init scale must be > 0, got 0.0"):
        layers.MoeFeedForward(_config(expert_init_scale=0.0), nnx.Rngs(0))
