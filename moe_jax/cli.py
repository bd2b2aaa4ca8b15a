"""What every moe_jax command (`train`, `distill`, `convert`, `upcycle`, `merge`, `generate`,
`score`, `quantize`, `aot`) does before its own work: parse the flags, pick the platform, and
the flags and checks of multi-host runs."""

import os
import sys

import jax
from absl import app, flags, logging

from moe_jax.config import check_config_overrides, resolve_config_argv
from moe_jax.tpu_chips import TPU_DEVICE_FILES

# Device files of an accelerator JAX can use: TPU, NVIDIA GPU (nvidiactl: also in containers),
# AMD GPU; the Makefile's test for a CPU host (its ALLOCATOR) reads the first three.
ACCELERATOR_DEVICE_FILES = (*TPU_DEVICE_FILES, "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")


def use_cpu_without_accelerator() -> bool:
    """Sets JAX's platform to the CPU on a host with none of `ACCELERATOR_DEVICE_FILES`, unless
    a platform is chosen already (`JAX_PLATFORMS`); returns whether it did.

    Without it, JAX initialises every backend it finds installed: libtpu (which the test extra
    installs to compile for TPU slices, `moe_jax.aot`) loads itself on a CPU-only host, looks for
    a TPU and prints warnings about the TPU it cannot find before JAX falls back to the CPU.
    """
    if jax.config.jax_platforms or any(map(os.path.exists, ACCELERATOR_DEVICE_FILES)):
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def flag_values(argv: list[str]) -> flags.FlagValues:
    """The parsed flags, after refusing positional arguments; logs at WARNING unless
    `--verbosity` is given, since orbax logs every checkpoint read and write at INFO. Chooses
    the CPU on a host without an accelerator (`use_cpu_without_accelerator`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    use_cpu_without_accelerator()
    return flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, after a one-line error for a missing config file or a misspelt
    `--config.KEY` (`moe_jax.config`); a relative `--config` path works from any directory."""
    try:
        argv = resolve_config_argv(argv)
        check_config_overrides(argv)
    except ValueError as error:
        sys.stderr.write(f"FATAL Flags parsing error: {error}\n")
        sys.exit(2)
    return app.parse_flags_with_usage(argv)


def cluster_detected() -> bool:
    """True in a multi-process environment `jax.distributed.initialize()` can read by itself."""
    env = os.environ
    return (
        "," in env.get("TPU_WORKER_HOSTNAMES", "")
        or "MEGASCALE_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
    )


def define_multihost_flags() -> None:
    """The flags that start `jax.distributed` (`train.run_command` reads them)."""
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
