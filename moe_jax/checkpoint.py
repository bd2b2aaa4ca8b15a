"""Checkpoints of a training run, written by orbax's `CheckpointManager`.

A checkpoint `WORKDIR/checkpoints/<step>/` holds three items:

- `state`: the train state pytree (step, parameters, non-trainable model state, optimizer
  state), saved with `StandardSave` and restored onto the shardings of a target pytree;
- `data`: the data pipeline's position (JSON), so a resumed run reads the batches an
  uninterrupted run would have read;
- `signature`: the run's identity (JSON): the whole resolved config and every state leaf's
  shape. It is written with the step, so each checkpoint says which run it belongs to.

`Checkpoints.restore_parts` reads a part of the state only (the leaves not marked `SKIP`): the
inference reader (`moe_jax.train_state.restore_for_inference`) skips the step and the optimizer
state, whose moments are twice the parameters' size under Adam.

`config_changes` compares a stored identity with the current run's and returns the keys that
differ; `moe_jax.train` refuses to resume when any of them is not in its list of keys that may
change. A step directory that cannot be read raises `UnreadableCheckpoint`, a short message
naming the step and why (empty, not a moe_jax checkpoint, or the storage error's first line).
When orbax's concurrent reads fail, the reads still in flight report to an event loop orbax has
already closed, each printing a traceback, during the read or seconds later; `_reads` drops
that noise, so the short message is all a user sees.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one. Saves are
asynchronous; `wait` blocks until the last one is on disk.
"""

import contextlib
import io
import json
import logging
import os
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data", "signature")
SKIP = ocp.PLACEHOLDER  # a leaf of a `Checkpoints.restore_parts` target that is not read
ABSENT = "<absent>"  # the value `config_changes` reports for a key one side lacks
_ERROR_CHARS = 300  # storage errors quote whole tensorstore specs; the start says what failed


class UnreadableCheckpoint(ValueError):
    """A step directory that holds no readable checkpoint; `str()` names the step and why."""

    def __init__(self, step: int, path: str, reason: str):
        super().__init__(f"checkpoint step {step} ({path}) {reason}")
        self.step = step


def _shape_string(leaf) -> str:
    """`'float32[4, 8]'` for an array or `jax.ShapeDtypeStruct`."""
    return f"{np.dtype(leaf.dtype).name}{list(leaf.shape)}"


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values (tuples become lists), as a checkpoint stores it."""
    return json.loads(config.to_json_best_effort())


def make_signature(config: ml_collections.ConfigDict, abstract_state) -> dict:
    """The run's identity a checkpoint stores: the resolved config and the state's shapes."""
    leaves = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    return {
        "config": config_dict(config),
        "shapes": {jax.tree_util.keystr(path): _shape_string(leaf) for path, leaf in leaves},
    }


def config_changes(stored: dict, current: dict) -> dict[str, tuple]:
    """`{key: (stored value, current value)}` for each dotted config key that differs.

    Checkpoints written before whole configs were stored hold some sections only; the keys of
    the other sections are not compared.
    """
    old, new = (flatten_dict(side["config"], sep=".") for side in (stored, current))
    sections = {key.split(".")[0] for key in old}
    keys = sorted(key for key in set(old) | set(new) if key.split(".")[0] in sections)
    return {
        key: (old.get(key, ABSENT), new.get(key, ABSENT))
        for key in keys
        if old.get(key, ABSENT) != new.get(key, ABSENT)
    }


def _short(error: BaseException) -> str:
    text = str(error).split(" [tensorstore_spec")[0].strip() or type(error).__name__
    return text if len(text) <= _ERROR_CHARS else text[:_ERROR_CHARS] + " ..."


class _DropOrphanedReads(logging.Filter):
    """Drops asyncio's reports of orbax's orphaned reads, and only those.

    The orphaned reads are asyncio tasks and futures; asyncio logs "Task exception was never
    retrieved", "Future exception was never retrieved" or "Task was destroyed but it is
    pending!" for them, naming an orbax coroutine or quoting a tensorstore spec. They report
    when they are garbage collected, which can be long after the failed restore returned, so
    this filter stays on the `asyncio` logger once installed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("orbax" in message or "tensorstore_spec" in message)


_DROP_ORPHANED_READS = _DropOrphanedReads()


def _drop_closed_loop_reports() -> None:
    """Makes `sys.unraisablehook` drop "Event loop is closed" from here on (the hook is kept).

    Orbax's orphaned reads finish on tensorstore's threads and schedule their results on the
    event loop orbax closed; Python reports each such RuntimeError through the hook. Nothing
    says which loop a report came from, so this is installed only once a read has failed.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _reads(step: int, path: str):
    """Runs an orbax read of checkpoint `step`; a failure raises UnreadableCheckpoint.

    While the read runs, `sys.stderr` is held back. On success what it caught is written out
    unchanged; on failure it is the noise of reads that finished after orbax closed their event
    loop and is dropped, and so are the reports still to come: "Event loop is closed" by
    `_drop_closed_loop_reports`, and what asyncio logs of the orphaned tasks and futures
    whenever they are collected, by `_DROP_ORPHANED_READS`.
    """
    held_back = io.StringIO()
    stderr, sys.stderr = sys.stderr, held_back
    try:
        yield
    except Exception as error:  # any storage error: name the step
        logging.getLogger("asyncio").addFilter(_DROP_ORPHANED_READS)  # adding twice adds once
        _drop_closed_loop_reports()
        raise UnreadableCheckpoint(step, path, f"is unreadable: {_short(error)}") from None
    else:
        stderr.write(held_back.getvalue())
    finally:
        sys.stderr = stderr


class Checkpoints:
    """Saves and restores train states under `directory` (keeps the last `keep`)."""

    def __init__(self, directory: str, *, keep: int, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        # a reader creates and cleans nothing and never saves (orbax's own read_only option
        # would log two warnings per opening)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _check_items(self, step: int) -> None:
        """Raises UnreadableCheckpoint for an empty or foreign step directory."""
        path = self.step_path(step)
        entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
        if not entries:
            raise UnreadableCheckpoint(step, path, "is empty: it is not a checkpoint")
        if not set(ITEMS) <= set(entries):
            raise UnreadableCheckpoint(
                step,
                path,
                f"is not a moe_jax checkpoint: it holds {', '.join(entries[:8])}, not the items "
                f"{', '.join(ITEMS)}",
            )

    def read_identity(self, step: int) -> dict:
        """The `signature` (run identity) stored with checkpoint `step`."""
        self._check_items(step)
        with _reads(step, self.step_path(step)):
            restored = self._manager.restore(
                step, args=ocp.args.Composite(signature=ocp.args.JsonRestore())
            )
        return restored.signature

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
        self._check_items(step)
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        with _reads(step, self.step_path(step)):
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
        return restored.state, restored.data

    def restore_parts(self, step: int, target_state):
        """The state of checkpoint `step`, read only where `target_state` holds a
        `jax.ShapeDtypeStruct` (with `.sharding`): a leaf given as `SKIP` is never read from
        storage and comes back as `SKIP` (orbax's restore with placeholders). The target must
        have the checkpoint's whole tree structure, as for `restore`."""
        self._check_items(step)
        restore_args = ocp.checkpoint_utils.construct_restore_args(target_state)
        with _reads(step, self.step_path(step)):
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(target_state, restore_args=restore_args)
                ),
            )
        return restored.state

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
