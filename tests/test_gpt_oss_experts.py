"""gpt-oss's MoE pieces (issue 28): biased experts, the clamped SwiGLU and the router bias.

Oracles: a hand-computed literal case, a per-token loop over each token's slots (values and
gradients), the single-device run for expert parallelism, and transformers' own `GptOssMLP`
(torch) on the same weights.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx

from moe_jax import config as config_lib
from moe_jax import dispatch, experts, layers, models, parallel, quantize, ragged, routing
from tests import test_parallel
from tests.tolerances import assert_trees_close

G, T, M, H, E, K = 2, 6, 4, 8, 4, 2
LIMIT, ALPHA = 7.0, 1.702  # gpt-oss's swiglu_limit and swiglu_alpha


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def test_clamped_swiglu_literal_case():
    # gate 8 -> min(8, 7) = 7; up 9 -> clip 7: (7 + 1) * 7 * sigmoid(1.702 * 7 = 11.914)
    #   = 8 * 6.9999531 = 55.999625;
    # gate 2, up -0.5 (inside the clamp): (-0.5 + 1) * 2 * sigmoid(3.404) = 0.5 * 1.9356586
    #   = 0.9678293;
    # gate -3 (no lower clamp), up -10 -> -7: (-7 + 1) * -3 * sigmoid(-5.106) = 18 * 0.0060238
    #   = 0.1084279.
    gate = jnp.array([8.0, 2.0, -3.0])
    up = jnp.array([9.0, -0.5, -10.0])
    expected = [
        8.0 * 7.0 * _sigmoid(1.702 * 7.0),
        0.5 * 2.0 * _sigmoid(1.702 * 2.0),
        18.0 * _sigmoid(-1.702 * 3.0),
    ]
    np.testing.assert_allclose(expected, [55.999625, 0.9678293, 0.1084279], rtol=1e-6)
    np.testing.assert_allclose(experts.clamped_swiglu(gate, up), expected, rtol=1e-6)
    # through `ffn`: x @ wi_gate = x = gate, x @ wi + bi = 0 + up, identity wo
    eye, zeros = jnp.eye(3)[None], jnp.zeros((1, 3, 3))  # [1, 3, 3]
    params = {"wi_gate": eye, "wi": zeros, "bi": up[None], "wo": eye}
    y = experts.ffn(params, gate[None, None], activation="swiglu_clamped")
    np.testing.assert_allclose(y[0, 0], expected, rtol=1e-6)
    # limit 1 and slope 2 passed on: gate 2 -> 1, up -0.5 inside: 0.5 * 1 * sigmoid(2 * 1)
    y = experts.ffn(
        params,
        gate[None, None],
        activation="swiglu_clamped",
        swiglu_limit=1.0,
        swiglu_alpha=2.0,
    )
    np.testing.assert_allclose(y[0, 0, 1], 0.5 * _sigmoid(2.0), rtol=1e-6)


# ------------------------------------------------------- biased experts in every backend


def _biased_params(seed=0):
    """Stacked clamped-SwiGLU experts with random (nonzero) biases."""
    key_params, key_bias = jax.random.split(jax.random.key(seed))
    params = experts.init_ffn_params(
        key_params, d_model=M, d_ff=H, activation="swiglu_clamped", num_experts=E, bias=True
    )
    for key, name in zip(jax.random.split(key_bias, 3), experts.BIAS_NAMES, strict=True):
        params[name] = 2.0 * jax.random.normal(key, params[name].shape)
    return params


def _expert(params, e, row):
    """Expert `e` on one token row f32[M], written out: gpt-oss's clamped SwiGLU with biases."""
    gate = jnp.minimum(row @ params["wi_gate"][e] + params["bi_gate"][e], LIMIT)
    up = jnp.clip(row @ params["wi"][e] + params["bi"][e], -LIMIT, LIMIT)
    return ((up + 1.0) * gate * jax.nn.sigmoid(ALPHA * gate)) @ params["wo"][e] + params["bo"][e]


def _per_token_reference(x, route, params):
    """y[g, t] = sum over the slots (e, c) holding token t of weight * expert_e(x[g, t])."""
    token_index = np.asarray(route.token_index)
    rows = []
    for g in range(G):
        for t in range(T):
            y = jnp.zeros((M,))
            for e, c in zip(*np.nonzero(token_index[g] == t), strict=True):
                y = y + route.weight[g, e, c] * _expert(params, e, x[g, t])
            rows.append(y)
    return jnp.stack(rows).reshape(G, T, M)


