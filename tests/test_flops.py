"""Model FLOPs (`moe_jax.flops`) against hand-computed counts and the parameter count."""

import pytest

from moe_jax import flops
from moe_jax.config import default_config
from moe_jax.models import count_params


def _micro(**settings):
    """M 32, 2 heads of 16, FFN width 64, vocabulary 384, 4 experts."""
    config = default_config()
    model, moe = config.model, config.moe
    model.d_model, model.num_heads, model.head_dim, model.d_ff = 32, 2, 16, 64
    model.vocab_size, model.ffn_activation = 384, "gated-gelu"
    moe.num_experts = 4
    for key, value in settings.items():
        section, name = key.split("__")
        config[section][name] = value
    return config


def test_decoder_with_gelu_experts_by_hand():
    # GLaM-like: layer 0 dense (GEGLU), layer 1 sparse: top-2 of 4 two-matrix GELU experts
    config = _micro(model__num_layers=2, moe__k=2, moe__activation="gelu")
    attention = 2 * 32 * (2 * 32 + 2 * 32) + 2 * 2 * 32 * 32  # projections; scores, context
    dense = 2 * 32 * 64 * 3
    sparse = 2 * 32 * 4 + 2 * (2 * 32 * 64 * 2)  # router; two experts
    per_token = attention + dense + attention + sparse + 2 * 32 * 384  # ... logits
    assert per_token == 78080
    assert flops.forward_flops(config, batch_size=8, length=32) == 8 * 32 * 78080
    assert flops.train_flops(config, batch_size=8, length=32) == 3 * 8 * 32 * 78080


def test_encoder_decoder_by_hand():
    # one sparse layer per stack (top-1 of 4 GEGLU experts), 32 encoder and 8 decoder tokens
    config = _micro(
        model__kind="encoder_decoder",
        model__num_encoder_layers=1,
        model__num_decoder_layers=1,
        moe__k=1,
        moe__sparse_every=1,
    )
    ffn = 2 * 32 * 4 + 2 * 32 * 64 * 3  # router, one expert
    # encoder token: self-attention over 32 keys, FFN, and the decoder layer's cross-attention
    # keys and values
    encoder = 2 * 32 * 128 + 2 * 2 * 32 * 32 + ffn + 2 * 32 * 2 * 32
    # decoder token: self-attention over 8, cross queries and outputs, cross scores over 32
    decoder = 2 * 32 * 128 + 2 * 2 * 8 * 32 + 2 * 32 * 2 * 32 + 2 * 2 * 32 * 32 + ffn
    decoder += 2 * 32 * 384  # logits
    assert (encoder, decoder) == (28928, 54528)
    counted = flops.forward_flops(config, batch_size=2, length=8, encoder_length=32)
    assert counted == 2 * (32 * encoder + 8 * decoder)


@pytest.mark.parametrize("num_experts, k", [(0, 1), (8, 2)])
def test_matmul_flops_are_twice_the_active_parameters(num_experts, k):
    # forward FLOPs per token minus attention scores and logits = 2 x the active parameters
    # (without embeddings) within the norms' and position bias' share (under 1% at M = 256)
    config = _micro(moe__num_experts=num_experts, moe__k=k, model__num_layers=4)
    config.model.d_model, config.model.num_heads, config.model.head_dim = 256, 4, 64
    length = 16
    per_token = flops.forward_flops(config, batch_size=1, length=length) / length
    per_token -= 4 * 2 * 2 * length * 256 + 2 * 256 * 384  # scores and context; logits
    active = count_params(config, include_embeddings=False)["active"]
    assert per_token == pytest.approx(2 * active, rel=0.01)


@pytest.mark.parametrize("q_lora_rank", [0, 96])
def test_latent_attention_flops_are_twice_its_parameters(q_lora_rank):
    # MLA (DeepSeek-V2): every projection once per token, wkv_up included
    config = _micro(model__kind="rope_decoder", model__num_layers=4, moe__num_experts=0)
    model = config.model
    model.d_model, model.num_heads, model.attention, model.q_lora_rank = 256, 4, "mla", q_lora_rank
    model.kv_lora_rank, model.qk_rope_head_dim, model.qk_nope_head_dim = 64, 16, 48
    model.v_head_dim = 40
    length = 16
    per_token = flops.forward_flops(config, batch_size=1, length=length) / length
    per_token -= 4 * 2 * length * 4 * (48 + 16 + 40) + 2 * 256 * 384  # scores, context; logits
    active = count_params(config, include_embeddings=False)["active"]
    assert per_token == pytest.approx(2 * active, rel=0.01)
