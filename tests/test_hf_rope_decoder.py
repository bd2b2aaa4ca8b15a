"""moe_jax.hf against transformers' Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE: logits, router
logits, the load-balancing loss, both expert layouts, round trips (also through a run written
by `moe_jax.convert`), scanned layers, fine-tuning from a checkpoint, refusals.

The oracle is a tiny random `transformers` model (seeded, float32, eager attention): 3 layers
(Qwen3-MoE: 6, sparse only where `decoder_sparse_step` and `mlp_only_layers` leave experts, with
head_dim 12 != hidden_size / heads; Qwen2-MoE: 4 with layer 2 dense, q/k/v biases and a gated
shared expert twice an expert's width), 4 query heads sharing 2 key/value heads, 6 (Mixtral) or
8 experts, random RMSNorm scales and biases, saved with `save_pretrained`, on batches with left
and right padding.
"""

import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from configs import hf as hf_configs
from moe_jax import convert, data, hf, losses, models, train
from moe_jax.config import default_config
from moe_jax.hf.loading import model_without_weights
from tests.test_hf_t5 import assert_close
from tests.test_hf_train import first_step_cross_entropy, small_run

VOCAB = 96
TRAIN_VOCAB = 384  # the byte-level synthetic corpus needs >= 259 ids
FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
# Qwen3-MoE's layers: experts where (i + 1) % 2 == 0, but layer 3 is in mlp_only_layers
QWEN_SPARSE = (False, True, False, False, False, True)
QWEN2_SPARSE = (True, True, False, True)  # mlp_only_layers [2]


# the transformers config fields every family's tiny decoder shares
TINY_DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 300.0, "rope_type": "default"},
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
    attn_implementation="eager",
)


def hf_config(family: str, **overrides):
    settings = dict(TINY_DECODER)
    if family == "mixtral":
        settings.update(num_local_experts=6, num_experts_per_tok=2, router_aux_loss_coef=0.02)
        settings.update(overrides)
        return transformers.MixtralConfig(**settings)
    settings.update(num_experts=8, num_experts_per_tok=3, norm_topk_prob=family == "qwen3_moe")
    if family == "qwen2_moe":
        settings.update(num_hidden_layers=4, moe_intermediate_size=16, mlp_only_layers=[2])
        settings.update(shared_expert_intermediate_size=32, qkv_bias=True)
        settings.update(router_aux_loss_coef=0.03)
        settings.update(overrides)
        return transformers.Qwen2MoeConfig(**settings)
    settings.update(router_aux_loss_coef=0.03)
    if family == "qwen3_moe":
        settings.update(num_hidden_layers=6, head_dim=12, moe_intermediate_size=16)
        settings.update(decoder_sparse_step=2, mlp_only_layers=[3], rms_norm_eps=1e-6)
        settings.update(overrides)
        return transformers.Qwen3MoeConfig(**settings)
    settings.update(overrides)
    return transformers.OlmoeConfig(**settings)


def random_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gate.weight"):
                # transformers draws the router from N(0, 0.02); spread the experts' shares so
                # that top-k choices are far from ties
                parameter.mul_(20.0)
            if name.endswith(("norm.weight", ".bias")):  # ones and zeros at init: make each
                parameter.add_(0.3 * torch.randn_like(parameter))  # value's place matter
    return model


