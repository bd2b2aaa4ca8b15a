"""DeepSeek routing (issue 23): group-limited selection (V2 'max', V3 'top2_sum'), the V3 bias used
for selection only, routed scaling, norm_topk_prob, both against transformers' routers; the
V3 sequence-wise balance loss; device-limited routing on 8 fake devices; bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import DeepseekV2Config, DeepseekV3Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from moe_jax import layers, losses, parallel, routing
from moe_jax.config import default_config
from moe_jax.group_routing import GroupLimit, check_group_limit, group_limited_mask

# One token, E = 8 experts in 4 groups of 2. Expert 0 has the best score, but its group
# (0.9, 0.1) sums to 1.0 only: groups (0.9, 0.1), (0.6, 0.5), (0.7, 0.65), (0.2, 0.3) have maxima
# 0.9, 0.6, 0.7, 0.3 and top-2 sums 1.0, 1.1, 1.35, 0.5.
SCORES = np.array([[[0.9, 0.1, 0.6, 0.5, 0.7, 0.65, 0.2, 0.3]]], np.float32)  # [1, 1, 8]
MAX_2 = GroupLimit(4, 2, "max")
TOP2_SUM_2 = GroupLimit(4, 2, "top2_sum")


def _gates(route: routing.Routing) -> np.ndarray:
    """f32[G, T, E] the combine weight each token gets from each expert."""
    _, combine = routing.to_masks(route, route.probs.shape[1])  # [G, T, E, C]
    return np.asarray(combine.sum(-1))


def _chosen(route: routing.Routing) -> set[int]:
    """The experts chosen by any token."""
    return set(np.asarray(route.expert_index).ravel().tolist())


def _chosen_sets(route: routing.Routing) -> list[frozenset[int]]:
    """Each token's set of chosen experts."""
    return [
        frozenset(row)
        for row in np.asarray(route.expert_index).reshape(-1, route.expert_index.shape[-1]).tolist()
    ]


def test_group_mask_by_max_keeps_the_groups_of_the_best_experts():
    # 'max' keeps groups 0 (0.9) and 2 (0.7): experts 0, 1, 4, 5
    mask = group_limited_mask(SCORES, MAX_2)
    np.testing.assert_array_equal(mask[0, 0], [1, 1, 0, 0, 1, 1, 0, 0])


def test_group_mask_by_top2_sum_can_exclude_the_best_expert():
    # 'top2_sum' keeps groups 2 (1.35) and 1 (1.1): experts 2..5, so the best expert 0 is out
    mask = group_limited_mask(SCORES, TOP2_SUM_2)
    np.testing.assert_array_equal(mask[0, 0], [0, 0, 1, 1, 1, 1, 0, 0])


def test_v2_group_limited_greedy_weights_raw_probabilities_times_scaling():
    # logits log(s): probs = s / 3.95. 'max' groups 0 and 2, top-2 there: experts 0 and 4, with
    # weights 2.0 * (0.9, 0.7) / 3.95 = (0.455696, 0.354430); renormalised (norm_topk_prob):
    # 2.0 * (0.9, 0.7) / 1.6 = (1.125, 0.875).
    logits = np.log(SCORES)
    route = routing.tokens_choose(logits, k=2, capacity=None, group_limit=MAX_2, routed_scaling=2.0)
    assert _chosen(route) == {0, 4}
    want = np.zeros(8)
    want[[0, 4]] = [0.455696, 0.354430]
    np.testing.assert_allclose(_gates(route)[0, 0], want, atol=1e-6)
    route = routing.tokens_choose(
        logits, k=2, capacity=None, normalize="topk", group_limit=MAX_2, routed_scaling=2.0
    )
    want[[0, 4]] = [1.125, 0.875]
    np.testing.assert_allclose(_gates(route)[0, 0], want, atol=1e-6)
    # without the limit the top-2 are experts 0 and 4 too; with 'top2_sum' they are 4 and 5
    route = routing.tokens_choose(logits, k=2, capacity=None, group_limit=TOP2_SUM_2)
    assert _chosen(route) == {4, 5}


