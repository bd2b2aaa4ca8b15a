"""Multi-head latent attention (`model.attention='mla'`, moe_jax.latent_attention) against
transformers' DeepseekV3Attention, its latent-only cache, cached decoding, gradients and
validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from test_decode import NEW, build, micro_config, prompts_and_lengths, teacher_forced_logits
from test_rope_decoder import _inputs, rope_config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from moe_jax import decode
from moe_jax.latent_attention import LatentAttention, interleaved_to_halves

# distinct sizes, so that a mixed-up axis fails
LATENT = dict(kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=6, v_head_dim=10)
Q_LORA_RANK = 20
YARN = dict(factor=4.0, original_max_positions=4, mscale=0.8, mscale_all_dim=1.1)


def mla_config(q_lora_rank=0, yarn=False, config=None):
    """rope_config()'s layer sizes (d_model 32, 4 heads, theta 500) with MLA."""
    config = config or rope_config()
    model = config.model
    model.attention, model.num_kv_heads, model.q_lora_rank = "mla", 0, q_lora_rank
    for key, value in LATENT.items():
        model[key] = value
    if yarn:
        model.rope_type = "yarn"
        for key, value in YARN.items():
            model["rope_" + key] = value
    return config


def transformers_attention(config, interleaved: bool):
    """DeepseekV3Attention and its rotary embedding for `config`, weights drawn at random."""
    model = config.model
    rope_parameters = {"rope_type": "default", "rope_theta": model.rope_theta}
    if model.rope_type == "yarn":
        rope_parameters.update(
            rope_type="yarn",
            factor=YARN["factor"],
            original_max_position_embeddings=YARN["original_max_positions"],
            mscale=YARN["mscale"],
            mscale_all_dim=YARN["mscale_all_dim"],
        )
    reference = transformers.DeepseekV3Config(
        hidden_size=model.d_model,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_heads,
        q_lora_rank=model.q_lora_rank or None,
        rope_parameters=rope_parameters,
        rope_interleave=interleaved,
        max_position_embeddings=16,  # YaRN: factor x original_max_positions
        **LATENT,
    )
    reference._attn_implementation = "eager"
    torch.manual_seed(0)
    attention = DeepseekV3Attention(reference, layer_idx=0).eval()
    with torch.no_grad():
        for name, weight in attention.named_parameters():
            scale = 0.2 if name.endswith("layernorm.weight") else 0.4
            offset = 1.0 if name.endswith("layernorm.weight") else 0.0
            weight.copy_(offset + scale * torch.randn(weight.shape))
    return attention, DeepseekV3RotaryEmbedding(reference)


def load_transformers_weights(layer: LatentAttention, attention, interleaved: bool) -> None:
    """Copy DeepseekV3Attention's weights into `layer` (the mapping moe_jax.hf reads):
    torch's `[out, in]` transposed, output features split into heads, and with `interleaved`
    each rotary block reordered from pairs (2i, 2i+1) to rotate-half pairs (i, i + Dr/2)."""
    heads, nope, rope = layer.num_heads, layer.nope_dim, layer.rope_dim
    order = interleaved_to_halves(rope) if interleaved else np.arange(rope)
    weight = lambda name: attention.get_parameter(name).detach().numpy().T  # [in, out]

    def queries(name):  # [in, N * Dq] -> [in, N, Dq], each head's rotary features reordered
        w = weight(name).reshape(-1, heads, nope + rope)
        return np.concatenate([w[..., :nope], w[..., nope:][..., order]], axis=-1)

    if layer.q_lora_rank:
        layer.wq_down[...] = weight("q_a_proj.weight")  # [M, Rq]
        layer.q_norm.scale[...] = attention.q_a_layernorm.weight.detach().numpy()
        layer.wq_up[...] = queries("q_b_proj.weight")  # [Rq, N, Dq]
    else:
        layer.wq[...] = queries("q_proj.weight")  # [M, N, Dq]
    kv_down = weight("kv_a_proj_with_mqa.weight")  # [M, R + Dr]
    latent = layer.kv_lora_rank
    layer.wkv_down[...] = np.concatenate([kv_down[:, :latent], kv_down[:, latent:][:, order]], 1)
    layer.kv_norm.scale[...] = attention.kv_a_layernorm.weight.detach().numpy()
    layer.wkv_up[...] = weight("kv_b_proj.weight").reshape(latent, heads, -1)  # [R, N, Dn + Dv]
    layer.wo[...] = weight("o_proj.weight").reshape(heads, layer.value_dim, -1)  # [N, Dv, M]


