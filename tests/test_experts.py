"""Expert FFN maths and initialisers against NumPy formulas and hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import experts


def _np_gelu(a):
    # tanh approximation, as jax.nn.gelu(approximate=True)
    return 0.5 * a * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (a + 0.044715 * a**3)))


def _np_clamped_swiglu(gate, up, limit=7.0, alpha=1.702):
    gate = np.minimum(gate, limit)
    return (np.clip(up, -limit, limit) + 1.0) * gate / (1.0 + np.exp(-alpha * gate))


def _np_ffn(params, x, activation):
    """Per-expert NumPy oracle: x [E, N, M] -> [E, N, M]; biases (bi, bi_gate, bo) if given."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    x = np.asarray(x, np.float64)

    def bias(name, width):
        return p[name][:, None, :] if name in p else np.zeros((1, 1, width))

    d_ff, d_model = p["wo"].shape[1:]
    pre = np.einsum("enm,emh->enh", x, p["wi"]) + bias("bi", d_ff)
    if activation == "relu":
        hidden = np.maximum(pre, 0.0)
    elif activation == "gelu":
        hidden = _np_gelu(pre)
    else:
        gate = np.einsum("enm,emh->enh", x, p["wi_gate"]) + bias("bi_gate", d_ff)
        if activation == "swiglu_clamped":
            hidden = _np_clamped_swiglu(gate, pre)
        else:
            act = _np_gelu(gate) if activation == "gated-gelu" else gate / (1.0 + np.exp(-gate))
            hidden = act * pre
    return np.einsum("enh,ehm->enm", hidden, p["wo"]) + bias("bo", d_model)


def test_relu_literal_case():
    # x = [2, 1]; wi = [[1, -1], [1, 1]] -> x wi = [2 + 1, -2 + 1] = [3, -1]; relu -> [3, 0];
    # wo = [[1, 2], [5, 7]] -> [3 * 1 + 0 * 5, 3 * 2 + 0 * 7] = [3, 6].
    params = {
        "wi": jnp.array([[[1.0, -1.0], [1.0, 1.0]]]),
        "wo": jnp.array([[[1.0, 2.0], [5.0, 7.0]]]),
    }
    y = experts.ffn(params, jnp.array([[[2.0, 1.0]]]), activation="relu")
    np.testing.assert_allclose(y, [[[3.0, 6.0]]])


