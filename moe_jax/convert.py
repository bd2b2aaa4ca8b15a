"""Convert between Hugging Face checkpoints and moe_jax training runs.

    # Hugging Face -> a run that moe_jax.train resumes (step 0: the checkpoint's weights)
    python -m moe_jax.convert --hf=/path/to/switch-base-8 --workdir=runs/switch8
    python -m moe_jax.train --config=configs/hf.py:/path/to/switch-base-8 --workdir=runs/switch8

    # the same with other training settings: give them to both commands
    python -m moe_jax.convert --hf=/path/to/switch-base-8 --workdir=runs/switch8_ts \
        --config=configs/hf.py:/path/to/switch-base-8 --config.data.name=tiny_shakespeare
    python -m moe_jax.train --config=configs/hf.py:/path/to/switch-base-8 \
        --workdir=runs/switch8_ts --config.data.name=tiny_shakespeare

    # a run's latest checkpoint -> Hugging Face (loads with transformers' from_pretrained)
    python -m moe_jax.convert --workdir=runs/switch8 --to_hf=/path/to/out

`--hf` takes the run's config from `--config` (default `configs/hf.py:DIR`, the checkpoint's
architecture with the default training settings) and writes `config.json` and an orbax
checkpoint of step 0 with `moe_jax.train.save_initial_checkpoint`; resume with the same
`--config` and overrides: step 0 already holds the run's identity (`moe_jax.run_identity`), so a
train command with other data or schedule settings is refused, with the convert command that
fits it. `--to_hf` reads the run's `config.json`, restores its latest checkpoint and writes
it with `moe_jax.hf.save` in the family `config.model.hf_model_type` (or `--model_type`).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from moe_jax import cli, hf, train
from moe_jax.hf.family import family_names, family_of


def hf_to_run(hf_dir: str, workdir: str, config=None, *, devices=None) -> str:
    """Writes the Hugging Face checkpoint `hf_dir` as step 0 of a run in `workdir` (over
    `devices`, default all)."""
    if config is None:
        config = hf.load_config(hf_dir)
    config = config.copy_and_resolve_references()
    config.train.init_from = f"hf:{hf_dir}"
    return train.save_initial_checkpoint(config, workdir, devices=devices)


def run_to_hf(workdir: str, hf_dir: str, model_type: str = "", **save_options) -> list[str]:
    """Writes the latest checkpoint of the run in `workdir` as a Hugging Face checkpoint."""
    config = train.config_from_workdir(workdir)
    if model_type:
        config.model.hf_model_type = model_type
    elif not config.model.hf_model_type:
        raise ValueError(
            f"--workdir={workdir} holds a run that did not start from a Hugging Face checkpoint "
            "(its config.json has no model.hf_model_type): name the family to write with "
            f"--model_type, one of {', '.join(family_names())}."
        )
    family_of(config)  # refuses an unknown family before restoring anything
    _, model, _ = train.restore_for_inference(workdir)
    return hf.save(config, model, hf_dir, **save_options)


def _define_flags():
    config = config_flags.DEFINE_config_file(
        "config", None, "Run config for --hf (default configs/hf.py:DIR)."
    )
    flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory to convert into --workdir.")
    flags.DEFINE_string("to_hf", None, "Directory to write --workdir's checkpoint to, HF layout.")
    flags.DEFINE_string("workdir", None, "moe_jax.train run directory.")
    flags.DEFINE_string("model_type", "", "HF family for --to_hf (default: the config's).")
    flags.DEFINE_integer("max_shard_bytes", 5 * 2**30, "Largest safetensors shard for --to_hf.")
    flags.mark_flags_as_required(["workdir"])
    return config


def run_tool(name: str, argv, write) -> int:
    """A checkpoint-writing CLI's body: `write()` returns what it wrote; bad input (ValueError,
    or FileNotFoundError for a workdir without a run) is reported as `name: message`, status 1."""
    cli.flag_values(argv)
    try:
        written = write()
    except (ValueError, FileNotFoundError) as error:
        sys.stderr.write(f"{name}: {error}\n")
        return 1
    print(f"wrote {written}", file=sys.stderr)
    return 0


def main(argv, config_flag) -> int:
    options = flags.FLAGS
    if bool(options.hf) == bool(options.to_hf):
        raise app.UsageError(
            "pass exactly one of --hf=DIR (HF -> run) and --to_hf=DIR (run -> HF)."
        )

    def write():
        if options.hf:
            return hf_to_run(options.hf, options.workdir, config_flag.value)
        return run_to_hf(
            options.workdir,
            options.to_hf,
            options.model_type,
            max_shard_bytes=options.max_shard_bytes,
        )

    return run_tool("moe_jax.convert", argv, write)


if __name__ == "__main__":
    _config_flag = _define_flags()
    app.run(lambda argv: main(argv, _config_flag), flags_parser=cli.parse_flags)
