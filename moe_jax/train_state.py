"""The state a run trains, built once for every program that holds it: model, shardings,
optimizer state, the jitted steps, and the reader of finished runs.

`moe_jax.train` (fresh and resumed runs), `moe_jax.aot` (the same steps compiled for a TPU
slice this host does not own) and the tools that read a run (`restore_for_inference`: decode,
generate, score, convert, upcycle, merge, quantize, distill's teacher) all build the state here.

Everything starts abstract. `abstract_model(config)` traces `build_model` with `nnx.eval_shape`
and must run outside `jax.set_mesh` (the model's logical axis names are not mesh axes).
`abstract_state` gives a `TrainState` of `jax.ShapeDtypeStruct`s with `NamedSharding`s:
parameters and model state from their logical names through `config.mesh.rules`; the optimizer
state from `jax.eval_shape(optimizer.init)`, where a moment shaped like its parameter (found by
path: the parameter's path ends the moment's) takes the parameter's sharding and the rest
(counters, Adafactor's factored second moments) is replicated. Nothing runs the optimizer's
`init` on devices, so the shardings exist for devices this host cannot run on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from moe_jax import checkpoint, optim, parallel
from moe_jax.config import EVAL_FULL_PASS, KINDS, default_config
from moe_jax.models import build_model
from moe_jax.steps import TrainState, make_eval_step, make_train_step, stand_in_rng_state

BatchSpec = dict[str, tuple[tuple[int, ...], Any]]  # {key: (shape, dtype)}, `Dataset.element_spec`


def replicated(mesh) -> jax.sharding.NamedSharding:
    """The sharding of an array every device of `mesh` holds whole."""
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_model(config) -> nnx.Module:
    """`config`'s model with `jax.ShapeDtypeStruct`s for arrays (`nnx.eval_shape`); call it
    outside `jax.set_mesh`."""
    return nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(config.seed)))


def check_divisible(model: nnx.Module, mesh, rules) -> None:
    """Each sharded dim of every parameter and state variable splits evenly over its mesh axes
    (read abstractly from the variables' logical axis names and `rules`); a ValueError names
    the parameter, the dim and the sizes otherwise."""
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        names = variable.get_metadata().get("out_sharding") or ()
        shape = getattr(variable.get_value(), "shape", ())
        for dim, (size, logical) in enumerate(zip(shape, names)):
            if logical is None:
                continue
            axes = parallel.mesh_axes_of(logical, rules)
            shards = parallel.axis_size(mesh, axes)
            if size % shards:
                sizes = ", ".join(f"mesh.{axis}={mesh.shape[axis]}" for axis in axes)
                raise ValueError(
                    f"parameter {'/'.join(map(str, path))} of shape {tuple(shape)}: dim {dim} "
                    f"(logical axis {logical!r}) has size {size}, which does not split over mesh "
                    f"axes {axes} of {shards} devices ({sizes}); choose mesh sizes that divide "
                    f"{size}, or a model size that divides by {shards}."
                )


def check_groups(config, mesh, batch_spec: BatchSpec) -> None:
    """Each device's share of a batch (`train.batch_size` rows of the lengths in `batch_spec`)
    must hold whole routing groups (see `moe_jax.parallel`)."""
    shards = parallel.batch_shards(mesh, config.mesh.rules)
    rows = config.train.batch_size // shards
    group_size = config.moe.group_size
    if config.moe.num_experts == 0 or shards == 1 or group_size == 0:  # 0: a group per row
        return
    for key, (shape, _) in batch_spec.items():
        if key.endswith("inputs") and (rows * shape[1]) % group_size:
            raise ValueError(
                f"each of the {shards} batch shards holds {rows} rows x {shape[1]} tokens of "
                f"'{key}', which do not split into whole groups of moe.group_size={group_size}; "
                f"set --config.moe.group_size to a divisor of {rows * shape[1]}."
            )


def check_config(config) -> None:
    """Raises ValueError naming the key for settings no run can use."""
    train = config.train
    for key in ("num_steps", "batch_size", "seq_len", "log_every", "checkpoint_every"):
        if train[key] < 1:
            raise ValueError(f"train.{key}={train[key]} must be >= 1.")
    if train.keep_checkpoints < 1:
        raise ValueError(f"train.keep_checkpoints={train.keep_checkpoints} must be >= 1.")
    if train.eval_steps < 1 and train.eval_steps != EVAL_FULL_PASS:
        raise ValueError(
            f"train.eval_steps={train.eval_steps} must be >= 1 (batches per evaluation) or "
            f"{EVAL_FULL_PASS} (the whole validation split once)."
        )
    if train.schedule_steps < 0:
        raise ValueError(
            f"train.schedule_steps={train.schedule_steps} must be >= 0 (0: train.num_steps)."
        )
    if train.eval_every < 0:
        raise ValueError(f"train.eval_every={train.eval_every} must be >= 0 (0: no evaluation).")
    distill = config.distill
    if not 0.0 <= distill.alpha <= 1.0:
        raise ValueError(
            f"distill.alpha={distill.alpha} must be in [0, 1] (the soft targets' share)."
        )
    if distill.temperature <= 0:
        raise ValueError(f"distill.temperature={distill.temperature} must be > 0.")
    for key in ("aux_coef", "z_coef"):
        if config.loss[key] < 0:
            raise ValueError(f"loss.{key}={config.loss[key]} must be >= 0.")
    if config.model.kind not in KINDS:
        raise ValueError(f"model.kind={config.model.kind!r} must be one of {KINDS}.")
    moe = config.moe
    if moe.num_experts and moe.k < 1:
        raise ValueError(f"moe.k={moe.k} routes each token to no expert; set moe.k >= 1.")
    if moe.num_experts and moe.k > moe.num_experts:
        raise ValueError(
            f"moe.k={moe.k} exceeds moe.num_experts={moe.num_experts}; lower k or add experts."
        )


def _with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        tree,
        shardings,
    )


def optimizer_shardings(opt_state: Any, params: Any, mesh) -> Any:
    """Shardings for `opt_state` (arrays or `jax.ShapeDtypeStruct`s, e.g. of
    `jax.eval_shape(optimizer.init, params)`): a leaf whose path ends with a parameter's path
    and whose shape is the parameter's (a moment) takes that parameter's `.sharding`; every
    other leaf is replicated."""
    by_path = {
        tuple(path): param for path, param in jax.tree_util.tree_flatten_with_path(params)[0]
    }

    def sharding(path: tuple, leaf: Any) -> jax.sharding.Sharding:
        for start in range(len(path)):
            param = by_path.get(tuple(path[start:]))
            if param is not None and param.shape == leaf.shape:
                return param.sharding
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(sharding, opt_state)


def abstract_state(
    model: nnx.Module, config, mesh, optimizer: optax.GradientTransformation
) -> tuple[TrainState, nnx.GraphDef, nnx.State]:
    """`(state, graphdef, rng_state)` of an abstract `model` (`abstract_model`): the state as
    `jax.ShapeDtypeStruct`s with their shardings over `mesh` (what a checkpoint is restored
    onto, and what `moe_jax.aot` compiles for)."""
    graphdef, params, rng_state, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    rules = config.mesh.rules
    params = _with_shardings(params, parallel.state_shardings(params, mesh, rules))
    model_state = _with_shardings(model_state, parallel.state_shardings(model_state, mesh, rules))
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_state = _with_shardings(opt_state, optimizer_shardings(opt_state, params, mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    return TrainState(step, params, model_state, opt_state), graphdef, rng_state


def create_state(config, mesh, optimizer, initialize: Callable | None = None) -> TrainState:
    """The state of a freshly initialised model, sharded over `mesh`; `initialize(model)`, if
    given, then sets parameters in place (`train.init_from`'s weights, `moe_jax.upcycle`)."""
    model = parallel.create_sharded(
        lambda: build_model(config, rngs=nnx.Rngs(config.seed)), mesh, config.mesh.rules
    )
    if initialize is not None:
        initialize(model)
    _, params, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
    abstract_opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = optimizer_shardings(abstract_opt_state, params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh))
    return TrainState(step, params, model_state, opt_state)


def batch_shardings(batch_spec: BatchSpec, mesh, rules) -> dict:
    """`{key: NamedSharding}` of a batch: rows over the 'batch' mesh axes."""
    return {
        key: parallel.batch_sharding(mesh, rules, len(shape))
        for key, (shape, _) in batch_spec.items()
    }


def jit_train_step(
    graphdef: nnx.GraphDef,
    rng_state: nnx.State,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config,
    mesh,
    state_shardings: Any,
    batch_spec: BatchSpec,
    teacher: tuple[nnx.GraphDef, Any] | None = None,
) -> Callable:
    """The jitted `train_step(state, batch, rng, teacher_state) -> (state, metrics)` of a run
    (`steps.make_train_step`): the state's input and output on `state_shardings`, the batch on
    its rows' shardings, the key and the teacher's state replicated, the state donated."""
    step_fn = make_train_step(graphdef, rng_state, optimizer, schedule, config, teacher)

    def constrained_step(state, batch, rng, teacher_state):
        new_state, step_metrics = step_fn(state, batch, rng, teacher_state)
        return jax.lax.with_sharding_constraint(new_state, state_shardings), step_metrics

    return jax.jit(
        constrained_step,
        in_shardings=(
            state_shardings,
            batch_shardings(batch_spec, mesh, config.mesh.rules),
            replicated(mesh),
            replicated(mesh),
        ),
        donate_argnums=0,
    )


def jit_eval_step(
    graphdef: nnx.GraphDef, rng_state: nnx.State, config, mesh, state_shardings, batch_spec
) -> Callable:
    """The jitted `eval_step(state, batch) -> metrics` of a run (`steps.make_eval_step`)."""
    return jax.jit(
        make_eval_step(graphdef, rng_state, config),
        in_shardings=(state_shardings, batch_shardings(batch_spec, mesh, config.mesh.rules)),
    )


# ------------------------------------------------------------------- reading finished runs


def config_from_workdir(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run wrote to `WORKDIR/config.json`, as a locked ConfigDict (with the
    `data.corpus` facts the run recorded, if any). Raises FileNotFoundError without the file and
    ValueError for a key this version's `default_config()` lacks."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{workdir} has no config.json, so it holds no training run: train one first with "
            f"python -m moe_jax.train --config=configs/switch.py:tiny --workdir={workdir}"
        )
    with open(path, encoding="utf-8") as file:
        stored = json.load(file)
    corpus = stored.get("data", {}).pop("corpus", None)  # added by run_identity.resolve
    config = default_config()
    try:
        config.update(stored)  # ConfigDict casts JSON's lists back to tuples
    except KeyError as error:
        raise ValueError(f"{path}: {error}") from None
    if corpus is not None:
        with config.unlocked():
            config.data.corpus = corpus
    return config


def restore_for_inference(workdir: str) -> tuple[ml_collections.ConfigDict, nnx.Module, int]:
    """`(config, model, step)`: the model of the latest checkpoint in a training `workdir`,
    on one device (the mesh of the run is not needed to read it). Only the parameters and the
    model state are read; the optimizer state stays on disk (`Checkpoints.restore_parts`)."""
    config = config_from_workdir(workdir)
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    step = None
    if os.path.isdir(directory):
        checkpoints = checkpoint.Checkpoints(directory, keep=1, read_only=True)
        step = checkpoints.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"{workdir} holds no checkpoint ({directory} is empty or missing): train it with "
            f"python -m moe_jax.train --config=... --workdir={workdir}, or pass the workdir of "
            "a finished run."
        )
    config.unlock()
    config.mesh.update(data=1, expert=1, model=1)
    config.lock()
    mesh = parallel.mesh_from_config(config, devices=jax.devices()[:1])
    optimizer, _ = optim.make_optimizer(config.train)
    model = abstract_model(config)
    with jax.set_mesh(mesh):
        target, graphdef, rng_state = abstract_state(model, config, mesh, optimizer)
        skipped = jax.tree.map(lambda _: checkpoint.SKIP, target.opt_state)
        state = checkpoints.restore_parts(
            step, target._replace(step=checkpoint.SKIP, opt_state=skipped)
        )
    checkpoints.close()
    model = nnx.merge(graphdef, state.params, stand_in_rng_state(rng_state), state.model_state)
    return config, model, step
