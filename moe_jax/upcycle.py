"""Sparse upcycling: the starting state of an MoE run from a dense checkpoint.

    python -m moe_jax.upcycle --from=runs/dense --config=configs/switch.py:tiny --workdir=runs/up
    python -m moe_jax.upcycle --from=hf:/path/to/t5 --config=configs/hf.py:/path/to/t5 \\
        --config.moe.num_experts=8 --workdir=runs/up
    python -m moe_jax.train --config=configs/switch.py:tiny --workdir=runs/up   # resumes step 0

Sparse upcycling (Komatsuzaki et al. 2023, "Sparse Upcycling: Training Mixture-of-Experts from
Dense Checkpoints"): every expert of a sparse layer starts as a copy of the dense FFN of that
layer; attention, embeddings, norms, position biases and the dense FFNs of layers that stay
dense are copied; routers keep the MoE model's own fresh initialisation. Which layers become
sparse is the MoE config's `moe.sparse_placement` (`stack.layer_plan`). With k experts chosen,
their weights renormalised to sum to 1 (`moe.normalize='topk'`, or k=1 with 'topk') and no
token dropped (dropless backend or ample capacity), the upcycled model computes the dense
model's function exactly.

Drop-Upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with
Partial Re-initialization", Sec. 3): `drop_ratio = r > 0` re-initialises, in each expert
independently, a random subset of round(r * d_ff) hidden units: those columns of `wi` and
`wi_gate` and those rows of `wo`, drawn from a normal distribution with the mean and standard
deviation of the dense matrix they replace. r = 0 is plain upcycling; r = 1 keeps only the
statistics (the paper finds r = 0.5 best).

`--from` is a `moe_jax.train` workdir of a dense run (its latest checkpoint) or `hf:DIR`, a
Hugging Face dense checkpoint `moe_jax.hf` loads (T5). The output workdir is written by
`train.save_initial_checkpoint` like `moe_jax.convert`'s, so training resumes from it as from
any run. Every layer the dense model has must be unscanned (`model.scan_layers=False`), and
the two configs must agree on every `model.*` key but those of `FREE_MODEL_KEYS` (dropout,
precision, rematerialisation, the Hugging Face family to save as), so that rotary bases, norm
epsilons and position buckets, and any key added later, are the dense model's.
"""

from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import cli, convert, hf, train
from moe_jax.models import layer_plan

Path = tuple[Any, ...]
EXPERT_WEIGHTS = ("wi", "wi_gate", "wo")  # wi, wi_gate: [E, M, F]; wo: [E, F, M]


def _stacks(config) -> dict[str, int]:
    """Stack name -> its number of layers."""
    model = config.model
    if model.kind == "encoder_decoder":
        return {"encoder": model.num_encoder_layers, "decoder": model.num_decoder_layers}
    return {"decoder": model.num_layers}


# model.* keys the MoE config may set apart from the dense one. Every other model.* key, a key
# added to the config later included, must be equal. These change no parameter and not the
# evaluation function (dropout, compute and parameter precision, rematerialisation, the family
# `hf.save` writes), or are compared otherwise: the layer counts of the stacks the model kind
# has (`_stacks`; the other kind's counts are unused) and scan_layers (False on both sides).
FREE_MODEL_KEYS = frozenset(
    {
        "dropout_rate",
        "dtype",
        "param_dtype",
        "remat",
        "hf_model_type",
        "num_layers",
        "num_encoder_layers",
        "num_decoder_layers",
        "scan_layers",
    }
)


