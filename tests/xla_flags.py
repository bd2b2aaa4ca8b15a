"""XLA flags of the test processes and of the processes they start.

Tests compile many small programs and run each a few times, so compilation dominates their
time: the tests build with XLA's CPU backend optimisation level 0, which cuts the suite's CPU
time by about a third, and without XLA's newer CPU fusion emitters, which cut the compilation
of the tiny Switch training step from 4.4 s to 1.8 s (the compiled programs compute the same
functions; only their code is less optimised). Processes the tests start get the same flags,
with their own device count.
"""

import os

FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def flags_with_devices(count: int | None) -> str:
    """The current XLA_FLAGS with FAST_COMPILE and `count` fake CPU devices (None: XLA's own
    default of one)."""
    kept = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith(_DEVICE_COUNT) and flag not in FAST_COMPILE
    ]
    devices = [] if count is None else [f"{_DEVICE_COUNT}={count}"]
    return " ".join([*kept, *FAST_COMPILE, *devices])
