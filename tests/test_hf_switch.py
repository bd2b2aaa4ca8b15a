"""moe_jax.hf against transformers' Switch Transformers: logits, router logits, aux losses, round
trips, and the capacity behaviour where transformers and the paper agree.

The oracle is a tiny random `transformers` model (seeded, float32) saved with `save_pretrained`:
2 encoder and 3 decoder layers with experts in layer 1 of each (dense and sparse layers mixed),
4 experts.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

from moe_jax import hf, layers, losses
from moe_jax.hf.loading import model_without_weights
from tests.test_hf_t5 import VOCAB, assert_close, batch, ours_logits, torch_logits


def switch_config(**overrides) -> transformers.SwitchTransformersConfig:
    settings = dict(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=3,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=4,
        expert_capacity=16,  # >= the sequence length: no token is dropped
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        dropout_rate=0.0,
        router_jitter_noise=0.0,
        router_z_loss_coef=0.003,
        router_aux_loss_coef=0.02,
    )
    settings.update(overrides)
    return transformers.SwitchTransformersConfig(**settings)


def random_switch(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.SwitchTransformersForConditionalGeneration(config).eval()
    for layer in model.modules():
        if isinstance(
            layer,
            transformers.models.switch_transformers.modeling_switch_transformers.SwitchTransformersTop1Router,
        ):
            # transformers draws the router from N(0, 1); spread the experts' shares wider so
            # that top-1 choices are far from ties
            layer.classifier.weight.data *= 3.0
    return model


@nnx.jit
def _forward_recording(model, encoder, decoder):
    recorded = []
    original = layers.Router.__call__

    def recording(self, x, **kwargs):
        route, logits = original(self, x, **kwargs)
        recorded.append(logits)
        return route, logits

    layers.Router.__call__ = recording
    try:
        logits, aux = model(encoder, decoder, deterministic=True)
    finally:
        layers.Router.__call__ = original
    return logits, aux, recorded


def recorded_router_logits(model, encoder, decoder):
    """Our logits and aux, plus each sparse layer's router logits f32[B, L, E] in call order."""
    logits, aux, recorded = _forward_recording(model, jnp.asarray(encoder), jnp.asarray(decoder))
    return np.asarray(logits), aux, [np.asarray(x) for x in recorded]


def hf_style_losses(router_logits: list[np.ndarray]) -> tuple[float, float]:
    """transformers' per-stack losses computed with moe_jax.losses: the stack's router logits
    concatenated along the sequence, every token (padding too) counted, groups = sequences."""
    logits = jnp.concatenate([jnp.asarray(x) for x in router_logits], axis=1)  # [B, S*L, E]
    balance = losses.load_balancing_loss(
        jax.nn.softmax(logits, axis=-1), jnp.argmax(logits, axis=-1)[..., None]
    )
    return float(balance), float(losses.router_z_loss(logits))