def test_v3_selects_by_biased_scores_and_weights_by_unbiased_ones():
    # logits logit(s): sigmoid scores s. No bias: groups 2 and 1, top-2 experts 4 (0.7) and 5
    # (0.65); renormalised 0.7 / 1.35 = 0.518519 and 0.481481, times 2.5.
    logits = np.log(SCORES / (1 - SCORES))
    common = dict(k=2, capacity=None, group_limit=TOP2_SUM_2, routed_scaling=2.5)
    route = routing.biased_top_k(logits, np.zeros(8), **common)
    want = np.zeros(8)
    want[[4, 5]] = [2.5 * 0.518519, 2.5 * 0.481481]
    np.testing.assert_allclose(_gates(route)[0, 0], want, atol=1e-5)
    # bias 0.8 on expert 6: biased group 3 is (1.0, 0.3), sum 1.3, which beats group 1 (1.1);
    # the biased top-2 of groups 2 and 3 are experts 6 (1.0) and 4 (0.7). Their weights are the
    # unbiased 0.2 and 0.7: renormalised 2.5 * (0.2, 0.7) / 0.9 = (0.555556, 1.944444), raw
    # (norm_topk_prob off) 2.5 * (0.2, 0.7) = (0.5, 1.75).
    bias = np.zeros(8, np.float32)
    bias[6] = 0.8
    route = routing.biased_top_k(logits, bias, **common)
    want = np.zeros(8)
    want[[6, 4]] = [0.555556, 1.944444]
    np.testing.assert_allclose(_gates(route)[0, 0], want, atol=1e-5)
    route = routing.biased_top_k(logits, bias, normalize="none", **common)
    want[[6, 4]] = [0.5, 1.75]
    np.testing.assert_allclose(_gates(route)[0, 0], want, atol=1e-5)
    # the losses see the unbiased affinities s / sum(s)
    np.testing.assert_allclose(route.probs[0, 0], SCORES[0, 0] / SCORES.sum(), atol=1e-6)


def test_combine_weight_gradients_match_a_fixed_selection():
    # the selection (top-k of groups and experts) has no gradient: the weights' gradient is that
    # of the unbiased scores gathered at the chosen experts, renormalised and scaled
    logits = jax.random.normal(jax.random.key(0), (2, 8, 16))
    bias = 0.3 * jax.random.normal(jax.random.key(1), (16,))
    cotangent = jax.random.normal(jax.random.key(2), (2, 8, 16))
    common = dict(k=4, capacity=None, group_limit=GroupLimit(4, 2, "top2_sum"), routed_scaling=2.5)
    chosen = routing.biased_top_k(logits, bias, **common).expert_index  # [G, T, K]

    def routed(logits):
        route = routing.biased_top_k(logits, bias, **common)
        _, combine = routing.to_masks(route, route.probs.shape[1])  # [G, T, E, C]
        return jnp.sum(combine.sum(-1) * cotangent)

    def fixed(logits):
        picked = jnp.take_along_axis(jax.nn.sigmoid(logits), chosen, -1)  # [G, T, K]
        weights = 2.5 * picked / picked.sum(-1, keepdims=True)
        gates = jnp.sum(jax.nn.one_hot(chosen, 16) * weights[..., None], axis=-2)  # [G, T, E]
        return jnp.sum(gates * cotangent)

    grad = jax.grad(routed)(logits)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad, jax.grad(fixed)(logits), atol=1e-6)


M, E = 8, 16


def _config(router, k, **moe):
    config = default_config()
    config.model.d_model = M
    config.moe.num_experts, config.moe.k, config.moe.router = E, k, router
    config.moe.router_jitter = 0.0
    for key, value in moe.items():
        config.moe[key] = value
    return config


