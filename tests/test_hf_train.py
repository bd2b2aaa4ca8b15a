"""Fine-tuning from Hugging Face checkpoints: `train.init_from='hf:DIR'`, `moe_jax.convert` both
ways. Oracle: the loss and logits of transformers' own Switch model on the same batch."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import hf as hf_config
from moe_jax import checkpoint, convert, data, hf, run_identity, train
from tests.test_hf_switch import random_switch, switch_config
from tests.test_hf_t5 import assert_close, ours_logits, torch_logits
from tests.test_hf_t5 import batch as batch_of_ids

VOCAB = 384  # the byte-level synthetic corpus needs >= 259 ids


def small_run(config):
    config.train.update(
        num_steps=1,
        batch_size=8,
        seq_len=24,
        eval_every=0,
        log_every=1,
        checkpoint_every=1,
        schedule="constant",
        warmup_steps=0,
    )
    return config


def first_step_cross_entropy(workdir) -> float:
    with open(workdir / "metrics.jsonl", encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    (row,) = [row for row in rows if row["split"] == "train" and row["step"] == 1]
    return row["cross_entropy"]


def transformers_cross_entropy(model, batch) -> float:
    """transformers' loss: mean token cross-entropy over the non-padding targets."""
    weights = batch["decoder_weights"] > 0
    labels = np.where(weights, batch["decoder_targets"], -100).astype(np.int64)
    with torch.no_grad():
        output = model(
            input_ids=torch.tensor(batch["encoder_inputs"], dtype=torch.long),
            attention_mask=torch.tensor(batch["encoder_segment_ids"] > 0, dtype=torch.long),
            decoder_input_ids=torch.tensor(batch["decoder_inputs"], dtype=torch.long),
            labels=torch.tensor(labels),
        )
    return float(output.loss)


def test_init_from_starts_from_the_transformers_loss_and_converts_back(tmp_path):
    reference = random_switch(switch_config(vocab_size=VOCAB, num_decoder_layers=2))
    reference.save_pretrained(tmp_path / "hf")
    config = small_run(hf_config.get_config(str(tmp_path / "hf")))
    assert config.train.init_from == f"hf:{tmp_path / 'hf'}"
    batch = data.dataset_from_config(config, "train").batch(0)

    one_device = jax.devices()[:1]  # the sharded paths have their own tests; this one is fast
    train.run(config, str(tmp_path / "run"), devices=one_device)
    expected = transformers_cross_entropy(reference, batch)
    np.testing.assert_allclose(first_step_cross_entropy(tmp_path / "run"), expected, rtol=1e-4)

    # the trained run -> HF -> transformers loads every key and computes our logits
    convert.run_to_hf(str(tmp_path / "run"), str(tmp_path / "out"))
    loaded, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    run_config = train.config_from_workdir(str(tmp_path / "run"))
    # config.json holds the resolved config (the schedule's horizon filled in)
    assert run_config.to_dict() == run_identity.resolve(config).to_dict()
    _, model, step = train.restore_for_inference(str(tmp_path / "run"))
    assert step == 1
    encoder, decoder = batch["encoder_inputs"][:3], batch["decoder_inputs"][:3]
    ours, _ = ours_logits(model, encoder, decoder)
    assert_close(ours, torch_logits(loaded.eval(), encoder, decoder).logits)
    assert not np.allclose(ours, torch_logits(reference, encoder, decoder).logits.numpy())


def test_resuming_an_init_from_run_needs_no_hugging_face_checkpoint(tmp_path):
    # the weights are in the run's checkpoint: a resume must not read train.init_from's DIR
    reference = random_switch(switch_config(vocab_size=VOCAB, num_decoder_layers=2), seed=3)
    reference.save_pretrained(tmp_path / "hf")
    config = small_run(hf_config.get_config(str(tmp_path / "hf")))
    one_device = jax.devices()[:1]
    train.run(config, str(tmp_path / "run"), devices=one_device)
    (tmp_path / "hf").rename(tmp_path / "moved")
    with pytest.raises(train.SetupError, match="no config.json"):  # a fresh run still needs it
        train.run(config, str(tmp_path / "fresh"), devices=one_device)
    assert not (tmp_path / "fresh").exists()
    config.train.num_steps = 2
    assert train.run(config, str(tmp_path / "run"), devices=one_device).step == 2


def test_converted_run_holds_the_checkpoint_at_step_0(tmp_path):
    """HF -> `moe_jax.convert` -> a step-0 orbax checkpoint (which `train.run` resumes from)
    whose model computes transformers' logits."""
    reference = random_switch(switch_config(vocab_size=VOCAB, num_decoder_layers=2), seed=5)
    reference.save_pretrained(tmp_path / "hf")
    config = small_run(hf.load_config(str(tmp_path / "hf")))
    directory = convert.hf_to_run(
        str(tmp_path / "hf"), str(tmp_path / "run"), config, devices=jax.devices()[:1]
    )
    assert checkpoint.Checkpoints(directory, keep=1, read_only=True).all_steps() == [0]
    _, model, step = train.restore_for_inference(str(tmp_path / "run"))
    assert step == 0
    encoder, decoder = batch_of_ids(seed=6)
    assert_close(
        ours_logits(model, encoder, decoder)[0], torch_logits(reference, encoder, decoder).logits
    )
