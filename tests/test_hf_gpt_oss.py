"""moe_jax.hf against transformers' GPT-OSS: logits past the sliding window, router logits, the
load-balancing loss, round trips, greedy generation, refusals.

The oracle is a tiny random `transformers` GptOss model (seeded, float32, eager attention): 4
layers alternating sliding (window 4) and full attention, 4 query heads sharing 2 key/value
heads, 6 experts top-2, random sinks, biases and RMSNorm scales, a swiglu_limit the expert
activations reach, on sequences of 12 tokens (three windows) with left and right padding.
"""

import numpy as np
import pytest
import qwix
import safetensors.numpy
import torch
import transformers
from flax import nnx
from test_hf_mxfp4 import quantize as to_mxfp4
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
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from moe_jax import decode, hf, models, quantize
from moe_jax.hf import files
from moe_jax.hf.gpt_oss import full_attention_period
from moe_jax.rope_attention import GroupedQueryAttention
from tests.test_hf_t5 import assert_close

WINDOW = 4


def gpt_oss_config(**overrides):
    settings = dict(
        TINY_DECODER,
        intermediate_size=16,
        num_hidden_layers=4,
        head_dim=8,
        num_local_experts=6,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        swiglu_limit=1.5,  # low enough that the clamps act on these activations
        router_aux_loss_coef=0.02,
    )
    settings.update(overrides)
    return transformers.GptOssConfig(**settings)


def random_gpt_oss(config, seed: int = 0):
    """A GptOss model whose every weight, sinks and biases included, is drawn at random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith("router.weight"):  # spread the experts' shares: no near-ties
                parameter.copy_(0.4 * torch.randn_like(parameter))
            elif "experts" in name or name.endswith(("proj.weight", "embed_tokens.weight")):
                parameter.copy_(0.3 * torch.randn_like(parameter))
            elif name.endswith(("bias", "sinks")):
                parameter.copy_(0.5 * torch.randn_like(parameter))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    reference = random_gpt_oss(gpt_oss_config())
    directory = tmp_path_factory.mktemp("gpt_oss")
    reference.save_pretrained(directory)
    return reference, directory


def test_loaded_model_equals_transformers_past_the_window(saved):
    reference, directory = saved
    config, model = hf.load(str(directory))
    assert config.model.sliding_window == WINDOW and config.model.full_attention_every == 2
    assert config.model.attention_sinks and config.model.attention_out_bias
    assert config.moe.activation == "swiglu_clamped" and config.moe.swiglu_limit == 1.5
    tokens, mask = batch()
    assert tokens.shape[1] >= 3 * WINDOW
    real = mask.astype(bool)
    ours, aux, router = ours_forward(model, tokens, mask)
    theirs = torch_forward(reference, tokens, mask)
    assert_close(ours[real], theirs.logits.numpy()[real])
    their_router = [x.numpy() for x in theirs.router_logits]
    assert len(router) == len(their_router) == 4
    flat_real = real.reshape(-1)
    for mine, their in zip(router, their_router, strict=True):
        assert_close(mine[flat_real], their[flat_real])
    # transformers pools every layer's tokens into one Switch-form loss; on one layer alone its
    # function is our per-layer loss (one routing group holds the batch)
    torch_mask = torch.tensor(mask)
    for layer, their in enumerate(theirs.router_logits):
        expected = load_balancing_loss_func((their,), 6, 2, torch_mask)
        np.testing.assert_allclose(aux.load_balancing_loss[layer], float(expected), rtol=1e-5)


def test_the_window_and_sinks_matter_here(saved):
    """The oracle is not blind to either feature: with full attention in every layer, or with
    sinks too low to take weight, our logits leave transformers'."""
    reference, directory = saved
    tokens, mask = batch()
    real = mask.astype(bool)
    theirs = torch_forward(reference, tokens, mask).logits.numpy()[real]
    config, sinkless = hf.load(str(directory))
    config.model.sliding_window = 0  # the same weights, every layer attending to all
    unwindowed = models.build_model(config, rngs=nnx.Rngs(0))
    nnx.update(unwindowed, nnx.state(sinkless, nnx.Param))
    for _, module in nnx.iter_modules(sinkless):
        if isinstance(module, GroupedQueryAttention):
            module.sinks[...] = np.full(module.sinks.shape, -1e9, np.float32)
    for model in (unwindowed, sinkless):
        ours, _, _ = ours_forward(model, tokens, mask)
        assert float(np.abs(ours[real] - theirs).max()) > 1e-3


def test_round_trip_through_transformers(saved, tmp_path):
    assert_saves_for_transformers(saved[-1], tmp_path)


def test_greedy_generation_past_the_window_equals_transformers(saved):
    reference, directory = saved
    _, model = hf.load(str(directory))
    prompts = np.random.default_rng(1).integers(0, VOCAB, (2, 6))
    new = 8  # 14 positions: past three windows
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=new,
            pad_token_id=0,
        ).numpy()[:, prompts.shape[1] :]
    ours = np.asarray(decode.generate(model, prompts, max_new_tokens=new))
    np.testing.assert_array_equal(ours, theirs)


