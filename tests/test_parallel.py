"""Meshes, rules, sharded creation, and expert parallelism against a single-device run.

The oracle for every sharded computation is the same computation on one device with the same
global input and the same group size (routing is per group, so results match exactly up to
float32 summation order).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from moe_jax import config as config_lib
from moe_jax import experts, layers, parallel, routing
from tests.tolerances import assert_trees_close

MESHES = [(8, 1, 1), (2, 4, 1), (1, 8, 1), (4, 2, 1), (2, 2, 2)]
# (router, k, capacity_factor_eval): C = 1 slot per expert drops tokens; C = T = 8 drops none
VARIANTS = [
    ("tokens_choose", 1, 0.5),
    ("tokens_choose", 1, 8.0),
    ("tokens_choose", 2, 0.5),
    ("tokens_choose", 2, 8.0),
    ("experts_choose", 1, 0.5),
    ("experts_choose", 1, 8.0),
]
BATCH, LENGTH, D_MODEL, D_FF, NUM_EXPERTS, GROUP_SIZE = 8, 8, 8, 16, 8, 8


def _config(router="tokens_choose", k=1, capacity_factor=0.5, strategy="shard_map"):
    config = config_lib.default_config()
    config.model.d_model = D_MODEL
    config.model.d_ff = D_FF
    config.moe.num_experts = NUM_EXPERTS
    config.moe.router = router
    config.moe.k = k
    config.moe.group_size = GROUP_SIZE
    config.moe.min_capacity = 1
    config.moe.capacity_factor_eval = capacity_factor
    config.moe.backend = "gather"
    config.mesh.expert_parallelism = strategy
    return config


# ---------------------------------------------------------------------------------- meshes


def test_make_mesh_shapes_and_auto_axes():
    mesh = parallel.make_mesh(2, 4, 1)
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(parallel.make_mesh(-1, 2, 2).shape) == {"data": 2, "expert": 2, "model": 2}
    assert dict(parallel.make_mesh(1, -1, 1).shape)["expert"] == 8
    config = _config()
    config.mesh.expert = 4
    assert dict(parallel.mesh_from_config(config).shape) == {"data": 2, "expert": 4, "model": 1}


@pytest.mark.parametrize(
    "sizes, message",
    [((2, 2, 1), "needs 4 devices but 8"), ((-1, 3, 1), "do not divide"), ((-1, -1, 1), "one")],
)
def test_make_mesh_rejects_bad_sizes(sizes, message):
    with pytest.raises(ValueError, match=message):
        parallel.make_mesh(*sizes)


# ----------------------------------------------------------------------------------- rules


def test_rules_from_config_and_override():
    config = _config()
    assert parallel.logical_rules(config) == parallel.DEFAULT_RULES
    config.mesh.rules.embed = "model"
    config.mesh.rules.batch = ("data",)
    table = dict(parallel.logical_rules(config))
    assert table["embed"] == ("model",) and table["batch"] == ("data",)
    # 'mlp' -> model is dropped in the second dim because 'embed' already took 'model'
    assert parallel.logical_to_spec(("embed", "mlp"), config) == PartitionSpec("model", None)
    assert parallel.logical_to_spec(("expert", "embed", "mlp")) == PartitionSpec(
        "expert", None, "model"
    )
    assert parallel.batch_spec(3) == PartitionSpec(("data", "expert"), None, None)


def test_rules_reject_unknown_names():
    with pytest.raises(ValueError, match="'token'"):
        parallel.logical_to_spec(("token",))
    with pytest.raises(ValueError, match="'pipeline'"):
        parallel.logical_rules({"batch": "pipeline"})


# ---------------------------------------------------------------------- sharded creation


def test_activations_keep_their_embedding_dim_whole_under_fsdp_rules():
    # FSDP splits weights' 'embed' over the batch axes; the residual stream's rows take them
    fsdp = parallel.logical_rules({"embed": ("data", "expert")})
    names = ("batch", "length", "activation_embed")
    mesh = parallel.make_mesh(2, 4, 1)

    def sharding_of(rows: int):
        x = jax.ShapeDtypeStruct((rows, 4, 16), jnp.float32)
        with jax.set_mesh(mesh):
            traced = jax.jit(lambda x: parallel.constrain(x, names, fsdp)).trace(x)
            spec = traced.lower().compile().output_shardings.spec
        return tuple(spec) + (None,) * (3 - len(spec))

    assert sharding_of(8) == (("data", "expert"), None, None)
    assert sharding_of(3) == (None, None, None)  # 3 rows stay whole on 8 devices
    x = jnp.ones((3, 4, 16))
    assert parallel.constrain(x, names, fsdp) is x  # no mesh: nothing to hold it to


def test_create_sharded_layer_and_optimizer_state():
    config = _config()
    mesh = parallel.make_mesh(2, 2, 2)
    layer = parallel.create_sharded(
        lambda: layers.MoeFeedForward(config, rngs=nnx.Rngs(0)), mesh, config
    )
    # sharded creation draws the same numbers as a plain one
    plain = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(layer.wi[...]), np.asarray(plain.wi[...]))
    # one device holds 1/2 of the experts and 1/2 of the hidden units; the router is replicated
    assert _shard_shape(layer.wi[...]) == (NUM_EXPERTS // 2, D_MODEL, D_FF // 2)
    assert _shard_shape(layer.wo[...]) == (NUM_EXPERTS // 2, D_FF // 2, D_MODEL)
    assert _shard_shape(layer.router.kernel[...]) == (D_MODEL, NUM_EXPERTS)

    with jax.set_mesh(mesh):
        optimizer = nnx.Optimizer(layer, optax.adam(1e-3), wrt=nnx.Param)
    shardings = parallel.state_shardings(optimizer, mesh, config)
    moments = [s for p, s in nnx.to_flat_state(shardings) if p[-1] == "wi" and "opt_state" in p]
    assert moments and all(
        s.get_value().spec == PartitionSpec("expert", None, "model") for s in moments
    )


def _shard_shape(array):
    return array.sharding.shard_shape(array.shape)


def test_state_shardings_reject_uneven_dims():
    config = _config()
    config.model.d_ff = 12
    layer = nnx.eval_shape(lambda: layers.MoeFeedForward(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="size 12, which does not divide by 8"):
        parallel.state_shardings(layer, parallel.make_mesh(1, 1, 8))
    parallel.state_shardings(layer, parallel.make_mesh(2, 1, 4))  # 12 hidden units over 4


# ---------------------------------------------------------------------- expert parallelism


@functools.cache
def _layers(strategy="shard_map"):
    """One MoE layer per variant as `(graphdef, params, rest)`.

    Every layer's hook is built from its config, and nothing else sets it: the hook computes
    locally when there is no mesh, so the same layers give the reference.
    """
    split = []
    for router, k, capacity_factor in VARIANTS:
        config = _config(router, k, capacity_factor, strategy)
        layer = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))
        assert layer.experts_impl == parallel.ExpertParallel.from_config(config)
        split.append(nnx.split(layer, nnx.Param, ...))
    return tuple(split)


def _inputs():
    key_x, key_cotangent = jax.random.split(jax.random.key(1))
    x = jax.random.normal(key_x, (BATCH, LENGTH, D_MODEL))
    cotangent = jax.random.normal(key_cotangent, (BATCH, LENGTH, D_MODEL))
    return x, cotangent


def _outputs_and_grads(split_layers, x, cotangent):
    """Per variant: output y, and gradients of `sum(y * cotangent) + aux losses` (params, x)."""
    graphdefs, params, others = zip(*split_layers)

    @jax.jit
    def run(params, others, x, cotangent):
        results = []
        for graphdef, param, other in zip(graphdefs, params, others):

            def loss(param, x, graphdef=graphdef, other=other):
                y, aux = nnx.merge(graphdef, param, other)(x, deterministic=True)
                total = jnp.sum(y * cotangent) + aux.load_balancing_loss + aux.router_z_loss
                return total, (y, aux.fraction_tokens_dropped)

            grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
            (_, (y, dropped)), grads = grad_fn(param, x)
            results.append({"y": y, "dropped": dropped, "grads": grads})
        return results

    return run(params, others, x, cotangent)


@functools.cache
def _single_device_reference():
    x, cotangent = _inputs()
    return jax.device_get(_outputs_and_grads(_layers(), x, cotangent))


def _assert_close(actual, expected):
    # sums split over devices round differently in float32; a weight's gradient sums the
    # BATCH * LENGTH tokens' terms
    assert_trees_close(actual, expected, num_summed=BATCH * LENGTH)


def _check_mesh(mesh_shape, strategy):
    expected = _single_device_reference()
    # the drop variants do drop tokens, the others do not
    dropped = [float(result["dropped"]) for result in expected]
    assert all(d > 0 for d in dropped[0::2]) and not any(dropped[1::2]), dropped
    mesh = parallel.make_mesh(*mesh_shape)
    x, cotangent = _inputs()
    with jax.set_mesh(mesh):
        split_layers = [
            (graphdef, *jax.device_put(states, parallel.state_shardings(states, mesh)))
            for graphdef, *states in _layers(strategy)
        ]
        x = jax.device_put(x, parallel.batch_sharding(mesh, ndim=3))
        actual = _outputs_and_grads(split_layers, x, cotangent)
    # the output stays split along the batch like the input
    shards = parallel.batch_shards(mesh)
    assert _shard_shape(actual[0]["y"]) == (BATCH // shards, LENGTH, D_MODEL)
    _assert_close(actual, expected)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=str)
def test_shard_map_matches_single_device(mesh_shape):
    _check_mesh(mesh_shape, "shard_map")


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2)], ids=str)
def test_gspmd_matches_single_device(mesh_shape):
    _check_mesh(mesh_shape, "gspmd")


def _routing_arrays(num_groups, num_experts, capacity=2, tokens=8):
    """A routing of the right shapes (contents do not matter for the shape checks)."""
    return routing.Routing(
        token_index=np.zeros((num_groups, num_experts, capacity), np.int32),
        weight=np.zeros((num_groups, num_experts, capacity), np.float32),
        probs=np.zeros((num_groups, tokens, num_experts), np.float32),
        expert_index=None,
    )


@pytest.mark.parametrize("strategy", parallel.EXPERT_PARALLELISM)
def test_uneven_experts_or_groups_fail_before_compiling(strategy):
    x = np.zeros((8, 8, D_MODEL), np.float32)
    params = {"wi": np.zeros((6, D_MODEL, D_FF)), "wo": np.zeros((6, D_FF, D_MODEL))}
    run = functools.partial(
        parallel.expert_parallel_dispatch_combine,
        expert_fn=functools.partial(experts.ffn, activation="relu"),
        param_axes={"wi": ("expert", "embed", "mlp"), "wo": ("expert", "mlp", "embed")},
        mesh=parallel.make_mesh(2, 4, 1),
        strategy=strategy,
    )
    with pytest.raises(ValueError, match="num_experts=6 does not divide by 4"):
        run(x, _routing_arrays(8, 6), expert_params=params)
    with pytest.raises(ValueError, match="6 routing groups do not divide by 8"):
        run(x[:6], _routing_arrays(6, 8), expert_params=params)


def test_layer_rejects_batch_that_splits_groups():
    """B * L = 48 tokens in groups of 8 are 6 groups, which 2 x 4 batch devices cannot share."""
    graphdef, params, rest = _layers()[0]
    mesh = parallel.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        layer = nnx.merge(graphdef, params, rest)
        with pytest.raises(ValueError, match="6 routing groups do not divide by 8"):
            jax.jit(lambda x: layer(x, deterministic=True)).lower(jnp.zeros((6, LENGTH, D_MODEL)))


def _lower_forward(layer, mesh_shape):
    with jax.set_mesh(parallel.make_mesh(*mesh_shape)):
        forward = jax.jit(lambda x: layer(x, deterministic=True)[0])
        return forward.lower(jnp.zeros((BATCH, LENGTH, D_MODEL))).as_text()


def test_expert_weights_split_as_their_metadata_names_them():
    """The hook reads the expert weights' logical names from their `out_sharding` metadata: on
    data=2 x expert=2 x model=2 the hidden dim named 'mlp' splits over 'model' (one psum after
    wo); renamed to None it stays whole on each device (no psum), and the output is unchanged."""
    config = _config()
    layer = layers.MoeFeedForward(config, rngs=nnx.Rngs(0))
    axes = layer.expert_param_axes()
    assert axes["wi"] == ("expert", "embed", "mlp") and axes["wo"] == ("expert", "mlp", "embed")
    x, _ = _inputs()
    expected = jax.jit(lambda x: layer(x, deterministic=True)[0])(x)  # no mesh: local
    assert _lower_forward(layer, (2, 2, 2)).count("stablehlo.all_reduce") == 1
    for name, names in axes.items():
        getattr(layer, name).set_metadata(
            out_sharding=tuple(n if n != "mlp" else None for n in names)
        )
    assert "stablehlo.all_reduce" not in _lower_forward(layer, (2, 2, 2))
    with jax.set_mesh(parallel.make_mesh(2, 2, 2)):
        actual = jax.jit(lambda x: layer(x, deterministic=True)[0])(x)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_expert_weight_without_names_fails_on_an_expert_mesh():
    layer = layers.MoeFeedForward(_config(), rngs=nnx.Rngs(0))
    layer.wo.del_metadata("out_sharding")
    jax.jit(lambda x: layer(x)[0]).lower(jnp.zeros((BATCH, LENGTH, D_MODEL)))  # no mesh: local
    with pytest.raises(ValueError, match=r"expert weights \['wo'\] carry no logical axis names"):
        _lower_forward(layer, (2, 4, 1))


def test_shard_map_sends_two_all_to_alls_of_the_dispatched_slots():
    """Forward pass on data=2 x expert=4: one all_to_all out, one back, each of the local
    `[E, G_local, C, M]` slots: E=8, G_local = 8 groups / 8 devices = 1, C = 1, M = 8."""
    graphdef, params, rest = _layers()[2]  # top-2, C = 1
    mesh = parallel.make_mesh(2, 4, 1)
    with jax.set_mesh(mesh):
        layer = nnx.merge(graphdef, params, rest)
        text = (
            jax.jit(lambda x: layer(x, deterministic=True)[0])
            .lower(jnp.zeros((BATCH, LENGTH, D_MODEL)))
            .as_text()
        )
    all_to_alls = [line for line in text.splitlines() if "all_to_all" in line]
    assert len(all_to_alls) == 2, all_to_alls
    assert all("tensor<8x1x1x8xf32>" in line for line in all_to_alls), all_to_alls


def test_per_device_groups_routes_locally_and_equals_global_routing():
    """Top-2 routing of 8 groups on 2 x 2 batch shards: same slots as routing all groups at
    once, with no collective in the compiled program (plain jit all-gathers the top_k)."""
    logits = jax.random.normal(jax.random.key(2), (8, 8, NUM_EXPERTS))
    mask = jnp.arange(8)[None, :] < jnp.array([8, 8, 8, 5, 8, 8, 2, 8])[:, None]  # [G, T]

    def route(logits, mask):
        return routing.tokens_choose(logits, k=2, capacity=2, padding_mask=mask)

    mesh = parallel.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        local = jax.jit(lambda lg, m: parallel.per_device_groups(route, lg, m))
        compiled = local.lower(logits, mask).compile().as_text()
        actual = local(logits, mask)
        global_compiled = jax.jit(route).lower(
            jax.device_put(logits, parallel.batch_sharding(mesh, ndim=3)), mask
        )
    for op in ("all-gather(", "all-reduce(", "all-to-all("):
        assert op not in compiled
    assert "all-gather(" in global_compiled.compile().as_text()
    expected = route(logits, mask)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------ dropless on a mesh (#16)


@functools.cache
def _dropless_layers():
    """Dropless top-1 and top-2 layers (`(graphdef, params, rest)`), nothing ever dropped."""
    split = []
    for k in (1, 2):
        config = _config("tokens_choose", k)
        config.moe.backend = "dropless"
        split.append(nnx.split(layers.MoeFeedForward(config, rngs=nnx.Rngs(0)), nnx.Param, ...))
    return tuple(split)


@functools.cache
def _dropless_single_device():
    x, cotangent = _inputs()
    return jax.device_get(_outputs_and_grads(_dropless_layers(), x, cotangent))


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (8, 1, 1)], ids=str)
def test_dropless_on_a_mesh_matches_single_device(mesh_shape):
    """(2, 2, 2): experts over 2 devices, sorted rows exchanged, hidden dim over 'model';
    (8, 1, 1): data parallelism, each device sorts its own groups. Outputs and gradients."""
    x, cotangent = _inputs()
    expected = _dropless_single_device()
    assert all(float(result["dropped"]) == 0.0 for result in expected)
    mesh = parallel.make_mesh(*mesh_shape)
    with jax.set_mesh(mesh):
        split_layers = [
            (graphdef, *jax.device_put(states, parallel.state_shardings(states, mesh)))
            for graphdef, *states in _dropless_layers()
        ]
        x = jax.device_put(x, parallel.batch_sharding(mesh, ndim=3))
        actual = _outputs_and_grads(split_layers, x, cotangent)
    _assert_close(actual, expected)


def _forward_hlo(layer_index, mesh_shape, compiled=False):
    graphdef, params, rest = _dropless_layers()[layer_index]
    with jax.set_mesh(parallel.make_mesh(*mesh_shape)):
        layer = nnx.merge(graphdef, params, rest)
        lowered = jax.jit(lambda x: layer(x, deterministic=True)[0]).lower(
            jnp.zeros((BATCH, LENGTH, D_MODEL))
        )
        return lowered.compile().as_text() if compiled else lowered.as_text()


def test_dropless_expert_parallelism_sends_the_padded_per_peer_maximum():
    """Top-1 on data=2 x expert=2 x model=2: each device holds G_local = 8 / 4 = 2 groups of
    T = 8 tokens; a peer holds E_local = 4 experts, so it can get at most 2 * 8 * min(1, 4) = 16
    rows. Each all_to_all moves [X=2, 16, M=8] (32 rows), not the [E=8, 2, C=T=8, M] (128 rows)
    of capacity C = T; plus the [2, 4] row counts."""
    text = _forward_hlo(0, (2, 2, 2))
    all_to_alls = [line for line in text.splitlines() if "all_to_all" in line]
    rows = [line for line in all_to_alls if "tensor<2x16x8xf32>" in line]
    counts = [line for line in all_to_alls if "tensor<2x4xi32>" in line]
    assert len(rows) == 2 and len(counts) == 1 and len(all_to_alls) == 3, all_to_alls


def test_dropless_data_parallelism_gathers_no_tokens():
    """On 8 data shards each device sorts its own groups: no all-gather, no all-to-all."""
    text = _forward_hlo(1, (8, 1, 1), compiled=True)
    assert "all-gather(" not in text and "all-to-all(" not in text


def _key_fingerprint(params, xe, *, dropout_rng, matmul=None):
    """An 'expert' whose every output is one uniform number drawn from its dropout key."""
    return jnp.broadcast_to(jax.random.uniform(dropout_rng, ()), xe.shape)


@pytest.mark.parametrize("backend", ["gather", "dropless"])
def test_expert_shards_draw_different_dropout_keys(backend):
    """One expert per device (1 x 8 x 1), every group identical: a token's output is the draw
    of the device that holds its expert, and the 8 experts' draws must all differ."""
    num_groups, tokens = 8, 8
    logits = jnp.tile(jnp.eye(NUM_EXPERTS)[None], (num_groups, 1, 1)) * 5.0  # token t -> e = t
    route = routing.tokens_choose(logits, k=1, capacity=None if backend == "dropless" else 1)
    x = jnp.ones((num_groups, tokens, D_MODEL))
    params = {"wi": jnp.zeros((NUM_EXPERTS, D_MODEL, D_FF))}
    run = functools.partial(
        parallel.expert_parallel_dispatch_combine,
        param_axes={"wi": ("expert", "embed", "mlp")},
        mesh=parallel.make_mesh(1, 8, 1),
        backend=backend,
    )
    draws = jax.jit(run, static_argnums=2)(
        x, route, _key_fingerprint, params, rng=jax.random.key(0)
    )
    per_expert = np.asarray(draws[0, :, 0] / route.probs[0, np.arange(tokens), np.arange(tokens)])
    assert len(set(np.round(per_expert, 6))) == NUM_EXPERTS, per_expert
    # every group sees the same draws: they depend on the expert's device, not the sender
    np.testing.assert_allclose(draws / draws[:1], 1.0, rtol=1e-6)


