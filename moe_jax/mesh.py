"""Meshes, and the logical-axis rules that map array dims onto them.

Mesh axes are `('data', 'expert', 'model')`, always `AxisType.Auto` (GSPMD propagates shardings
between the constraints we place). Parameters and activations name their dimensions with
*logical* axes (`batch, length, embed, activation_embed, mlp, heads, kv, vocab, expert`); one
rules table (`config.mesh.rules`) maps each logical axis to zero, one or several mesh axes.

A weight's embedding dim is `embed` and an activation's is `activation_embed` (MaxText's
names), so that FSDP can split weights along it while activations, whose batch dim the batch
axes already split, keep it whole: `embed -> ('data', 'expert')` shards every weight (and its
optimizer moments) over all data-parallel devices (`configs.set_fsdp`), and XLA all-gathers a
weight where it is used and reduce-scatters its gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, PartitionSpec

MESH_AXES = ("data", "expert", "model")
LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "activation_embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "expert",
)

# TPU kinds whose two TensorCores per chip jax's mesh layouts place (mesh_utils)
TWO_CORE_KINDS = ("TPU v2", "TPU v3")

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]
AnyMesh = Mesh | jax.sharding.AbstractMesh

# Logical axis -> mesh axes. Groups (and so the batch) split over data and expert devices; the
# hidden dims of FFNs and experts, attention heads and the vocabulary over 'model'; weights are
# not split along their embedding dim (no FSDP) and activations never are.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("length", ()),
    ("embed", ()),
    ("activation_embed", ()),
    ("mlp", ("model",)),
    ("heads", ("model",)),
    ("kv", ()),
    ("vocab", ("model",)),
    ("expert", ("expert",)),
)


# ----------------------------------------------------------------------------------- meshes


def make_mesh(
    data: int = -1, expert: int = 1, model: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A `('data', 'expert', 'model')` mesh with Auto axes over `devices` (default: all).

    One size may be -1: it takes the devices the other two leave. Raises a ValueError when the
    sizes' product differs from the device count. On a TPU slice the devices follow its
    physical axes (`jax.make_mesh`), split where the shape needs it.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "expert": expert, "model": model}
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} must be an int >= 1 or -1, got {size!r}.")
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ValueError(f"only one mesh axis may be -1, got -1 for {fill}.")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if len(devices) % known:
            raise ValueError(
                f"cannot fill mesh axis {fill[0]!r}: {len(devices)} devices do not divide by "
                f"the other axes' product {known} ({_describe(sizes)}); "
                f"{_fitting_sizes(len(devices))}."
            )
        sizes[fill[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh {_describe(sizes)} needs {math.prod(sizes.values())} devices but "
            f"{len(devices)} are available; make the product equal {len(devices)} or use -1 "
            f"({_fitting_sizes(len(devices))})."
        )
    shape = tuple(int(sizes[name]) for name in MESH_AXES)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if _cores_as_devices(devices):
        grid = np.array(sorted(devices, key=lambda device: device.id)).reshape(shape)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError):
        # no layout along the slice's physical axes (data 8 x expert 8 on a 4x4x4 v5p torus):
        # split them (every data x expert x model shape of v3:4x4, v5e:4x4, v5p:4x4x4 and
        # v6e:8x8 lays out so)
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def _cores_as_devices(devices: list) -> bool:
    """True for TPU chips past v3 whose two TensorCores are two devices (libtpu's v4 topology
    descriptions), which jax's physical layouts refuse; their devices go in torus order (by id:
    chip by chip, core by core)."""
    chips = {tuple(getattr(device, "coords", ())) for device in devices}
    kind = getattr(devices[0], "device_kind", "")
    return len(chips) < len(devices) and kind.startswith("TPU") and kind not in TWO_CORE_KINDS


def mesh_from_config(config: Any, *, devices: Sequence[Any] | None = None) -> Mesh:
    """`make_mesh` with the sizes of `config.mesh` (data, expert, model)."""
    mesh_config = config.mesh
    return make_mesh(mesh_config.data, mesh_config.expert, mesh_config.model, devices=devices)


def _fitting_sizes(num_devices: int) -> str:
    """The axis sizes a mesh over `num_devices` devices can have: the divisors."""
    divisors = [str(size) for size in range(1, num_devices + 1) if num_devices % size == 0]
    return f"on {num_devices} devices each axis size must be one of {', '.join(divisors)}"


def _describe(sizes: Mapping[str, int]) -> str:
    return " x ".join(f"{name}={size}" for name, size in sizes.items())


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set with `jax.set_mesh`, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


# ------------------------------------------------------------------------------------ rules


def _as_mesh_axes(logical: str, value: Any) -> MeshAxes:
    if value is None:
        axes: MeshAxes = ()
    elif isinstance(value, str):
        axes = (value,)
    else:
        axes = tuple(value)
    for axis in axes:
        if axis not in MESH_AXES:
            raise ValueError(
                f"rule {logical!r} -> {value!r} names mesh axis {axis!r}; mesh axes are "
                f"{MESH_AXES}."
            )
    return axes


def logical_rules(rules: Any = None) -> Rules:
    """Normalise a rules table to `((logical, (mesh_axis, ...)), ...)`.

    Accepts None (`DEFAULT_RULES`), a full config (uses `config.mesh.rules`), a mapping such as
    `config.mesh.rules` (values: None, a mesh axis name, or a tuple of them), or a sequence of
    `(logical, mesh_axes)` pairs. Logical axes missing from the table keep their default rule.
    """
    if rules is None:
        return DEFAULT_RULES
    if hasattr(rules, "mesh") and hasattr(rules.mesh, "rules"):
        rules = rules.mesh.rules
    pairs = rules.items() if hasattr(rules, "items") else rules
    table = dict(DEFAULT_RULES)
    for logical, value in pairs:
        table[str(logical)] = _as_mesh_axes(str(logical), value)
    return tuple(table.items())


def mesh_axes_of(logical: str, rules: Any = None) -> MeshAxes:
    """The mesh axes a logical axis maps to (empty: replicated)."""
    table = dict(logical_rules(rules))
    if logical not in table:
        raise ValueError(f"unknown logical axis {logical!r}; the rules know {tuple(table)}.")
    return table[logical]


def spec_entry(axes: MeshAxes) -> str | MeshAxes | None:
    """One `PartitionSpec` entry for a dim split over mesh `axes` (None: replicated)."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def logical_to_spec(names: Sequence[str | None], rules: Any = None) -> PartitionSpec:
    """`PartitionSpec` for an array whose dims carry logical `names` (None: replicated dim).

    A mesh axis is used at most once per array: a later dim that maps to an axis an earlier dim
    already uses drops that axis.
    """
    table = dict(logical_rules(rules))
    used: set[str] = set()
    entries = []
    for name in names:
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"unknown logical axis {name!r}; the rules know {tuple(table)}.")
        axes = tuple(axis for axis in table[name] if axis not in used)
        used.update(axes)
        entries.append(spec_entry(axes))
    return PartitionSpec(*entries)


def axis_size(mesh: AnyMesh, axes: Sequence[str]) -> int:
    """Product of the mesh's sizes along `axes` (1 for none)."""
    return math.prod(mesh.shape[axis] for axis in axes)


def _spec_axes(entry: Any) -> MeshAxes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: AnyMesh, what: str) -> None:
    """Raise a ValueError naming the numbers if a dim of `shape` does not split evenly."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape))):
        axes = _spec_axes(entry)
        shards = axis_size(mesh, axes)
        if size % shards:
            raise ValueError(
                f"{what}: dim {dim} has size {size}, which does not divide by {shards} "
                f"(mesh axes {axes}); change the size or the mesh/rules."
            )
