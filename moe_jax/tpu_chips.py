"""TPU chips and slices for compiling on a host that has none: the devices of a slice (libtpu's
topology descriptions), what the compiler can give each device, and each chip's datasheet.

`slice_devices('v5e:4x4')` gives the compile-only devices of a slice (`jax.experimental.
topologies.get_topology_desc`), or raises `UnknownTopology`, whose message lists the names this
libtpu accepts. A topology's devices are TensorCores: v2 and v3 chips hold two, and so do v4
chips in libtpu's topology descriptions (v4 without megacore: `v4:2x2x1` is 8 devices);
`devices_per_chip` counts them from the devices' chip coordinates. `available_hbm(device)` asks
the compiler itself: it compiles a program far too large for any device and reads the available
HBM from the RESOURCE_EXHAUSTED error (XLA reserves part of the chip's HBM).

Datasheet figures per chip (`CHIPS`): peak bf16 TFLOP/s, HBM capacity (GiB) and bandwidth
(GB/s), and inter-chip interconnect (ICI) bandwidth (GB/s, both directions together, all
links). Sources, Google Cloud TPU documentation (fetched 2026):
- v5e: https://cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB at 819 GBps, bidirectional ICI
  400 GBps per chip).
- v6e: https://cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB at 1638 GBps, bidirectional ICI
  800 GBps per chip).
- v5p: https://cloud.google.com/tpu/docs/v5p (459 TFLOPs, "95 GB" at 2765 GBps; "Interchip
  Interconnect BW 4800 Gbps", the figure in the form v5e's page gives as 1600 Gbps, i.e. one
  direction: 600 GB/s, 1200 GB/s both ways). libtpu lets a program use 95.74 GiB of a v5p
  device, so its HBM is taken as 96 GiB (the pages' GB are GiB: v5e's 16 GB give 15.75 GiB).
- v4: https://cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB at 1200 GBps). The page gives no
  per-chip ICI figure; 537 GB/s is 2 x its "all-reduce bandwidth per Pod" 1.1 PB/s / 4096
  chips, the relation the v5e (51.2 TB/s, 256 chips, 400 GBps) and v6e pages satisfy exactly.
- v3: https://cloud.google.com/tpu/docs/v3 (123 TFLOPs, 32 GiB at 900 GBps); ICI the same way,
  2 x 340 TB/s / 1024 chips = 664 GB/s.
- v2: the v2 page (https://cloud.google.com/tpu/docs/v2) gives no figures and refers to Jouppi
  et al., "A Domain Specific Supercomputer for Training Deep Neural Networks", CACM 63(7), 2020;
  its Table 3 as we read it: 46 TFLOPS bf16, 16 GiB at 700 GB/s, 4 ICI links of 496 Gbit/s
  (248 GB/s each way). These v2 figures were not re-checked against the paper on this host.
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class Chip(NamedTuple):
    name: str  # the topology prefix, 'v5e'
    device_kind: str  # what libtpu's devices report, 'TPU v5 lite'
    bf16_tflops: float  # peak, per chip
    hbm_gib: float  # per chip
    hbm_gbps: float  # HBM bandwidth, GB/s per chip
    ici_gbps: float  # ICI bandwidth, GB/s per chip, both directions
    example: str  # a slice libtpu 0.0.42.1 accepts
    source: str


CHIPS = (
    Chip("v2", "TPU v2", 46, 16, 700, 496, "v2:2x2", "Jouppi et al. 2020, Table 3"),
    Chip("v3", "TPU v3", 123, 32, 900, 664, "v3:4x4", "cloud.google.com/tpu/docs/v3"),
    Chip("v4", "TPU v4", 275, 32, 1200, 537, "v4:2x2x1", "cloud.google.com/tpu/docs/v4"),
    Chip("v5e", "TPU v5 lite", 197, 16, 819, 400, "v5e:4x4", "cloud.google.com/tpu/docs/v5e"),
    Chip("v5p", "TPU v5", 459, 96, 2765, 1200, "v5p:2x2x1", "cloud.google.com/tpu/docs/v5p"),
    Chip("v6e", "TPU v6 lite", 918, 32, 1638, 800, "v6e:8x8", "cloud.google.com/tpu/docs/v6e"),
)
GIB = 1 << 30
TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")  # v2-v4, v5e and later


class UnknownTopology(ValueError):
    """A topology name libtpu does not accept; the message lists names it does."""


def known_topologies() -> str:
    """The chips this module knows, each with a slice libtpu accepts."""
    return ", ".join(chip.example for chip in CHIPS)


def slice_devices(topology: str) -> list[Any]:
    """The compile-only devices of `topology` (e.g. 'v5e:4x4', 'v4:2x2x1').

    On a host without a TPU, libtpu may be loaded by several processes at once (the tests'
    workers, a tool next to a notebook): it only compiles there, so the lock it takes against
    two processes driving one TPU (/tmp/libtpu_lockfile) is lifted (ALLOW_MULTIPLE_LIBTPU_LOAD),
    and the host is named its one TPU worker (TPU_WORKER_HOSTNAMES), which libtpu otherwise
    reports as an error at length (it still warns in one line that it found no accelerator).
    """
    if not any(map(os.path.exists, TPU_DEVICE_FILES)):
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except RuntimeError as error:
        if not isinstance(error, jax.errors.JaxRuntimeError):  # no libtpu to ask
            raise ValueError(
                f"--topology={topology}: {error}; install libtpu, e.g. with the test extra "
                "(pip install -e '.[test]', which pins it)."
            ) from None
        reason = str(error).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
        raise UnknownTopology(
            f"--topology={topology}: libtpu does not know it ({reason}); it knows CHIP:SHAPE "
            f"slices of {', '.join(chip.name for chip in CHIPS)}, e.g. {known_topologies()}."
        ) from None


def chip_of(device: Any) -> Chip:
    """The `CHIPS` entry of a TPU device."""
    for chip in CHIPS:
        if chip.device_kind == device.device_kind:
            return chip
    raise ValueError(
        f"no datasheet for device kind {device.device_kind!r}; moe_jax.tpu_chips.CHIPS knows "
        f"{[chip.device_kind for chip in CHIPS]}."
    )


def devices_per_chip(devices: list[Any]) -> int:
    """TensorCores per chip that are devices of their own (distinct devices per chip)."""
    chips = {tuple(device.coords) for device in devices}
    return len(devices) // len(chips)


def parse_bytes(text: str) -> int:
    """Bytes of XLA's human-readable sizes: '15.75G' (XLA's K, M, G and T are powers of 1024)."""
    match = re.fullmatch(r"([\d.]+)([KMGT]?)B?", text)
    if match is None:
        raise ValueError(f"not a size: {text!r}")
    return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))


def out_of_memory(message: str) -> tuple[int, int] | None:
    """`(bytes needed, bytes available)` from an XLA:TPU RESOURCE_EXHAUSTED message, or None
    when the message is not one."""
    size = r"([\d.]+[KMGT]?)"
    patterns = (
        rf"required for HLO temporaries \({size}\) exceeds available HBM \({size}\)",
        rf"Used {size} of {size} hbm",
    )
    for pattern in patterns:
        found = re.search(pattern, message)
        if found:
            return parse_bytes(found.group(1)), parse_bytes(found.group(2))
    return None


def available_hbm(device: Any) -> int:
    """HBM bytes the compiler lets one program use on `device`, read from the error of a
    program that needs a TiB of temporaries."""
    mesh = Mesh([device], ("one",))
    one = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    try:
        jax.jit(lambda x: jnp.zeros(GIB // 4 * 1024, jnp.float32) + x).lower(one).compile()
    except jax.errors.JaxRuntimeError as error:
        sizes = out_of_memory(str(error))
        if sizes is not None:
            return sizes[1]
        raise
    raise ValueError(f"a TiB of temporaries fit on {device.device_kind}: cannot read its HBM.")
