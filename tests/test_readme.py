"""The README's command blocks run as printed after its set-up block, from a fresh checkout.

How the blocks run (the README's "Development" section says the same):
- The `bash` blocks of README.md are read in order (indented ones, inside list items, too); the
  first is the set-up block (`make run`, then the lines that set up a shell). A block whose
  first line is a `# needs ...` comment (a GPU or TPU, a network, a download) is skipped.
- They run in a copy of the checkout's files (`CHECKOUT`) with a `.venv` that sees the packages
  of the environment the suite runs in, the one `make` installed (`make_venv`), and `make` runs
  with `-o .venv/.installed`, so it installs nothing. Whatever a block installs goes into that
  `.venv`, never into the suite's environment.
- Each block runs in a new `bash -e` with a newcomer's environment (the PATH without the
  suite's environment, a fresh HOME), after the set-up block's `.` and `export` lines. Three
  variables keep the runs short and equal on every host: JAX_PLATFORMS=cpu, one persistent
  compilation cache for all blocks, and the suite's fast-compilation XLA_FLAGS
  (`tests/xla_flags.py`), which a command that sets XLA_FLAGS itself keeps.
- Tiny sizes (`TINY`, 10 steps of a small model): each `moe_jax.train` command gets them as
  `--config.KEY=VALUE` after its own, each `experiments.sweep` as `--set KEY=VALUE` after its
  own, and `make run` as `TRAIN_FLAGS`, with `MAKE_RUN_STEPS`; `make test` runs as
  `make -n test`, since the suite cannot run inside itself.
Then the README's `generate` command, on the tiny run of `make run`, must print text made of
the training corpus's characters.
"""

import gzip
import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from xla_flags import flags_with_devices

ROOT = Path(__file__).resolve().parents[1]
CHECKOUT = ("Makefile", "setup.py", "pyproject.toml", "constraints.txt", "README.md")
CHECKOUT_DIRS = ("moe_jax", "configs", "experiments")
SKIP_MARKER = "# needs "
# a small model; seq_len stays 128, the prompt plus the new tokens of the generate example
TINY = {
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.head_dim": 16,
    "model.d_ff": 64,
    "model.num_layers": 2,
    "train.batch_size": 8,
    "train.num_steps": 10,
    "train.warmup_steps": 2,
    "train.eval_steps": 1,
}
# `make run` trains the model the generate example reads: 100 steps are what it needs to write
# only the corpus's characters
MAKE_RUN_STEPS = 100
BLOCK_TIMEOUT = 600
REPORT_START = re.compile(r"^\d+ tokens, mean loss", re.M)  # routing_report's first line


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash blocks of markdown `text`, in order, without their indentation."""
    blocks, body, indent = [], None, ""
    for line in text.splitlines():
        stripped = line.lstrip(" ")
        if body is None and stripped == "```bash":
            body, indent = [], line[: len(line) - len(stripped)]
        elif body is not None and line == indent + "```":
            blocks.append("\n".join(body) + "\n")
            body = None
        elif body is not None:
            body.append(line.removeprefix(indent))
    return blocks


def commands(block: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    return block.replace("\\\n", " ").splitlines()


def tiny_flags(**settings) -> str:
    return " ".join(f"--config.{key}={value}" for key, value in {**TINY, **settings}.items())


def at_tiny_size(command: str) -> str:
    """`command` at the tiny sizes of the module docstring."""
    if re.match(r"make\b", command):
        target = command.split("#")[0].split()[1:]
        if target == ["test"]:
            return "make -n test"
        flags = tiny_flags(**{"train.num_steps": MAKE_RUN_STEPS})
        extra = f" TRAIN_FLAGS={shlex.quote(flags)}" if target == ["run"] else ""
        return f"make -o .venv/.installed {' '.join(target)}{extra}"
    command = re.sub(r"^XLA_FLAGS=(\S+)", r'XLA_FLAGS="$XLA_FLAGS \1"', command)
    if "-m moe_jax.train" in command:
        assert " #" not in command, f"a comment would swallow the tiny flags: {command}"
        return f"{command} {tiny_flags()}"
    if "-m experiments.sweep" in command:
        assert " #" not in command, f"a comment would swallow the tiny flags: {command}"
        return command + "".join(f" --set {key}={value}" for key, value in TINY.items())
    return command


def newcomer_environment(home: Path, cache: Path) -> dict[str, str]:
    """A new shell's variables: no virtual environment on the PATH (the README activates it)."""
    venv_bins = {
        os.path.join(prefix, "bin") for prefix in (sys.prefix, os.environ.get("VIRTUAL_ENV", ""))
    }
    path = [entry for entry in os.environ["PATH"].split(os.pathsep) if entry not in venv_bins]
    return {
        "PATH": os.pathsep.join(path),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "XLA_FLAGS": flags_with_devices(None),
    }


