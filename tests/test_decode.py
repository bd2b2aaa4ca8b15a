"""Tests of moe_jax.decode: cached decoding against the full forward pass, sampling, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import VOCAB
from test_models import micro_config as models_micro_config

from moe_jax import decode, models

NEW = 5
# confident routers (no ties between experts) and a small eval capacity: the full forward pass
# below drops tokens unless it is asked to run dropless
DECODE_MOE = {"router_init_scale": 10.0, "capacity_factor_eval": 0.5, "min_capacity": 1}


def micro_config(kind="decoder", **moe_overrides):
    """test_models' micro model (d_model 32, 4 experts) with 2 decoder-only layers."""
    config = models_micro_config(kind, **{**DECODE_MOE, **moe_overrides})
    config.model.num_layers = 2
    return config


def build(config, seed=0):
    return models.build_model(config, rngs=nnx.Rngs(seed))


@nnx.jit
def _forward(model, inputs):
    return model(*inputs, deterministic=True)[0]


def prompts_and_lengths(batch=3, width=6):
    prompts = jax.random.randint(jax.random.key(7), (batch, width), 3, VOCAB)
    return np.asarray(prompts), np.array([width, 2, 4][:batch], np.int32)


@nnx.jit
def _encode(model, encoder_inputs):
    return model.encode(encoder_inputs, deterministic=True)[:2]


@nnx.jit
def _decode_full(model, decoder_inputs, encoded, encoder_valid):
    return model.decode(decoder_inputs, encoded, encoder_valid, deterministic=True)[0]


def teacher_forced_logits(model, prompts, lengths, new_tokens):
    """Logits a full forward pass whose decoder runs dropless gives at each generated position,
    f32[B, NEW, V]; an encoder-decoder's encoder runs as in evaluation (its eval capacity)."""
    full = decode.inference_copy(model, dropless=True)
    if isinstance(model, models.EncoderDecoder):
        start = jnp.zeros((len(lengths), 1), jnp.int32)
        decoder_inputs = jnp.concatenate([start, new_tokens[:, :-1]], axis=1)
        encoder_inputs = jnp.where(jnp.arange(prompts.shape[1]) < lengths[:, None], prompts, 0)
        encoded, encoder_valid = _encode(model, encoder_inputs)
        return _decode_full(full, decoder_inputs, encoded, encoder_valid)
    # each row's prompt then its new tokens, right-padded (causal: padding sees nothing later)
    width = prompts.shape[1] + NEW
    sequences = np.zeros((len(lengths), width), np.int32)
    for row, length in enumerate(lengths):
        sequences[row, : length + NEW] = np.concatenate([prompts[row, :length], new_tokens[row]])
    logits = _forward(full, (jnp.asarray(sequences),))
    index = lengths[:, None] - 1 + np.arange(NEW)  # [B, NEW]
    return jnp.take_along_axis(logits, jnp.asarray(index)[..., None], axis=1)


# every router kind that can decode; Expert Choice only in an encoder
CASES = [
    ("decoder", {}),
    ("decoder", {"router": "gshard_top2", "k": 2}),
    ("decoder", {"router": "hash"}),
    ("decoder", {"router": "noisy_top_k", "k": 2, "normalize": "topk"}),
    ("decoder", {"router": "aux_free", "num_shared_experts": 1, "extra_dense_ffn": True}),
    ("encoder_decoder", {"router": "experts_choose", "decoder_router": "tokens_choose"}),
    ("encoder_decoder", {}),  # Switch: the encoder drops tokens at its eval capacity
    ("rope_decoder", {"k": 2, "normalize": "topk"}),  # GQA with 1 key/value head, q/k norm
]


@pytest.mark.parametrize("share_layers", [False, True], ids=["own_layers", "widenet"])
@pytest.mark.parametrize("kind, overrides", CASES)
def test_cached_decoding_matches_the_full_forward_pass(kind, overrides, share_layers):
    config = micro_config(kind, **overrides)
    if kind == "rope_decoder":
        config.model.num_kv_heads, config.model.qk_norm = 1, True
    if share_layers:  # WideNet: one attention and one MoE FFN for every layer
        config.model.share_layers, config.moe.sparse_every = True, 1
    model = build(config)
    prompts, lengths = prompts_and_lengths()
    new_tokens, logits = decode.generate(
        model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, return_logits=True
    )
    assert new_tokens.shape == (3, NEW) and new_tokens.dtype == jnp.int32
    np.testing.assert_array_equal(new_tokens, jnp.argmax(logits, -1))
    want = teacher_forced_logits(model, prompts, lengths, new_tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_the_encoder_keeps_its_eval_capacity_while_decoding():
    """Only the decoder decodes dropless: the encoder reads the prompt as in evaluation, so the
    first step's logits are those of the eval forward pass, where one decoder token per row
    cannot be dropped."""
    model = build(micro_config("encoder_decoder"))
    prompts = jnp.asarray(prompts_and_lengths(batch=1, width=16)[0])
    start = jnp.zeros((1, 1), jnp.int32)
    want = _forward(model, (prompts, start))[:, 0]  # [1, V]
    _, _, encoder_aux = model.encode(prompts, deterministic=True)
    assert float(encoder_aux.fraction_tokens_dropped.min()) > 0.2  # the capacity bites
    _, logits = decode.generate(model, prompts, max_new_tokens=NEW, return_logits=True)
    atol = 1e-6 * max(1.0, float(jnp.max(jnp.abs(want))))
    np.testing.assert_allclose(logits[:, 0], want, atol=atol, rtol=0)


def test_scanned_layers_decode_like_the_full_pass():
    config = micro_config("decoder", k=2, normalize="topk")
    config.model.scan_layers = True
    config.model.num_layers = 4
    model = build(config)
    prompts, lengths = prompts_and_lengths()
    new_tokens, logits = decode.generate(
        model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, return_logits=True
    )
    want = teacher_forced_logits(model, prompts, lengths, new_tokens)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)


