"""YaRN RoPE scaling (`model.rope_type='yarn'`, moe_jax.rope) against transformers 5's
`ROPE_INIT_FUNCTIONS['yarn']`, its cos/sin application (gpt-oss), a hand-computed ramp, and a
tiny Qwen3-MoE with yarn `rope_parameters` through `hf.load` and `hf.save`.
"""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, _apply_rotary_emb

from moe_jax import hf, models
from moe_jax.config import default_config
from moe_jax.rope import YarnScaling, rope_frequencies, yarn_from_config
from moe_jax.rope_attention import GroupedQueryAttention, rotary_embedding
from tests.test_hf_rope_decoder import (
    batch,
    hf_config,
    ours_forward,
    random_model,
    rope_decoder_config,
    torch_forward,
)
from tests.test_hf_t5 import assert_close

GPT_OSS = dict(  # gpt-oss's rope_parameters (transformers' GptOssConfig default)
    rope_type="yarn",
    rope_theta=150_000.0,
    factor=32.0,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
    original_max_position_embeddings=4096,
)


def config_from_hf(hf_settings: dict):
    """default_config() with the rope settings the qwen3_moe reader takes from `hf_settings`."""
    config = default_config()
    settings = hf.get_family("qwen3_moe").to_moe_config(hf_settings, frozenset())
    config.update_from_flattened_dict(settings)
    return config


@pytest.mark.parametrize(
    "head_dim, max_positions, parameters",
    [
        (64, 131_072, GPT_OSS),
        # Qwen3's long-context recipe: truncate (the default), beta_fast / beta_slow defaulted
        (
            128,
            131_072,
            dict(
                rope_type="yarn",
                rope_theta=1e6,
                factor=4.0,
                original_max_position_embeddings=32_768,
            ),
        ),
        # DeepSeek-V3's mscale ratio (0.707 to 1.0 here, so that it differs from 1)
        (
            64,
            163_840,
            dict(
                rope_type="yarn",
                rope_theta=10_000.0,
                factor=40.0,
                original_max_position_embeddings=4096,
                beta_fast=32,
                beta_slow=1,
                mscale=0.707,
                mscale_all_dim=1.0,
            ),
        ),
        # no factor: max_position_embeddings / original_max_position_embeddings = 8; an explicit
        # attention factor
        (
            32,
            20_000,
            dict(
                rope_type="yarn",
                rope_theta=5e5,
                factor=None,
                original_max_position_embeddings=2500,
                attention_factor=0.8,
            ),
        ),
    ],
)
def test_frequencies_and_attention_factor_equal_transformers(head_dim, max_positions, parameters):
    reference = transformers.Qwen3MoeConfig(
        head_dim=head_dim, max_position_embeddings=max_positions, rope_parameters=dict(parameters)
    )
    their_inv_freq, their_scaling = ROPE_INIT_FUNCTIONS["yarn"](reference)
    config = config_from_hf(
        {"rope_parameters": dict(parameters), "max_position_embeddings": max_positions}
    )
    assert config.model.rope_type == "yarn"
    inv_freq, scaling = rope_frequencies(
        head_dim, config.model.rope_theta, yarn_from_config(config.model)
    )
    assert inv_freq.shape == (head_dim // 2,) and inv_freq.dtype == jnp.float32
    np.testing.assert_allclose(inv_freq, their_inv_freq.numpy(), rtol=1e-6)
    assert scaling == pytest.approx(their_scaling, rel=1e-12)
    # the ramp is not trivial: some pairs are interpolated, some kept, some blended
    plain, _ = rope_frequencies(head_dim, config.model.rope_theta)
    share = np.asarray(inv_freq / plain)
    factor = config.model.rope_factor
    assert share[0] == pytest.approx(1) and share[-1] == pytest.approx(1 / factor)
    assert np.any((share < 1 - 1e-3) & (share > 1 / factor + 1e-3))


def test_yarn_ramp_by_hand():
    """head_dim 8, theta 1e4, 2048 original positions, factor 4: the pair turning 32 times over
    2048 positions is d = 8 ln(2048 / 64 pi) / (2 ln 1e4) = 1.008, the one turning once 2.513;
    truncated to (1, 3), the ramp over the 4 pairs is (0, 0, 1/2, 1)."""
    yarn = YarnScaling(factor=4.0, original_max_positions=2048)
    assert yarn.correction_range(8, 1e4) == (1, 3)
    inv_freq, scaling = rope_frequencies(8, 1e4, yarn)
    plain = np.array([1.0, 0.1, 0.01, 0.001])  # 1e4 ** (-2i / 8)
    expected = [plain[0], plain[1], (plain[2] + plain[2] / 4) / 2, plain[3] / 4]
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    assert scaling == pytest.approx(0.1 * math.log(4.0) + 1)
    untruncated = YarnScaling(factor=4.0, original_max_positions=2048, truncate=False)
    low, high = untruncated.correction_range(8, 1e4)
    assert low == pytest.approx(8 * math.log(2048 / (64 * math.pi)) / (2 * math.log(1e4)))
    assert high == pytest.approx(8 * math.log(2048 / (2 * math.pi)) / (2 * math.log(1e4)))
    # DeepSeek's ratio needs both mscales; one alone leaves YaRN's default
    deepseek = YarnScaling(factor=40.0, original_max_positions=4096, mscale=0.5, mscale_all_dim=2)
    ln40 = math.log(40.0)
    assert deepseek.attention_scaling() == pytest.approx((0.05 * ln40 + 1) / (0.2 * ln40 + 1))
    assert YarnScaling(40.0, 4096, mscale=0.5).attention_scaling() == 0.1 * ln40 + 1


def test_plain_frequencies_are_unchanged():
    inv_freq, scaling = rope_frequencies(8, 500.0)
    np.testing.assert_array_equal(
        inv_freq, 1.0 / (500.0 ** (jnp.arange(0, 8, 2, dtype=jnp.float32) / 8))
    )
    assert scaling == 1.0 and yarn_from_config(default_config().model) is None


def test_rotary_embedding_equals_gpt_oss():
    """gpt-oss's rotary embedding (`GptOssRotaryEmbedding`, cos and sin times the attention
    scaling, `_apply_rotary_emb` on the two halves), on positions up to twice the original 4096.

    XLA's and torch's float32 powers differ by an ulp in some pairs, an angle error that grows
    with the position (1e-3 radians at gpt-oss's 131072); below 8192 it is < 1e-4."""
    reference = transformers.GptOssConfig(head_dim=64, num_attention_heads=3)
    assert reference.rope_parameters == GPT_OSS
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 64)).astype(np.float32)  # [B, N, L, D]
    positions = rng.integers(0, 8192, (2, 5))
    with torch.no_grad():
        cos, sin = GptOssRotaryEmbedding(reference)(torch.tensor(x), torch.tensor(positions))
        theirs = _apply_rotary_emb(torch.tensor(x), cos[:, None], sin[:, None]).numpy()
    yarn = YarnScaling(factor=32.0, original_max_positions=4096, truncate=False)
    ours = rotary_embedding(
        jnp.asarray(x.transpose(0, 2, 1, 3)), jnp.asarray(positions), theta=150_000.0, yarn=yarn
    )  # [B, L, N, D]
    np.testing.assert_allclose(np.asarray(ours).transpose(0, 2, 1, 3), theirs, atol=2e-4)


