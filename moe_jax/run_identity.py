"""A run's identity: what a resume may change, the schedule's horizon, and the run history.

Every checkpoint stores the run's resolved config (`moe_jax.checkpoint`). Resuming compares it
with the config of the command that resumes: the keys of `RESUMABLE_KEYS` and those under
`RESUMABLE_PREFIXES` may differ (how often to log, evaluate and save, how many steps to train,
where the data lives, how the devices are laid out, whether evaluation runs dropless: it changes
no update, and each eval line of metrics.jsonl says which routing it used), and any other
difference refuses the resume, naming every differing key with both values. A key that only
one side has (the code added or removed a config key since the checkpoint was written) does not
refuse; it is reported with the other changes.

Schedule horizon. `train.schedule_steps` is the step count the learning-rate schedule is laid
over (the end of the cosine decay); 0 means `train.num_steps` of the run's first start, and the
resolved number is stored. A resume that leaves it at 0 keeps the stored horizon, so raising
`train.num_steps` continues the stored schedule: past its horizon the cosine schedule holds its
final value, and the learning rate never jumps. Setting it explicitly to another number is a
different run and is refused like any other key.

Each start appends one JSON line to `WORKDIR/run_history.jsonl`: the time, whether the run
started or resumed, the step, the keys that changed (`{key: [before, now]}`), and the installed
versions of the libraries its numbers depend on (`library_versions`).
"""

import contextlib
import datetime
import importlib.metadata
import json
import os
import shlex

import ml_collections

from moe_jax import checkpoint, data

HISTORY_FILE = "run_history.jsonl"
RESUMABLE_KEYS = frozenset(
    {
        "train.num_steps",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.eval_every",
        "train.eval_steps",
        "train.eval_dropless",
        "data.download",
        "data.data_dir",
    }
)
RESUMABLE_PREFIXES = ("mesh.",)
# the distributions whose versions a run's results depend on, as pip names them; transformers
# and torch (Hugging Face interop) and libtpu (TPU hosts) are recorded where installed
LIBRARIES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "qwix",
    "numpy",
    "transformers",
    "torch",
    "libtpu",
)


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `train.schedule_steps` resolved (0 -> `train.num_steps`), and
    `data.corpus` set to what identifies a corpus beyond its name (`data.corpus_facts`: for
    'python_stdlib' the Python version and the files and bytes per split), so that config.json
    records it and a resume on another Python's standard library is refused."""
    config = config.copy_and_resolve_references()
    if not config.train.schedule_steps:
        config.train.schedule_steps = config.train.num_steps
    corpus = data.corpus_facts(config.data.name)
    if corpus is not None:
        with config.unlocked():
            config.data.corpus = corpus
    return config


def keep_stored_horizon(
    config: ml_collections.ConfigDict, requested: int, stored: dict
) -> ml_collections.ConfigDict:
    """`config` with the stored schedule horizon when the command left it at 0 (`requested`)."""
    if requested == 0:
        train = stored["config"].get("train", {})
        horizon = train.get("schedule_steps") or train.get("num_steps")
        if horizon:
            config.train.schedule_steps = int(horizon)
    return config


def resumable(key: str) -> bool:
    return key in RESUMABLE_KEYS or key.startswith(RESUMABLE_PREFIXES)


def check_resume(stored: dict, current: dict, step: int, directory: str) -> dict:
    """The allowed changes `{key: (stored, now)}`; raises ValueError naming every other one."""
    changes = checkpoint.config_changes(stored, current)
    refused = {
        key: values
        for key, values in changes.items()
        if not resumable(key) and checkpoint.ABSENT not in values
    }
    refused_keys = bool(refused)  # config keys; else the shapes, below, may differ
    if not refused and stored["shapes"] != current["shapes"]:
        old, new = stored["shapes"], current["shapes"]
        refused = {
            path: (old.get(path), new.get(path))
            for path in sorted(set(old) | set(new))
            if old.get(path) != new.get(path)
        }
    if refused:
        lines = [
            f"{key}: {old!r} (checkpoint) vs {new!r} (this run)"
            for key, (old, new) in refused.items()
        ]
        raise ValueError(
            f"The checkpoints in {directory} (latest step {step}) belong to a different run:\n  "
            + "\n  ".join(lines)
            + "\nRun with the checkpoint's settings to resume it (its config.json), or use a new "
            "--workdir. A resume may change only: "
            + ", ".join(sorted(RESUMABLE_KEYS))
            + ", and mesh.*."
            + (_converted_run_hint(stored, refused) if step == 0 and refused_keys else "")
        )
    return changes


def resume_message(step: int, num_steps: int, changes: dict) -> str:
    """The line a resume from `step` prints: the step and the allowed `changes`, or, for a run
    already at `num_steps`, that there is nothing to train and how to train further."""
    shown = ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
    if step >= num_steps:
        return (
            f"the run is already at step {step} of train.num_steps={num_steps}: nothing to train; "
            f"raise it to train further, e.g. --config.train.num_steps={2 * num_steps} (the "
            "learning-rate schedule keeps its horizon)"
        )
    return f"resuming from step {step} of {num_steps}" + (f" with {shown}" if changes else "")


def _converted_run_hint(stored: dict, refused: dict) -> str:
    """For a step-0 checkpoint `moe_jax.convert --hf=DIR` wrote, a line with the convert
    command that writes it with this run's `refused` settings (convert takes `--config`
    overrides); empty for other runs."""
    source = stored["config"].get("train", {}).get("init_from", "")
    if not source.startswith("hf:"):
        return ""
    hf_dir = shlex.quote(source.removeprefix("hf:"))
    overrides = " ".join(shlex.quote(f"--config.{key}={new}") for key, (_, new) in refused.items())
    return (
        f"\nStep 0 is what moe_jax.convert wrote from {hf_dir} with the settings of its --config "
        "(configs/hf.py:DIR unless given); convert again with this run's settings, into a new "
        f"workdir, and train that: python -m moe_jax.convert --hf={hf_dir} "
        f"--workdir=NEW_WORKDIR --config=configs/hf.py:{hf_dir} {overrides}"
    )


def library_versions() -> dict[str, str]:
    """`{distribution: version}` of each of `LIBRARIES` that is installed."""
    versions = {}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def append_history(workdir: str, step: int, changes: dict, *, resumed: bool) -> None:
    """Appends one line to `WORKDIR/run_history.jsonl`: a start, or a resume from `step`."""
    record = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "event": "resume" if resumed else "start",
        "step": step,
        "changed": {key: list(values) for key, values in changes.items()},
        "versions": library_versions(),
    }
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