def _backend_run(backend):
    """`(x, route, params) -> y` of one backend; 'ragged' is the TPU/GPU dropless path."""
    expert_fn = functools.partial(experts.ffn, activation="swiglu_clamped")
    if backend == "ragged":
        return lambda x, route, params: ragged.dropless(x, route, expert_fn, params)
    return lambda x, route, params: dispatch.dispatch_combine(
        x, route, expert_fn, params, backend=backend, block_size=4
    )


@pytest.mark.parametrize("backend", ["einsum", "gather", "dropless", "ragged"])
def test_biased_experts_match_a_per_token_reference_with_gradients(backend):
    keys = jax.random.split(jax.random.key(1), 3)
    x = 3.0 * jax.random.normal(keys[0], (G, T, M))  # large enough to reach the clamps
    logits = jax.random.normal(keys[1], (G, T, E))
    cotangent = jax.random.normal(keys[2], (G, T, M))
    params = _biased_params()
    dropless = backend in ("dropless", "ragged")
    # 2 slots per expert for T * K = 12 choices over 4 experts: some are dropped
    route = routing.tokens_choose(logits, k=K, capacity=None if dropless else 2)
    unplaced = np.asarray(routing.slots_per_token(route)) == 0
    assert dropless or unplaced.any()

    def loss(run, params):
        y = run(x, route, params)
        return jnp.sum(y * cotangent), y

    grad = jax.value_and_grad(loss, argnums=1, has_aux=True)
    (_, want), want_grads = grad(_per_token_reference, params)
    (_, got), got_grads = jax.jit(grad, static_argnums=0)(_backend_run(backend), params)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # the slots of dropped choices carry the bias too, but nothing of them reaches the output
    assert np.all(np.asarray(got)[unplaced] == 0.0)
    assert all(float(jnp.abs(want_grads[name]).max()) > 0 for name in experts.BIAS_NAMES)
    # a weight's gradient sums the G * T tokens' K terms
    assert_trees_close(got_grads, want_grads, num_summed=G * T * K, rtol=1e-4)


def test_tokens_choose_topk_weights_are_a_softmax_over_the_top_k_logits():
    """gpt-oss's router: softmax over the k largest logits = softmax over all, renormalised."""
    logits = 3.0 * jax.random.normal(jax.random.key(2), (G, T, E))
    route = routing.tokens_choose(logits, k=K, capacity=None, normalize="topk")
    top_logits, top_experts = jax.lax.top_k(logits, K)  # [G, T, K]
    gpt_oss = jax.nn.softmax(top_logits, axis=-1)  # [G, T, K]
    expected = jnp.sum(jax.nn.one_hot(top_experts, E) * gpt_oss[..., None], axis=2)  # [G, T, E]
    _, combine = routing.to_masks(route, T)  # [G, T, E, C]
    np.testing.assert_allclose(combine.sum(-1), expected, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------- the MoE layer and config


def _gpt_oss_config(backend="dropless", num_tokens=T):
    config = config_lib.default_config()
    config.model.d_model = M
    config.model.d_ff = H
    config.moe.num_experts = E
    config.moe.k = K
    config.moe.activation = "swiglu_clamped"
    config.moe.normalize = "topk"
    config.moe.expert_bias = True
    config.moe.router_bias = True
    config.moe.backend = backend
    config.moe.group_size = 0  # one group per sequence
    config.moe.expert_capacity = num_tokens  # no token dropped by the capacity backends
    return config


def _randomise(layer, seed, scale=1.0):
    """Every parameter of `layer` drawn from N(0, scale^2), the zero-initialised biases too."""
    for index, (_, variable) in enumerate(nnx.to_flat_state(nnx.state(layer, nnx.Param))):
        key = jax.random.fold_in(jax.random.key(seed), index)
        variable.set_value(scale * jax.random.normal(key, variable.get_value().shape))


def _torch_gpt_oss_mlp(layer):
    """transformers' GptOssMLP (float64) holding `layer`'s weights."""
    torch = pytest.importorskip("torch")
    gpt_oss = pytest.importorskip("transformers.models.gpt_oss.modeling_gpt_oss")
    from transformers import GptOssConfig

    hf_config = GptOssConfig(
        hidden_size=M,
        intermediate_size=H,
        num_local_experts=E,
        num_experts_per_tok=K,
        swiglu_limit=LIMIT,
    )
    mlp = gpt_oss.GptOssMLP(hf_config).double().eval()

    def tensor(variable):
        return torch.from_numpy(np.asarray(variable[...], np.float64))

    gate_up = torch.empty(E, M, 2 * H, dtype=torch.float64)  # gate at even columns, up at odd
    gate_up[..., ::2], gate_up[..., 1::2] = tensor(layer.wi_gate), tensor(layer.wi)
    gate_up_bias = torch.empty(E, 2 * H, dtype=torch.float64)
    gate_up_bias[:, ::2], gate_up_bias[:, 1::2] = tensor(layer.bi_gate), tensor(layer.bi)
    with torch.no_grad():
        mlp.experts.gate_up_proj.copy_(gate_up)
        mlp.experts.gate_up_proj_bias.copy_(gate_up_bias)
        mlp.experts.down_proj.copy_(tensor(layer.wo))  # [E, H, M]
        mlp.experts.down_proj_bias.copy_(tensor(layer.bo))  # [E, M]
        mlp.router.weight.copy_(tensor(layer.router.kernel).T)  # [E, M]
        mlp.router.bias.copy_(tensor(layer.router.logit_bias))  # [E]
    assert mlp.experts.alpha == ALPHA
    return mlp


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_layer_equals_transformers_gpt_oss_mlp(backend):
    torch = pytest.importorskip("torch")
    layer = layers.MoeFeedForward(_gpt_oss_config(backend), rngs=nnx.Rngs(0))
    _randomise(layer, seed=3)
    layer.trace_routing = True
    x = 2.0 * jax.random.normal(jax.random.key(4), (3, T, M))
    up = np.einsum("blm,emh->bleh", x, layer.wi[...])
    assert np.abs(up).max() > LIMIT  # the clamp is reached
    y, aux = layer(x, deterministic=True)

    mlp = _torch_gpt_oss_mlp(layer)
    with torch.no_grad():
        want, scores = mlp(torch.from_numpy(np.asarray(x, np.float64)))
        _, _, indices = mlp.router(torch.from_numpy(np.asarray(x, np.float64)).reshape(-1, M))
    want = want.numpy()
    weights = np.zeros((3 * T, E))  # gpt-oss's softmax over each token's top-k logits
    np.put_along_axis(weights, indices.numpy(), scores.numpy(), axis=-1)
    np.testing.assert_allclose(aux.token_weights.reshape(-1, E), weights, rtol=1e-5, atol=1e-6)
    # an output sums K experts' H hidden units
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=K * H * 1e-6 * np.abs(want).max())


