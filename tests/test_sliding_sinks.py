"""Sliding-window attention, attention sinks and the output-projection bias of the rope decoder
(gpt-oss's attention), against oracles written here; transformers' gpt-oss is the outside oracle
for the whole network in tests/test_hf_gpt_oss.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode import (
    NEW,
    _forward,
    build,
    micro_config,
    prompts_and_lengths,
    teacher_forced_logits,
)
from test_rope_decoder import _inputs, rope_config

from moe_jax import decode
from moe_jax.rope_attention import (
    GroupedQueryAttention,
    rotary_embedding,
    sliding_layers,
    sliding_window_mask,
)


def test_which_layers_slide():
    model = rope_config().model
    model.sliding_window = 0
    assert sliding_layers(4, model) == (False,) * 4  # no window: every layer attends to all
    model.sliding_window, model.full_attention_every = 3, 2  # gpt-oss: sliding, full, ...
    assert sliding_layers(5, model) == (True, False, True, False, True)
    model.full_attention_every = 3
    assert sliding_layers(6, model) == (True, True, False, True, True, False)
    model.full_attention_every = 0  # Mixtral's sliding_window: every layer
    assert sliding_layers(3, model) == (True,) * 3
    model.sliding_window = -1
    with pytest.raises(ValueError, match=r"model.sliding_window must be an int >= 0.*-1"):
        sliding_layers(3, model)
    model.sliding_window, model.full_attention_every = 4, -2
    with pytest.raises(ValueError, match=r"model.full_attention_every must be .*-2"):
        sliding_layers(3, model)


def test_sliding_window_mask_by_hand():
    causal = jnp.tril(jnp.ones((5, 5), jnp.bool_))[None, None]  # [1, 1, 5, 5]
    positions = jnp.arange(5)[None]
    mask = sliding_window_mask(causal, positions, positions, 2)
    expected = [  # each query sees itself and the one before it
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    np.testing.assert_array_equal(mask[0, 0], np.array(expected, bool))
    # a left-padded row (positions start late) windows its real tokens alike
    shifted = sliding_window_mask(causal, positions + 7, positions + 7, 2)
    np.testing.assert_array_equal(shifted, mask)
    # decoding: one query at cache row 3 against a cache of 5 rows
    one = sliding_window_mask(jnp.ones((1, 1, 1, 5), jnp.bool_), jnp.array([[3]]), positions, 3)
    np.testing.assert_array_equal(one[0, 0, 0], [False, True, True, True, True])


def _sink_attention_reference(layer, x, mask, positions):
    """The layer's output with sinks, written out: per query head n, `p_j = exp(l_j) /
    (exp(s_n) + sum_i exp(l_i))` over the unmasked keys, `out = sum_j p_j v_j @ wo + bo`."""
    q = layer._project(x, layer.wq, layer.bq)  # [B, L, N, D]
    k = layer._project(x, layer.wk, layer.bk)  # [B, L, K, D]
    v = layer._project(x, layer.wv, layer.bv)
    q = rotary_embedding(q, positions, theta=layer.theta)
    k = rotary_embedding(k, positions, theta=layer.theta)
    group = layer.num_heads // layer.num_kv_heads
    k = jnp.repeat(k, group, axis=2)  # [B, L, N, D]: query head n reads key head n // group
    v = jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(layer.head_dim)  # [B, N, L, L]
    weights = jnp.where(mask, jnp.exp(logits), 0.0)
    sinks = jnp.exp(layer.sinks[...])[None, :, None, None]  # [1, N, 1, 1]
    probs = weights / (sinks + weights.sum(-1, keepdims=True))
    context = jnp.einsum("bnqk,bknd->bqnd", probs, v)
    return jnp.einsum("bqnd,ndm->bqm", context, layer.wo[...]) + layer.bo[...]


def _sink_layer():
    config = rope_config()
    config.model.attention_sinks = config.model.attention_out_bias = True
    config.model.qkv_bias = True
    layer = GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    assert layer.sinks.shape == (4,) and layer.bo.shape == (32,)
    keys = jax.random.split(jax.random.key(3), 5)
    layer.sinks[...] = jnp.array([-1.0, 0.5, 2.0, 4.0])  # each head its own sink
    for key, name in zip(keys, ("bq", "bk", "bv", "bo"), strict=False):
        variable = getattr(layer, name)
        variable[...] = 0.3 * jax.random.normal(key, variable.shape)
    return layer


def test_sinks_and_output_bias_equal_the_written_out_softmax():
    layer = _sink_layer()
    x, mask = _inputs()
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    ours = layer(x, mask=mask, positions=positions, deterministic=True)
    want = _sink_attention_reference(layer, x, mask, positions)
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)

    # gradients, the sinks' included, agree with the written-out form's
    def loss(layer, attend):
        return jnp.sum(jnp.sin(attend(layer)))

    ours_grad = nnx.grad(loss)(
        layer, lambda m: m(x, mask=mask, positions=positions, deterministic=True)
    )
    want_grad = nnx.grad(loss)(layer, lambda m: _sink_attention_reference(m, x, mask, positions))
    for name in ("sinks", "bo", "bq", "wq", "wv"):
        np.testing.assert_allclose(
            getattr(ours_grad, name)[...], getattr(want_grad, name)[...], rtol=1e-4, atol=1e-5
        )
    assert float(jnp.abs(ours_grad.sinks[...]).min()) > 0


def test_a_very_negative_sink_leaves_plain_attention():
    layer = _sink_layer()
    x, mask = _inputs()
    positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    with_sinks = layer(x, mask=mask, positions=positions, deterministic=True)
    sinks = layer.sinks[...]
    layer.sinks[...] = jnp.full((4,), -1e4)
    plain_config = rope_config()
    plain_config.model.qkv_bias = plain_config.model.attention_out_bias = True
    plain = GroupedQueryAttention(plain_config, rngs=nnx.Rngs(0))
    for name in ("wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo"):
        getattr(plain, name)[...] = getattr(layer, name)[...]
    without = plain(x, mask=mask, positions=positions, deterministic=True)
    vanishing = layer(x, mask=mask, positions=positions, deterministic=True)
    real = np.asarray(mask[:, 0].any(-1))  # [B, L] queries with a key to attend to
    np.testing.assert_allclose(vanishing[real], without[real], rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(sinks).min()) > 0 and float(jnp.abs(with_sinks - without).max()) > 1e-3


def _gpt_oss_like(window=3, every=2):
    config = micro_config("rope_decoder", k=2, normalize="topk")
    model = config.model
    model.num_layers, model.num_kv_heads = 4, 2
    model.sliding_window, model.full_attention_every = window, every
    model.attention_sinks = model.qkv_bias = model.attention_out_bias = True
    return config


def _randomised(config, seed=0):
    """The model with its sinks and biases drawn away from their zero init."""
    model = build(config, seed)
    graph, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 11), len(leaves))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    leaves = [
        leaf + 0.5 * jax.random.normal(key, leaf.shape)
        if any(name in path for name in ("sinks", "'bo'", "'bq'", "'bk'", "'bv'"))
        else leaf
        for leaf, key, path in zip(leaves, keys, paths, strict=True)
    ]
    return nnx.merge(graph, jax.tree.unflatten(treedef, leaves))


def test_cached_decoding_past_the_window_equals_the_full_pass():
    config = _gpt_oss_like(window=3)
    model = _randomised(config)
    prompts, lengths = prompts_and_lengths()  # prompts of 6, 2 and 4 tokens, then NEW more
    assert prompts.shape[1] + NEW > 2 * config.model.sliding_window
    new_tokens, logits = decode.generate(
        model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, return_logits=True
    )
    want = teacher_forced_logits(model, prompts, lengths, new_tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_the_window_changes_the_output_only_past_its_length():
    tokens = jnp.asarray(prompts_and_lengths(batch=2, width=10)[0])
    wide = _randomised(_gpt_oss_like(window=10))  # as wide as the sequence: full attention
    full = _randomised(_gpt_oss_like(window=0))
    narrow = _randomised(_gpt_oss_like(window=3))
    np.testing.assert_allclose(_forward(wide, (tokens,)), _forward(full, (tokens,)), atol=1e-5)
    narrow_logits, full_logits = _forward(narrow, (tokens,)), _forward(full, (tokens,))
    np.testing.assert_allclose(narrow_logits[:, :3], full_logits[:, :3], atol=1e-5)
    assert float(jnp.abs(narrow_logits[:, 3:] - full_logits[:, 3:]).max()) > 1e-3


def test_windows_the_stack_cannot_express_are_refused():
    config = _gpt_oss_like()
    config.model.scan_layers, config.moe.sparse_every = True, 1
    # one-layer blocks repeated, but the layers' attention alternates
    with pytest.raises(ValueError, match=r"scan_layers=True repeats one block of 1 layer"):
        build(config)
    config.moe.sparse_every = 2  # blocks of (dense, sparse) alternate as the windows do
    build(config)
    config = micro_config("decoder")
    config.model.sliding_window = 8
    with pytest.raises(ValueError, match=r"sliding_window=8 needs rotary attention"):
        build(config)