def test_swiglu_literal_case():
    # x = [1]; gate = x wi_gate = 2 -> silu(2) = 2 / (1 + e^-2) = 1.7615942; linear = x wi = 3;
    # hidden = 5.2847826; wo = 0.5 -> 2.6423913.
    params = {
        "wi": jnp.array([[[3.0]]]),
        "wi_gate": jnp.array([[[2.0]]]),
        "wo": jnp.array([[[0.5]]]),
    }
    y = experts.ffn(params, jnp.array([[[1.0]]]), activation="swiglu")
    np.testing.assert_allclose(y, [[[2.0 / (1.0 + math.exp(-2.0)) * 3.0 * 0.5]]], rtol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("activation", experts.ACTIVATIONS)
def test_ffn_matches_numpy_per_expert(activation, bias):
    params = experts.init_ffn_params(
        jax.random.PRNGKey(0), d_model=6, d_ff=10, activation=activation, num_experts=3, bias=bias
    )
    # random biases (they start at zero) and inputs large enough to reach the clamp at 7
    bias_keys = jax.random.split(jax.random.PRNGKey(2), len(experts.BIAS_NAMES))
    for key, name in zip(bias_keys, experts.BIAS_NAMES, strict=True):
        if name in params:
            params[name] = jax.random.normal(key, params[name].shape)
    x = 4.0 * jax.random.normal(jax.random.PRNGKey(1), (3, 5, 6))
    y = experts.ffn(params, x, activation=activation)
    np.testing.assert_allclose(y, _np_ffn(params, x, activation), rtol=1e-5, atol=1e-6)
    # the dense form on expert 1's weights gives expert 1's rows
    params_1 = {k: v[1] for k, v in params.items()}
    dense = experts.ffn(params_1, x[1], activation=activation, matmul=experts.dense_matmul)
    np.testing.assert_allclose(dense, y[1], rtol=1e-5, atol=1e-6)


def test_params_shapes_and_gate_only_for_gated_units():
    gated = experts.init_ffn_params(
        jax.random.PRNGKey(0), d_model=4, d_ff=8, activation="swiglu", num_experts=3
    )
    assert {k: v.shape for k, v in gated.items()} == {
        "wi": (3, 4, 8),
        "wi_gate": (3, 4, 8),
        "wo": (3, 8, 4),
    }
    plain = experts.init_ffn_params(jax.random.PRNGKey(0), d_model=4, d_ff=8, activation="relu")
    assert {k: v.shape for k, v in plain.items()} == {"wi": (4, 8), "wo": (8, 4)}
    biased = experts.init_ffn_params(
        jax.random.PRNGKey(0), d_model=4, d_ff=8, activation="swiglu", num_experts=3, bias=True
    )
    assert {k: v.shape for k, v in biased.items() if k in experts.BIAS_NAMES} == {
        "bi": (3, 8),
        "bi_gate": (3, 8),
        "bo": (3, 4),
    }
    assert not any(np.any(biased[name]) for name in experts.BIAS_NAMES)  # zeros at init
    assert experts.param_names("relu", bias=True) == ("wi", "wo", "bi", "bo")
    assert set(biased) == set(experts.param_names("swiglu", bias=True))
    assert experts.is_gated("gated-gelu") and not experts.is_gated("gelu")


def test_switch_truncated_normal_std_and_bounds():
    fan_in = 64
    init = experts.truncated_normal_init(0.1)
    w = np.asarray(init(jax.random.PRNGKey(0), (16, fan_in, 256)))
    std = math.sqrt(0.1 / fan_in)  # Switch: sqrt(scale / fan_in), scale 0.1
    assert abs(w.std() - std) / std < 0.01
    assert np.abs(w).max() <= 2.0 * std / 0.8796256610342398 + 1e-7  # truncated at 2 raw std
    assert abs(w.mean()) < 0.01 * std
    with pytest.raises(ValueError, match="scale"):
        experts.truncated_normal_init(0.0)


def test_expert_dropout_zeroes_and_rescales_hidden():
    # identity-like experts: one hidden unit per input, so the output shows the hidden layer
    eye = jnp.eye(4)[None]
    params = {"wi": eye, "wo": eye}
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (1, 200, 4))) + 0.1
    y = experts.ffn(params, x, activation="relu", dropout_rate=0.5, dropout_rng=jax.random.key(3))
    kept = np.asarray(y) != 0.0
    np.testing.assert_allclose(np.asarray(y)[kept], 2.0 * np.asarray(x)[kept], rtol=1e-6)
    assert 0.4 < kept.mean() < 0.6
    no_dropout = experts.ffn(params, x, activation="relu")
    np.testing.assert_allclose(no_dropout, x)
    with pytest.raises(ValueError, match="dropout_rng"):
        experts.ffn(params, x, activation="relu", dropout_rate=0.5)


def test_bfloat16_compute_accumulates_in_float32():
    params = experts.init_ffn_params(
        jax.random.PRNGKey(0), d_model=32, d_ff=64, activation="swiglu", num_experts=2
    )
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 32))
    y16 = experts.ffn(params, x, activation="swiglu", dtype=jnp.bfloat16)
    y32 = experts.ffn(params, x, activation="swiglu")
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.02 * float(jnp.abs(y32).max()))


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="swiglu"):
        experts.check_activation("tanh")
    with pytest.raises(ValueError, match="Unknown FFN activation"):
        experts.init_ffn_params(jax.random.PRNGKey(0), d_model=2, d_ff=2, activation="geglu")
