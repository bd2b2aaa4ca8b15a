"""WideNet (`model.share_layers`): one attention and one MoE FFN for all layers, a set of norms
per layer; gradients reach every layer's norms; the shared model is the unshared one whose
layers all hold the same weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.widenet import get_config
from moe_jax import models
from moe_jax.models import build_model

TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 1, 300)


def tiny(share: bool, kind: str = "decoder"):
    config = get_config("tiny")
    config.model.update(
        kind=kind, share_layers=share, d_model=32, num_heads=2, head_dim=16, d_ff=64
    )
    config.moe.update(num_experts=4, group_size=32)
    return config


def layers_of(stack):
    return [layer for segment in stack.segments for block in segment for layer in block.layers]


def test_one_set_of_attention_and_expert_weights_and_a_set_of_norms_per_layer():
    config = tiny(share=True)
    model = build_model(config, rngs=nnx.Rngs(0))
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    num_layers = config.model.num_layers
    for name in ("wq", "wk", "wv"):
        assert sum(path[-2:] == ("self_attention", name) for path in paths) == 1
    for name in ("wi", "wi_gate", "wo"):
        assert sum(path[-2:] == ("ffn", name) for path in paths) == 1
    assert sum(path[-3:-1] == ("ffn", "router") for path in paths) == 1
    for norm in ("self_norm", "ffn_norm"):
        assert sum(path[-2:] == (norm, "scale") for path in paths) == num_layers
    shared, unshared = models.count_params(config), models.count_params(tiny(share=False))
    m, f, e, k = 32, 64, 4, config.moe.k
    per_layer = 4 * m * 32 + 3 * e * m * f + m * e  # attention, gated experts, router
    active_per_layer = per_layer - 3 * m * f * (e - k)  # k of the e experts
    assert unshared["total"] - shared["total"] == (num_layers - 1) * per_layer
    assert unshared["active"] - shared["active"] == (num_layers - 1) * active_per_layer


def test_gradients_reach_every_layers_norms():
    model = build_model(tiny(share=True), rngs=nnx.Rngs(0))

    def loss(model):
        logits, _ = model(TOKENS, deterministic=True)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    grads = nnx.grad(loss)(model)
    norms = [
        value for path, value in nnx.to_flat_state(grads) if path[-2] in ("self_norm", "ffn_norm")
    ]
    assert len(norms) == 2 * 4
    assert all(float(jnp.max(jnp.abs(g.get_value()))) > 0 for g in norms)


@pytest.mark.parametrize("kind", ["decoder", "rope_decoder"])
def test_shared_model_equals_the_unshared_model_holding_the_same_weights(kind):
    shared = build_model(tiny(True, kind), rngs=nnx.Rngs(0))
    unshared = build_model(tiny(False, kind), rngs=nnx.Rngs(1))
    first = layers_of(shared.decoder)[0]
    nnx.update(unshared.embed, nnx.state(shared.embed))
    nnx.update(unshared.output, nnx.state(shared.output))
    nnx.update(unshared.decoder.final_norm, nnx.state(shared.decoder.final_norm))
    if kind == "decoder":
        nnx.update(unshared.decoder.position_bias, nnx.state(shared.decoder.position_bias))
    pairs = zip(layers_of(shared.decoder), layers_of(unshared.decoder), strict=True)
    for index, (source, target) in enumerate(pairs):
        assert source.ffn is first.ffn
        for name in ("wq", "wk", "wv", "wo"):  # the first layer's attention weights
            assert getattr(source.self_attention, name) is getattr(first.self_attention, name)
        for name in ("self_norm", "ffn_norm"):  # each layer's own (random) norm scales
            getattr(source, name).scale[...] = jax.random.uniform(
                jax.random.key(index), (32,), minval=0.5, maxval=1.5
            )
            nnx.update(getattr(target, name), nnx.state(getattr(source, name)))
        nnx.update(target.self_attention, nnx.state(first.self_attention))
        nnx.update(target.ffn, nnx.state(first.ffn))
    want, want_aux = unshared(TOKENS, deterministic=True)
    got, got_aux = shared(TOKENS, deterministic=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_aux.load_balancing_loss, want_aux.load_balancing_loss, atol=1e-6)


@pytest.mark.parametrize("kind", ["decoder", "rope_decoder", "encoder_decoder"])
def test_each_layer_caches_its_own_keys_and_values(kind):
    """Shared attention weights, one key/value cache per layer (per attention of a layer),
    none of them a parameter."""
    model = build_model(tiny(True, kind), rngs=nnx.Rngs(0))
    params_before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    if kind == "encoder_decoder":
        model.init_cache(2, 5, 3)
    else:
        model.init_cache(2, 5)
    decoder_layers = layers_of(model.decoder)
    attentions = ["self_attention", "cross_attention"][: 2 if kind == "encoder_decoder" else 1]
    caches = [getattr(layer, name).cache for layer in decoder_layers for name in attentions]
    assert len(caches) == len(decoder_layers) * len(attentions)
    assert len({id(cache) for cache in caches}) == len(caches)  # no two layers share one
    cached = nnx.to_flat_state(nnx.state(model, nnx.Cache))
    assert len(cached) == len(caches)
    params_after = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert [path for path, _ in params_after] == [path for path, _ in params_before]


def test_share_layers_refuses_mixed_dense_and_sparse_layers_and_scan():
    config = tiny(share=True)
    config.moe.sparse_every = 2
    with pytest.raises(ValueError, match="sparse_every=1"):
        build_model(config, rngs=nnx.Rngs(0))
    config = tiny(share=True)
    config.model.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers=False"):
        build_model(config, rngs=nnx.Rngs(0))