def test_expert_biases_change_the_output_and_nothing_the_router_reports():
    """Capacity 1 drops tokens: their empty slots run the biased experts on zero rows, with
    combine weight 0, so the dropped tokens' output stays 0 and every aux statistic is the one
    of the same layer with zero biases."""
    config = _gpt_oss_config("gather", num_tokens=1)
    layer = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(5), (2, T, M))
    layer.trace_routing = True
    y_zero, aux_zero = layer(x, deterministic=True)
    for seed, name in enumerate(experts.BIAS_NAMES):
        bias = getattr(layer, name)
        bias.set_value(jax.random.normal(jax.random.key(seed), bias.get_value().shape))
    y, aux = layer(x, deterministic=True)
    assert float(aux.fraction_tokens_dropped) > 0
    dropped = np.asarray(aux.token_weights).sum(-1) == 0  # [B, L]
    assert np.all(np.asarray(y)[dropped] == 0.0) and np.any(np.asarray(y) != y_zero)
    jax.tree.map(np.testing.assert_array_equal, aux, aux_zero)


def test_zero_biases_leave_the_default_layer_as_it_is():
    """Biases start at zero: the layer with `expert_bias` and `router_bias` computes bit for
    bit the default layer of the same seed (the weights are drawn alike)."""
    config = _gpt_oss_config("dropless")
    default = _gpt_oss_config("dropless")
    default.moe.expert_bias = default.moe.router_bias = False
    x = jax.random.normal(jax.random.key(6), (2, T, M))
    y_biased, _ = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))(x, deterministic=True)
    y_default, _ = layers.MoeFeedForward(default, rngs=nnx.Rngs(0))(x, deterministic=True)
    np.testing.assert_array_equal(y_biased, y_default)


