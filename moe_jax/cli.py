"""What every moe_jax command (`train`, `distill`, `convert`, `generate`, `score`, `quantize`)
does before its own work."""

from absl import app, flags, logging


def flag_values(argv: list[str]) -> flags.FlagValues:
    """The parsed flags, after refusing positional arguments; logs at WARNING unless
    `--verbosity` is given, since orbax logs every checkpoint read and write at INFO."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    return flags.FLAGS
