"""Distillation of a trained model (e.g. an MoE) into a student (e.g. dense): a training run.

    python -m moe_jax.distill --teacher=runs/switch --config=configs/dense.py:tiny \\
        --workdir=runs/distilled --alpha=0.25 --temperature=1.0

Switch Transformer Sec. 5 (Fedus et al. 2022, Table 6) distils sparse T5 models into dense ones
with the loss `(1 - alpha) * CE(data) + alpha * CE(teacher's soft targets)`, alpha = 0.25, and
keeps about 30% of the sparse model's quality gain over the dense baseline. Here the student is
any `--config` (usually dense) and the teacher the latest checkpoint of a `moe_jax.train`
workdir, frozen and run deterministically (eval mode: no jitter or dropout, the eval capacity
factor) inside each train step. The soft targets are `softmax(teacher_logits / temperature)`
and their term is scaled by `temperature**2` (Hinton et al. 2015), so temperature 1 is the
loss above. Evaluation reports the student's cross-entropy on the data.

The flags set `config.distill` (teacher as an absolute path, alpha, temperature); the run is
`moe_jax.train.run`, so it logs, checkpoints and resumes like any run: the same command again
(or `python -m moe_jax.train` with the workdir's config) continues it, and a resume that
changes the teacher, alpha or temperature is refused like any other change of the run.
"""

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from moe_jax import cli, train


def distill_config(config, teacher: str, *, alpha: float, temperature: float):
    """A copy of the student's `config` that distils from the run in `teacher`."""
    config = config.copy_and_resolve_references()
    config.distill.teacher = os.path.abspath(teacher)
    config.distill.alpha = alpha
    config.distill.temperature = temperature
    return config


def _define_flags():
    config = config_flags.DEFINE_config_file("config", None, "The student's config.")
    flags.DEFINE_string("teacher", None, "The teacher's moe_jax.train workdir.")
    flags.DEFINE_string("workdir", None, "The student's run directory.")
    flags.DEFINE_float("alpha", 0.25, "Share of the soft-target term (Switch Table 6: 0.25).")
    flags.DEFINE_float("temperature", 1.0, "Softmax temperature of the soft targets.")
    cli.define_multihost_flags()
    flags.mark_flags_as_required(["config", "teacher", "workdir"])
    return config


def main(argv, config_flag) -> int:
    options = flags.FLAGS
    config = distill_config(
        config_flag.value, options.teacher, alpha=options.alpha, temperature=options.temperature
    )
    return train.run_command(argv, config, options.workdir)


if __name__ == "__main__":
    _config_flag = _define_flags()
    app.run(functools.partial(main, config_flag=_config_flag), flags_parser=cli.parse_flags)