def _hf_gates(weights: torch.Tensor, indices: torch.Tensor) -> np.ndarray:
    """f32[N, E] dense gates from transformers' top-k weights and indices."""
    dense = torch.zeros(indices.shape[0], E).scatter(1, indices, weights.float())
    return dense.detach().numpy()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_aux_free_router_matches_transformers_deepseek_v3(norm_topk_prob):
    hf_config = DeepseekV3Config(
        hidden_size=M,
        n_routed_experts=E,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=2.5,
        norm_topk_prob=norm_topk_prob,
    )
    hf_router = DeepseekV3TopkRouter(hf_config)
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(E, M)).astype(np.float32)
    bias = (0.5 * rng.normal(size=E)).astype(np.float32)
    x = rng.normal(size=(32, M)).astype(np.float32)
    with torch.no_grad():
        hf_router.weight.copy_(torch.from_numpy(weight))
        hf_router.e_score_correction_bias.copy_(torch.from_numpy(bias))
        _, hf_weights, hf_indices = hf_router(torch.from_numpy(x))
    config = _config("aux_free", 4, num_groups=4, topk_groups=2, routed_scaling=2.5)
    router = layers.Router(config, nnx.Rngs(0))
    router.kernel[...] = jnp.asarray(weight.T)
    router.bias[...] = jnp.asarray(bias)
    if not norm_topk_prob:  # moe.normalize is not the aux_free router's; set it on the module
        router.normalize = "none"
    route, _ = router(jnp.asarray(x)[None], capacity=None, deterministic=True)
    np.testing.assert_array_equal(
        np.sort(np.asarray(route.expert_index[0]), -1), np.sort(hf_indices.numpy(), -1)
    )
    np.testing.assert_allclose(_gates(route)[0], _hf_gates(hf_weights, hf_indices), atol=1e-5)
    # the bias and the group limit both change choices on these logits
    logits = jnp.asarray(x @ weight.T)[None]  # [1, 32, E]
    ungrouped = routing.biased_top_k(logits, bias, k=4, capacity=None)
    unbiased = routing.biased_top_k(
        logits, np.zeros(E), k=4, capacity=None, group_limit=GroupLimit(4, 2, "top2_sum")
    )
    assert _chosen_sets(ungrouped) != _chosen_sets(route)
    assert _chosen_sets(unbiased) != _chosen_sets(route)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_tokens_choose_matches_transformers_deepseek_v2(topk_method):
    limited = topk_method == "group_limited_greedy"
    hf_config = DeepseekV2Config(
        hidden_size=M,
        intermediate_size=16,
        moe_intermediate_size=4,
        n_routed_experts=E,
        n_shared_experts=1,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method=topk_method,
        routed_scaling_factor=16.0,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    hf_moe = DeepseekV2Moe(hf_config)
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(E, M)).astype(np.float32)
    x = rng.normal(size=(32, M)).astype(np.float32)
    with torch.no_grad():
        hf_moe.gate.weight.copy_(torch.from_numpy(weight))
        _, hf_weights, hf_indices = hf_moe.gate(torch.from_numpy(x))
    groups = dict(num_groups=4, topk_groups=2) if limited else {}
    config = _config("tokens_choose", 3, routed_scaling=16.0, **groups)
    router = layers.Router(config, nnx.Rngs(0))
    router.kernel[...] = jnp.asarray(weight.T)
    route, _ = router(jnp.asarray(x)[None], capacity=None, deterministic=True)
    np.testing.assert_array_equal(
        np.sort(np.asarray(route.expert_index[0]), -1), np.sort(hf_indices.numpy(), -1)
    )
    np.testing.assert_allclose(_gates(route)[0], _hf_gates(hf_weights, hf_indices), atol=1e-5)


def test_sequence_wise_balance_loss_literal():
    # DeepSeek-V3 Eqs. 17-20 on one sequence of T = 2 tokens, E = 4, K = 2. Logits (2, 1, 0, -1)
    # and (0.5, -0.5, 1.5, 0): s'_i = s_i / sum_j s_j = (0.369959, 0.307065, 0.210014, 0.112963)
    # and (0.268582, 0.162903, 0.352772, 0.215743), so P = (0.319271, 0.234984, 0.281393,
    # 0.164353). No bias: the tokens choose {0, 1} and {2, 0}: counts (2, 1, 1, 0), f = E / (K T)
    # * counts = (2, 1, 1, 0), L = 2 P_0 + P_1 + P_2 = 1.154918. Bias 2 on expert 3: they choose
    # {3, 0} and {3, 2}: f = (1, 0, 1, 2), L = P_0 + P_2 + 2 P_3 = 0.929369; the bias moves f, and
    # P stays the unbiased affinities.
    config = _config("aux_free", 2, num_experts=4, group_size=0)
    config.loss.aux_scope = "sequence"
    layer = layers.MoeFeedForward(config, nnx.Rngs(0))
    kernel = np.zeros((M, 4), np.float32)
    kernel[0] = [2.0, 1.0, 0.0, -1.0]
    kernel[1] = [0.5, -0.5, 1.5, 0.0]
    layer.router.kernel[...] = jnp.asarray(kernel)
    x = jnp.eye(2, M)[None]  # [B=1, L=2, M]: token t is the unit vector e_t
    _, aux = layer(x, deterministic=True)
    np.testing.assert_allclose(aux.load_balancing_loss, 1.154918, rtol=1e-6)
    layer.router.bias[...] = jnp.asarray([0.0, 0.0, 0.0, 2.0])
    _, aux = layer(x, deterministic=True)
    np.testing.assert_allclose(aux.load_balancing_loss, 0.929369, rtol=1e-6)
    # the pure loss: Switch's form over K
    route, _ = layer.router(x, capacity=None, deterministic=True)
    np.testing.assert_allclose(
        losses.deepseek_balance_loss(route.probs, route.expert_index),
        losses.load_balancing_loss(route.probs, route.expert_index) / 2,
        rtol=1e-6,
    )


def _shards_per_token(expert_index: jax.Array, experts_per_shard: int) -> np.ndarray:
    """i32[N]: how many expert shards each token's experts lie on."""
    shards = np.asarray(expert_index).reshape(-1, expert_index.shape[-1]) // experts_per_shard
    return np.array([len(set(row)) for row in shards])


