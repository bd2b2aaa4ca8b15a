"""Greedy decoding of Hugging Face checkpoints against `transformers`' own `generate`.

Tiny random Switch Transformers and Mixtral models (the fixtures of the hf tests), saved with
`save_pretrained`, loaded with `moe_jax.hf.load`, decoded greedily by `moe_jax.decode.generate`
and by `transformers`' `generate(do_sample=False)`: the tokens must agree one for one. Switch's
expert capacity (16) exceeds the tokens of a decode step, so transformers drops nothing there,
as our decode-time rule says. With one slot per expert the encoder drops tokens, in
transformers as in moe_jax's eval forward pass, and decoding keeps that encoder.
"""

import jax.numpy as jnp
import numpy as np
import torch

from moe_jax import decode, hf
from tests.test_hf_rope_decoder import hf_config, random_model
from tests.test_hf_switch import VOCAB, random_switch, switch_config
from tests.test_hf_t5 import assert_close, ours_logits, torch_logits

NEW = 8


def test_switch_greedy_generation_equals_transformers(tmp_path):
    reference = random_switch(switch_config())
    reference.save_pretrained(tmp_path)
    _, model = hf.load(str(tmp_path))
    prompts = np.random.default_rng(0).integers(2, VOCAB, (3, 7))
    lengths = np.array([7, 4, 6])
    mask = np.arange(7) < lengths[:, None]
    prompts = np.where(mask, prompts, 0)
    eos = reference.config.eos_token_id
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            do_sample=False,
            max_new_tokens=NEW,
            decoder_start_token_id=0,
            use_cache=False,  # transformers 5 sizes the Switch cache by the encoder depth
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()[:, 1:]  # drop the decoder start token
    ours = np.asarray(
        decode.generate(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths, eos_id=eos)
    )
    np.testing.assert_array_equal(ours[:, : theirs.shape[1]], theirs)
    assert np.all(ours[:, theirs.shape[1] :] == 0)  # transformers stops when every row has EOS


def test_switch_first_step_keeps_the_encoders_capacity(tmp_path):
    """expert_capacity=1: the encoder drops most tokens; the first decode step (one decoder
    token per row, which no capacity drops) equals transformers' forward and our eval pass."""
    reference = random_switch(switch_config(expert_capacity=1))
    reference.save_pretrained(tmp_path)
    _, model = hf.load(str(tmp_path))
    prompts = np.random.default_rng(2).integers(2, VOCAB, (2, 9))
    prompts[1, 6:] = 0  # right padding: transformers' padding takes slots after the real tokens
    start = np.zeros((2, 1), np.int64)
    ours, aux = ours_logits(model, prompts, start)
    assert float(aux.fraction_tokens_dropped[0]) > 0.5  # the encoder's sparse layer
    theirs = torch_logits(reference, prompts, start).logits.numpy()
    assert_close(ours, theirs)
    _, logits = decode.generate(
        model, prompts, max_new_tokens=2, prompt_lengths=[9, 6], return_logits=True
    )
    assert_close(logits[:, :1], theirs)
    atol = 1e-6 * max(1.0, float(np.max(np.abs(ours))))
    np.testing.assert_allclose(logits[:, :1], jnp.asarray(ours), atol=atol, rtol=0)


def test_mixtral_greedy_generation_equals_transformers(tmp_path):
    reference = random_model(hf_config("mixtral"))
    reference.save_pretrained(tmp_path)
    _, model = hf.load(str(tmp_path))
    prompts = np.random.default_rng(1).integers(0, 96, (2, 6))
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
        ).numpy()[:, prompts.shape[1] :]
    ours = np.asarray(decode.generate(model, prompts, max_new_tokens=NEW))
    np.testing.assert_array_equal(ours, theirs)
