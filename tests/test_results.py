"""experiments/RESULTS.md reproduces from a clone: its corpus ships with the package, and the
command of its section (g), as printed there, gives the table's first number."""

import hashlib
import json
import re
import shlex
from pathlib import Path

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from moe_jax import data, train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = (ROOT / "experiments" / "RESULTS.md").read_text(encoding="utf-8")


def test_bundled_tiny_shakespeare_is_the_char_rnn_text_split_as_a_text_file(tmp_path):
    text = b"".join(
        (
            (
                data.make_source("tiny_shakespeare", split, seed=0, data_dir=None, download=False)
            ).tokens
            - data.BYTE_OFFSET
        )
        .astype(np.uint8)
        .tobytes()
        for split in data.SPLITS
    )
    # Karpathy's char-rnn input.txt (the nanoGPT shakespeare_char corpus): 1,115,394 bytes
    assert len(text) == 1_115_394
    assert text.startswith(b"First Citizen:\nBefore we proceed any further, hear me speak.")
    digest = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert hashlib.sha256(text).hexdigest() == digest
    (tmp_path / "input.txt").write_bytes(text)
    for split in data.SPLITS:
        as_file = data.make_source(
            f"text:{tmp_path / 'input.txt'}", split, seed=0, data_dir=None, download=False
        )
        bundled = data.make_source("tiny_shakespeare", split, seed=0, data_dir=None, download=False)
        np.testing.assert_array_equal(bundled.tokens, as_file.tokens)


def _results_command(name: str) -> list[str]:
    """The arguments of RESULTS.md's `python -m moe_jax.train` line with `--workdir=runs/NAME`,
    with the shell variables it uses expanded from their definitions in RESULTS.md."""
    lines = RESULTS.replace("\\\n", " ").splitlines()
    variables = {}
    for line in lines:
        match = re.fullmatch(r'([A-Z]+)="(.*)"', line.strip())
        if match:
            variables[match[1]] = match[2]
    (command,) = [
        line for line in lines if f"--workdir=runs/{name}" in line.split() and "train" in line
    ]
    for variable, value in variables.items():
        command = command.replace(f"${variable}", value)
    arguments = shlex.split(command)
    assert arguments[:3] == ["python", "-m", "moe_jax.train"], arguments
    return arguments[3:]


def test_results_widenet_command_reproduces_its_first_eval_number(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # RESULTS.md's commands run from the repository root
    arguments = _results_command("widenet")
    # the constant schedule makes steps 1-20 of the 100-step run those of a 20-step run
    assert "--config.train.schedule=constant" in arguments
    arguments = [
        "--config.train.num_steps=20" if a.startswith("--config.train.num_steps=") else a
        for a in arguments
        if not a.startswith("--workdir=")
    ]
    argv = ["moe_jax.train", *arguments]  # parsed as the command line of moe_jax.train is
    flag_values = flags.FlagValues()
    config_flag = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    # one CPU device, as on the machine of RESULTS.md (the tests have 8 fake ones)
    train.run(config_flag.value, str(tmp_path / "widenet"), devices=jax.devices()[:1])
    lines = (tmp_path / "widenet" / "metrics.jsonl").read_text().splitlines()
    (evaluation,) = [json.loads(line) for line in lines if '"split": "eval"' in line]
    row = next(line for line in RESULTS.splitlines() if line.startswith("| WideNet (shared)"))
    printed = row.split("|")[4].strip()  # eval CE at step 20 (run, slot order, params first)
    assert evaluation["step"] == 20
    assert f"{evaluation['cross_entropy']:.3f}" == printed == "2.856"