def batch(seed: int = 1, rows: int = 3, length: int = 12):
    """Token ids and an attention mask: row 0 left-padded, row 2 right-padded."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, (rows, length))
    mask = np.ones((rows, length), np.int64)
    mask[0, :4] = 0
    mask[2, 9:] = 0
    return tokens, mask


def torch_forward(model, tokens, mask):
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            output_router_logits=True,
        )


@nnx.jit
def _ours(model, tokens, segment_ids):
    return models.router_logits(model, tokens, deterministic=True, segment_ids=segment_ids)


def ours_forward(model, tokens, mask):
    """Our logits f32[B, L, V], aux, and each layer's router logits f32[B*L, E]."""
    logits, aux, router = _ours(model, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
    flat = [np.asarray(x).reshape(-1, x.shape[-1])[: tokens.size] for x in router]
    return np.asarray(logits), aux, flat


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family, transformers model, checkpoint directory written by save_pretrained)."""
    family = request.param
    reference = random_model(hf_config(family))
    directory = tmp_path_factory.mktemp(family)
    reference.save_pretrained(directory)
    return family, reference, directory


def test_loaded_model_equals_transformers(saved):
    family, reference, directory = saved
    config, model = hf.load(str(directory))
    assert config.model.kind == "rope_decoder" and config.model.num_kv_heads == 2
    assert config.model.qk_norm == (family in ("olmoe", "qwen3_moe"))
    assert config.model.qk_norm_per_head == (family == "qwen3_moe")
    assert config.moe.backend == "dropless"
    assert config.model.qkv_bias == config.moe.shared_expert_gate == (family == "qwen2_moe")
    assert config.moe.num_shared_experts == (2 if family == "qwen2_moe" else 0)
    assert config.moe.normalize == ("none" if family in ("olmoe", "qwen2_moe") else "topk")
    assert config.loss.aux_coef == (0.02 if family == "mixtral" else 0.03)
    sparse = models.sparse_layer_flags(config.model.num_layers, config.moe)
    expected = {"qwen3_moe": QWEN_SPARSE, "qwen2_moe": QWEN2_SPARSE}.get(family, (True,) * 3)
    assert sparse == expected
    tokens, mask = batch()
    real = mask.astype(bool)
    ours, aux, router = ours_forward(model, tokens, mask)
    theirs = torch_forward(reference, tokens, mask)
    assert_close(ours[real], theirs.logits.numpy()[real])

    # per-layer router logits of the real tokens
    their_router = [x.numpy() for x in theirs.router_logits]
    assert len(router) == len(their_router) == sum(sparse)
    flat_real = real.reshape(-1)
    for mine, their in zip(router, their_router):
        assert_close(mine[flat_real], their[flat_real])

    num_experts, k = config.moe.num_experts, config.moe.k
    torch_mask = torch.tensor(mask)
    # each layer's loss: transformers' function on that layer alone equals our per-layer loss
    # (one routing group holds the whole batch)
    for layer, their in enumerate(theirs.router_logits):
        expected = load_balancing_loss_func((their,), num_experts, k, torch_mask)
        np.testing.assert_allclose(aux.load_balancing_loss[layer], float(expected), rtol=1e-5)
        # neither family reports a z-loss; ours is the mean squared log-partition of their
        # logits over the real tokens
        log_z = torch.logsumexp(their, dim=-1).numpy()[flat_real]
        np.testing.assert_allclose(aux.router_z_loss[layer], np.mean(log_z**2), rtol=1e-4)
    # the loss transformers reports pools all layers' tokens: our loss on our router logits of
    # every layer taken as one group
    pooled = jnp.concatenate([jnp.asarray(x) for x in router])[None]  # [1, S*B*L, E]
    probs = jax.nn.softmax(pooled, axis=-1)
    _, chosen = jax.lax.top_k(probs, k)
    pooled_mask = jnp.tile(jnp.asarray(flat_real), len(router))[None]
    ours_pooled = losses.load_balancing_loss(probs, chosen, pooled_mask)
    np.testing.assert_allclose(ours_pooled, float(theirs.aux_loss), rtol=1e-5)


def test_fused_expert_layout_loads_the_same(saved, tmp_path):
    """transformers 5's in-memory layout (`mlp.experts.gate_up_proj`, `down_proj`), written as
    is, loads to the same model as the per-expert layout that save_pretrained writes."""
    family, reference, directory = saved
    state = {name: tensor.numpy() for name, tensor in reference.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    safetensors.numpy.save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    _, fused = hf.load(str(tmp_path))
    _, per_expert = hf.load(str(directory))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(fused, nnx.Param)),
        nnx.to_flat_state(nnx.state(per_expert, nnx.Param)),
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def test_round_trip_through_transformers(saved, tmp_path):
    """transformers -> moe_jax -> save (sharded) -> transformers loads every key -> same logits."""
    family, reference, directory = saved
    config, model = hf.load(str(directory))
    written = hf.save(config, model, str(tmp_path), max_shard_bytes=20_000)
    assert len(written) > 2
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    tokens, mask = batch(seed=2)
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(loaded.eval(), tokens, mask).logits.numpy()[real])


def test_model_initialised_here_saves_for_transformers(saved, tmp_path):
    """A model of the checkpoint's architecture with our own random initialisation -> save ->
    transformers loads every key and computes our logits -> loading it back gives our weights."""
    family, _, directory = saved
    config = hf.load_config(str(directory))
    model = models.build_model(config, rngs=nnx.Rngs(3))
    hf.save(config, model, str(tmp_path))
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["model_type"] == family and saved_config["num_key_value_heads"] == 2
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    tokens, mask = batch(seed=4)
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(loaded.eval(), tokens, mask).logits.numpy()[real])
    _, reloaded = hf.load(str(tmp_path))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)),
        nnx.to_flat_state(nnx.state(reloaded, nnx.Param)),
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def rope_decoder_config(family: str):
    """A moe_jax config of the family's architecture."""
    config = default_config()
    model, moe = config.model, config.moe
    model.kind, model.hf_model_type = "rope_decoder", family
    model.vocab_size, model.d_model, model.num_layers = VOCAB, 32, 2
    model.num_heads, model.num_kv_heads, model.head_dim = 4, 1, 8
    model.ffn_activation, model.norm_epsilon = "swiglu", 1e-5
    model.qk_norm = family in ("olmoe", "qwen3_moe")
    moe.num_experts, moe.k, moe.d_ff, moe.sparse_every = 4, 2, 16, 1
    moe.normalize, moe.backend = "topk", "dropless"
    return config


