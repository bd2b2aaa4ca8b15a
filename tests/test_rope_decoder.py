"""The Llama-style decoder (`model.kind = 'rope_decoder'`): RoPE, grouped-query attention, q/k
norm, the model around them, and router logits, against oracles built here.

The `transformers` Mixtral and OLMoE models are the outside oracle for the whole network in
tests/test_hf_mixtral_olmoe.py.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_training import TINY_TRAINING

from moe_jax import losses, metrics, models, train
from moe_jax.attention import MultiHeadAttention, attention_mask
from moe_jax.config import default_config, load_config_file
from moe_jax.rope_attention import GroupedQueryAttention, rotary_embedding


@nnx.jit(static_argnames="deterministic")
def apply(model, tokens, deterministic=True, **kwargs):
    return model(tokens, deterministic=deterministic, **kwargs)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rope_config(num_heads=4, num_kv_heads=2, qk_norm=False, num_experts=4, k=2):
    config = default_config()
    model, moe = config.model, config.moe
    model.kind = "rope_decoder"
    model.vocab_size, model.d_model, model.num_layers = 64, 32, 3
    model.num_heads, model.num_kv_heads, model.head_dim = num_heads, num_kv_heads, 8
    model.d_ff, model.ffn_activation, model.qk_norm = 48, "swiglu", qk_norm
    model.norm_epsilon, model.rope_theta = 1e-5, 500.0
    moe.num_experts, moe.k, moe.normalize = num_experts, k, "topk"
    moe.backend, moe.router_jitter, moe.sparse_every, moe.group_size = "dropless", 0.0, 1, 64
    return config


# ----------------------------------------------------------------------------------- RoPE


def test_rotary_embedding_by_hand():
    # head_dim 2: one pair turned by `position` radians (inv_freq = theta**0 = 1)
    x = jnp.array([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [B=1, L=2, N=1, D=2]
    out = rotary_embedding(x, jnp.array([[1, 3]]), theta=10_000.0)
    expected = [[[[math.cos(1.0), math.sin(1.0)]], [[-2 * math.sin(3.0), 2 * math.cos(3.0)]]]]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # head_dim 4: feature i pairs with i + 2; the second pair turns at theta**(-1/2)
    x = jnp.array([[[[1.0, 1.0, 0.0, 0.0]]]])
    out = rotary_embedding(x, jnp.array([[2]]), theta=100.0)
    a0, a1 = 2.0, 2.0 / 10.0
    expected = [math.cos(a0), math.cos(a1), math.sin(a0), math.sin(a1)]
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_rotary_scores_depend_only_on_position_differences():
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 6, 2, 16))
    k = jax.random.normal(kk, (1, 6, 2, 16))
    positions = jnp.array([[0, 1, 2, 5, 9, 20]])

    def scores(shift):
        rq = rotary_embedding(q, positions + shift, theta=10_000.0)
        rk = rotary_embedding(k, positions + shift, theta=10_000.0)
        return jnp.einsum("bqnd,bknd->bnqk", rq, rk)

    np.testing.assert_allclose(scores(0), scores(137), rtol=1e-4, atol=1e-4)
    # and they do depend on the differences: moving one key changes its scores
    moved = rotary_embedding(k, positions.at[0, 0].add(3), theta=10_000.0)
    rq = rotary_embedding(q, positions, theta=10_000.0)
    changed = jnp.einsum("bqnd,bknd->bnqk", rq, moved)
    assert float(jnp.abs(changed - scores(0))[..., 0].max()) > 1e-2
    # the rotation keeps norms
    np.testing.assert_allclose(jnp.linalg.norm(rq, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)


def test_rotary_embedding_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        rotary_embedding(jnp.ones((1, 2, 1, 3)), jnp.zeros((1, 2), jnp.int32), theta=10.0)


# ------------------------------------------------------------------ grouped-query attention


def _inputs(length=7, batch=2, d_model=32):
    x = jax.random.normal(jax.random.key(1), (batch, length, d_model))
    valid = jnp.ones((batch, length), jnp.bool_).at[1, :2].set(False)  # left padding in row 1
    mask = attention_mask(key_valid=valid, causal=True)
    return x, mask


def test_gqa_with_all_heads_at_position_zero_equals_multi_head_attention():
    # RoPE at position 0 is the identity, so with K == N the layer is T5's attention
    config = rope_config(num_kv_heads=4)
    gqa = GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    mha = MultiHeadAttention(config, rngs=nnx.Rngs(1))
    for name in ("wq", "wk", "wv", "wo"):
        getattr(mha, name)[...] = getattr(gqa, name)[...]
    x, mask = _inputs()
    positions = jnp.zeros(x.shape[:2], jnp.int32)
    ours = gqa(x, mask=mask, positions=positions, deterministic=True)
    oracle = mha(x, x, mask=mask, deterministic=True)
    np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-5)


def test_grouped_heads_equal_multi_head_attention_with_repeated_key_value_heads():
    # K=2 key/value heads for N=4 query heads: query head n reads key/value head n // 2, which
    # is full multi-head attention with each key/value head's weights copied to its group
    grouped = GroupedQueryAttention(rope_config(num_kv_heads=2), rngs=nnx.Rngs(0))
    full = GroupedQueryAttention(rope_config(num_kv_heads=4), rngs=nnx.Rngs(1))
    full.wq[...], full.wo[...] = grouped.wq[...], grouped.wo[...]
    full.wk[...] = jnp.repeat(grouped.wk[...], 2, axis=1)
    full.wv[...] = jnp.repeat(grouped.wv[...], 2, axis=1)
    x, mask = _inputs()
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    ours = grouped(x, mask=mask, positions=positions, deterministic=True)
    oracle = full(x, mask=mask, positions=positions, deterministic=True)
    np.testing.assert_allclose(ours, oracle, rtol=1e-5, atol=1e-5)


def test_qk_norm_normalises_all_heads_together():
    # OLMoE's q/k norm is one RMSNorm over the whole N * D projection (not one per head)
    config = rope_config(qk_norm=True)
    layer = GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    assert layer.q_norm.scale.shape == (4 * 8,) and layer.k_norm.scale.shape == (2 * 8,)
    layer.q_norm.scale[...] = jax.random.uniform(jax.random.key(2), (32,), minval=0.5, maxval=2)
    x, mask = _inputs()
    # only head 0's query weights grow: a per-head norm would undo it, the joint norm does not
    layer.wq[...] = layer.wq[...].at[:, 0].multiply(10.0)
    q = np.asarray(layer._project(x, layer.wq)).reshape(2, 7, 32)  # [B, L, N * D]
    rms = np.sqrt(np.mean(q**2, axis=-1, keepdims=True) + 1e-5)
    expected = (q / rms * np.asarray(layer.q_norm.scale[...])).reshape(2, 7, 4, 8)
    normed = layer._normed(layer._project(x, layer.wq), layer.q_norm)
    np.testing.assert_allclose(normed, expected, rtol=1e-5, atol=1e-6)
    # scaling the query and key projections as a whole changes nothing
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    before = layer(x, mask=mask, positions=positions, deterministic=True)
    layer.wq[...] = 5.0 * layer.wq[...]
    layer.wk[...] = 3.0 * layer.wk[...]
    after = layer(x, mask=mask, positions=positions, deterministic=True)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-5)


def test_qk_norm_per_head_normalises_each_head_alone():
    # Qwen3's q/k norm is one [D] RMSNorm applied to every head's D features on their own
    config = rope_config(qk_norm=True)
    config.model.qk_norm_per_head = True
    layer = GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    assert layer.q_norm.scale.shape == layer.k_norm.scale.shape == (8,)
    layer.q_norm.scale[...] = jax.random.uniform(jax.random.key(2), (8,), minval=0.5, maxval=2)
    x, _ = _inputs()
    q = np.asarray(layer._project(x, layer.wq))  # [B, L, N, D]
    rms = np.sqrt(np.mean(q**2, axis=-1, keepdims=True) + 1e-5)
    expected = q / rms * np.asarray(layer.q_norm.scale[...])
    normed = layer._normed(layer._project(x, layer.wq), layer.q_norm)
    np.testing.assert_allclose(normed, expected, rtol=1e-5, atol=1e-6)
    config.model.qk_norm = False
    with pytest.raises(ValueError, match="qk_norm_per_head=True needs model.qk_norm=True"):
        GroupedQueryAttention(config, rngs=nnx.Rngs(0))


def test_gqa_rejects_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide"):
        GroupedQueryAttention(rope_config(num_kv_heads=3), rngs=nnx.Rngs(0))


# -------------------------------------------------------------------------------- the model


def test_rope_decoder_has_no_relative_bias_and_no_biases():
    model = models.build_model(rope_config(qk_norm=True), rngs=nnx.Rngs(0))
    assert isinstance(model, models.DecoderLM) and model.decoder.position_bias is None
    names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model))}
    assert not any("bias" in name for name in names)
    assert any(name.endswith("self_attention/q_norm/scale") for name in names)
    assert "output/kernel" in names  # untied head


def test_left_padding_and_shifted_positions_leave_real_logits_unchanged():
    # rotary positions are relative and dropless routing has no capacity: the logits of the
    # real tokens of a left-padded row equal those of the same tokens unpadded
    model = models.build_model(rope_config(qk_norm=True), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (1, 9), 1, 64)
    plain, plain_aux = apply(model, tokens)
    padded = jnp.concatenate([jnp.full((1, 4), 7), tokens], axis=1)  # [1, 13]
    segments = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 9), jnp.int32)], 1)
    shifted, shifted_aux = apply(model, padded, segment_ids=segments)
    np.testing.assert_allclose(shifted[:, 4:], plain, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        shifted_aux.load_balancing_loss, plain_aux.load_balancing_loss, rtol=1e-5
    )


def test_tied_logits_of_a_rope_decoder_are_not_rescaled():
    config = rope_config()
    config.model.tie_embeddings = True
    model = models.build_model(config, rngs=nnx.Rngs(0))
    hidden = jax.random.normal(jax.random.key(3), (1, 2, 32))
    table = model.embed.embedding[...]
    np.testing.assert_allclose(model.logits(hidden), hidden @ table.T, rtol=1e-5)


def test_router_logits_reproduce_the_reported_z_loss_and_gradients_flow():
    config = rope_config()
    model = models.build_model(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(4), (2, 8), 1, 64)
    segments = jnp.ones((2, 8), jnp.int32).at[0, :3].set(0)
    capture = nnx.jit(
        lambda model: models.router_logits(model, tokens, deterministic=True, segment_ids=segments)
    )
    logits, aux, router_logits = capture(model)
    assert len(router_logits) == 3 and router_logits[0].shape == (1, 16, 4)
    real = (segments > 0).reshape(1, 16)
    for layer, layer_logits in enumerate(router_logits):
        z_loss = losses.router_z_loss(layer_logits, real)
        np.testing.assert_allclose(aux.router_z_loss[layer], z_loss, rtol=1e-6)

    def loss_fn(model):
        logits, aux = model(tokens, deterministic=False, segment_ids=segments)
        return jnp.mean(logits**2) + aux.load_balancing_loss.sum()

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    for path, grad in nnx.to_flat_state(grads):
        assert float(jnp.abs(grad[...]).sum()) > 0, path


def test_router_logits_refuses_scanned_layers():
    config = rope_config()
    config.model.scan_layers = True
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="scan_layers=False"):
        models.router_logits(model, jnp.ones((1, 4), jnp.int32), deterministic=True)


def test_tiny_mixtral_trains_and_its_loss_falls(tmp_path):
    # the tiny recipe shrunk further (tests/tiny_training.py) keeps Mixtral's architecture; the
    # loss starts near log(384) = 5.95 (OLMoE's tiny config trains forward and backward in
    # tests/test_configs.py)
    config = load_config_file(os.path.join(ROOT, "configs", "mixtral.py") + ":tiny")
    settings = {**TINY_TRAINING, "model.num_kv_heads": 1, "moe.d_ff": 64, "moe.k": 2}
    settings.update({"train.num_steps": 20, "train.eval_every": 0, "train.checkpoint_every": 20})
    settings["train.learning_rate"] = 1e-2
    for key, value in settings.items():
        section, name = key.split(".")
        config[section][name] = value
    assert config.model.kind == "rope_decoder" and config.moe.backend == "dropless"
    result = train.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert result.step == 20
    with open(tmp_path / metrics.METRICS_FILE, encoding="utf-8") as file:
        losses_ = [json.loads(line)["loss"] for line in file]
    assert all(math.isfinite(loss) for loss in losses_)
    assert np.mean(losses_[-5:]) < np.mean(losses_[:5]) - 0.8, losses_
