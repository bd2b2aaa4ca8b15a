"""moe_jax.hf against transformers' own T5: logits of loaded checkpoints, round trips, layouts.

The oracle is a tiny random `transformers` model (seeded, float32) saved with `save_pretrained`.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moe_jax import hf

VOCAB = 100


def t5_config(**overrides) -> transformers.T5Config:
    settings = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        layer_norm_epsilon=1e-5,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return transformers.T5Config(**settings)


def random_t5(config: transformers.T5Config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    if "lm_head.weight" in dict(model.named_parameters()) and not config.scale_decoder_outputs:
        # transformers 5 ties T5's head to `shared` unless given its own values (v1.1 has them)
        model.lm_head.weight = torch.nn.Parameter(torch.randn(config.vocab_size, config.d_model))
    return model


def batch(seed: int = 1, rows: int = 3, encoder_length: int = 11, decoder_length: int = 7):
    """Token ids with padding (id 0) at the end of some encoder rows; decoder rows start at 0."""
    rng = np.random.default_rng(seed)
    encoder = rng.integers(1, VOCAB, (rows, encoder_length))
    encoder[0, 7:] = 0
    encoder[2, 4:] = 0
    decoder = rng.integers(1, VOCAB, (rows, decoder_length))
    decoder[:, 0] = 0
    return encoder, decoder


def torch_logits(model, encoder, decoder, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(encoder, dtype=torch.long),
            attention_mask=torch.tensor(encoder != 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(decoder, dtype=torch.long),
            **kwargs,
        )


@nnx.jit
def _forward(model, encoder, decoder):
    return model(encoder, decoder, deterministic=True)


def ours_logits(model, encoder, decoder):
    logits, aux = _forward(model, jnp.asarray(encoder), jnp.asarray(decoder))
    return np.asarray(logits), aux


def assert_close(ours: np.ndarray, theirs: np.ndarray, rtol: float = 1e-4):
    """Equal to `rtol` relative to the largest magnitude of `theirs`."""
    theirs = np.asarray(theirs, np.float32)
    error = np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs))
    assert error < rtol, f"relative error {error:.2e}"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),  # v1.1: gated-gelu, untied head
        dict(feed_forward_proj="relu", tie_word_embeddings=True),  # v1.0: relu, tied and scaled
        dict(feed_forward_proj="gated-silu"),
    ],
    ids=["v1_1", "v1_0", "gated_silu"],
)
def test_loaded_t5_logits_equal_transformers(tmp_path, overrides):
    reference = random_t5(t5_config(**overrides))
    reference.save_pretrained(tmp_path)
    config, model = hf.load(str(tmp_path))
    assert config.model.norm_epsilon == 1e-5
    assert config.model.relative_attention_max_distance == 20
    encoder, decoder = batch()
    ours, aux = ours_logits(model, encoder, decoder)
    assert aux is None
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)


def test_t5_round_trip_through_transformers(tmp_path):
    """moe_jax -> save -> transformers loads every key -> the same logits; also sharded."""
    random_t5(t5_config()).save_pretrained(tmp_path / "hf")
    config, model = hf.load(str(tmp_path / "hf"))
    encoder, decoder = batch(seed=2)
    ours, _ = ours_logits(model, encoder, decoder)
    for name, shard_bytes in (("single", 2**40), ("sharded", 20_000)):
        written = hf.save(config, model, str(tmp_path / name), max_shard_bytes=shard_bytes)
        assert (len(written) > 2) == (name == "sharded"), written
        loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
            tmp_path / name, output_loading_info=True
        )
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert_close(ours, torch_logits(loaded.eval(), encoder, decoder).logits)
        _, again = hf.load(str(tmp_path / name))
        assert_close(ours_logits(again, encoder, decoder)[0], ours, rtol=1e-6)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(written)


def test_bad_checkpoints_are_refused(tmp_path):
    random_t5(t5_config()).save_pretrained(tmp_path / "good")
    good = tmp_path / "good"

    def variant(name: str, edit_config=None, edit_tensors=None):
        directory = tmp_path / name
        directory.mkdir()
        config = json.loads((good / "config.json").read_text())
        if edit_config:
            edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
        from safetensors.numpy import load_file, save_file

        tensors = load_file(good / "model.safetensors")
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return str(directory)

    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        hf.load(variant("type", lambda c: c.update(model_type="bert")))
    missing = "encoder.block.1.layer.0.SelfAttention.k.weight"
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        hf.load(variant("missing", edit_tensors=lambda t: t.pop(missing)))
    wrong = "decoder.block.2.layer.2.DenseReluDense.wo.weight"

    def reshape(tensors):
        tensors[wrong] = np.zeros((32, 40), np.float32)

    with pytest.raises(ValueError, match=r"wo\.weight' has shape \[32, 40\].*\[32, 48\]"):
        hf.load(variant("shape", edit_tensors=reshape))
    with pytest.raises(ValueError, match="feed_forward_proj='gelu'"):
        hf.load(variant("field", lambda c: c.update(feed_forward_proj="gelu")))
    with pytest.raises(ValueError, match="pad_token_id=3"):
        hf.load(variant("pad", lambda c: c.update(pad_token_id=3)))
    sharded = tmp_path / "sharded"
    config, model = hf.load(str(good))
    written = hf.save(config, model, str(sharded), max_shard_bytes=20_000)
    os.remove(sharded / written[1])
    with pytest.raises(ValueError, match=f"names the shard '{written[1]}', which is missing"):
        hf.load(str(sharded))