@pytest.mark.parametrize(
    "q_lora_rank, interleaved, yarn",
    [(0, True, False), (Q_LORA_RANK, True, True), (Q_LORA_RANK, False, False), (0, False, True)],
    ids=["v2_lite_like", "v3_like_yarn", "q_lora_rotate_half", "direct_q_yarn"],
)
def test_the_layer_equals_transformers_deepseek_v3_attention(q_lora_rank, interleaved, yarn):
    config = mla_config(q_lora_rank, yarn)
    layer = LatentAttention(config, rngs=nnx.Rngs(0))
    attention, rotary = transformers_attention(config, interleaved)
    load_transformers_weights(layer, attention, interleaved)
    x, mask = _inputs()  # row 1 left-padded by 2
    valid = np.asarray(mask[:, 0].any(-2))  # [B, L] real keys
    # each row counting from its first real token, from 3: past YaRN's 4 pretraining positions
    positions = jnp.asarray(np.maximum(np.cumsum(valid, axis=1) - 1, 0) + 3)
    ours = layer(x, mask=mask, positions=positions, deterministic=True)
    assert ours.shape == x.shape
    additive = np.where(np.asarray(mask), 0.0, -1e9).astype(np.float32)  # [B, 1, L, L]
    with torch.no_grad():
        hidden = torch.tensor(np.asarray(x))
        cos_sin = rotary(hidden, torch.tensor(np.asarray(positions)))
        theirs, _ = attention(hidden, cos_sin, torch.tensor(additive))
    real = np.asarray(mask[:, 0].any(-1))  # [B, L] queries with a key to attend to
    np.testing.assert_allclose(np.asarray(ours)[real], theirs.numpy()[real], rtol=1e-5, atol=1e-5)
    if yarn:  # mscale_all_dim scales the logits: (0.1 * 1.1 * ln 4 + 1)**2 / sqrt(Dn + Dr)
        assert layer.scale == pytest.approx(attention.scaling, rel=1e-12)
        assert layer.scale == pytest.approx((0.11 * np.log(4) + 1) ** 2 / np.sqrt(14), rel=1e-12)


def test_interleaved_order_by_hand():
    np.testing.assert_array_equal(interleaved_to_halves(8), [0, 2, 4, 6, 1, 3, 5, 7])


