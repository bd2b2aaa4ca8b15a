"""Hugging Face checkpoint <-> moe_jax config and NNX model, through a registered family.

- `load_config(path, base=None)`: the moe_jax config of a checkpoint directory.
- `load(path) -> (config, model)`: the config and an NNX model holding the checkpoint's weights.
- `load_into(model, config, path)`: copy a checkpoint's weights into an existing model of
  `config` (scanned or not, sharded or not); `init_from(config, model)` does it for
  `train.init_from='hf:DIR'`.
- `save(config, model, path, max_shard_bytes=...)`: write a checkpoint directory.

Every check (model type, config fields, tensor names and shapes, shard files) runs before any
parameter is built or any file is written.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax.config import default_config
from moe_jax.hf import files
from moe_jax.hf.family import LoadPlan, Path, family_of, get_family
from moe_jax.models import build_model
from moe_jax.routers import RouterBias

# the variables a checkpoint holds: the parameters, and aux_free's selection bias (DeepSeek-V3's
# e_score_correction_bias), which training moves outside the optimizer
LOADED = nnx.Any(nnx.Param, RouterBias)


def _family_and_reader(path: str, param_dtype: str = "bfloat16"):
    """The checkpoint's family and a reader that dequantizes quantized weights (FP8, MXFP4)
    straight to `param_dtype`, the dtype of the parameters they are loaded into: a float32
    model gets FP8 times its float32 scales rounded once, not through bfloat16 (the default
    serves readers of the config and shapes only)."""
    reader = files.CheckpointReader(path, dequantized_dtype=np.dtype(jnp.dtype(param_dtype)))
    model_type = reader.config.get("model_type")
    return get_family(model_type), reader


def load_config(
    path: str, base: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """The moe_jax config of the checkpoint in `path`: `base` (default `default_config()`) with
    the settings the checkpoint's family derives from its `config.json` and tensor names."""
    family, reader = _family_and_reader(path)
    reader.close()
    config = (base or default_config()).copy_and_resolve_references()
    config.update_from_flattened_dict(family.to_moe_config(reader.config, frozenset(reader.shapes)))
    config.model.hf_model_type = family.model_type
    config.model.scan_layers = False
    return config


def _checked_plan(family, reader: files.CheckpointReader, config) -> LoadPlan:
    """The family's load plan, checked against the files: names, shapes, nothing unexpected."""
    plan = family.load_plan(reader.config, config, frozenset(reader.shapes))
    missing = [name for name in plan.tensors if name not in reader.shapes]
    if missing:
        raise ValueError(
            f"{reader.directory} lacks {len(missing)} tensor(s) a {family.model_type} checkpoint "
            f"of this config needs: {missing[:8]}"
        )
    for name, shape in plan.tensors.items():
        if tuple(reader.shapes[name]) != tuple(shape):
            raise ValueError(
                f"{reader.directory}: tensor {name!r} has shape {list(reader.shapes[name])}, but "
                f"config.json implies {list(shape)}."
            )
    unexpected = sorted(set(reader.shapes) - set(plan.tensors) - plan.ignored)
    if unexpected:
        raise ValueError(
            f"{reader.directory} holds {len(unexpected)} tensor(s) a {family.model_type} model "
            f"of this config does not have: {unexpected[:8]}"
        )
    return plan


def _unscanned(path: Path, index: int) -> Path:
    """The unscanned path of repeat `index` of the scanned parameter at `path`."""
    return (*path[:3], index, *path[3:])


def _is_scanned(config, path: Path) -> bool:
    return bool(config.model.scan_layers) and len(path) > 2 and path[1] == "segments"


def _fill_params(model: nnx.Module, config, plan: LoadPlan, get) -> None:
    """Sets every parameter of `model` from `plan` (one parameter built at a time)."""
    params = nnx.to_flat_state(nnx.state(model, LOADED))
    wanted = set(plan.params)
    for path, variable in params:
        if _is_scanned(config, path):
            parts = [_unscanned(path, r) for r in range(variable.shape[0])]
            value = np.stack([plan.params[part](get) for part in parts])  # [R, ...]
            wanted -= set(parts)
        else:
            value = plan.params[path](get)
            wanted.discard(path)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"parameter {path} was built as {value.shape}, needs {variable.shape}."
            )
        current = variable.get_value()
        array = jnp.asarray(value, dtype=variable.dtype)
        sharding = getattr(current, "sharding", None)
        if isinstance(current, jax.Array) and sharding is not None:
            array = jax.device_put(array, sharding)
        variable.set_value(array)
    if wanted:
        raise ValueError(f"the load plan builds parameters the model lacks: {sorted(wanted)[:4]}")


# Settings a fine-tuning run may choose freely: they change no parameter and no maths of the
# loaded network's evaluation forward pass except by choice (dropout, capacity, precision, layout).
TUNABLE = frozenset(
    {
        "model.dropout_rate",
        "model.dtype",
        "model.param_dtype",
        "model.scan_layers",
        "model.remat",
        "moe.expert_dropout",
        "moe.router_jitter",
        "moe.capacity_factor_train",
        "moe.capacity_factor_eval",
        "moe.min_capacity",
        "moe.expert_capacity",
        "moe.group_size",
        "moe.backend",
    }
)


