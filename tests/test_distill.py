"""Distillation (moe_jax.distill): the soft-target loss on hand-computed cases, a student trained
on the teacher's soft targets alone moves toward the teacher, alpha = 0 is plain training bit for
bit, bad settings are refused before anything is written, and the CLI trains and resumes."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import TINY_TRAINING, configured
from xla_flags import flags_with_devices

from moe_jax import data, distill, train
from moe_jax.config import default_config
from moe_jax.steps import forward, soft_cross_entropy

DEVICES = jax.devices()[:1]


def tiny(**overrides):
    """A tiny decoder-only config; `overrides` use '__' for '.' in keys."""
    settings = {
        **TINY_TRAINING,
        "train.num_steps": 8,
        "train.eval_every": 0,
        "train.checkpoint_every": 100,
    }
    return configured(default_config(), settings, overrides)


def student(**overrides):
    return tiny(moe__num_experts=0, **overrides)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny top-1 MoE trained for 30 steps."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    train.run(tiny(train__num_steps=30), workdir, devices=DEVICES)
    return workdir


def test_soft_cross_entropy_hand_computed():
    teacher = jnp.log(jnp.array([[[1.0, 3.0]]]))  # soft targets [1/4, 3/4]
    student = jnp.zeros((1, 1, 2))  # [1/2, 1/2]
    cross_entropy, kl = soft_cross_entropy(student, teacher, 1.0)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(cross_entropy, [[math.log(2)]], rtol=1e-6)
    np.testing.assert_allclose(kl, [[math.log(2) - entropy]], rtol=1e-6)
    # temperature 2: the soft targets are softmax(log([1, 3]) / 2), i.e. [1, sqrt 3] / (1 + sqrt 3)
    _, kl = soft_cross_entropy(student, teacher, 2.0)
    p = np.array([1.0, math.sqrt(3)]) / (1 + math.sqrt(3))
    np.testing.assert_allclose(kl, [[np.sum(p * np.log(p / 0.5))]], rtol=1e-6)
    _, same = soft_cross_entropy(teacher, teacher, 1.0)
    np.testing.assert_allclose(same, [[0.0]], atol=1e-7)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """The student trained alone: `(workdir, RunResult)`."""
    workdir = str(tmp_path_factory.mktemp("plain"))
    return workdir, train.run(student(), workdir, devices=DEVICES)


def kl_to_teacher(teacher_dir: str, student_dir: str) -> float:
    """Token-mean KL(teacher || student) on a validation batch, computed here in NumPy."""
    teacher_config, teacher_model, _ = train.restore_for_inference(teacher_dir)
    student_config, student_model, _ = train.restore_for_inference(student_dir)
    batch = data.dataset_from_config(student_config, "validation").batch(0)
    t_logits, _, _, weights = forward(teacher_model, batch, teacher_config, deterministic=True)
    s_logits, *_ = forward(student_model, batch, student_config, deterministic=True)
    t_log = np.asarray(jax.nn.log_softmax(t_logits.astype(jnp.float32)))
    s_log = np.asarray(jax.nn.log_softmax(s_logits.astype(jnp.float32)))
    per_token = (np.exp(t_log) * (t_log - s_log)).sum(-1)
    return float((per_token * weights).sum() / weights.sum())


def test_soft_targets_alone_move_the_student_toward_the_teacher(teacher_dir, plain_run, tmp_path):
    plain, soft = plain_run[0], str(tmp_path / "soft")
    config = distill.distill_config(student(), teacher_dir, alpha=1.0, temperature=1.0)
    train.run(config, soft, devices=DEVICES)
    plain_kl, soft_kl = kl_to_teacher(teacher_dir, plain), kl_to_teacher(teacher_dir, soft)
    assert soft_kl < 0.9 * plain_kl, (soft_kl, plain_kl)
    with open(os.path.join(soft, "metrics.jsonl"), encoding="utf-8") as file:
        logged = [json.loads(line)["distill_kl"] for line in file]
    assert logged[-1] < 0.5 * logged[0]
    assert logged[-1] == pytest.approx(soft_kl, rel=0.5)  # the logged KL is the one measured here


def test_alpha_zero_is_plain_training(teacher_dir, plain_run, tmp_path):
    # The two programs differ (one also runs the teacher), so XLA may round their shared part
    # differently: equal to float32 rounding, not bit for bit.
    plain = plain_run[1].state
    config = distill.distill_config(student(), teacher_dir, alpha=0.0, temperature=2.0)
    hard = train.run(config, str(tmp_path / "hard"), devices=DEVICES).state
    for want, got in zip(jax.tree.leaves(plain.params), jax.tree.leaves(hard.params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"alpha": 1.5}, "distill.alpha=1.5 must be in"),
        ({"temperature": 0.0}, "distill.temperature=0.0 must be > 0"),
        ({"teacher": "missing"}, "has no config.json"),
        ({"vocab_size": 512}, "model.vocab_size=384"),
    ],
)
def test_bad_settings_are_refused_before_writing(teacher_dir, tmp_path, change, message):
    config = student(model__vocab_size=change.get("vocab_size", 384))
    config = distill.distill_config(
        config,
        str(tmp_path / change["teacher"]) if "teacher" in change else teacher_dir,
        alpha=change.get("alpha", 0.5),
        temperature=change.get("temperature", 1.0),
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        train.run(config, str(out), devices=DEVICES)
    assert not out.exists()


def test_cli_distils_and_a_resume_must_keep_the_distillation(teacher_dir, tmp_path):
    workdir = str(tmp_path / "cli")
    overrides = [f"--config.{key}={value}" for key, value in TINY_TRAINING.items()]
    command = [
        sys.executable,
        "-m",
        "moe_jax.distill",
        f"--teacher={teacher_dir}",
        "--config=configs/dense.py:tiny",
        f"--workdir={workdir}",
        "--alpha=0.5",
        *overrides,
        "--config.moe.num_experts=0",
        "--config.train.eval_every=0",
        "--config.train.num_steps=3",
    ]
    env = {**os.environ, "XLA_FLAGS": flags_with_devices(1)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        assert [json.loads(line)["step"] for line in file] == [1, 2, 3]
    config = train.config_from_workdir(workdir)
    assert config.distill.to_dict() == {"teacher": teacher_dir, "alpha": 0.5, "temperature": 1.0}
    config.unlock()
    config.distill.alpha = 0.25
    with pytest.raises(ValueError, match=r"distill.alpha: 0.5 \(checkpoint\) vs 0.25"):
        train.run(config, workdir, devices=DEVICES)
