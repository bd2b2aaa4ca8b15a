"""Tests of moe_jax.attention and moe_jax.models: oracles for the parts, model properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import attention, models
from moe_jax.config import default_config
from moe_jax.layers import MoeAux
from tests.tolerances import assert_trees_close, summed_atol

VOCAB = 64


def micro_config(kind="decoder", **moe_overrides):
    """A model small enough to compile in seconds: d_model 32, 2 heads of 16, 4 experts."""
    config = default_config()
    model = config.model
    model.kind = kind
    model.vocab_size = VOCAB
    model.d_model, model.num_heads, model.head_dim, model.d_ff = 32, 2, 16, 64
    model.num_layers, model.num_encoder_layers, model.num_decoder_layers = 4, 2, 2
    model.relative_attention_num_buckets, model.relative_attention_max_distance = 8, 16
    moe = config.moe
    moe.num_experts, moe.group_size, moe.router_jitter = 4, 16, 0.0
    # capacity C = T in eval: no token is ever dropped, so a token's output depends on itself only
    moe.capacity_factor_eval = 4.0
    for key, value in moe_overrides.items():
        moe[key] = value
    return config


def tokens(key, shape):
    return jax.random.randint(jax.random.key(key), shape, 3, VOCAB)


@nnx.jit
def _run_deterministic(model, inputs, kwargs):
    return model(*inputs, deterministic=True, **kwargs)


def apply(model, *inputs, **kwargs):
    """`model(*inputs, deterministic=True, **kwargs)`, jitted (cached across same-shaped calls)."""
    return _run_deterministic(model, inputs, kwargs)


# ------------------------------------------------------------------------- attention oracles


@pytest.mark.parametrize(
    "relative, expected",
    [
        # bidirectional, 32 buckets -> 16 per direction, exact = 8, max_distance 128:
        (0, 0),  # n = 0
        (-1, 1),  # key 1 before the query: n = 1 < 8
        (-7, 7),  # n = 7 < 8
        (1, 17),  # key after the query: offset 16, n = 1
        (-8, 8),  # 8 + floor(log(8/8) / log(128/8) * 8) = 8 + 0
        (-12, 9),  # 8 + floor(log(1.5) / log(16) * 8) = 8 + floor(1.170) = 9
        (-20, 10),  # 8 + floor(log(2.5) / log(16) * 8) = 8 + floor(2.644) = 10
        (-50, 13),  # 8 + floor(log(6.25) / log(16) * 8) = 8 + floor(5.288) = 13
        (20, 26),  # 16 + 10
        (-128, 15),  # 8 + 8 = 16, capped at 15
        (-1000, 15),  # capped
        (1000, 31),  # 16 + 15
    ],
)
def test_relative_position_bucket_bidirectional(relative, expected):
    bucket = attention.relative_position_bucket(
        jnp.array([relative], jnp.int32), bidirectional=True, num_buckets=32, max_distance=128
    )
    assert int(bucket[0]) == expected


@pytest.mark.parametrize(
    "relative, expected",
    [
        # causal, 32 buckets, exact = 16, max_distance 128:
        (5, 0),  # keys after the query all map to bucket 0
        (0, 0),
        (-1, 1),
        (-15, 15),
        (-16, 16),  # 16 + floor(log(1) / log(8) * 16) = 16
        (-40, 23),  # 16 + floor(log(2.5) / log(8) * 16) = 16 + floor(7.049) = 23
        (-100, 30),  # 16 + floor(log(6.25) / log(8) * 16) = 16 + floor(14.100) = 30
        (-128, 31),  # 16 + 16 = 32, capped at 31
        (-5000, 31),
    ],
)
def test_relative_position_bucket_causal(relative, expected):
    bucket = attention.relative_position_bucket(
        jnp.array([relative], jnp.int32), bidirectional=False, num_buckets=32, max_distance=128
    )
    assert int(bucket[0]) == expected


def test_relative_position_bucket_rejects_bad_sizes():
    with pytest.raises(ValueError, match="max_distance"):
        attention.relative_position_bucket(
            jnp.zeros((1,), jnp.int32), bidirectional=True, num_buckets=32, max_distance=4
        )


def test_rms_norm_matches_formula():
    norm = attention.RMSNorm(3)
    norm.scale[...] = jnp.array([1.0, 2.0, 0.5])
    x = np.array([[3.0, -4.0, 12.0], [1.0, 1.0, 1.0]], np.float32)
    # row 0: mean square = (9 + 16 + 144) / 3 = 169 / 3; row 1: 1
    rms = np.sqrt(np.array([[169.0 / 3.0], [1.0]]) + 1e-6)
    expected = x / rms * np.array([1.0, 2.0, 0.5])
    np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-6)


def naive_attention(xq, xkv, wq, wk, wv, wo, mask, bias):
    """Loops over batch, heads and queries in numpy."""
    batch, num_q, _ = xq.shape
    heads, head_dim = wq.shape[1], wq.shape[2]
    out = np.zeros((batch, num_q, wo.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            q, k, v = xq[b] @ wq[:, h], xkv[b] @ wk[:, h], xkv[b] @ wv[:, h]
            for i in range(num_q):
                scores = k @ q[i] / np.sqrt(head_dim) + bias[b, h, i]
                scores = np.where(mask[b, 0, i], scores, -np.inf)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[b, i] += (probs @ v) @ wo[h]
    return out


def test_attention_matches_naive_numpy():
    config = micro_config()
    layer = attention.MultiHeadAttention(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    xq = rng.normal(size=(2, 5, 32)).astype(np.float32)
    xkv = rng.normal(size=(2, 4, 32)).astype(np.float32)
    bias = rng.normal(size=(2, 2, 5, 4)).astype(np.float32)
    key_valid = np.array([[True, True, True, False], [True, True, True, True]])
    segments_q = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    segments_k = np.array([[1, 1, 2, 2], [1, 1, 1, 1]])
    mask = attention.attention_mask(
        key_valid=jnp.asarray(key_valid),
        query_segments=jnp.asarray(segments_q),
        key_segments=jnp.asarray(segments_k),
    )
    expected_mask = key_valid[:, None, :] & (segments_q[:, :, None] == segments_k[:, None, :])
    np.testing.assert_array_equal(mask[:, 0], expected_mask)
    got = layer(
        jnp.asarray(xq), jnp.asarray(xkv), mask=mask, bias=jnp.asarray(bias), deterministic=True
    )
    weights = [np.asarray(w[...]) for w in (layer.wq, layer.wk, layer.wv, layer.wo)]
    expected = naive_attention(xq, xkv, *weights, np.asarray(mask), bias)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_causal_mask_is_lower_triangular():
    mask = attention.attention_mask(key_valid=jnp.ones((1, 3), bool), causal=True)
    np.testing.assert_array_equal(mask[0, 0], [[1, 0, 0], [1, 1, 0], [1, 1, 1]])


# -------------------------------------------------------------------------- sparse placement


@pytest.mark.parametrize(
    "num_layers, overrides, flags",
    [
        (4, dict(sparse_every=2), (0, 1, 0, 1)),  # Switch / GLaM
        (8, dict(sparse_every=4), (0, 0, 0, 1, 0, 0, 0, 1)),  # ST-MoE
        (6, dict(sparse_every=4), (0, 0, 0, 1, 0, 0)),  # remainder layers stay dense
        (3, dict(sparse_every=1), (1, 1, 1)),  # Switch-C
        (4, dict(sparse_placement="bottom", num_sparse_layers=1), (1, 0, 0, 0)),
        (4, dict(sparse_placement="top", num_sparse_layers=2), (0, 0, 1, 1)),
        (4, dict(num_experts=0), (0, 0, 0, 0)),
        # Qwen's decoder_sparse_step 2 with mlp_only_layers [3]
        (6, dict(sparse_every=2, dense_layers=(3,)), (0, 1, 0, 0, 0, 1)),
        (4, dict(sparse_every=1, dense_layers=(0, 3)), (0, 1, 1, 0)),
    ],
)
def test_sparse_layer_placement(num_layers, overrides, flags):
    moe = micro_config(**overrides).moe
    assert models.sparse_layer_flags(num_layers, moe) == tuple(bool(f) for f in flags)


def test_bad_placement_raises():
    with pytest.raises(ValueError, match="num_sparse_layers"):
        models.layer_plan(4, micro_config(sparse_placement="top", num_sparse_layers=0).moe)
    with pytest.raises(ValueError, match="sparse_placement"):
        models.layer_plan(4, micro_config(sparse_placement="middle").moe)
    with pytest.raises(ValueError, match=r"moe.dense_layers=\(4,\) must be layer indices"):
        models.layer_plan(4, micro_config(sparse_every=1, dense_layers=(4,)).moe)


def test_dense_layers_make_one_layer_segments():
    """Each run of equal layers is one segment of one-layer blocks (what scan repeats)."""
    moe = micro_config(sparse_every=2, dense_layers=(3,)).moe
    expected = (((False,), 1), ((True,), 1), ((False,), 3), ((True,), 1))
    assert models.layer_plan(6, moe) == expected


# ----------------------------------------------------------------------------------- models


def test_decoder_forward_backward_shapes_and_aux():
    config = micro_config()
    model = models.build_model(config, rngs=nnx.Rngs(0))
    inputs = tokens(1, (2, 16))

    @nnx.jit
    def loss_and_grad(model, inputs):
        def loss_fn(model):
            logits, aux = model(inputs, deterministic=False)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux.load_balancing_loss.sum(), (
                logits,
                aux,
            )

        return nnx.value_and_grad(loss_fn, has_aux=True)(model)

    (loss, (logits, aux)), grads = loss_and_grad(model, inputs)
    assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
    assert isinstance(aux, MoeAux)
    assert aux.load_balancing_loss.shape == (2,)  # 4 layers, every other sparse
    assert aux.expert_load.shape == (2, 4)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert (
        float(jnp.abs(grads["decoder"]["segments"][0][0]["layers"][1]["ffn"]["wo"][...]).sum()) > 0
    )


def test_decoder_is_causal():
    config = micro_config()
    model = models.build_model(config, rngs=nnx.Rngs(0))
    inputs = tokens(2, (2, 16))
    changed = inputs.at[:, 10:].set(tokens(3, (2, 6)))
    logits, _ = apply(model, inputs)
    logits_changed, _ = apply(model, changed)
    np.testing.assert_allclose(logits[:, :10], logits_changed[:, :10], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits[:, 10:], logits_changed[:, 10:], atol=1e-3)


@pytest.mark.parametrize("router", ["tokens_choose", "gshard_top2", "aux_free"])
def test_top2_capacity_routing_in_a_decoder_does_not_see_later_tokens(router):
    # k=2 with capacity (4 slots per expert for 32 choices per group) drops choices. Filled
    # choice-major (GShard), token t's second choice competes with later tokens' first choices,
    # so changing tokens 8-15 moves the logits of positions 0-7; a causal stack's default
    # fills token by token, and the earlier positions stay as they were.
    inputs = tokens(2, (2, 16))
    changed = inputs.at[:, 8:].set(tokens(3, (2, 8)))

    def logits_of(fill_order):
        config = micro_config(router=router, k=2, capacity_factor_eval=1.0, fill_order=fill_order)
        model = models.build_model(config, rngs=nnx.Rngs(0))
        (logits, aux), (logits_changed, _) = apply(model, inputs), apply(model, changed)
        assert float(aux.fraction_assignments_dropped.max()) > 0.1  # capacity does drop
        return logits, logits_changed

    logits, logits_changed = logits_of("")
    np.testing.assert_array_equal(logits[:, :8], logits_changed[:, :8])
    leaky, leaky_changed = logits_of("choice")
    assert float(np.abs(leaky[:, :8] - leaky_changed[:, :8]).max()) > 1e-2


def test_fill_order_resolves_by_stack():
    config = micro_config("encoder_decoder", k=2)
    model = models.build_model(config, rngs=nnx.Rngs(0))

    def fill_orders(stack):
        return {m.fill_order for _, m in nnx.iter_graph(stack) if hasattr(m, "fill_order")}

    assert fill_orders(model.encoder) == {"choice"} and fill_orders(model.decoder) == {"token"}
    config.moe.fill_order = "choice"  # GShard's order everywhere, as the paper's code
    model = models.build_model(config, rngs=nnx.Rngs(0))
    assert fill_orders(model.encoder) == fill_orders(model.decoder) == {"choice"}
    config.moe.fill_order = "tokens"
    with pytest.raises(ValueError, match="fill_order 'tokens'"):
        models.build_model(config, rngs=nnx.Rngs(0))


def test_packed_segments_do_not_see_each_other():
    """A document packed after another gives the logits it gives alone (positions restart)."""
    config = micro_config()
    model = models.build_model(config, rngs=nnx.Rngs(0))
    first, second = tokens(4, (1, 6)), tokens(5, (1, 10))
    packed = jnp.concatenate([first, second], axis=1)  # [1, 16]
    segment_ids = jnp.array([[1] * 6 + [2] * 10])
    positions = jnp.array([list(range(6)) + list(range(10))])
    logits_packed, _ = apply(model, packed, segment_ids=segment_ids, positions=positions)
    alone = jnp.concatenate([second, jnp.zeros((1, 6), jnp.int32)], axis=1)
    alone_segments = jnp.array([[1] * 10 + [0] * 6])
    alone_positions = jnp.arange(16)[None]
    logits_alone, _ = apply(model, alone, segment_ids=alone_segments, positions=alone_positions)
    np.testing.assert_allclose(logits_packed[:, 6:], logits_alone[:, :10], rtol=1e-4, atol=1e-4)


def test_encoder_decoder_cross_attention_sees_encoder_and_ignores_padding():
    config = micro_config("encoder_decoder")
    model = models.build_model(config, rngs=nnx.Rngs(0))
    encoder_inputs = tokens(6, (2, 12))
    segments = (jnp.arange(12) < 9).astype(jnp.int32)[None].repeat(2, 0)  # last 3: padding
    decoder_inputs = tokens(7, (2, 8))
    logits, aux = apply(model, encoder_inputs, decoder_inputs, encoder_segment_ids=segments)
    assert logits.shape == (2, 8, VOCAB)
    assert aux.router_z_loss.shape == (2,)  # one sparse layer per 2-layer stack
    changed = encoder_inputs.at[:, :3].set(tokens(8, (2, 3)))
    logits_changed, _ = apply(model, changed, decoder_inputs, encoder_segment_ids=segments)
    assert not np.allclose(logits, logits_changed, atol=1e-3)
    # padding (segment 0) is invisible whatever its tokens
    padded_noise = encoder_inputs.at[:, 9:].set(tokens(9, (2, 3)))
    logits_noise, _ = apply(model, padded_noise, decoder_inputs, encoder_segment_ids=segments)
    np.testing.assert_allclose(logits_noise, logits, rtol=1e-5, atol=1e-5)


def _unstack(scanned_state: dict, unscanned_state: dict) -> dict:
    """Scanned `(..., 'segments', s, *rest)[r]` -> unscanned `(..., 'segments', s, r, *rest)`."""
    values = {}
    for path in unscanned_state:
        if "segments" in path:
            at = path.index("segments") + 2
            values[path] = scanned_state[path[:at] + path[at + 1 :]][path[at]]
        else:
            values[path] = scanned_state[path]
    return values


@pytest.mark.parametrize("kind", ["decoder", "rope_decoder", "encoder_decoder"])
def test_scanned_and_unscanned_stacks_agree(kind):
    config = micro_config(kind, extra_dense_ffn=True)
    config.model.scan_layers = True
    scanned = models.build_model(config, rngs=nnx.Rngs(0))
    config.model.scan_layers = False
    unscanned = models.build_model(config, rngs=nnx.Rngs(1))
    scanned_params = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
    unscanned_params = nnx.state(unscanned, nnx.Param)
    flat = dict(nnx.to_flat_state(unscanned_params))
    for path, value in _unstack(scanned_params, flat).items():
        flat[path][...] = value
    inputs = tokens(10, (2, 16))
    args = (inputs, inputs[:, :8]) if kind == "encoder_decoder" else (inputs,)
    logits_scanned, aux_scanned = apply(scanned, *args)
    logits_unscanned, aux_unscanned = apply(unscanned, *args)
    np.testing.assert_allclose(logits_scanned, logits_unscanned, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(aux_scanned), jax.tree.leaves(aux_unscanned)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_axis_has_no_logical_name():
    config = micro_config()
    config.model.scan_layers = True
    model = models.build_model(config, rngs=nnx.Rngs(0))
    wi = model.decoder.segments[0].layers[1].ffn.wi
    assert wi.shape == (2, 4, 32, 64)  # [blocks, E, M, H]
    assert wi.get_metadata()["out_sharding"] == (None, "expert", "embed", "mlp")


def test_remat_keeps_values_and_gradients():
    config = micro_config()
    plain = models.build_model(config, rngs=nnx.Rngs(0))
    config.model.remat = "full"
    config.model.scan_layers = True
    remat_scanned = models.build_model(config, rngs=nnx.Rngs(0))
    inputs = tokens(11, (2, 16))

    @nnx.jit
    def grad_of(model):
        def loss_fn(model):
            logits, _ = model(inputs, deterministic=True)
            return jnp.mean(logits**2)

        return nnx.grad(loss_fn)(model)

    # same init: plain layers vs remat + scan built from split keys differ, so copy the params
    scanned_params = {p: v[...] for p, v in nnx.to_flat_state(nnx.state(remat_scanned, nnx.Param))}
    flat = dict(nnx.to_flat_state(nnx.state(plain, nnx.Param)))
    for path, value in _unstack(scanned_params, flat).items():
        flat[path][...] = value
    grads_plain = dict(nnx.to_flat_state(grad_of(plain)))
    grads_remat = {p: v[...] for p, v in nnx.to_flat_state(grad_of(remat_scanned))}
    # a weight's gradient sums the 2 x 16 tokens' terms, each through a d_ff = 64 contraction
    for path, value in _unstack(grads_remat, grads_plain).items():
        want = grads_plain[path][...]
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=summed_atol(want, 64))


def test_remat_policies_keep_gradients_and_choose_what_is_recomputed():
    """Per policy: the gradient equals the one without remat, and the backward program
    recomputes what the policy does not keep: 'full' re-runs matmuls and the routing's sorts,
    'save_dots' no matmul, 'save_routing' fewer sorts than 'full'."""
    inputs = tokens(11, (2, 16))

    def grad_of(model):
        def loss_fn(model):
            logits, _ = model(inputs, deterministic=True)
            return jnp.mean(logits**2)

        return nnx.grad(loss_fn)(model)

    counts, grads = {}, {}
    for policy in ("none", "full", "save_dots", "save_routing"):
        config = micro_config()
        config.model.num_layers = 2
        config.model.remat = policy
        model = models.build_model(config, rngs=nnx.Rngs(0))
        text = str(jax.make_jaxpr(grad_of)(model))
        counts[policy] = (text.count("dot_general"), text.count("sort"))
        if policy != "full":  # test_remat_keeps_values_and_gradients checks 'full'
            grads[policy] = jax.tree.leaves(nnx.state(nnx.jit(grad_of)(model)))
    assert counts["full"][0] > counts["none"][0] == counts["save_dots"][0]
    assert counts["none"][1] < counts["save_routing"][1] < counts["full"][1]
    for policy in ("save_dots", "save_routing"):
        # as above: contractions of d_ff = 64 terms
        assert_trees_close(grads[policy], grads["none"], num_summed=64, err_msg=policy)
    with pytest.raises(ValueError, match="save_routing"):
        models.remat_policy("save_everything")


def test_bfloat16_compute_keeps_float32_params_and_logits():
    config = micro_config()
    config.model.num_layers = 2
    config.model.dtype = "bfloat16"
    model = models.build_model(config, rngs=nnx.Rngs(0))
    logits, aux = apply(model, tokens(12, (2, 16)))
    assert logits.dtype == jnp.float32 and aux.router_z_loss.dtype == jnp.float32
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_dense_model_has_no_aux():
    config = micro_config(num_experts=0)
    config.model.num_layers = 2
    model = models.build_model(config, rngs=nnx.Rngs(0))
    logits, aux = apply(model, tokens(13, (1, 8)))
    assert aux is None and logits.shape == (1, 8, VOCAB)


def test_hash_routing_gets_token_ids():
    config = micro_config(router="hash")
    config.model.num_layers = 2
    model = models.build_model(config, rngs=nnx.Rngs(0))
    logits, aux = apply(model, tokens(14, (2, 16)))
    assert bool(jnp.all(jnp.isfinite(logits))) and aux.expert_load.shape == (1, 4)


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("router", ["experts_choose", "soft_moe", "base_layer", "sinkhorn"])
def test_routers_that_see_later_tokens_are_refused_in_causal_stacks(kind, router):
    # BASE and S-BASE balance a group jointly in training, so a token's expert there depends on
    # later tokens, as with Expert Choice and Soft MoE always
    config = micro_config(kind, router=router, k=1)
    with pytest.raises(ValueError, match=f"{router}.*causal decoder"):
        models.build_model(config, rngs=nnx.Rngs(0))


def test_expert_choice_encoder_with_tokens_choose_decoder():
    config = micro_config(
        "encoder_decoder", router="experts_choose", decoder_router="tokens_choose"
    )
    model = models.build_model(config, rngs=nnx.Rngs(0))

    def router_kinds(stack):
        return {m.router_kind for _, m in nnx.iter_graph(stack) if hasattr(m, "router_kind")}

    assert router_kinds(model.encoder) == {"experts_choose"}
    assert router_kinds(model.decoder) == {"tokens_choose"}
    logits, aux = apply(model, tokens(15, (2, 16)), tokens(16, (2, 8)))
    assert logits.shape == (2, 8, VOCAB) and bool(jnp.all(jnp.isfinite(logits)))
    # encoder sparse layer first: Expert Choice fills every slot, so no expert is idle
    assert float(aux.expert_usage[0]) == 1.0


def test_unknown_kind_raises():
    config = micro_config()
    config.model.kind = "encoder"
    with pytest.raises(ValueError, match="model.kind"):
        models.build_model(config, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------- counting


def test_count_params_decoder_by_hand():
    # micro decoder, untied: embedding 64*32 = 2048; logits kernel 32*64 = 2048;
    # relative bias 8 buckets * 2 heads = 16; final norm 32.
    # per layer: attention 4 * 32 * (2*16) = 4096; norms 2 * 32 = 64;
    #   dense GEGLU FFN 3 * 32 * 64 = 6144;
    #   sparse: router 32 * 4 = 128 + experts 4 * 6144 = 24576.
    # layers 0, 2 dense: 2 * (4096 + 64 + 6144) = 20608
    # layers 1, 3 sparse: 2 * (4096 + 64 + 128 + 24576) = 57728
    # total = 2048 + 2048 + 16 + 32 + 20608 + 57728 = 82480
    # active (k=1 of 4 experts): 82480 - 2 * 3 * 6144 = 45616
    counts = models.count_params(micro_config())
    assert counts == {"total": 82480, "active": 45616}
    no_embeddings = models.count_params(micro_config(), include_embeddings=False)
    assert no_embeddings == {"total": 82480 - 4096, "active": 45616 - 4096}


def test_count_params_encoder_decoder_by_hand():
    # micro encoder-decoder, top-2, tied embeddings, extra dense FFN beside each sparse FFN:
    # embedding 2048 (tied: no logits kernel); two relative biases 2 * 16; two final norms 2 * 32.
    # encoder layer: attention 4096 + norms 64 + FFN; decoder layer adds cross-attention 4096 + 32.
    # layer 0 dense FFN 6144; layer 1 sparse: 128 + 24576 + extra FFN 6144 + its norm 32.
    # encoder: (4096 + 64 + 6144) + (4096 + 64 + 128 + 24576 + 6144 + 32) = 10304 + 35040
    # decoder: each layer + 4128: 45344 + 2 * 4128 = 53600
    # total = 2048 + 32 + 64 + 45344 + 53600 = 101088
    # active (k=2 of 4): 101088 - 2 * (2 * 6144) = 76512
    config = micro_config("encoder_decoder", k=2, extra_dense_ffn=True)
    config.model.tie_embeddings = True
    assert models.count_params(config) == {"total": 101088, "active": 76512}


def test_count_params_allocates_nothing():
    config = micro_config()
    config.model.d_model, config.model.d_ff, config.moe.num_experts = 8192, 65536, 4096
    # 2 sparse layers * 4096 experts * 3 * 8192 * 65536 = 1.3e13 parameters: only countable
    # abstractly (53 TB in float32)
    counts = models.count_params(config)
    assert counts["total"] > 1.3e13


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_batch_prioritized_refused_in_causal_stack(kind):
    # Batch-prioritized routing ranks a group's tokens by their top-1 scores, so whether token t
    # keeps its slot depends on later tokens' scores: a causal stack must refuse it.
    config = micro_config(kind, batch_prioritized=True)
    with pytest.raises(ValueError, match="batch_prioritized=True.*causal"):
        models.build_model(config, rngs=nnx.Rngs(0))
