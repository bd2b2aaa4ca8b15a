"""Generate text from a trained model: `python -m moe_jax.generate`.

    python -m moe_jax.generate --workdir=runs/switch_tiny --prompt="The expert" \\
        --max_new_tokens=64 --temperature=0.8 --top_p=0.9 --seed=0
    python -m moe_jax.generate --hf=path/to/switch-base-8 --prompt="translate ..."

`--workdir` restores the latest checkpoint of a training run (`train.restore_for_inference`)
and uses the byte-level tokenizer of `moe_jax.data`; a decoder-only prompt starts with the start
token 0, as the training rows do, and may be at most `train.seq_len` long with its new tokens.
`--hf` loads a Hugging Face checkpoint directory (`moe_jax.hf.load`) and its `tokenizer.json`
with the `tokenizers` library (what transformers' fast tokenizers are built on); a directory
without one (a SentencePiece model alone, or no tokenizer) needs the prompt as token ids,
`--prompt_ids=1,2,3`, and prints the new ids. Generation stops at the `eos_token_id` of the
checkpoint's config.json. Decoding is `moe_jax.decode.generate` (KV cache; the decode-time
routing rule is in its docstring).
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np
import tokenizers
from absl import app, flags

from moe_jax import cli, data, decode, train
from moe_jax.config import DECODER_KINDS

TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model")  # T5 / Switch, Llama / Mixtral


def _hf_tokenizer(directory: str) -> tokenizers.Tokenizer:
    """The tokenizer of `DIR/tokenizer.json`, read with the `tokenizers` library."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if os.path.isfile(path):
        return tokenizers.Tokenizer.from_file(path)
    sentencepiece = [
        name for name in SENTENCEPIECE_FILES if os.path.isfile(os.path.join(directory, name))
    ]
    found = (
        f"only {sentencepiece[0]}, a SentencePiece model, which is not read here; "
        "transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) writes "
        f"{TOKENIZER_FILE} beside it"
        if sentencepiece
        else "no tokenizer files"
    )
    raise ValueError(
        f"--hf={directory} has no {TOKENIZER_FILE} ({found}): pass the prompt as ids of the "
        "checkpoint's vocabulary with --prompt_ids=ID,ID,... (the output prints as ids too)."
    )


def _hf_model(directory: str, prompt: str, prompt_ids: list[int]):
    """`(model, ids, decode_text, eos_id, max_length)` for a Hugging Face checkpoint."""
    from moe_jax import hf  # the optional Hugging Face interop
    from moe_jax.hf import files

    eos_id = files.read_config(directory).get("eos_token_id")  # refuses a non-checkpoint first
    tokenizer = None if prompt_ids else _hf_tokenizer(directory)
    if tokenizer is not None:
        prompt_ids = tokenizer.encode(prompt).ids
    _, model = hf.load(directory)

    def decode_text(ids):
        if tokenizer is None:
            return " ".join(str(i) for i in ids)
        return tokenizer.decode(ids, skip_special_tokens=True)

    return model, prompt_ids, decode_text, eos_id, None


def _workdir_model(workdir: str, prompt: str, prompt_ids: list[int]):
    """`(model, ids, decode_text, eos_id, max_length)` for a training workdir."""
    config, model, _ = train.restore_for_inference(workdir)
    tokenizer = data.ByteTokenizer()
    if not prompt_ids:
        prompt_ids = tokenizer.encode(prompt).tolist()
        if config.model.kind in DECODER_KINDS:
            prompt_ids = [data.PAD_ID, *prompt_ids]  # the start token of every training row
    return model, prompt_ids, tokenizer.decode, data.EOS_ID, config.train.seq_len


def main(argv: list[str]) -> int:
    options = cli.flag_values(argv)
    if bool(options.workdir) == bool(options.hf):
        raise app.UsageError("pass exactly one of --workdir (a training run) or --hf (a HF dir).")
    prompt_ids = [int(i) for i in options.prompt_ids.split(",")] if options.prompt_ids else []
    try:
        load = _workdir_model if options.workdir else _hf_model
        model, ids, decode_text, eos_id, max_length = load(
            options.workdir or options.hf, options.prompt, prompt_ids
        )
        new_tokens = decode.generate(
            model,
            np.asarray([ids], np.int32).reshape(1, -1),
            max_new_tokens=options.max_new_tokens,
            temperature=options.temperature,
            top_k=options.top_k or None,
            top_p=options.top_p,
            rng=jax.random.key(options.seed),
            eos_id=eos_id,
            max_length=max_length,
        )
    except (FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"moe_jax.generate: {error}\n")
        return 1
    tokens = np.asarray(new_tokens)[0]
    if eos_id is not None and eos_id in tokens:
        tokens = tokens[: tokens.tolist().index(eos_id)]
    print(options.prompt + decode_text(tokens))
    return 0


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Training workdir whose latest checkpoint generates.")
    flags.DEFINE_string("hf", None, "A Hugging Face checkpoint directory instead of --workdir.")
    flags.DEFINE_string("prompt", "", "Prompt text.")
    flags.DEFINE_string("prompt_ids", "", "Prompt as comma-separated token ids (overrides text).")
    flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 is greedy; > 0 samples.")
    flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
    flags.DEFINE_float("top_p", None, "Nucleus sampling: keep the tokens that reach p, in (0, 1].")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
