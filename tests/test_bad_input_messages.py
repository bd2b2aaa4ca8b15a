"""What a newcomer's mistakes get: one line that names the bad value and the fix, no traceback.

Each test gives one mistake to the command that meets it (in process where the command's own
error handling can be called, else as a subprocess) and checks the line it prints or raises.
The Hugging Face checkpoints are tiny Switch Transformers written by `moe_jax.hf.save`.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
import tokenizers
from flax import nnx
from tiny_training import TINY_TRAINING, configured
from tokenizers import models, pre_tokenizers

from experiments import routing_report
from moe_jax import cli, convert, generate, hf, train
from moe_jax import config as config_module
from moe_jax.config import load_config_file
from moe_jax.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SWITCH = os.path.join(ROOT, "configs", "switch.py") + ":tiny"
ONE_DEVICE = jax.devices()[:1]


def one_line(text: str) -> str:
    """`text` (an error message or a command's stderr), checked to be one line, no traceback."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def parse_flags_error(argv: list[str], capsys) -> str:
    """The line `moe_jax.train`'s flag parsing prints before it exits with status 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(argv)
    assert exit_info.value.code == 2
    return one_line(capsys.readouterr().err)


def test_unknown_variant_names_the_closest_one(capsys):
    line = parse_flags_error(["train", "--config=configs/switch.py:tinyy", "--workdir=w"], capsys)
    assert line.startswith("FATAL Flags parsing error: --config=")
    assert "switch.py:tinyy: unknown variant 'tinyy'; did you mean 'tiny'?" in line


def test_missing_config_file_names_the_closest_one(capsys):
    line = parse_flags_error(["train", "--config=configs/swich.py:tiny", "--workdir=w"], capsys)
    assert "did you mean --config=configs/switch.py:tiny?" in line
    assert line.count("swich.py") == 1, line  # the path once, as given
    unlike = parse_flags_error(["train", "--config=configs/zzzz.py:tiny"], capsys)
    assert "e.g. --config=configs/switch.py:tiny" in unlike


@pytest.fixture(scope="module")
def switch_dir(tmp_path_factory) -> str:
    """A Hugging Face switch_transformers checkpoint: 2 + 2 layers of d_model 32, 4 experts."""
    config = load_config_file(TINY_SWITCH)
    config.model.update(
        kind="encoder_decoder",
        d_model=32,
        num_heads=2,
        head_dim=16,
        d_ff=64,
        ffn_activation="relu",
        tie_embeddings=True,
        hf_model_type="switch_transformers",
    )
    config.moe.num_experts = 4
    directory = str(tmp_path_factory.mktemp("switch_hf"))
    hf.save(config, build_model(config, rngs=nnx.Rngs(0)), directory)
    return directory


def copy_of(directory: str, tmp_path) -> str:
    copy = str(tmp_path / "checkpoint")
    shutil.copytree(directory, copy)
    return copy


def test_truncated_safetensors_is_named_in_one_line(switch_dir, tmp_path, capsys):
    directory = copy_of(switch_dir, tmp_path)
    weights = os.path.join(directory, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) // 2)  # an interrupted download
    with pytest.raises(ValueError) as error:
        hf.load(directory)
    message = one_line(str(error.value))
    assert weights in message and "truncated or damaged" in message
    assert "download it again" in message
    # train --config=configs/hf.py:DIR reads it while parsing its flags
    line = parse_flags_error(
        ["train", f"--config=configs/hf.py:{directory}", "--workdir=w"], capsys
    )
    assert weights in line and "truncated or damaged" in line
    # train.init_from=hf:DIR reads it before anything is written
    config = configured(load_config_file(TINY_SWITCH), TINY_TRAINING, {})
    config.train.init_from = f"hf:{directory}"
    with pytest.raises(train.SetupError) as error:
        train.run(config, str(tmp_path / "run"), devices=ONE_DEVICE)
    assert weights in one_line(str(error.value))


def test_switch_config_with_no_sparse_layer_names_the_mistake(switch_dir, tmp_path, capsys):
    directory = copy_of(switch_dir, tmp_path)
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as file:
        hf_config = json.load(file)
    # transformers' default of 3 sparse layers per stack on 2 layers: step 2 // 3 = 0, no expert
    hf_config.update(num_sparse_encoder_layers=3, num_sparse_decoder_layers=3)
    with open(path, "w", encoding="utf-8") as file:
        json.dump(hf_config, file)
    line = parse_flags_error(
        ["train", f"--config=configs/hf.py:{directory}", "--workdir=w"], capsys
    )
    assert f"hf.py:{directory}: switch_transformers config.json" in line
    assert "puts experts in no layer: encoder_sparse_step=0 and decoder_sparse_step=0" in line
    assert "num_sparse_encoder_layers=3" in line and "set both steps to 2" in line
    assert "cannot express" not in line


def test_generate_hf_without_a_tokenizer_says_so_and_how_to_pass_ids(switch_dir, tmp_path):
    command = [sys.executable, "-m", "moe_jax.generate", f"--hf={switch_dir}", "--prompt=hello"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and done.stdout == ""
    line = one_line(done.stderr)
    assert "has no tokenizer.json (no tokenizer files)" in line and "--prompt_ids=" in line
    # a Llama-style folder with the SentencePiece file only
    sentencepiece = copy_of(switch_dir, tmp_path)
    open(os.path.join(sentencepiece, "tokenizer.model"), "wb").close()
    with pytest.raises(ValueError) as error:
        generate._hf_model(sentencepiece, "hello", [])
    message = one_line(str(error.value))
    assert "only tokenizer.model, a SentencePiece model" in message
    assert "sentencepiece" not in message  # transformers' advice to install the library


def test_generate_hf_tokenizes_with_tokenizer_json(switch_dir, tmp_path):
    directory = copy_of(switch_dir, tmp_path)
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2, "hello": 5, "experts": 7}
    tokenizer = tokenizers.Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    _, ids, decode_text, eos_id, _ = generate._hf_model(directory, "hello experts", [])
    assert ids == [5, 7] and eos_id == 1  # config.json's eos_token_id
    assert decode_text([7, 5]) == "experts hello"


def test_the_settings_own_error_comes_before_the_warmup_check(tmp_path):
    # tiny's 50 warmup steps exceed a 5-step trial, but the trial's real mistake is reported
    config = load_config_file(TINY_SWITCH)
    config.train.num_steps = 5
    config.data.name = "text:/no/such/corpus.txt"
    with pytest.raises(train.SetupError) as error:
        train.run(config, str(tmp_path / "run"))
    assert "/no/such/corpus.txt" in one_line(str(error.value))
    config.data.name = "synthetic"
    config.train.warmup_steps = 60
    with pytest.raises(train.SetupError, match="train.warmup_steps=60 must be smaller"):
        train.run(config, str(tmp_path / "run"))


# a converted run small enough to train a step: what `convert` and `train` are both given
CONVERTED_RUN = {
    "train.num_steps": 1,
    "train.batch_size": 2,
    "train.seq_len": 16,
    "train.warmup_steps": 0,
    "train.eval_every": 0,
}


@pytest.fixture(scope="module")
def converted_run(switch_dir, tmp_path_factory) -> str:
    """The workdir `moe_jax.convert --hf=switch_dir` writes with the CONVERTED_RUN settings."""
    config = configured(hf.load_config(switch_dir), CONVERTED_RUN, {})
    workdir = str(tmp_path_factory.mktemp("converted"))
    convert.hf_to_run(switch_dir, workdir, config, devices=ONE_DEVICE)
    return workdir


def converted_run_config(switch_dir: str):
    """The config of `train --config=configs/hf.py:DIR` with the CONVERTED_RUN settings."""
    return configured(load_config_file(f"configs/hf.py:{switch_dir}"), CONVERTED_RUN, {})


def test_training_a_converted_run_with_other_data_shows_the_convert_command(
    switch_dir, converted_run
):
    config = converted_run_config(switch_dir)
    config.data.name = "tiny_shakespeare"
    with pytest.raises(train.SetupError) as error:
        train.run(config, converted_run, devices=ONE_DEVICE)
    message = str(error.value)
    assert "data.name: 'synthetic' (checkpoint) vs 'tiny_shakespeare' (this run)" in message
    hint = message.splitlines()[-1]
    assert hint.startswith("Step 0 is what moe_jax.convert wrote from")
    assert f"python -m moe_jax.convert --hf={switch_dir} --workdir=NEW_WORKDIR" in hint
    assert hint.endswith(f"--config=configs/hf.py:{switch_dir} --config.data.name=tiny_shakespeare")


def test_convert_to_hf_of_a_run_from_scratch_names_model_type(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(config_module.default_config().to_json())
    write = lambda: convert.run_to_hf(str(workdir), str(tmp_path / "out"))
    assert convert.run_tool("moe_jax.convert", ["convert"], write) == 1
    line = one_line(capsys.readouterr().err)
    assert "--model_type" in line and "switch_transformers" in line
    assert not (tmp_path / "out").exists()


def test_a_resume_says_its_step_and_a_finished_run_how_to_train_on(
    switch_dir, converted_run, tmp_path, capsys
):
    workdir = str(tmp_path / "run")
    shutil.copytree(converted_run, workdir)
    config = converted_run_config(switch_dir)
    train.run(config, workdir, devices=ONE_DEVICE)
    assert "moe_jax.train: resuming from step 0 of 1\n" in capsys.readouterr().err
    train.run(config, workdir, devices=ONE_DEVICE)
    assert one_line(capsys.readouterr().err) == (
        "moe_jax.train: the run is already at step 1 of train.num_steps=1: nothing to train; "
        "raise it to train further, e.g. --config.train.num_steps=2 (the learning-rate "
        "schedule keeps its horizon)"
    )


def test_a_mesh_size_that_does_not_fit_names_the_sizes_that_do(tmp_path):
    config = load_config_file(TINY_SWITCH)
    config.mesh.expert = 3  # on the 8 test devices
    with pytest.raises(train.SetupError) as error:
        train.run(config, str(tmp_path / "run"))
    assert "on 8 devices each axis size must be one of 1, 2, 4, 8" in one_line(str(error.value))


def test_routing_report_without_its_trace_says_how_to_make_one(tmp_path, capsys):
    trace = tmp_path / "trace.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        routing_report.main([f"--trace={trace}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert (
        error.strip()
        .splitlines()[-1]
        .endswith(
            f"--trace={trace}: no such file; write it first with python -m moe_jax.score "
            f"--workdir=WORKDIR --text=FILE --out={trace}"
        )
    )
