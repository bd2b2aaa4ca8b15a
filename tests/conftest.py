"""Test setup: 8 fake CPU devices and fast compilation, set before JAX is first imported."""

import os

from xla_flags import flags_with_devices

os.environ["XLA_FLAGS"] = flags_with_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