def test_loaded_switch_equals_transformers(tmp_path):
    reference = random_switch(switch_config())
    reference.save_pretrained(tmp_path)
    config, model = hf.load(str(tmp_path))
    assert (config.moe.num_experts, config.moe.expert_capacity, config.moe.group_size) == (4, 16, 0)
    assert (config.moe.sparse_placement, config.moe.sparse_every) == ("every", 2)
    assert (config.loss.aux_coef, config.loss.z_coef) == (0.02, 0.003)
    encoder, decoder = batch()
    ours, aux, router_logits = recorded_router_logits(model, encoder, decoder)
    theirs = torch_logits(reference, encoder, decoder, output_router_logits=True)
    assert_close(ours, theirs.logits)

    # per-layer router logits: encoder layer 1, then decoder layer 1. Layer 0 is dense, so even
    # the encoder's padding positions see the same hidden states in both.
    their_router = [
        x.numpy() for x in (*theirs.encoder_router_logits, *theirs.decoder_router_logits)
    ]
    assert len(router_logits) == len(their_router) == 2
    for mine, their in zip(router_logits, their_router):
        assert_close(mine, their)
    # the aux losses transformers reports, computed its way with moe_jax.losses
    for stack, mine in (("encoder", router_logits[:1]), ("decoder", router_logits[1:])):
        balance, z_loss = hf_style_losses(mine)
        np.testing.assert_allclose(balance, float(getattr(theirs, f"{stack}_aux_loss")), rtol=1e-5)
        np.testing.assert_allclose(z_loss, float(getattr(theirs, f"{stack}_z_loss")), rtol=1e-5)
    # our own per-layer losses leave padding out: the same maths over the real tokens only
    real = encoder != 0
    for layer, their in enumerate(their_router):
        mask = real if layer == 0 else np.ones(decoder.shape, bool)
        probs = jax.nn.softmax(their, axis=-1)
        expected_balance = losses.load_balancing_loss(probs, np.argmax(their, -1)[..., None], mask)
        np.testing.assert_allclose(
            aux.router_z_loss[layer], losses.router_z_loss(their, mask), rtol=1e-5
        )
        np.testing.assert_allclose(aux.load_balancing_loss[layer], expected_balance, rtol=1e-5)


def test_capacity_drops_equal_transformers(tmp_path):
    """transformers 5 gives a token dropped by capacity nothing from the layer, as the paper and
    moe_jax do (transformers 4.x passed it through scaled by its router probability). With 2
    slots per expert per sequence many tokens drop; right padding keeps the real tokens' slots
    the same in both (transformers lets padding take slots, after the real tokens)."""
    reference = random_switch(switch_config(expert_capacity=2))
    reference.save_pretrained(tmp_path)
    config, model = hf.load(str(tmp_path))
    assert config.moe.expert_capacity == 2
    encoder, decoder = batch(seed=3)
    ours, aux, _ = recorded_router_logits(model, encoder, decoder)
    assert np.all(np.asarray(aux.fraction_tokens_dropped) > 0.2)
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_switch_round_trip_through_transformers(tmp_path, tied):
    """moe_jax -> save (sharded) -> transformers loads every key -> the same logits."""
    reference = random_switch(switch_config(tie_word_embeddings=tied))
    if not tied:  # transformers 5 unties the stacks' tables too; moe_jax shares one
        reference.encoder.embed_tokens.weight.data = reference.shared.weight.data.clone()
        reference.decoder.embed_tokens.weight.data = reference.shared.weight.data.clone()
    reference.save_pretrained(tmp_path / "hf")
    config, model = hf.load(str(tmp_path / "hf"))
    assert config.model.tie_embeddings == tied
    encoder, decoder = batch(seed=4)
    ours, _, _ = recorded_router_logits(model, encoder, decoder)
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)
    written = hf.save(config, model, str(tmp_path / "out"), max_shard_bytes=30_000)
    assert len(written) > 2
    loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(ours, torch_logits(loaded.eval(), encoder, decoder).logits)


def test_stored_sparse_steps_place_the_experts(tmp_path):
    """transformers builds the stacks from `encoder_sparse_step` / `decoder_sparse_step` of
    config.json, which may disagree with `num_layers // num_sparse_*_layers` (here the counts
    give step 2, the stored steps 1: every layer sparse). The load reads the steps, holds every
    tensor, gives transformers' logits, and saves back what transformers loads."""
    hf_config = switch_config(
        num_layers=4,
        num_decoder_layers=4,
        num_sparse_encoder_layers=2,
        num_sparse_decoder_layers=2,
        encoder_sparse_step=1,
        decoder_sparse_step=1,
    )
    reference = random_switch(hf_config)
    reference.save_pretrained(tmp_path / "hf")
    config, model = hf.load(str(tmp_path / "hf"))
    assert (config.moe.sparse_placement, config.moe.sparse_every) == ("every", 1)
    encoder, decoder = batch(seed=5)
    ours, _ = ours_logits(model, encoder, decoder)
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)
    hf.save(config, model, str(tmp_path / "out"))
    loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert_close(ours, torch_logits(loaded.eval(), encoder, decoder).logits)


