"""What a resume may change (moe_jax.run_identity), on identities built from the default config."""

import json

import pytest

from moe_jax import checkpoint, run_identity, train
from moe_jax.config import default_config


def _identity(config):
    return {"config": checkpoint.config_dict(config), "shapes": {"params": "float32[2]"}}


def test_allowed_changes_pass_and_are_reported():
    stored = _identity(run_identity.resolve(default_config()))
    config = default_config()
    config.train.num_steps, config.train.log_every, config.mesh.expert = 400, 5, 2
    config = run_identity.keep_stored_horizon(run_identity.resolve(config), 0, stored)
    changes = run_identity.check_resume(stored, _identity(config), 100, "ckpt")
    assert changes == {
        "mesh.expert": (1, 2),
        "train.log_every": (10, 5),
        "train.num_steps": (200, 400),
    }
    assert config.train.schedule_steps == 200  # the stored horizon, not the new num_steps


def test_every_other_change_is_refused_and_named():
    stored = _identity(run_identity.resolve(default_config()))
    config = default_config()
    config.seed, config.moe.group_size, config.train.schedule_steps = 1, 512, 400
    with pytest.raises(ValueError) as error:
        run_identity.check_resume(stored, _identity(run_identity.resolve(config)), 100, "ckpt")
    message = str(error.value)
    for line in (
        "seed: 0 (checkpoint) vs 1 (this run)",
        "moe.group_size: 1024 (checkpoint) vs 512 (this run)",
        "train.schedule_steps: 200 (checkpoint) vs 400 (this run)",
    ):
        assert line in message
    assert "latest step 100" in message and "train.num_steps" in message


def test_a_key_added_to_the_config_since_the_checkpoint_does_not_refuse():
    stored = _identity(run_identity.resolve(default_config()))
    del stored["config"]["moe"]["bias_update_rate"]
    current = _identity(run_identity.resolve(default_config()))
    changes = run_identity.check_resume(stored, current, 100, "ckpt")
    assert changes == {"moe.bias_update_rate": (checkpoint.ABSENT, 0.001)}


@pytest.mark.parametrize("name", ["tiny_shakespeare", "python_stdlib"])
def test_config_json_loads_back_as_the_resolved_config(tmp_path, name):
    # python_stdlib records its corpus facts in data.corpus, a key default_config() lacks
    config = default_config()
    config.data.name = name
    config.mesh.rules.batch = ("data",)
    resolved = run_identity.resolve(config)
    (tmp_path / "config.json").write_text(resolved.to_json_best_effort(indent=2))
    loaded = train.config_from_workdir(str(tmp_path))
    assert loaded.to_dict() == resolved.to_dict()
    assert loaded.mesh.rules.batch == ("data",)  # JSON's list is a tuple again


def test_config_json_with_a_key_this_version_lacks_is_refused_by_name(tmp_path):
    stored = checkpoint.config_dict(run_identity.resolve(default_config()))
    stored["moe"]["expert_colour"] = "blue"
    (tmp_path / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match="config.json.*expert_colour"):
        train.config_from_workdir(str(tmp_path))
