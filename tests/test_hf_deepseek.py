"""moe_jax.hf against transformers' DeepSeek-V2 and DeepSeek-V3: logits, router logits, round
trips (also through a run written by `moe_jax.convert`), fine-tuning from a checkpoint, FP8
block-scaled weights as V3 is published, greedy generation, refusals.

The oracles are tiny random `transformers` models (seeded, float32, eager attention) of 4 layers,
the first dense (`first_k_dense_replace` 1), 4 heads of multi-head latent attention (latent 16,
rope 8 interleaved, no-rope 8, value 8), 8 routed experts in 4 groups with 2 kept, top-2, one
shared expert, YaRN with DeepSeek's mscale: V3 with sigmoid affinities and a random correction
bias, with and without `q_lora_rank`; V2 with softmax group-limited routing and routed scaling.
Batches have left and right padding.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx
from test_hf_fp8 import quantize as to_fp8
from test_hf_rope_decoder import (
    TINY_DECODER,
    TRAIN_VOCAB,
    VOCAB,
    assert_convert_round_trips,
    assert_init_from_starts_from_the_transformers_loss,
    assert_saves_for_transformers,
    batch,
    ours_forward,
    torch_forward,
)
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from moe_jax import decode, hf, models, train
from moe_jax.hf import files
from moe_jax.hf.loading import model_without_weights
from moe_jax.routers import RouterBias
from tests.test_hf_t5 import assert_close

FP8_BLOCK = [8, 8]  # divides every linear's rows and columns here
FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": FP8_BLOCK,
}
YARN = {
    "rope_type": "yarn",
    "rope_theta": 300.0,
    "factor": 4.0,
    "original_max_position_embeddings": 8,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
}
# (id, transformers config class, its settings)
VARIANTS = {
    "v3": (transformers.DeepseekV3Config, {"q_lora_rank": 24, "routed_scaling_factor": 2.5}),
    "v3_no_q_lora": (
        transformers.DeepseekV3Config,
        {"q_lora_rank": None, "routed_scaling_factor": 1.5},
    ),
    "v2": (
        transformers.DeepseekV2Config,
        {"q_lora_rank": None, "topk_method": "group_limited_greedy", "routed_scaling_factor": 3.0},
    ),
}


def deepseek_config(variant: str, **overrides):
    config_class, settings = VARIANTS[variant]
    settings = dict(
        TINY_DECODER,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        rms_norm_eps=1e-6,
        max_position_embeddings=32,
        rope_parameters=YARN,
        **settings,
    )
    settings.update(overrides)
    return config_class(**settings)


def random_deepseek(config, seed: int = 0):
    """A DeepSeek model with every weight, norm scale and (V3) correction bias drawn at random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("norm.weight", "layernorm.weight")):
                tensor.copy_(1.0 + 0.3 * torch.randn_like(tensor))
            elif name.endswith("e_score_correction_bias"):
                tensor.copy_(0.2 * torch.randn_like(tensor))
            elif name.endswith("gate.weight"):  # spread the experts' shares: no near-ties
                tensor.copy_(0.5 * torch.randn_like(tensor))
            else:
                tensor.copy_(0.2 * torch.randn_like(tensor))
    return model


@pytest.fixture(scope="module", params=tuple(VARIANTS))
def saved(request, tmp_path_factory):
    variant = request.param
    reference = random_deepseek(deepseek_config(variant))
    directory = tmp_path_factory.mktemp(variant)
    reference.save_pretrained(directory)
    return variant, reference, directory


def test_loaded_model_equals_transformers(saved):
    variant, reference, directory = saved
    config, model = hf.load(str(directory))
    assert config.model.attention == "mla" and config.model.rope_type == "yarn"
    assert config.moe.router == ("tokens_choose" if variant == "v2" else "aux_free")
    assert (config.moe.num_groups, config.moe.topk_groups) == (4, 2)
    assert config.moe.dense_layers == (0,) and config.moe.num_shared_experts == 1
    assert config.model.q_lora_rank == (24 if variant == "v3" else 0)
    tokens, mask = batch()
    real = mask.astype(bool)
    ours, _, router = ours_forward(model, tokens, mask)
    theirs = torch_forward(reference, tokens, mask)
    assert_close(ours[real], theirs.logits.numpy()[real])
    their_router = [x.numpy() for x in theirs.router_logits]
    assert len(router) == len(their_router) == 3
    flat_real = real.reshape(-1)
    for mine, their in zip(router, their_router, strict=True):
        assert_close(mine[flat_real], their[flat_real])