def test_unsupported_switch_settings_are_refused(tmp_path):
    def saved(name, **overrides):
        random_switch(switch_config(**overrides)).save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    with pytest.raises(ValueError, match="router_bias=True"):
        hf.load(saved("bias", router_bias=True))
    # step 4 in a 4-layer stack: experts in layer 1 only, which no placement of ours gives
    with pytest.raises(ValueError, match=r"num_sparse_encoder_layers=1.*layers \[1\]"):
        hf.load(saved("placement", num_layers=4, num_decoder_layers=4))
    config, model = hf.load(saved("good"))
    good = tmp_path / "good" / "config.json"
    good.write_text(json.dumps({**json.loads(good.read_text()), "encoder_sparse_step": "2"}))
    with pytest.raises(ValueError, match="encoder_sparse_step='2' is not supported"):
        hf.load_config(str(tmp_path / "good"))
    config.moe.k = 2
    with pytest.raises(ValueError, match="moe.k=2"):
        hf.save(config, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_scanned_model_loads_and_saves(tmp_path):
    """`load_into` and `save` map the checkpoint onto scanned layer stacks (nnx.scan)."""
    reference = random_switch(switch_config(num_layers=4, num_sparse_encoder_layers=2))
    reference.save_pretrained(tmp_path / "hf")
    config = hf.load_config(str(tmp_path / "hf"))
    config.model.scan_layers = True
    model = model_without_weights(config)
    hf.load_into(model, config, str(tmp_path / "hf"))
    encoder, decoder = batch(seed=7)
    ours, _ = ours_logits(model, encoder, decoder)
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)
    hf.save(config, model, str(tmp_path / "out"))
    written = load_file(tmp_path / "out" / "model.safetensors")
    original = load_file(tmp_path / "hf" / "model.safetensors")
    assert set(written) == set(original)
    for name, tensor in written.items():
        np.testing.assert_allclose(tensor, original[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_scanned_save_fetches_each_layer_once(tmp_path, monkeypatch):
    """`save` of scanned stacks `[R, ...]` slices a layer on device before fetching it: the bytes
    through `jax.device_get` are the model's bytes once, each fetch one layer of one parameter
    (fetching the whole stack each time the tensor order moved to another parameter was about R
    times the model's bytes)."""
    reference = random_switch(
        switch_config(
            num_layers=4,
            num_decoder_layers=4,
            num_sparse_encoder_layers=2,
            num_sparse_decoder_layers=2,
        )
    )
    reference.save_pretrained(tmp_path / "hf")
    config = hf.load_config(str(tmp_path / "hf"))
    config.model.scan_layers = True
    model = model_without_weights(config)
    hf.load_into(model, config, str(tmp_path / "hf"))
    params = {
        path: variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    scanned = {path: value.shape[0] for path, value in params.items() if path[1] == "segments"}
    assert set(scanned.values()) == {2}  # every block parameter stacked [R=2, ...]
    model_bytes = sum(value.nbytes for value in params.values())
    layer_bytes = sorted(  # one piece per layer of each parameter
        value.nbytes // scanned.get(path, 1)
        for path, value in params.items()
        for _ in range(scanned.get(path, 1))
    )
    fetched = []
    device_get = jax.device_get

    def recording(tree):
        host = device_get(tree)
        fetched.append(sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(host)))
        return host

    monkeypatch.setattr(jax, "device_get", recording)
    hf.save(config, model, str(tmp_path / "out"))
    monkeypatch.undo()
    assert sum(fetched) == model_bytes, (sum(fetched) / model_bytes, len(fetched))
    assert sorted(fetched) == layer_bytes, (max(fetched), max(layer_bytes))
