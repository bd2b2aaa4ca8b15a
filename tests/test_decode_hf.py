"""Greedy decoding of Hugging Face checkpoints against `transformers`' own `generate`.

Tiny random Switch Transformers, Mixtral, Qwen2-MoE, Qwen3-MoE and DeepSeek-V3 models (the
fixtures of the hf tests), saved with `save_pretrained`, loaded with `moe_jax.hf.load`, decoded
greedily by `moe_jax.decode.generate` (and the `moe_jax.generate --hf` CLI) and by `transformers`'
`generate(do_sample=False)`: the tokens must agree one for one. Switch's
expert capacity (16) exceeds the tokens of a decode step, so transformers drops nothing there,
as our decode-time rule says. With one slot per expert the encoder drops tokens, in
transformers as in moe_jax's eval forward pass, and decoding keeps that encoder.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from moe_jax import decode, hf
from tests.test_hf_deepseek import deepseek_config, random_deepseek
from tests.test_hf_rope_decoder import VOCAB as ROPE_VOCAB
from tests.test_hf_rope_decoder import hf_config, random_model
from tests.test_hf_switch import VOCAB, random_switch, switch_config
from tests.test_hf_t5 import assert_close, ours_logits, torch_logits

NEW = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# decoder-only checkpoints the generate CLI is run on: {family: tiny random transformers model}
CLI_REFERENCES = {
    "qwen3_moe": lambda: random_model(hf_config("qwen3_moe")),
    "deepseek_v3": lambda: random_deepseek(deepseek_config("v3")),
}


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


@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe", "qwen3_moe"))
def test_rope_decoder_greedy_generation_equals_transformers(family, tmp_path):
    """Prompts of 7, 4 and 6 tokens: ours padded on the right with `prompt_lengths`,
    transformers' on the left (its positions count from each row's first real token)."""
    reference = random_model(hf_config(family))
    reference.save_pretrained(tmp_path)
    _, model = hf.load(str(tmp_path))
    prompts = np.random.default_rng(1).integers(0, ROPE_VOCAB, (3, 7))
    lengths = np.array([7, 4, 6])
    mask = np.arange(7) < lengths[:, None]
    prompts = np.where(mask, prompts, 0)
    left_padded = np.stack([np.roll(row, 7 - n) for row, n in zip(prompts, lengths)])
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor(left_padded),
            attention_mask=torch.tensor(mask[:, ::-1].astype(np.int64)),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
        ).numpy()[:, prompts.shape[1] :]
    ours = np.asarray(decode.generate(model, prompts, max_new_tokens=NEW, prompt_lengths=lengths))
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("family", tuple(CLI_REFERENCES))
def test_generate_cli_prints_a_checkpoints_greedy_ids_up_to_its_eos(family, tmp_path):
    """`python -m moe_jax.generate --hf=DIR --prompt_ids=...` on a decoder-only checkpoint
    without tokenizer.json prints transformers' greedy new tokens as ids, up to (without) the
    `eos_token_id` of DIR's config.json."""
    reference = CLI_REFERENCES[family]()
    prompt = [45, 49, 72, 91, 3, 13, 79]
    with torch.no_grad():
        theirs = reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW,
            pad_token_id=0,
        )
    new = theirs.numpy()[0, len(prompt) :].tolist()
    reference.config.eos_token_id = new[4]
    expected = new[: new.index(new[4])]
    assert len(expected) >= 2, new
    reference.save_pretrained(tmp_path)
    ids = ",".join(str(i) for i in prompt)
    command = [sys.executable, "-m", "moe_jax.generate", f"--hf={tmp_path}", f"--prompt_ids={ids}"]
    done = subprocess.run(
        [*command, f"--max_new_tokens={NEW}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(i) for i in expected], (done.stdout, new)
