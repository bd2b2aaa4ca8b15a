"""Checkpoint round trips, retention, incomplete saves and the model-compatibility check."""

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax.checkpoint import Checkpoints, make_signature
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


def test_incompatible_model_is_refused_with_the_differing_key(tmp_path):
    config = default_config()
    state = _state(width=4)
    directory = str(tmp_path / "ckpt")
    checkpoints = Checkpoints(directory, keep=1)
    checkpoints.save(1, state, {}, make_signature(config, state))
    checkpoints.close()
    reader = Checkpoints(directory, keep=1, read_only=True)
    reader.check_compatible(make_signature(config, state))  # same model: accepted
    other = default_config()
    other.model.d_model = 64
    with pytest.raises(ValueError, match=r"model\.d_model: 128 \(checkpoint\) vs 64") as error:
        reader.check_compatible(make_signature(other, _state(width=8)))
    assert "new --workdir" in str(error.value)