def test_init_from_and_convert_start_from_the_checkpoint(tmp_path):
    """`train.init_from=hf:DIR` starts from transformers' loss; `convert` both ways keeps the
    logits (4 layers: 2 sliding, 2 full, windows of 4 in 128-token training rows)."""
    reference = random_gpt_oss(gpt_oss_config(vocab_size=TRAIN_VOCAB))
    assert_init_from_starts_from_the_transformers_loss(reference, tmp_path / "init_from")
    assert_convert_round_trips(reference, tmp_path / "convert")


def test_layer_types_to_a_period():
    s, f = "sliding_attention", "full_attention"
    assert full_attention_period([s, f, s, f], 128) == (128, 2)
    assert full_attention_period([s, s, f, s, s, f], 64) == (64, 3)
    assert full_attention_period([s, s, s], 8) == (8, 0)
    assert full_attention_period([f, f], 8) == (0, 0)
    with pytest.raises(ValueError, match=r"layer_types=\['full_attention', 'sliding_attention'"):
        full_attention_period([f, s, f, s], 8)
    with pytest.raises(ValueError, match="sliding_window=None"):
        full_attention_period([s, f], None)
    with pytest.raises(ValueError, match="chunked_attention"):
        full_attention_period([s, "chunked_attention"], 8)


def test_settings_gpt_oss_cannot_express_are_refused_before_writing(saved, tmp_path):
    _, directory = saved
    config = hf.load_config(str(directory))
    model = nnx.eval_shape(lambda: models.build_model(config, rngs=nnx.Rngs(0)))
    config.moe.router_bias = False
    with pytest.raises(ValueError, match="moe.router_bias=False"):
        hf.save(config, model, str(tmp_path / "out"))
    config = hf.load_config(str(directory))
    config.moe.sparse_every = 2
    with pytest.raises(ValueError, match="experts in every layer"):
        hf.save(config, model, str(tmp_path / "out"))
    config = hf.load_config(str(directory))
    config.model.hf_model_type, config.moe.activation = "mixtral", "swiglu"  # and no sinks
    with pytest.raises(ValueError, match="model.attention_sinks=True"):
        hf.save(config, model, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(tmp_path):
    """Expert weights stored as the releases store them (MXFP4 blocks and scales of the
    `[out, in]` matrices): our model's logits equal those of transformers' model loaded with
    `Mxfp4Config(dequantize=True)` from the same files."""
    config = gpt_oss_config(num_hidden_layers=2, intermediate_size=32)  # blocks of 32 values
    reference = random_gpt_oss(config)
    rng = np.random.default_rng(5)
    tensors = {}
    for name, param in reference.state_dict().items():
        array = param.detach().numpy()
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = array
            continue
        stored = 0.3 * rng.normal(size=array.transpose(0, 2, 1).shape).astype(np.float32)
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"], _ = to_mxfp4(stored)
    config.quantization_config = {"quant_method": "mxfp4"}
    config.save_pretrained(tmp_path)
    safetensors.numpy.save_file(tensors, str(tmp_path / files.SINGLE_FILE), {"format": "pt"})
    theirs_model = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    _, model = hf.load(str(tmp_path))
    tokens, mask = batch(seed=3)
    real = mask.astype(bool)
    ours, _, _ = ours_forward(model, tokens, mask)
    assert_close(ours[real], torch_forward(theirs_model, tokens, mask).logits.numpy()[real])
    # and moe_jax.quantize keeps the experts in 4 bits (int4 with a scale per 32 input rows,
    # as MXFP4 has one per block of 32; 5 bits a value with the float32 scales): its logits are
    # those of the float model whose expert weights are the rounded ones
    _, rounded = hf.load(str(tmp_path))
    float_bytes = quantize.expert_bytes(model)
    four_bit = quantize.quantize_experts(model, 4, group_size=32)
    assert quantize.expert_bytes(four_bit) == float_bytes * 5 // 32
    for (_, stored), (_, weight) in zip(
        nnx.to_flat_state(nnx.state(four_bit, nnx.Param)),
        nnx.to_flat_state(nnx.state(rounded, nnx.Param)),
        strict=True,
    ):
        if isinstance(stored.get_value(), qwix.QArray):
            weight.set_value(qwix.dequantize(stored.get_value()))
    four_bit_logits, _, _ = ours_forward(four_bit, tokens, mask)
    rounded_logits, _, _ = ours_forward(rounded, tokens, mask)
    np.testing.assert_allclose(four_bit_logits, rounded_logits, rtol=1e-5, atol=1e-5)
    assert float(np.abs(rounded_logits[real] - ours[real]).max()) > 1e-3  # 4 bits round
