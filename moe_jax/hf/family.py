"""The family interface: how one Hugging Face `model_type` maps onto moe_jax, and the registry.

A family answers three questions (see the package docstring for the full contract):

- `to_moe_config(hf_config, tensor_names) -> {dotted moe_jax config key: value}`: the moe_jax
  settings that express the checkpoint; raises ValueError naming any HF config field it cannot
  express.
- `load_plan(hf_config, config, tensor_names) -> LoadPlan`: every HF tensor the checkpoint must
  hold with its shape, and for every moe_jax parameter a function building it from a
  `get(hf_name) -> np.ndarray` callback.
- `save_plan(config) -> SavePlan`: the `config.json` to write and, for every HF tensor, its shape
  and a function building it from a `param(path) -> np.ndarray` callback; raises ValueError
  naming any moe_jax setting the family cannot express.

Parameter paths are those of the model built with `model.scan_layers=False`
(`nnx.to_flat_state(nnx.state(model, nnx.Param))` keys, e.g.
`('encoder', 'segments', 0, 1, 'layers', 0, 'ffn', 'wi')`); `layer_paths` gives the path of
every layer of a stack. The loader maps them onto a scanned model itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from moe_jax.stack import layer_plan

Path = tuple[str | int, ...]
TensorGetter = Callable[[str], np.ndarray]  # HF tensor name -> array
ParamGetter = Callable[[Path], np.ndarray]  # moe_jax parameter path -> array


@dataclasses.dataclass(frozen=True)
class LoadPlan:
    """How a checkpoint becomes moe_jax parameters.

    Attributes:
      tensors: {HF name: shape} of every tensor the checkpoint must hold. Checked against the
        files before any parameter is built: a missing name or another shape is an error.
      params: {moe_jax parameter path: build(get) -> np.ndarray}, one per parameter of the model.
      ignored: HF tensor names that may be present and are not used (anything else that is
        present but not in `tensors` is an error).
    """

    tensors: dict[str, tuple[int, ...]]
    params: dict[Path, Callable[[TensorGetter], np.ndarray]]
    ignored: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class SavePlan:
    """How moe_jax parameters become a checkpoint.

    Attributes:
      config: the `config.json` dict (with `model_type`).
      tensors: {HF name: (shape, build(param) -> np.ndarray)}, in the order they are written.
    """

    config: dict[str, Any]
    tensors: dict[str, tuple[tuple[int, ...], Callable[[ParamGetter], np.ndarray]]]


class Family(Protocol):
    """One Hugging Face `model_type` (see the module docstring)."""

    model_type: str

    def to_moe_config(self, hf_config: dict, tensor_names: frozenset[str]) -> dict[str, Any]: ...

    def load_plan(self, hf_config: dict, config: Any, tensor_names: frozenset[str]) -> LoadPlan: ...

    def save_plan(self, config: Any) -> SavePlan: ...


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Adds `family` to the registry under its `model_type` (replacing any earlier one)."""
    _FAMILIES[family.model_type] = family
    return family


def family_names() -> tuple[str, ...]:
    return tuple(sorted(_FAMILIES))


def get_family(model_type: str) -> Family:
    """The registered family of `model_type`; ValueError naming the known ones otherwise."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"Hugging Face model_type {model_type!r} is not supported; moe_jax reads and writes "
            f"{family_names()}."
        )
    return _FAMILIES[model_type]


def family_of(config: Any) -> Family:
    """The family a moe_jax config saves as: `config.model.hf_model_type`."""
    model_type = config.model.hf_model_type
    if not model_type:
        raise ValueError(
            "config.model.hf_model_type is empty: set it to the Hugging Face family to save as, "
            f"one of {family_names()}."
        )
    return get_family(model_type)


def layer_paths(config: Any, stack: str, num_layers: int) -> list[Path]:
    """The parameter path prefix of each layer of `stack` ('encoder' or 'decoder'), bottom to
    top, in the model built with `scan_layers=False`: `(stack, 'segments', s, r, 'layers', j)`
    for layer j of repeat r of segment s (see `moe_jax.stack.layer_plan`)."""
    paths = []
    for segment, (pattern, repeats) in enumerate(layer_plan(num_layers, config.moe)):
        for repeat in range(repeats):
            for position in range(len(pattern)):
                paths.append((stack, "segments", segment, repeat, "layers", position))
    return paths


def check_fields(model_type: str, hf_config: dict, supported: dict[str, Callable[[Any], bool]]):
    """Raises ValueError naming the first HF config field whose value `supported` rejects.

    `supported` maps a field name to a predicate of its value (a field that is absent is
    skipped: transformers fills its default, which the family handles).
    """
    for field, accepts in supported.items():
        if field in hf_config and not accepts(hf_config[field]):
            raise ValueError(
                f"{model_type} config.json: {field}={hf_config[field]!r} is not supported by "
                "moe_jax."
            )


def check_settings(model_type: str, required: dict[str, tuple[Any, tuple]]) -> None:
    """Raises ValueError naming the first moe_jax setting a `model_type` checkpoint cannot hold.

    `required` maps a dotted config key to (its value, the values the family can write).
    """
    for key, (value, allowed) in required.items():
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: a {model_type} checkpoint needs one of {allowed}.")
