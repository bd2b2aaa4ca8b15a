"""Quantized experts (moe_jax.quantize): qwix's rounding on a hand-computed case, expert weights
really stored as int8 / int4 with per-channel or per-group scales, int8 logits within a stated
tolerance of float32 (int4 further off), byte counts, decoding, and unsupported bit widths."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_upcycle import TOKENS, moe_config

from moe_jax import decode, quantize
from moe_jax.models import build_model


def test_hand_computed_int8_and_int4():
    """Symmetric absmax rounding, one scale per output column: scale = absmax / (2**(b-1) - 0.5)
    (qwix's convention), values rounded to the nearest integer and clipped to the range."""
    weight = jnp.array([[[1.0, -2.0], [0.5, 4.0]]])  # [E=1, A=2, N=2]
    int8 = quantize.quantize_array(weight, 8)
    np.testing.assert_allclose(int8.scale, [[[1 / 127.5, 4 / 127.5]]], rtol=1e-6)
    np.testing.assert_array_equal(int8.qvalue, [[[127, -64], [64, 127]]])  # 63.75 -> 64
    int4 = quantize.quantize_array(weight, 4)
    np.testing.assert_array_equal(int4.qvalue, [[[7, -4], [4, 7]]])  # 7.5 -> 7, 3.75 -> 4
    grouped = quantize.quantize_array(jnp.ones((2, 8, 3)), 4, group_size=4)
    assert grouped.scale.shape == (2, 2, 3)  # [E, A / group_size, N]


def model(**overrides):
    return build_model(moe_config(moe__num_experts=4, **overrides), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bits, dtype", [(8, jnp.int8), (4, jnp.int4)])
def test_expert_weights_are_stored_as_integers(bits, dtype):
    quantized = quantize.quantize_experts(model(), bits)
    ffn = quantized.decoder.segments[0][0].layers[1].ffn
    for name in ("wi", "wi_gate", "wo"):
        stored = getattr(ffn, name).get_value()
        assert stored.qvalue.dtype == dtype
        assert stored.scale.shape == (4, 1, stored.qvalue.shape[2])  # per expert and channel
    float_bytes = quantize.expert_bytes(model())
    scale_bytes = sum(4 * 4 * w.shape[2] for w in (ffn.wi, ffn.wi_gate, ffn.wo)) * 2  # 2 layers
    assert quantize.expert_bytes(quantized) == float_bytes * bits // 32 + scale_bytes


def test_int8_logits_are_within_tolerance_of_float32_and_int4_further():
    """Stated tolerance: int8 logits within 2% of the float32 logits' largest magnitude."""
    reference = model()
    want, _ = reference(TOKENS, deterministic=True)
    errors = {}
    for bits in (8, 4):
        got, _ = quantize.quantize_experts(model(), bits)(TOKENS, deterministic=True)
        errors[bits] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert 0 < errors[8] < 0.02, errors
    assert errors[4] > 4 * errors[8], errors  # 16 levels round much more coarsely than 256


def test_quantized_model_decodes():
    quantized = quantize.quantize_experts(model(), 8)
    tokens = decode.generate(quantized, TOKENS[:1, :4], max_new_tokens=3, max_length=16)
    assert tokens.shape == (1, 3)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quantize.quantize_experts(model(), 2), r"to \[4, 8\] bits, not 2"),
        (lambda: quantize.quantize_experts(model(), 4, group_size=5), "group_size=5 must be"),
        (lambda: quantize.in_format(model(), "fp8"), "unknown format 'fp8'"),
    ],
)
def test_unsupported_settings_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()