def test_expert_dropout_on_a_mesh_is_reproducible_per_seed():
    config = _config("tokens_choose", 2)
    config.moe.backend = "dropless"
    config.moe.expert_dropout = 0.5
    x, _ = _inputs()
    mesh = parallel.make_mesh(2, 2, 2)
    forward = nnx.jit(lambda layer, x: layer(x, deterministic=False)[0])

    def train_output(seed):
        with jax.set_mesh(mesh):
            layer = layers.MoeFeedForward(config, rngs=nnx.Rngs(0, dropout=seed))
            return np.asarray(forward(layer, x))

    first, again, other = train_output(1), train_output(1), train_output(2)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_dropless_expert_parallelism_exports_ragged_all_to_all_for_tpu_and_gpu():
    """The weight-gradient program exported from this CPU host for TPU and GPU exchanges rows
    with `ragged_all_to_all` (out, back, and the transpose of the way back) and multiplies them
    with ragged dots. jax.export refuses `ragged_all_to_all` unless its safety check is
    disabled: the op is a custom call without a compatibility guarantee."""
    graphdef, params, rest = _dropless_layers()[0]

    def loss(params, x):
        y, _ = nnx.merge(graphdef, params, rest)(x, deterministic=True)
        return jnp.sum(y**2)

    with jax.set_mesh(parallel.make_mesh(2, 2, 2)):
        exported = jax.export.export(
            jax.jit(jax.grad(loss)),
            platforms=("tpu", "cuda"),
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")],
        )(params, jnp.zeros((BATCH, LENGTH, D_MODEL)))
    text = exported.mlir_module()
    assert text.count("stablehlo.custom_call @ragged_all_to_all(") == 3
    assert 'stablehlo.composite "chlo.ragged_dot"' in text
    # the only loops are the random-bit generator's rounds (uint32 state), none over blocks
    loops = [line for line in text.splitlines() if "stablehlo.while(" in line]
    assert all("ui32" in line for line in loops), loops