def _param_paths(config):
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    return {path: p.shape for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_biases_appear_in_the_parameter_tree_and_count_only_when_enabled():
    config = config_lib.default_config()  # 4 decoder layers, every second one sparse
    plain = _param_paths(config)
    assert not any(path[-1] in (*experts.BIAS_NAMES, "logit_bias") for path in plain)
    config.moe.expert_bias = True
    config.moe.router_bias = True
    biased = _param_paths(config)
    added = {path: shape for path, shape in biased.items() if path not in plain}
    num_experts, d_ff, d_model = config.moe.num_experts, config.model.d_ff, config.model.d_model
    sparse_layers = {path[:-2] for path in biased if path[-2:] == ("router", "kernel")}
    assert len(sparse_layers) == 2
    expected = {}
    for layer_path in sparse_layers:
        expected[(*layer_path, "bi")] = (num_experts, d_ff)
        expected[(*layer_path, "bi_gate")] = (num_experts, d_ff)
        expected[(*layer_path, "bo")] = (num_experts, d_model)
        expected[(*layer_path, "router", "logit_bias")] = (num_experts,)
    assert added == expected
    assert ("decoder", "segments", 0, 0, "layers", 1, "ffn", "bi") in added
    before = models.count_params(config_lib.default_config())
    after = models.count_params(config)
    per_expert, k = 2 * d_ff + d_model, config.moe.k
    assert after["total"] - before["total"] == 2 * (num_experts * per_expert + num_experts)
    # a token touches the biases of its k experts, and the whole router bias
    assert after["active"] - before["active"] == 2 * (k * per_expert + num_experts)


def test_quantization_keeps_the_expert_biases_in_float():
    layer = layers.MoeFeedForward(_gpt_oss_config(), rngs=nnx.Rngs(0))
    quantize.quantize_experts(layer, 8)
    assert isinstance(layer.wi.get_value(), qwix.QArray)
    assert all(
        isinstance(getattr(layer, name).get_value(), jax.Array) for name in experts.BIAS_NAMES
    )
    layer(jnp.ones((1, T, M)), deterministic=True)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"swiglu_limit": 0.0}, "swiglu_limit.*0.0"),
        ({"swiglu_alpha": -1.0}, "swiglu_alpha.*-1.0"),
        ({"router": "cosine"}, "router_bias.*'cosine'"),
        ({"router": "noisy_top_k"}, "router_bias.*'noisy_top_k'"),
        ({"activation": "swiglu-clamped"}, "'swiglu-clamped'.*swiglu_clamped"),
    ],
)
def test_bad_gpt_oss_settings_raise_naming_the_value(overrides, message):
    config = _gpt_oss_config()
    config.moe.update(overrides)
    with pytest.raises(ValueError, match=message):
        layers.MoeFeedForward(config, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------- expert parallelism


@functools.cache
def _parallel_layers(strategy="shard_map"):
    """gpt-oss layers (random biases) per backend, as `(graphdef, params, rest)`; the gather
    and einsum ones drop tokens (test_parallel's capacity factor 0.5)."""
    split = []
    for backend in ("gather", "einsum", "dropless"):
        config = test_parallel._config("tokens_choose", K, 0.5, strategy)
        config.moe.update(
            {
                "backend": backend,
                "activation": "swiglu_clamped",
                "normalize": "topk",
                "expert_bias": True,
                "router_bias": True,
            }
        )
        layer = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))
        _randomise(layer, seed=7, scale=0.5)
        split.append(nnx.split(layer, nnx.Param, ...))
    return tuple(split)


@functools.cache
def _parallel_reference():
    x, cotangent = test_parallel._inputs()
    return jax.device_get(test_parallel._outputs_and_grads(_parallel_layers(), x, cotangent))


@pytest.mark.parametrize(
    "mesh_shape, strategy",
    [((2, 2, 2), "shard_map"), ((1, 8, 1), "shard_map"), ((2, 2, 2), "gspmd")],
    ids=str,
)
def test_biased_experts_under_expert_parallelism_match_single_device(mesh_shape, strategy):
    """(2, 2, 2) splits the hidden dim over 'model' too: `bo`, whole on every H shard, must
    still be added once."""
    expected = _parallel_reference()
    assert float(expected[0]["dropped"]) > 0 and float(expected[2]["dropped"]) == 0
    mesh = parallel.make_mesh(*mesh_shape)
    x, cotangent = test_parallel._inputs()
    with jax.set_mesh(mesh):
        split_layers = [
            (graphdef, *jax.device_put(states, parallel.state_shardings(states, mesh)))
            for graphdef, *states in _parallel_layers(strategy)
        ]
        x = jax.device_put(x, parallel.batch_sharding(mesh, ndim=3))
        actual = test_parallel._outputs_and_grads(split_layers, x, cotangent)
    bias_grads = [result["grads"][0]["bo"] for result in expected]
    assert all(float(np.abs(grad).max()) > 0 for grad in bias_grads)
    test_parallel._assert_close(actual, expected)
