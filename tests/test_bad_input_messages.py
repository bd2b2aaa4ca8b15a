"""What a newcomer's mistakes get: one line that names the bad value and the fix, no traceback.

Each test gives one mistake to the command that meets it (in process where the command's own
error handling can be called, else as a subprocess) and checks the line it prints or raises.
The Hugging Face checkpoints are tiny Switch Transformers written by `moe_jax.hf.save`.
"""

import os

import jax
import pytest

from moe_jax import train

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
        train.parse_flags(argv)
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