@pytest.mark.parametrize(
    "family, field, value",
    [
        ("mixtral", "sliding_window", 4),
        ("mixtral", "router_jitter_noise", 0.1),
        ("mixtral", "hidden_act", "gelu"),
        ("olmoe", "clip_qkv", 8.0),
        ("olmoe", "attention_bias", True),
        ("qwen3_moe", "use_sliding_window", True),
        ("qwen3_moe", "attention_bias", True),
        ("qwen2_moe", "use_sliding_window", True),
        ("qwen2_moe", "shared_expert_intermediate_size", 20),
    ],
)
def test_unsupported_fields_are_named(family, field, value, tmp_path):
    random_model(hf_config(family, **{field: value})).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        hf.load(str(tmp_path))


def test_config_fields_rope_spellings_and_norm_topk_prob():
    family = hf.get_family("mixtral")
    legacy = family.to_moe_config({"rope_theta": 1234.0}, frozenset())
    assert legacy["model.rope_theta"] == 1234.0
    current = {"rope_parameters": {"rope_theta": 99.0, "rope_type": "default"}}
    assert family.to_moe_config(current, frozenset())["model.rope_theta"] == 99.0
    olmoe = hf.get_family("olmoe")
    assert olmoe.to_moe_config({}, frozenset())["moe.normalize"] == "none"
    assert olmoe.to_moe_config({"norm_topk_prob": True}, frozenset())["moe.normalize"] == "topk"
    scaled = {"rope_parameters": {"rope_theta": 99.0, "rope_type": "linear", "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type='linear'"):
        family.to_moe_config(scaled, frozenset())
    qwen = hf.get_family("qwen3_moe")
    with pytest.raises(
        ValueError, match="qwen3_moe config.json: rope_parameters.rope_type='linear'"
    ):
        qwen.to_moe_config(scaled, frozenset())
    # the released configs name the expert count num_experts, transformers 5 num_local_experts
    for key in ("num_experts", "num_local_experts"):
        assert qwen.to_moe_config({key: 5}, frozenset())["moe.num_experts"] == 5
    # transformers makes layer i dense when i is in mlp_only_layers: an index past the last
    # layer names no layer (a checkpoint cut to fewer layers keeps its list)
    shallow = {"num_hidden_layers": 2, "mlp_only_layers": [3, 0]}
    assert qwen.to_moe_config(shallow, frozenset())["moe.dense_layers"] == (0,)


def test_settings_a_family_cannot_express_are_refused_before_writing(tmp_path):
    config = rope_decoder_config("mixtral")
    config.model.qk_norm = True  # Mixtral has no q/k norm
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="model.qk_norm=True"):
        hf.save(config, model, str(tmp_path / "out"))
    config = rope_decoder_config("olmoe")
    config.moe.sparse_every = 2
    with pytest.raises(ValueError, match="experts in every layer"):
        hf.save(config, model, str(tmp_path / "out"))
    config = rope_decoder_config("qwen3_moe")  # Qwen3's q/k norm is per head
    with pytest.raises(ValueError, match="model.qk_norm_per_head=False"):
        hf.save(config, model, str(tmp_path / "out"))
    config = rope_decoder_config("qwen2_moe")
    config.model.qk_norm = False
    with pytest.raises(ValueError, match="sigmoid-gated shared expert"):
        hf.save(config, model, str(tmp_path / "out"))
    config = rope_decoder_config("mixtral")
    config.moe.num_shared_experts, config.moe.shared_expert_gate = 1, True
    with pytest.raises(ValueError, match="moe.num_shared_experts=1"):
        hf.save(config, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, num_layers", [("mixtral", 2), ("qwen2_moe", 4), ("qwen3_moe", 4)])
def test_init_from_starts_from_the_transformers_loss(family, num_layers, tmp_path):
    """`--config=configs/hf.py:DIR` fine-tunes a decoder-only checkpoint: the first step's
    cross-entropy is transformers' loss on the same batch (our targets are the inputs shifted by
    one, so transformers is given them unshifted as `shift_labels`). Qwen's 4 layers mix dense
    and sparse ones."""
    reference = random_model(
        hf_config(family, vocab_size=TRAIN_VOCAB, num_hidden_layers=num_layers)
    )
    assert_init_from_starts_from_the_transformers_loss(reference, tmp_path)


def assert_init_from_starts_from_the_transformers_loss(reference, tmp_path):
    """Fine-tune the transformers decoder `reference` from its `save_pretrained` directory for
    one step; its first cross-entropy must be transformers' loss on that batch."""
    with torch.no_grad():  # logits far from uniform, so that only the right weights match
        reference.lm_head.weight.mul_(50.0)
    reference.save_pretrained(tmp_path / "hf")
    config = small_run(hf_configs.get_config(str(tmp_path / "hf")))
    assert config.model.kind == "rope_decoder" and config.train.init_from
    batch = data.dataset_from_config(config, "train").batch(0)
    train.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    labels = np.where(batch["weights"] > 0, batch["targets"], -100).astype(np.int64)
    with torch.no_grad():
        output = reference(
            input_ids=torch.tensor(batch["inputs"], dtype=torch.long),
            attention_mask=torch.tensor(batch["segment_ids"] > 0, dtype=torch.long),
            labels=torch.tensor(labels),
            shift_labels=torch.tensor(labels),
        )
    assert abs(float(output.loss) - np.log(TRAIN_VOCAB)) > 0.1
    np.testing.assert_allclose(
        first_step_cross_entropy(tmp_path / "run"), float(output.loss), rtol=1e-4
    )


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_convert_round_trip_through_a_run(family, tmp_path):
    """`moe_jax.convert --hf=DIR --workdir=RUN` writes a step-0 run whose model computes
    transformers' logits; `--workdir=RUN --to_hf=OUT` writes a checkpoint that transformers
    loads with no missing or unexpected key and that computes the same logits."""
    assert_convert_round_trips(random_model(hf_config(family, vocab_size=TRAIN_VOCAB)), tmp_path)


def assert_saves_for_transformers(directory, tmp_path):
    """Load the checkpoint in `directory`, save it sharded to `tmp_path`: transformers loads
    every key with the same logits, and loading it back gives the same variables."""
    config, model = hf.load(str(directory))
    hf.save(config, model, str(tmp_path), max_shard_bytes=40_000)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    tokens, mask = batch(seed=2)
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(loaded.eval(), tokens, mask).logits.numpy()[real])
    _, reloaded = hf.load(str(tmp_path))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, hf.loading.LOADED)),
        nnx.to_flat_state(nnx.state(reloaded, hf.loading.LOADED)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))