def check_compatible(dense_config, moe_config) -> None:
    """Raises ValueError, naming the key, both values and the fix, when the dense model's
    architecture (every model.* key but `FREE_MODEL_KEYS`, the expert width and activation, the
    layers per stack) differs from the MoE config's or either cannot take part in upcycling."""
    dense, target = dense_config.model, moe_config.model
    if dense_config.moe.num_experts != 0:
        raise ValueError(
            f"the checkpoint to upcycle has moe.num_experts={dense_config.moe.num_experts}; "
            "upcycle a dense model (moe.num_experts=0)."
        )
    if moe_config.moe.num_experts < 1:
        raise ValueError(
            "the upcycled config has moe.num_experts=0 (dense); set --config.moe.num_experts."
        )
    expert_d_ff = moe_config.moe.d_ff or target.d_ff
    expert_activation = moe_config.moe.activation or target.ffn_activation
    compared = sorted(set(target) - FREE_MODEL_KEYS, key=lambda key: (key != "kind", key))
    pairs = [(f"model.{key}", dense[key], f"model.{key}", target[key]) for key in compared]
    pairs += [
        ("model.d_ff", dense.d_ff, "moe.d_ff (expert width)", expert_d_ff),
        ("model.ffn_activation", dense.ffn_activation, "expert activation", expert_activation),
    ]
    pairs += [
        (f"{name} layers", count, f"{name} layers", _stacks(moe_config).get(name))
        for name, count in _stacks(dense_config).items()
    ]
    for dense_key, dense_value, moe_key, moe_value in pairs:
        if dense_value != moe_value:
            raise ValueError(
                f"the dense checkpoint has {dense_key}={dense_value!r} but the MoE config has "
                f"{moe_key}={moe_value!r}; set --config.{moe_key.split(' ')[0]}={dense_value!r} "
                "or upcycle a checkpoint with that setting."
            )
    for name, config in (("dense", dense_config), ("MoE", moe_config)):
        if config.model.scan_layers:
            raise ValueError(
                f"the {name} config has model.scan_layers=True; upcycling maps unscanned layers "
                "(set model.scan_layers=False)."
            )
    if moe_config.moe.extra_dense_ffn or moe_config.moe.num_shared_experts:
        raise ValueError(
            "upcycling copies the dense FFN into the experts only; set moe.extra_dense_ffn=False "
            "and moe.num_shared_experts=0."
        )


def _dense_path(path: Path, moe_config) -> Path:
    """The dense model's path of the MoE model's parameter at `path` (unscanned layers): layer
    `(stack, 'segments', s, b, 'layers', j, ...)` is the dense `(stack, 'segments', 0, i,
    'layers', 0, ...)` of the same depth i."""
    if len(path) < 6 or path[1] != "segments":
        return path
    stack, _, segment, block, _, position, *rest = path
    plan = layer_plan(_stacks(moe_config)[stack], moe_config.moe)
    depth = sum(len(pattern) * repeats for pattern, repeats in plan[:segment])
    depth += block * len(plan[segment][0]) + position
    return (stack, "segments", 0, depth, "layers", 0, *rest)


def _drop_mask(key: jax.Array, num_experts: int, d_ff: int, ratio: float) -> jax.Array:
    """bool[E, F]: per expert, a uniformly random set of round(ratio * d_ff) hidden units."""
    num_dropped = round(ratio * d_ff)
    scores = jax.random.uniform(key, (num_experts, d_ff))
    ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)  # [E, F] a permutation per row
    return ranks < num_dropped


def upcycle_params(
    dense: dict[Path, jax.Array],
    moe: dict[Path, jax.Array],
    moe_config,
    *,
    drop_ratio: float = 0.0,
    key: jax.Array | None = None,
) -> dict[Path, jax.Array]:
    """The MoE parameters upcycled from the dense ones (a pure function; see the module doc).

    `dense` and `moe` map parameter paths (`nnx.to_flat_state`, unscanned layers) to arrays;
    `moe` is a freshly initialised MoE model's, whose routers are kept. Each sparse layer's
    `wi, wi_gate: [E, M, F]` and `wo: [E, F, M]` are the dense `[M, F]`, `[F, M]` repeated E
    times, with Drop-Upcycling's `drop_ratio` share of hidden units re-initialised per expert
    (`key` draws them). Everything else comes from `dense` at the same depth.
    """
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio={drop_ratio} must be in [0, 1] (0: plain upcycling).")
    if drop_ratio > 0 and key is None:
        raise ValueError("drop_ratio > 0 needs a random key.")
    result = {}
    masks: dict[Path, jax.Array] = {}  # one hidden-unit choice per layer, shared by its weights
    for path, value in moe.items():
        is_router = "router" in path
        is_expert = path[-2:-1] == ("ffn",) and path[-1] in EXPERT_WEIGHTS and value.ndim == 3
        if is_router:
            result[path] = value
            continue
        source_path = _dense_path(path, moe_config)
        if source_path not in dense:
            raise ValueError(f"the dense checkpoint has no parameter {source_path} for {path}.")
        source = jnp.asarray(dense[source_path], value.dtype)
        expected = value.shape[1:] if is_expert else value.shape
        if source.shape != expected:
            raise ValueError(
                f"dense parameter {source_path} has shape {source.shape}, the MoE model's "
                f"{path} needs {expected}; give the config the dense model's sizes."
            )
        if not is_expert:
            result[path] = source
            continue
        num_experts = value.shape[0]
        copies = jnp.broadcast_to(source, value.shape)  # [E, M, F] or [E, F, M]
        if drop_ratio == 0:
            result[path] = copies
            continue
        layer = path[:-2]
        hidden_axis = 1 if path[-1] == "wo" else 2
        if layer not in masks:
            masks[layer] = _drop_mask(
                jax.random.fold_in(key, len(masks)),
                num_experts,
                value.shape[hidden_axis],
                drop_ratio,
            )
        mask = jnp.expand_dims(masks[layer], 3 - hidden_axis)  # [E, 1, F] or [E, F, 1]
        noise_key = jax.random.fold_in(jax.random.fold_in(key, 1 << 20), len(result))
        fresh = jnp.mean(source) + jnp.std(source) * jax.random.normal(
            noise_key, value.shape, value.dtype
        )
        result[path] = jnp.where(mask, fresh, copies)
    return result