def _check_architecture(config, family, reader) -> None:
    """Raises ValueError listing the model/moe settings of `config` the checkpoint fixes
    otherwise (fine-tuning settings in `TUNABLE` and loss coefficients may differ)."""
    overrides = family.to_moe_config(reader.config, frozenset(reader.shapes))
    differences = []
    for key, value in overrides.items():
        section, _, field = key.partition(".")
        if section in ("model", "moe") and key not in TUNABLE and config[section][field] != value:
            differences.append(f"{key}: {config[section][field]!r} (config) vs {value!r}")
    if differences:
        raise ValueError(
            f"the model config differs from the checkpoint in {reader.directory}:\n  "
            + "\n  ".join(differences)
            + "\nStart from --config=configs/hf.py:DIR, which reads them from the checkpoint."
        )


def load_into(model: nnx.Module | None, config, path: str) -> None:
    """Copies the weights of the checkpoint in `path` into `model`, built from `config` (scanned
    or not, sharded or not). `config`'s architecture must be the checkpoint's (see
    `load_config`; the settings in `TUNABLE` may differ). With `model=None` only checks."""
    family, reader = _family_and_reader(path, config.model.param_dtype)
    try:
        _check_architecture(config, family, reader)
        plan = _checked_plan(family, reader, config)
        if model is not None:
            _fill_params(model, config, plan, reader.get)
    finally:
        reader.close()


def init_from(config, model: nnx.Module | None = None) -> None:
    """`config.train.init_from`: 'hf:DIR' loads (or, with `model=None`, checks) the Hugging
    Face checkpoint in DIR into `model`; '' does nothing."""
    source = config.train.init_from
    if not source:
        return
    kind, _, path = source.partition(":")
    if kind != "hf" or not path:
        raise ValueError(
            f"train.init_from={source!r}: use 'hf:DIR' with DIR a Hugging Face checkpoint."
        )
    load_into(model, config, path)


def model_without_weights(config) -> nnx.Module:
    """The model of `config` with abstract parameters (`jax.ShapeDtypeStruct`s, to be set) and
    real non-parameter state (RNG keys), without drawing the random parameter initialisation
    (jit drops the unused work)."""
    abstract = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(config.seed)))
    graphdef, params, _ = nnx.split(abstract, nnx.Param, ...)
    rest = jax.jit(
        lambda: nnx.split(build_model(config, rngs=nnx.Rngs(config.seed)), nnx.Param, ...)[2]
    )()
    return nnx.merge(graphdef, params, rest)


def load(path: str, base: ml_collections.ConfigDict | None = None):
    """`(config, model)` of the Hugging Face checkpoint in `path`.

    The model is built with `scan_layers=False` and holds the checkpoint's weights; call it as
    usual (`model(encoder_inputs, decoder_inputs, deterministic=True)`). `base` is the config
    the checkpoint's settings are written into (default `default_config()`).
    """
    config = load_config(path, base)
    family, reader = _family_and_reader(path, config.model.param_dtype)
    try:
        plan = _checked_plan(family, reader, config)
        model = model_without_weights(config)
        _fill_params(model, config, plan, reader.get)
    finally:
        reader.close()
    return config, model


def _param_getter(model: nnx.Module, config):
    """`param(path) -> np.ndarray` by unscanned path. A scanned parameter `[R, ...]` is sliced
    on device and only the layer asked for is fetched; the last layer read is kept (the stacked
    experts of a layer are read once for all their per-expert tensors), so the host holds about
    one tensor at a time."""
    by_path = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, LOADED)):
        if _is_scanned(config, path):
            for r in range(variable.shape[0]):
                by_path[_unscanned(path, r)] = (variable, r)
        else:
            by_path[path] = (variable, None)
    cache: dict = {}

    def param(path: Path) -> np.ndarray:
        variable, index = by_path[path]
        key = (id(variable), index)
        if key not in cache:
            cache.clear()
            value = variable.get_value()
            layer = value if index is None else value[index]  # [...] without the [R] axis
            cache[key] = np.asarray(jax.device_get(layer))
        return cache[key]

    return param


def save(
    config,
    model: nnx.Module,
    path: str,
    *,
    max_shard_bytes: int = files.DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Writes `model` (built from `config`) as a Hugging Face checkpoint into `path`, in the
    family `config.model.hf_model_type`; returns the weight files written. Refuses (ValueError,
    nothing written) a config the family cannot express."""
    family = family_of(config)
    plan = family.save_plan(config)
    param = _param_getter(model, config)
    dtype = np.dtype(jnp.dtype(config.model.param_dtype))
    entries = [
        (name, shape, dtype, lambda build=build: build(param))
        for name, (shape, build) in plan.tensors.items()
    ]
    return files.write_checkpoint(
        os.fspath(path), plan.config, entries, max_shard_bytes=max_shard_bytes
    )
