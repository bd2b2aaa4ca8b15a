"""Checkpoints of a training run, written by orbax's `CheckpointManager`.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:

- `state`: the train state pytree (step, parameters, non-trainable model state, optimizer
  state), saved with `StandardSave` and restored onto the shardings of a target pytree;
- `data`: the data pipeline's position (JSON), so a resumed run reads the batches an
  uninterrupted run would have read;
- `signature`: the model and MoE config and every state leaf's shape (JSON). Before restoring,
  `check_compatible` compares it with the current run and refuses a workdir that holds a
  different model, naming the config keys that differ.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one. Saves are
asynchronous; `wait` blocks until the last one is on disk.
"""

import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINT_DIR = "checkpoints"
# The config sections that decide the shapes and meaning of the parameters.
MODEL_SECTIONS = ("model", "moe")


def _shape_string(leaf) -> str:
    """`'float32[4, 8]'` for an array or `jax.ShapeDtypeStruct`."""
    return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def make_signature(config: ml_collections.ConfigDict, abstract_state) -> dict:
    """What a checkpoint must match to be restored into this run (JSON-serialisable)."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return {
        "config": {section: config[section].to_dict() for section in MODEL_SECTIONS},
        "shapes": {jax.tree_util.keystr(path): _shape_string(leaf) for path, leaf in leaves},
    }


def _config_differences(stored: dict, current: dict) -> list[str]:
    """`'moe.num_experts: 4 (checkpoint) vs 8 (this run)'` for each differing key."""
    differences = []
    for section in MODEL_SECTIONS:
        old, new = stored.get(section, {}), current.get(section, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(
                    f"{section}.{key}: {old.get(key)!r} (checkpoint) vs {new.get(key)!r} (this run)"
                )
    return differences


class Checkpoints:
    """Saves and restores train states under `directory` (keeps the last `keep`)."""

    def __init__(self, directory: str, *, keep: int, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "signature")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def check_compatible(self, signature: dict) -> None:
        """Raises ValueError when the latest checkpoint holds a different model."""
        step = self.latest_step()
        if step is None:
            return
        stored = self._manager.restore(
            step, args=ocp.args.Composite(signature=ocp.args.JsonRestore())
        ).signature
        if stored["shapes"] == signature["shapes"]:
            return
        differences = _config_differences(stored["config"], signature["config"])
        if not differences:
            old, new = stored["shapes"], signature["shapes"]
            differences = [
                f"{path}: {old.get(path)} (checkpoint) vs {new.get(path)} (this run)"
                for path in sorted(set(old) | set(new))
                if old.get(path) != new.get(path)
            ][:10]
        raise ValueError(
            f"The checkpoints in {self.directory} (latest step {step}) hold a different model:\n  "
            + "\n  ".join(differences)
            + "\nUse a new --workdir, or run with the checkpoint's settings to resume it."
        )

    def save(self, step: int, state, data_state: dict, signature: dict) -> None:
        """Starts saving `state` at `step` (asynchronous; see `wait`)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                signature=ocp.args.JsonSave(signature),
            ),
            force=True,
        )

    def restore(self, step: int, target_state):
        """`(state, data_state)` of checkpoint `step`; `target_state` gives structure and
        shardings (arrays or `jax.ShapeDtypeStruct`s with `.sharding`)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