def test_device_limited_routing_on_an_expert_mesh():
    # 8 fake devices, all on the expert axis: 2 experts per shard. k = 4 experts per token on
    # at most M = 2 shards; without the limit most tokens spread over 3 or 4.
    x = jax.random.normal(jax.random.key(0), (8, 16, M))  # [G, T, M], one group per device
    mesh = parallel.make_mesh(1, 8, 1)
    spread = {}
    for max_shards in (0, 2):
        config = _config("aux_free", 4, max_expert_shards=max_shards)
        router = layers.Router(config, nnx.Rngs(0))
        router.bias[...] = 0.1 * jax.random.normal(jax.random.key(1), (E,))
        with jax.set_mesh(mesh):
            route, _ = router(x, capacity=None, deterministic=True)
        spread[max_shards] = _shards_per_token(route.expert_index, E // 8)
    assert spread[2].max() <= 2
    assert spread[0].max() > 2
    # without a mesh (one shard) the limit is off
    route, _ = router(x, capacity=None, deterministic=True)
    assert _shards_per_token(route.expert_index, E // 8).max() > 2


def test_device_limited_layer_equals_the_group_limit_of_its_shards():
    # on a (data 2, expert 4) mesh, max_expert_shards=2 is the group limit of 4 groups (one per
    # shard), keep 2, scored by their best probability: the expert-parallel layer on the mesh
    # gives the single-device output of tokens_choose with num_groups=4, topk_groups=2
    x = jax.random.normal(jax.random.key(0), (8, 16, M))  # [B, L, M], a group per device
    common = dict(d_ff=8, group_size=16, capacity_factor_eval=4.0)
    sharded = layers.MoeFeedForward(
        _config("tokens_choose", 3, max_expert_shards=2, **common), nnx.Rngs(0)
    )
    grouped = layers.MoeFeedForward(
        _config("tokens_choose", 3, num_groups=4, topk_groups=2, **common), nnx.Rngs(0)
    )
    nnx.update(grouped, nnx.state(sharded))
    want, _ = grouped(x, deterministic=True)
    with jax.set_mesh(parallel.make_mesh(2, 4, 1)):
        got, _ = nnx.jit(lambda layer, x: layer(x, deterministic=True))(sharded, x)
    np.testing.assert_allclose(got, want, atol=1e-5)
    plain, _ = layers.MoeFeedForward(_config("tokens_choose", 3, **common), nnx.Rngs(0))(
        x, deterministic=True
    )
    assert not np.allclose(plain, want, atol=1e-3)


@pytest.mark.parametrize(
    "limit, k, message",
    [
        (GroupLimit(3, 1), 2, r"num_groups=3 must be an int >= 1 that divides num_experts=8"),
        (GroupLimit(4, 5), 2, r"topk_groups=5 must be an int in \[1, num_groups=4\]"),
        (GroupLimit(4, 2), 5, r"k=5 experts per token do not fit in topk_groups=2 groups of 2"),
        (GroupLimit(8, 2, "top2_sum"), 1, r"leaves 1 expert per group"),
        (GroupLimit(4, 2, "mean"), 1, r"group_score must be one of"),
    ],
)
def test_bad_group_limits_name_the_values(limit, k, message):
    with pytest.raises(ValueError, match=message):
        check_group_limit(limit, num_experts=8, k=k)
    with pytest.raises(ValueError, match=message):
        routing.tokens_choose(np.log(SCORES), k=k, capacity=None, group_limit=limit)


def test_bad_deepseek_settings_name_the_values():
    with pytest.raises(ValueError, match=r"moe.num_groups / moe.topk_groups: num_groups=3"):
        layers.Router(_config("aux_free", 2, num_groups=3), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"k=4 experts per token do not fit in topk_groups=1"):
        layers.Router(_config("tokens_choose", 4, num_groups=8, topk_groups=1), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"router 'gshard_top2' does not do"):
        layers.Router(_config("gshard_top2", 2, routed_scaling=2.5), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"both limit"):
        layers.Router(_config("aux_free", 2, num_groups=4, max_expert_shards=2), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"moe.routed_scaling must be > 0, got 0.0"):
        layers.Router(_config("aux_free", 2, routed_scaling=0.0), nnx.Rngs(0))
    # k = 4 on at most 1 of 8 shards of 2 experts: found when the router meets the mesh
    router = layers.Router(_config("aux_free", 4, max_expert_shards=1), nnx.Rngs(0))
    with jax.set_mesh(parallel.make_mesh(1, 8, 1)):
        with pytest.raises(ValueError, match=r"moe.max_expert_shards=1 on 8 expert shards: k=4"):
            router(jnp.zeros((8, 4, M)), capacity=None, deterministic=True)