def test_round_trip_through_transformers(saved, tmp_path):
    assert_saves_for_transformers(saved[-1], tmp_path)


def test_greedy_generation_equals_transformers(saved):
    _, reference, directory = saved
    _, model = hf.load(str(directory))
    prompts = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
        ).numpy()[:, prompts.shape[1] :]
    ours = np.asarray(decode.generate(model, prompts, max_new_tokens=8))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("variant", ["v3", "v2"])
def test_init_from_and_convert_start_from_the_checkpoint(variant, tmp_path):
    """`train.init_from=hf:DIR` starts from transformers' loss; `convert` both ways keeps the
    logits; the converted run holds V3's `e_score_correction_bias` as aux_free's RouterBias (not
    an nnx.Param) and the checkpoint written back from it holds every tensor bit for bit."""
    reference = random_deepseek(deepseek_config(variant, vocab_size=TRAIN_VOCAB))
    assert_init_from_starts_from_the_transformers_loss(reference, tmp_path / "init_from")
    assert_convert_round_trips(reference, tmp_path / "convert")
    expected = reference.state_dict()
    _, run_model, _ = train.restore_for_inference(str(tmp_path / "convert" / "run"))
    run_biases = nnx.to_flat_state(nnx.state(run_model, RouterBias))  # [(path, f32[E])]
    biases = [name for name in expected if name.endswith("e_score_correction_bias")]
    assert len(run_biases) == len(biases) == (0 if variant == "v2" else 3)  # sparse layers
    for (path, bias), name in zip(run_biases, biases, strict=True):
        np.testing.assert_array_equal(bias[...], expected[name].numpy(), err_msg=str(path))
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "convert" / "out")
    for name, tensor in written.state_dict().items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name].numpy(), err_msg=name)


def test_fp8_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    """DeepSeek-V3's release layout: every linear of the attention, the dense MLP and the
    routed and shared experts (`*_proj.weight`, the experts one per name as save_pretrained
    writes them) in float8_e4m3fn with `*_scale_inv` per 8 x 8 block; norms, embeddings, head
    and router gate unquantized. Our logits are those of transformers' model holding the weights
    its `_dequantize_fp8_weight` computes (in float32)."""
    original = random_deepseek(deepseek_config("v3"))
    original.save_pretrained(tmp_path / "original")
    stored = safetensors.torch.load_file(tmp_path / "original" / files.SINGLE_FILE)
    hf_config = json.loads((tmp_path / "original" / files.CONFIG_FILE).read_text())
    quantized, dequantized = {}, {}
    for name, tensor in stored.items():
        if "_proj" in name:
            weight, scale_inv = to_fp8(tensor, FP8_BLOCK)
            quantized[name], quantized[name + "_scale_inv"] = weight, scale_inv
            dequantized[name] = _dequantize_fp8_weight(weight, scale_inv, FP8_BLOCK, torch.float32)
        else:
            quantized[name] = dequantized[name] = tensor
    assert sum(name.endswith("_scale_inv") for name in quantized) == 4 * 5 + 3 + 3 * (8 * 3 + 3)
    for directory, tensors, config in (
        ("fp8", quantized, {**hf_config, "quantization_config": FP8_CONFIG}),
        ("dequantized", dequantized, hf_config),
    ):
        (tmp_path / directory).mkdir()
        safetensors.torch.save_file(tensors, tmp_path / directory / files.SINGLE_FILE)
        (tmp_path / directory / files.CONFIG_FILE).write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dequantized", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config, model = hf.load(str(tmp_path / "fp8"))
    loaded_into = model_without_weights(config)  # train.init_from's path
    hf.load_into(loaded_into, config, str(tmp_path / "fp8"))
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model, hf.loading.LOADED)),
        nnx.to_flat_state(nnx.state(loaded_into, hf.loading.LOADED)),
        strict=True,
    ):
        np.testing.assert_array_equal(a[...], b[...], err_msg=str(path))
    tokens, mask = batch()
    real = mask.astype(bool)
    theirs = torch_forward(reference, tokens, mask).logits.numpy()[real]
    assert_close(ours_forward(model, tokens, mask)[0][real], theirs)
    with pytest.raises(AssertionError, match="relative error"):  # FP8 moved the logits
        assert_close(torch_forward(original, tokens, mask).logits.numpy()[real], theirs)