def flat_params(model: nnx.Module) -> dict[Path, jax.Array]:
    """path -> array of every `nnx.Param` of `model`."""
    return {
        path: variable.get_value()
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def set_params(model: nnx.Module, values: dict[Path, jax.Array]) -> None:
    """Sets `model`'s parameters from `values` (same paths), keeping each one's sharding."""
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        current = variable.get_value()
        array = jnp.asarray(values[path], current.dtype)
        if isinstance(current, jax.Array):
            array = jax.device_put(array, current.sharding)
        variable.set_value(array)


def load_dense(source: str):
    """`(config, model)` of `source`: a moe_jax.train workdir (latest checkpoint) or 'hf:DIR'."""
    kind, _, path = source.partition(":")
    if kind == "hf" and path:
        return hf.load(path)
    config, model, _ = train.restore_for_inference(source)
    return config, model


def dense_config_of(source: str):
    """The config of `source` without loading its weights."""
    kind, _, path = source.partition(":")
    if kind == "hf" and path:
        return hf.load_config(path)
    return train.config_from_workdir(source)


def upcycle_run(source: str, config, workdir: str, *, drop_ratio: float = 0.0, devices=None) -> str:
    """Writes step 0 of a run of the MoE `config` in `workdir`, upcycled from the dense `source`
    (a workdir or 'hf:DIR'). Every check runs before anything is written."""
    config = config.copy_and_resolve_references()
    dense_config = dense_config_of(source)
    check_compatible(dense_config, config)
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"--drop_ratio={drop_ratio} must be in [0, 1] (0: plain upcycling).")
    _, dense_model = load_dense(source)
    dense = flat_params(dense_model)
    key = jax.random.fold_in(jax.random.key(config.seed), 17)

    def initialize(model: nnx.Module) -> None:
        set_params(
            model,
            upcycle_params(dense, flat_params(model), config, drop_ratio=drop_ratio, key=key),
        )

    return train.save_initial_checkpoint(config, workdir, devices=devices, initialize=initialize)


def _define_flags():
    config = config_flags.DEFINE_config_file("config", None, "The MoE run's config.")
    flags.DEFINE_string("from", None, "Dense moe_jax.train workdir, or hf:DIR.")
    flags.DEFINE_string("workdir", None, "New run directory for the upcycled model.")
    flags.DEFINE_float("drop_ratio", 0.0, "Drop-Upcycling's re-initialised share r in [0, 1].")
    flags.mark_flags_as_required(["from", "workdir", "config"])
    return config


def main(argv, config_flag) -> int:
    options = flags.FLAGS
    return convert.run_tool(
        "moe_jax.upcycle",
        argv,
        lambda: upcycle_run(
            options["from"].value, config_flag.value, options.workdir, drop_ratio=options.drop_ratio
        ),
    )


if __name__ == "__main__":
    _config_flag = _define_flags()
    app.run(lambda argv: main(argv, _config_flag), flags_parser=cli.parse_flags)
