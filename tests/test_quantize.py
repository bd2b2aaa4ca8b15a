"""Quantized experts (moe_jax.quantize): qwix's rounding on a hand-computed case, expert weights
really stored as int8 / int4 with per-channel or per-group scales, scanned layers quantized as
each layer alone, int8 logits within a stated tolerance of float32 (int4 further off), byte
counts, decoding, and unsupported bit widths."""

import jax.numpy as jnp
import numpy as np
import pytest
import qwix
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


def relative_error_per_expert(weight, quantized) -> np.ndarray:
    """f32[..., E]: |dequantized - weight| / |weight| (Frobenius) of each expert's matrix."""
    error = np.asarray(qwix.dequantize(quantized)) - np.asarray(weight)
    return np.linalg.norm(error, axis=(-2, -1)) / np.linalg.norm(weight, axis=(-2, -1))


@pytest.mark.parametrize("bits, group_size", [(8, 0), (4, 0), (4, 8)])
def test_scanned_expert_weights_quantize_as_each_layer_alone(bits, group_size):
    """A scanned model stores each expert weight as `[R, E, A, N]`: its integers and scales are
    those of each layer's `[E, A, N]` quantized by itself (the oracle), so experts of magnitudes
    1e-2..1 each keep the per-layer relative error, and the model runs on them."""
    scanned = model(model__scan_layers=True)
    magnitudes = jnp.logspace(-2, 0, 4)[None, :, None, None]  # [1, E, 1, 1]
    for module, name in quantize._expert_weights(scanned):
        variable = getattr(module, name)
        variable.set_value(variable.get_value() * magnitudes)
    floats = {name: getattr(m, name).get_value() for m, name in quantize._expert_weights(scanned)}
    oracle = nnx.clone(scanned)
    quantize.quantize_experts(scanned, bits, group_size)
    for (module, name), (oracle_module, _) in zip(
        quantize._expert_weights(scanned), quantize._expert_weights(oracle)
    ):
        weight, stored = floats[name], getattr(module, name).get_value()
        layers = [quantize.quantize_array(layer, bits, group_size) for layer in weight]
        np.testing.assert_array_equal(stored.qvalue, jnp.stack([q.qvalue for q in layers]))
        np.testing.assert_allclose(stored.scale, jnp.stack([q.scale for q in layers]), rtol=1e-6)
        want = np.stack([relative_error_per_expert(w, q) for w, q in zip(weight, layers)])
        got = relative_error_per_expert(weight, stored)  # [R, E]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
        assert got.max() < (0.01 if bits == 8 else 0.15), (name, got)
        getattr(oracle_module, name).set_value(jnp.stack([qwix.dequantize(q) for q in layers]))
    want, _ = oracle(TOKENS, deterministic=True)
    got, _ = scanned(TOKENS, deterministic=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * max(1.0, float(jnp.abs(want).max())))


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