def test_multi_token_prediction_layers_are_refused_by_name(tmp_path):
    """V3's published checkpoint carries one MTP layer after the last decoder layer
    (`num_nextn_predict_layers`); moe_jax does not implement it and says so."""
    reference = random_deepseek(deepseek_config("v3", num_hidden_layers=3))
    reference.save_pretrained(tmp_path / "hf")
    config_json = (
        (tmp_path / "hf" / "config.json")
        .read_text()
        .replace('"num_hidden_layers": 3', '"num_hidden_layers": 2')
    )
    (tmp_path / "hf" / "config.json").write_text(config_json)  # layer 2 now looks like MTP
    with pytest.raises(ValueError, match=r"multi-token prediction layer \(model\.layers\.2\."):
        hf.load(str(tmp_path / "hf"))


@pytest.mark.parametrize(
    "variant, field, value",
    [
        ("v3", "scoring_func", "softmax"),
        ("v3", "topk_method", "greedy"),
        ("v3", "rope_interleave", False),
        ("v3", "norm_topk_prob", False),
        ("v2", "topk_method", "noaux_tc"),
        ("v2", "attention_bias", True),
    ],
)
def test_unsupported_fields_are_named(variant, field, value, tmp_path):
    reference = random_deepseek(deepseek_config(variant, **{field: value}))
    reference.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        hf.load(str(tmp_path))


def test_settings_deepseek_cannot_express_are_refused_before_writing(tmp_path):
    reference = random_deepseek(deepseek_config("v3"))
    reference.save_pretrained(tmp_path / "hf")
    config = hf.load_config(str(tmp_path / "hf"))
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    config.moe.router = "tokens_choose"
    with pytest.raises(ValueError, match="moe.router='tokens_choose'"):
        hf.save(config, model, str(tmp_path / "out"))
    config = hf.load_config(str(tmp_path / "hf"))
    config.moe.dense_layers = (0, 2)  # a dense layer after a sparse one
    with pytest.raises(ValueError, match="dense layers only before its first sparse"):
        hf.save(config, model, str(tmp_path / "out"))
    config = hf.load_config(str(tmp_path / "hf"))
    config.model.hf_model_type = "mixtral"
    with pytest.raises(ValueError, match="model.attention='mla'"):
        hf.save(config, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@nnx.jit
def _ours_routing(model, tokens, segment_ids):
    """Each sparse layer's `Routing` on the batch (captured as `models.router_logits` does)."""
    _, captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        tokens, deterministic=True, segment_ids=segment_ids
    )
    return [
        value.get_value()[0][0]
        for path, value in sorted(nnx.to_flat_state(captured), key=lambda item: item[0])
        if path[-2:] == ("router", "__call__")
    ]


def _dense_weights(routing) -> np.ndarray:
    """f32[T, E]: each token's combine weight per expert (0 where unchosen) of one group."""
    token_index, weight = np.asarray(routing.token_index[0]), np.asarray(routing.weight[0])
    num_experts = token_index.shape[0]
    dense = np.zeros((routing.probs.shape[1], num_experts), np.float32)
    for expert in range(num_experts):
        filled = token_index[expert] >= 0
        dense[token_index[expert][filled], expert] = weight[expert][filled]
    return dense


def test_each_layers_chosen_experts_and_weights_equal_transformers(saved):
    """Per sparse layer and real token: the experts chosen and their combine weights (routed
    scaling included) are transformers' router's, read from its `gate` modules by hooks."""
    variant, reference, directory = saved
    _, model = hf.load(str(directory))
    tokens, mask = batch()
    captured = []
    hooks = [
        layer.mlp.gate.register_forward_hook(lambda _, __, out: captured.append(out))
        for layer in reference.model.layers
        if hasattr(layer.mlp, "gate")
    ]
    torch_forward(reference, tokens, mask)
    for hook in hooks:
        hook.remove()
    ours = _ours_routing(model, jnp.asarray(tokens), jnp.asarray(mask, jnp.int32))
    assert len(ours) == len(captured) == 3
    real = mask.reshape(-1).astype(bool)
    for routing, (_, weights, indices) in zip(ours, captured, strict=True):
        theirs = np.zeros((tokens.size, 8), np.float32)
        np.put_along_axis(theirs, indices.numpy(), weights.numpy(), axis=1)
        mine = _dense_weights(routing)[: tokens.size]
        np.testing.assert_array_equal(mine[real] > 0, theirs[real] > 0)
        np.testing.assert_allclose(mine[real], theirs[real], rtol=1e-5, atol=1e-6)
