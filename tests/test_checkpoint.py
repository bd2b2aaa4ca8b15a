"""Checkpoint round trips, retention, incomplete saves, the stored run identity, damaged steps."""

import asyncio
import gc
import os
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.checkpoint import Checkpoints, UnreadableCheckpoint, config_changes, make_signature
from moe_jax.config import default_config


def _state(width=4, step=0):
    params = {"kernel": jnp.arange(3.0 * width).reshape(3, width), "scale": jnp.ones(width)}
    optimizer = optax.adamw(1e-3)
    return {"step": jnp.asarray(step), "params": params, "opt_state": optimizer.init(params)}


def test_round_trip_keeps_last_n_and_data_position(tmp_path):
    config = default_config()
    state = _state()
    signature = make_signature(config, state)
    checkpoints = Checkpoints(str(tmp_path / "ckpt"), keep=2)
    for step in (1, 2, 3):
        saved = dict(state, step=jnp.asarray(step))
        checkpoints.save(step, saved, {"position": step * 10}, signature)
    checkpoints.wait()
    assert checkpoints.all_steps() == [2, 3]
    restored, data_state = checkpoints.restore(3, state)
    checkpoints.close()
    assert data_state == {"position": 30}
    assert int(restored["step"]) == 3
    np.testing.assert_array_equal(restored["params"]["kernel"], state["params"]["kernel"])
    assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)


def test_incomplete_save_is_not_the_latest(tmp_path):
    # A process killed mid-save leaves orbax's temporary directory behind; it must not count.
    config = default_config()
    state = _state()
    directory = str(tmp_path / "ckpt")
    checkpoints = Checkpoints(directory, keep=3)
    checkpoints.save(4, state, {"position": 4}, make_signature(config, state))
    checkpoints.close()
    partial = os.path.join(directory, "8.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(partial, "state"))
    assert Checkpoints(directory, keep=3, read_only=True).latest_step() == 4
    assert Checkpoints(directory, keep=3).latest_step() == 4


def test_identity_is_the_whole_config_and_changes_name_both_values(tmp_path):
    config = default_config()
    state = _state(width=4)
    directory = str(tmp_path / "ckpt")
    checkpoints = Checkpoints(directory, keep=1)
    checkpoints.save(1, state, {}, make_signature(config, state))
    checkpoints.close()
    stored = Checkpoints(directory, keep=1, read_only=True).read_identity(1)
    assert config_changes(stored, make_signature(config, state)) == {}
    other = default_config()
    other.moe.router, other.train.batch_size = "gshard_top2", 32
    other.mesh.rules.batch = ("data",)
    assert config_changes(stored, make_signature(other, state)) == {
        "mesh.rules.batch": (["data", "expert"], ["data"]),
        "moe.router": ("tokens_choose", "gshard_top2"),
        "train.batch_size": (16, 32),
    }


def _saved(tmp_path):
    config = default_config()
    state = _state()
    directory = str(tmp_path / "ckpt")
    checkpoints = Checkpoints(directory, keep=3)
    for step in (1, 2):
        checkpoints.save(step, state, {"position": step}, make_signature(config, state))
    checkpoints.close()
    return directory, state


def test_empty_and_foreign_step_directories_are_named_as_such(tmp_path):
    directory, _ = _saved(tmp_path)
    os.makedirs(os.path.join(directory, "999"))
    os.makedirs(os.path.join(directory, "1000", "weights"))
    reader = Checkpoints(directory, keep=3, read_only=True)
    assert reader.all_steps() == [1, 2, 999, 1000]
    with pytest.raises(UnreadableCheckpoint, match=r"step 999 \(.*999\) is empty"):
        reader.read_identity(999)
    with pytest.raises(UnreadableCheckpoint, match="step 1000 .* not a moe_jax checkpoint"):
        reader.read_identity(1000)
    assert reader.read_identity(2)["config"]["moe"]["k"] == 1


def test_truncated_step_gives_a_short_error_naming_it(tmp_path):
    directory, state = _saved(tmp_path)
    manifest = os.path.join(directory, "2", "state", "manifest.ocdbt")
    with open(manifest, "r+b") as file:
        file.truncate(os.path.getsize(manifest) // 2)
    reader = Checkpoints(directory, keep=3, read_only=True)
    with pytest.raises(UnreadableCheckpoint, match=r"step 2 \(.*\) is unreadable: ") as error:
        reader.restore(2, state)
    assert error.value.step == 2 and len(str(error.value)) < 600
    restored, data_state = reader.restore(1, state)
    assert data_state == {"position": 1}


class _RaisesWhenDeleted:
    """Its `__del__` raises `error`, which Python reports through `sys.unraisablehook`."""

    def __init__(self, error: Exception):
        self.error = error

    def __del__(self):
        raise self.error


def test_failed_concurrent_reads_print_nothing(tmp_path, capfd, caplog, monkeypatch):
    # orbax reads the leaves concurrently; when one read fails it closes its event loop while
    # the others are in flight, and those used to print "Event loop is closed" tracebacks and
    # "Task/Future exception was never retrieved" errors, a different number each time. The
    # tracebacks go through sys.unraisablehook, which pytest replaces: put Python's back.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    state = {f"leaf_{index}": jnp.full((8, 8), float(index)) for index in range(200)}
    checkpoints = Checkpoints(str(tmp_path), keep=3)
    checkpoints.save(1, state, {"position": 1}, {"run": 1})
    checkpoints.close()
    manifest = os.path.join(str(tmp_path), "1", "state", "manifest.ocdbt")
    with open(manifest, "r+b") as file:
        file.truncate(os.path.getsize(manifest) // 2)
    reader = Checkpoints(str(tmp_path), keep=3, read_only=True)
    for _ in range(3):
        with pytest.raises(UnreadableCheckpoint, match="step 1 .* is unreadable"):
            reader.restore(1, state)
    gc.collect()
    time.sleep(0.5)
    out, err = capfd.readouterr()
    assert err == "" and out == ""
    assert not [record for record in caplog.records if record.name == "asyncio"]
    # Reports that come later still go (they came up to seconds later on a loaded machine);
    # any other unraisable exception is still printed.
    _RaisesWhenDeleted(RuntimeError("Event loop is closed"))
    assert capfd.readouterr().err == ""
    _RaisesWhenDeleted(ValueError("a bug of someone else"))
    assert "ValueError: a bug of someone else" in capfd.readouterr().err
    # Orphaned futures report too, quoting the failed read's tensorstore spec; others still log.
    caplog.clear()
    _unretrieved_future(ValueError("DATA_LOSS: Error reading [tensorstore_spec='{}']"))
    assert not [record for record in caplog.records if record.name == "asyncio"]
    _unretrieved_future(ValueError("a future of someone else"))
    assert [record.getMessage() for record in caplog.records] == [
        "Future exception was never retrieved\nfuture: <Future finished exception="
        "ValueError('a future of someone else')>"
    ]


def _unretrieved_future(error: Exception) -> None:
    """Makes asyncio log "Future exception was never retrieved" for `error`, as orbax's do."""
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(error)
    loop.close()
    del future
    gc.collect()