def test_the_step_compiles_once():
    model = build(micro_config())
    prompts, lengths = prompts_and_lengths()
    before = decode.STEP_TRACES
    decode.generate(model, prompts, max_new_tokens=9, prompt_lengths=lengths)
    assert decode.STEP_TRACES == before + 1  # traced once for all 9 + 4 steps
    decode.generate(model, prompts + 1, max_new_tokens=9, prompt_lengths=lengths)
    assert decode.STEP_TRACES == before + 1  # same shapes: the compiled program is reused


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = build(micro_config())
    prompts, lengths = prompts_and_lengths()
    common = dict(max_new_tokens=NEW, prompt_lengths=lengths)
    greedy = decode.generate(model, prompts, **common)
    first = decode.generate(model, prompts, temperature=2.0, rng=jax.random.key(3), **common)
    again = decode.generate(model, prompts, temperature=2.0, rng=jax.random.key(3), **common)
    other = decode.generate(model, prompts, temperature=2.0, rng=jax.random.key(4), **common)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    top1 = decode.generate(
        model, prompts, temperature=2.0, top_k=1, rng=jax.random.key(3), **common
    )
    np.testing.assert_array_equal(top1, greedy)
    tiny_p = decode.generate(
        model, prompts, temperature=1.0, top_p=1e-6, rng=jax.random.key(3), **common
    )
    np.testing.assert_array_equal(tiny_p, greedy)  # only the most likely token survives


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)

    def drawn(sampling):
        draw = jax.vmap(lambda key: decode.sample_logits(logits, key, sampling)[0])
        return set(np.asarray(draw(keys)).tolist())

    assert drawn(decode.Sampling(1.0, top_k=2)) == {0, 1}
    assert drawn(decode.Sampling(1.0, top_p=0.8)) == {0, 1}  # 0.5 < 0.8 <= 0.5 + 0.3
    assert drawn(decode.Sampling(1.0, top_p=0.81)) == {0, 1, 2}
    assert drawn(decode.Sampling(1.0)) == {0, 1, 2, 3}


def test_eos_stops_a_row_and_zeros_the_rest():
    model = build(micro_config())
    prompts, lengths = prompts_and_lengths()
    greedy = np.asarray(decode.generate(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths))
    eos = int(greedy[0, 1])
    stopped = np.asarray(
        decode.generate(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, eos_id=eos)
    )
    for row in range(3):
        hits = np.flatnonzero(greedy[row] == eos)
        end = hits[0] + 1 if hits.size else NEW
        np.testing.assert_array_equal(stopped[row, :end], greedy[row, :end])
        assert np.all(stopped[row, end:] == 0)


def test_bad_input_is_refused_with_the_fix():
    model = build(micro_config())
    prompts, _ = prompts_and_lengths()
    with pytest.raises(ValueError, match="at least one token"):
        decode.generate(model, np.zeros((2, 0), np.int32), max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        decode.generate(model, prompts, max_new_tokens=2, prompt_lengths=[6, 0, 2])
    with pytest.raises(ValueError, match="longer than the model's maximum length 4: shorten"):
        decode.generate(model, prompts, max_new_tokens=2, max_length=4)
    with pytest.raises(ValueError, match="lower max_new_tokens to 2"):
        decode.generate(model, prompts, max_new_tokens=3, max_length=8)
    for top_p in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
            decode.generate(model, prompts, max_new_tokens=2, top_p=top_p, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rng=jax.random.key"):
        decode.generate(model, prompts, max_new_tokens=2, temperature=1.0)


def test_expert_choice_decoder_is_refused():
    model = build(micro_config("encoder_decoder", router="experts_choose", decoder_router="hash"))
    for _, module in nnx.iter_modules(model.decoder):
        if hasattr(module, "router_kind"):
            module.router_kind = "experts_choose"  # as if built without the models.py check
    with pytest.raises(ValueError, match="cannot decode one token at a time"):
        decode.generate(model, np.ones((1, 3), np.int32), max_new_tokens=2)