def _attention_layers(model):
    return [module for _, module in nnx.iter_modules(model) if isinstance(module, LatentAttention)]


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_the_cache_holds_only_the_latent_and_the_rotary_key(scan):
    config = mla_config(Q_LORA_RANK, config=micro_config("rope_decoder", k=2, normalize="topk"))
    config.model.num_layers, config.model.scan_layers = 4, scan
    model = build(config)
    model.decoder.init_cache(3, 11)
    per_token = LATENT["kv_lora_rank"] + LATENT["qk_rope_head_dim"]  # 20 numbers
    caches = [layer.cache[...] for layer in _attention_layers(model)]
    if scan:  # one segment of 2 blocks of (dense, sparse): each layer's cache stacks 2 blocks
        assert [cache.shape for cache in caches] == [(2, 3, 11, per_token)] * 2
    else:
        assert [cache.shape for cache in caches] == [(3, 11, per_token)] * 4
    cached = sum(cache.size for cache in jax.tree.leaves(nnx.state(model, nnx.Cache)))
    assert cached == 4 * 3 * 11 * per_token  # layers x batch x rows x numbers


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned_yarn"])
def test_cached_decoding_equals_the_full_pass(scan):
    config = micro_config("rope_decoder", k=2, normalize="topk")
    config = mla_config(Q_LORA_RANK if scan else 0, yarn=scan, config=config)
    if scan:
        config.model.num_layers, config.model.scan_layers = 4, True
    model = build(config)
    prompts, lengths = prompts_and_lengths()
    new_tokens, logits = decode.generate(
        model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, return_logits=True
    )
    np.testing.assert_array_equal(new_tokens, jnp.argmax(logits, -1))
    want = teacher_forced_logits(model, prompts, lengths, new_tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_sliding_windows_apply_to_latent_attention():
    config = mla_config(config=micro_config("rope_decoder"))
    config.model.sliding_window = 3
    model = build(config)
    prompts, lengths = prompts_and_lengths()
    assert prompts.shape[1] + NEW > 2 * config.model.sliding_window
    new_tokens, logits = decode.generate(
        model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, return_logits=True
    )
    want = teacher_forced_logits(model, prompts, lengths, new_tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)
    config.model.sliding_window = 0
    full = build(config)
    full_logits = teacher_forced_logits(full, prompts, lengths, new_tokens)
    assert float(jnp.abs(full_logits - want).max()) > 1e-3  # the window matters


@pytest.mark.parametrize("q_lora_rank", [0, Q_LORA_RANK])
def test_gradients_reach_every_weight(q_lora_rank):
    config = mla_config(q_lora_rank, yarn=True, config=micro_config("rope_decoder"))
    model = build(config)
    tokens = jnp.asarray(prompts_and_lengths(batch=2, width=8)[0])

    def loss(model):
        logits = model(tokens, deterministic=True)[0]  # [B, L, V]
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))

    grads = nnx.to_flat_state(nnx.grad(loss)(model))
    names = set()
    for path, leaf in grads:
        if "self_attention" in path:
            names.add(".".join(map(str, path[path.index("self_attention") + 1 :])))
            value = np.asarray(leaf[...])
            assert np.all(np.isfinite(value)) and np.abs(value).max() > 0, path
    down_up = {"wq_down", "q_norm.scale", "wq_up"} if q_lora_rank else {"wq"}
    assert names == down_up | {"wkv_down", "kv_norm.scale", "wkv_up", "wo"}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("kv_lora_rank", 0, r"model.kv_lora_rank must be an int >= 1 .*got 0"),
        ("qk_nope_head_dim", -3, r"model.qk_nope_head_dim must be an int >= 1 .*got -3"),
        ("v_head_dim", 0, r"model.v_head_dim must be an int >= 1 .*got 0"),
        ("qk_rope_head_dim", 7, r"even model.qk_rope_head_dim, got 7"),
        ("q_lora_rank", -1, r"model.q_lora_rank must be an int >= 0 .*got -1"),
        ("num_kv_heads", 2, r"model.num_kv_heads=2 must be 0 or model.num_heads=4"),
        ("attention_sinks", True, r"model.attention_sinks=True is not supported"),
        ("qk_norm", True, r"model.qk_norm=True is not supported"),
        ("qkv_bias", True, r"model.qkv_bias=True is not supported"),
        ("attention_out_bias", True, r"model.attention_out_bias=True is not supported"),
    ],
)
def test_bad_settings_are_refused_by_name(key, value, message):
    config = mla_config()
    config.model[key] = value
    with pytest.raises(ValueError, match=message):
        LatentAttention(config, rngs=nnx.Rngs(0))


def test_unknown_attention_and_mla_without_rotary_positions_are_refused():
    config = mla_config(config=micro_config("rope_decoder"))
    config.model.attention = "mha"
    with pytest.raises(ValueError, match=r"model.attention='mha' is not one of \('gqa', 'mla'\)"):
        build(config)
    config = mla_config(config=micro_config("decoder"))
    with pytest.raises(ValueError, match=r"model.attention='mla' .*needs rotary attention"):
        build(config)