# Qwen3-MoE's head_dim 12 over 64 original positions: pairs 0 .. 5 ramp between 0.98 and 2.44
YARN_QWEN = dict(
    rope_type="yarn",
    rope_theta=300.0,
    factor=4.0,
    original_max_position_embeddings=64,
    beta_fast=4.0,
    beta_slow=1.0,
    truncate=False,
)


def test_qwen3_moe_with_yarn_loads_and_round_trips(tmp_path):
    reference = random_model(
        hf_config("qwen3_moe", rope_parameters=dict(YARN_QWEN), max_position_embeddings=256)
    )
    reference.save_pretrained(tmp_path / "hf")
    config, model = hf.load(str(tmp_path / "hf"))
    model_config = config.model
    assert (model_config.rope_type, model_config.rope_factor) == ("yarn", 4.0)
    assert (model_config.rope_original_max_positions, model_config.rope_beta_fast) == (64, 4.0)
    assert not model_config.rope_truncate and model_config.rope_attention_factor == 0.0
    tokens, mask = batch()
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(reference, tokens, mask).logits.numpy()[real])

    hf.save(config, model, str(tmp_path / "ours"))
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["rope_parameters"] == YARN_QWEN
    assert written["max_position_embeddings"] == 256
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "ours", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, mask = batch(seed=2)
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(loaded.eval(), tokens, mask).logits.numpy()[real])
    reloaded = hf.load_config(str(tmp_path / "ours"))
    for key in model_config:
        if key.startswith("rope_"):
            assert reloaded.model[key] == model_config[key], key


def test_legacy_rope_scaling_is_read():
    legacy = {"rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0}}
    legacy["max_position_embeddings"] = 32_768
    config = config_from_hf(legacy)
    assert (config.model.rope_type, config.model.rope_theta) == ("yarn", 1e6)
    assert (config.model.rope_factor, config.model.rope_original_max_positions) == (4.0, 32_768)


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"rope_type": "linear", "factor": 2.0}, "rope_type='linear' is not supported"),
        (
            {**YARN_QWEN, "partial_rotary_factor": 0.5},
            r"yarn field\(s\) \['partial_rotary_factor'\]",
        ),
        ({**YARN_QWEN, "factor": 0.5}, "model.rope_factor=0.5 must be >= 1"),
        ({**YARN_QWEN, "beta_fast": 0.5}, "model.rope_beta_slow=1.0 and model.rope_beta_fast=0.5"),
        ({**YARN_QWEN, "attention_factor": 0.0}, "attention_factor=0.0 must be > 0"),
    ],
)
def test_unsupported_rope_parameters_are_named(parameters, message):
    with pytest.raises(ValueError, match=f"qwen3_moe config.json: rope_parameters.*{message}"):
        config_from_hf({"rope_parameters": parameters, "max_position_embeddings": 256})


def test_bad_settings_are_named():
    config = rope_decoder_config("qwen3_moe")
    config.model.rope_type = "ntk"
    with pytest.raises(ValueError, match=r"model.rope_type='ntk' is not one of \('default'"):
        GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    config.model.rope_type = "yarn"
    with pytest.raises(ValueError, match="model.rope_original_max_positions=0 must be >= 1"):
        GroupedQueryAttention(config, rngs=nnx.Rngs(0))
    config.model.rope_original_max_positions, config.model.rope_attention_factor = 64, -1.0
    with pytest.raises(ValueError, match=r"model.rope_attention_factor=-1.0 must be >= 0"):
        GroupedQueryAttention(config, rngs=nnx.Rngs(0))


def test_unsupported_rope_type_is_refused_before_writing(tmp_path):
    config = rope_decoder_config("qwen3_moe")
    config.model.qk_norm_per_head = True
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    config.model.rope_type = "linear"
    with pytest.raises(ValueError, match="model.rope_type='linear'"):
        hf.save(config, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