def assert_convert_round_trips(reference, tmp_path):
    """`hf_to_run` then `run_to_hf` of the transformers decoder `reference`: both keep its
    logits, and transformers loads the written checkpoint with every key."""
    reference.save_pretrained(tmp_path / "hf")
    config = small_run(hf.load_config(str(tmp_path / "hf")))
    convert.hf_to_run(
        str(tmp_path / "hf"), str(tmp_path / "run"), config, devices=jax.devices()[:1]
    )
    _, model, step = train.restore_for_inference(str(tmp_path / "run"))
    assert step == 0
    tokens, mask = batch(seed=5)
    real = mask.astype(bool)
    expected = torch_forward(reference, tokens, mask).logits.numpy()[real]
    assert_close(ours_forward(model, tokens, mask)[0][real], expected)
    convert.run_to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True, attn_implementation="eager"
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert_close(torch_forward(loaded.eval(), tokens, mask).logits.numpy()[real], expected)


def test_scanned_qwen3_model_equals_the_unscanned(tmp_path):
    """With `model.scan_layers=True` Qwen3-MoE's mixed layers (QWEN_SPARSE: one-layer blocks,
    each run of equal layers one scanned segment, the 3 dense layers stacked [3, ...]) load with
    `load_into` to the unscanned model's logits, and `save` writes the checkpoint's tensors."""
    random_model(hf_config("qwen3_moe")).save_pretrained(tmp_path / "hf")
    _, unscanned = hf.load(str(tmp_path / "hf"))
    config = hf.load_config(str(tmp_path / "hf"))
    config.model.scan_layers = True
    scanned = model_without_weights(config)
    hf.load_into(scanned, config, str(tmp_path / "hf"))
    repeats = {  # the leading [R] of each scanned segment's parameters
        path[0]: variable.shape[0]
        for path, variable in nnx.to_flat_state(nnx.state(scanned.decoder.segments, nnx.Param))
    }
    assert repeats == {0: 1, 1: 1, 2: 3, 3: 1}, repeats
    tokens, mask = batch(seed=6)
    real = mask.astype(bool)
    forward = nnx.jit(  # (logits f32[B, L, V], aux); router_logits cannot see into nnx.scan
        lambda model: model(
            jnp.asarray(tokens), deterministic=True, segment_ids=jnp.asarray(mask, jnp.int32)
        )
    )
    ours, aux = forward(scanned)
    expected, expected_aux = forward(unscanned)
    np.testing.assert_allclose(
        np.asarray(ours)[real], np.asarray(expected)[real], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(aux.load_balancing_loss, expected_aux.load_balancing_loss, rtol=1e-5)
    hf.save(config, scanned, str(tmp_path / "out"))
    written = safetensors.numpy.load_file(tmp_path / "out" / "model.safetensors")
    original = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    assert set(written) == set(original)
    for name, tensor in written.items():
        np.testing.assert_array_equal(tensor, original[name], err_msg=name)


def test_bfloat16_checkpoints_load(tmp_path):
    """Published Mixtral and OLMoE checkpoints hold bfloat16 tensors, which numpy cannot name."""
    reference = random_model(hf_config("olmoe")).to(torch.bfloat16)
    reference.save_pretrained(tmp_path)
    config, model = hf.load(str(tmp_path))
    table = reference.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(model.embed.embedding[...], table)
    gate = reference.model.layers[1].mlp.gate.weight.detach().float().numpy()
    router = model.decoder.segments[0][1].layers[0].ffn.router.kernel[...]
    np.testing.assert_array_equal(router, gate.T)
    assert model.embed.embedding[...].dtype == jnp.float32


@pytest.mark.parametrize(
    "family, variant, overrides",
    [
        ("mixtral", "8x7b", {}),
        # transformers' OLMoE default has intermediate_size 2048; the release (and the 6.9B
        # count) has 1024
        ("olmoe", "1b_7b", {"intermediate_size": 1024}),
    ],
)
def test_released_architectures_load_as_our_paper_configs(family, variant, overrides):
    """transformers' default configs are the released Mixtral-8x7B and OLMoE-1B-7B (but for the
    override); read as moe_jax settings they give configs/{mixtral,olmoe}.py's architecture."""
    reference = transformers.AutoConfig.for_model(family, **overrides)
    settings = hf.get_family(family).to_moe_config(reference.to_dict(), frozenset())
    ours = importlib.import_module(f"configs.{family}").get_config(variant)
    for key, value in settings.items():
        section, field = key.split(".")
        if section in ("model", "moe") and field not in ("dropout_rate", "decoder_router"):
            assert ours[section][field] == value, (key, ours[section][field], value)