def run_block(block: str, prefix: str, checkout: Path, env: dict) -> subprocess.CompletedProcess:
    script = prefix + "\n".join(at_tiny_size(command) for command in commands(block)) + "\n"
    done = subprocess.run(
        ["bash", "-e", "-c", script],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    assert done.returncode == 0, f"README block\n{block}failed:\n{done.stderr[-4000:]}"
    return done


def make_venv(path: Path) -> None:
    """A virtual environment at `path` whose Python imports the packages of the one running the
    suite (a `.pth` file adds its site directories) and installs into `path` only; `ruff`, the
    one program of the test extra the Makefile runs, is linked in."""
    venv.EnvBuilder(with_pip=False).create(path)
    (site_packages,) = path.glob("lib/python*/site-packages")
    directories = ", ".join(repr(directory) for directory in site.getsitepackages())
    (site_packages / "suite_packages.pth").write_text(
        f"import site; list(map(site.addsitedir, ({directories},)))\n"
    )
    ruff = shutil.which("ruff", path=os.path.join(sys.prefix, "bin"))
    if ruff:
        os.symlink(ruff, path / "bin" / "ruff")


def corpus_alphabet() -> set[str]:
    path = ROOT / "moe_jax" / "corpora" / "tinyshakespeare.txt.gz"
    return set(gzip.decompress(path.read_bytes()).decode("utf-8"))


def test_readme_bash_blocks_run_as_printed_after_the_set_up(tmp_path):
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in CHECKOUT:
        shutil.copy2(ROOT / name, checkout / name)
    for name in CHECKOUT_DIRS:
        ignored = shutil.ignore_patterns("__pycache__", "figures")
        shutil.copytree(ROOT / name, checkout / name, ignore=ignored)
    make_venv(checkout / ".venv")
    env = newcomer_environment(tmp_path, tmp_path / "jax_cache")

    set_up, *blocks = bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))
    assert commands(set_up)[0].split("#")[0].split() == ["make", "run"], set_up
    run_block(set_up, "", checkout, env)
    prefix = "".join(
        command + "\n" for command in commands(set_up) if command.startswith((". ", "export "))
    )
    assert ". .venv/bin/activate" in prefix
    (tunables,) = re.findall(r"^CPU_TUNABLES := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert f"export GLIBC_TUNABLES={tunables}\n" in prefix  # what `make run` sets on a CPU
    ran, generated = 0, None
    for block in blocks:
        if block.startswith(SKIP_MARKER):
            continue
        done = run_block(block, prefix, checkout, env)
        ran += 1
        if "moe_jax.generate --workdir=runs/switch_tiny" in block:
            generated = REPORT_START.split(done.stdout)[0]
    assert ran >= 6, ran  # CPU exports, training, 8 devices, generate/score, sweep, development
    assert generated is not None and generated.startswith("ROMEO:"), generated
    text = generated.removeprefix("ROMEO:")
    assert len(text) > 50 and set(text) <= corpus_alphabet(), text
