"""Learning-rate schedules and optimizers from `config.train` (optax).

Schedules (`train.schedule`), each with a linear warmup from 0 to `train.learning_rate` over
`train.warmup_steps` updates:

- `'constant'`: then constant.
- `'rsqrt'`: then `learning_rate * sqrt(warmup_steps / step)`, the inverse-square-root decay of
  T5 and Switch (Raffel et al. 2020, Sec. 3.1.2), continuous at the end of the warmup.
- `'cosine'`: then a cosine decay to `COSINE_FINAL_FRACTION * learning_rate` at the horizon
  `train.schedule_steps` (0: `train.num_steps`), held after it (MaxText's default final
  fraction).

Update s (1-based) of the warmup uses `learning_rate * s / warmup_steps`, so the first update
already moves the parameters. The pieces are optax's (`linear_schedule`, `constant_schedule`,
`cosine_decay_schedule`, joined by `join_schedules`) but for the inverse square root, which
optax lacks.

Optimizers (`train.optimizer`): `'adafactor'` (the T5/Switch/ST-MoE choice: factored second
moments, update clipping at 1.0, updates scaled by the parameter RMS, no momentum) and
`'adamw'`. Weight decay (`train.weight_decay`, decoupled) is masked by what a parameter is, read
from its path: kernels, embeddings and expert weights decay; norm scales (`scale`), biases
(`bias`) and relative position bias tables (under `position_bias`) do not, whatever their rank
(`model.scan_layers` stacks a leading layer axis onto every parameter).
`train.grad_clip_norm > 0` clips the global gradient norm before the optimizer sees it.
`train.router_learning_rate_scale` multiplies the updates of the router weights (parameters
under a `router` module), which for both optimizers is the same as multiplying their learning
rate (and, for AdamW, their decoupled weight decay) by it; 1.0 leaves the optimizer as it is.
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax

COSINE_FINAL_FRACTION = 0.1
SCHEDULES = ("constant", "rsqrt", "cosine")
# path entries that mark a parameter weight decay leaves alone (see the module docstring)
NO_DECAY_NAMES = frozenset({"scale", "bias", "position_bias"})
OPTIMIZERS = ("adamw", "adafactor")
ROUTER_NAME = "router"  # the path entry of the router modules' parameters


def make_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate as a function of the number of updates already applied (0, 1, ...)."""
    peak = float(train_config.learning_rate)
    if not peak > 0:
        raise ValueError(
            f"train.learning_rate={train_config.learning_rate} must be > 0 (e.g. 3e-3 for the "
            "tiny configs, 1e-2 for Adafactor with the rsqrt schedule)."
        )
    warmup_steps = int(train_config.warmup_steps)
    name = train_config.schedule
    if name not in SCHEDULES:
        raise ValueError(
            f"train.schedule={name!r} is not a schedule; use one of {', '.join(SCHEDULES)}."
        )
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={warmup_steps} must be >= 0.")
    num_steps = int(train_config.get("schedule_steps", 0) or train_config.num_steps)
    if name == "cosine" and warmup_steps >= num_steps:
        raise ValueError(
            f"train.warmup_steps={warmup_steps} must be smaller than the schedule's horizon "
            f"{num_steps} (train.schedule_steps, or train.num_steps when it is 0) for the cosine "
            "schedule; lower the warmup or raise num_steps."
        )
    if name == "constant":
        decay = optax.constant_schedule(peak)
    elif name == "rsqrt":  # its argument counts the updates after the warmup
        decay = lambda after: peak * jnp.sqrt(max(warmup_steps, 1) / (after + warmup_steps))
    else:
        decay = optax.cosine_decay_schedule(peak, num_steps - warmup_steps, COSINE_FINAL_FRACTION)
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), decay], [warmup_steps]
    )
    # optax counts from 0 at the start of the warmup; the update being computed is count + 1
    return lambda count: schedule(jnp.asarray(count) + 1)


def _path_names(path) -> set[str]:
    """The names along a pytree path (dict keys, attribute names, sequence indices)."""
    names = (getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))) for key in path)
    return {str(name) for name in names}


def _decay_mask(params):
    """True for the weights that weight decay applies to (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not NO_DECAY_NAMES & _path_names(path), params
    )


def _router_mask(params):
    """True for the router weights (see the module docstring)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: ROUTER_NAME in _path_names(path), params
    )


def make_optimizer(
    train_config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`(optimizer, schedule)` for `train_config`; the optimizer includes gradient clipping."""
    schedule = make_schedule(train_config)
    weight_decay = float(train_config.weight_decay)
    name = train_config.optimizer
    if name == "adamw":
        optimizer = optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)
    elif name == "adafactor":
        optimizer = optax.adafactor(
            schedule,
            weight_decay_rate=weight_decay or None,
            weight_decay_mask=_decay_mask,
        )
    else:
        raise ValueError(
            f"train.optimizer={name!r} is not an optimizer; use one of {', '.join(OPTIMIZERS)}."
        )
    router_scale = float(train_config.router_learning_rate_scale)
    if not router_scale > 0:
        raise ValueError(
            f"train.router_learning_rate_scale={router_scale} must be > 0 (1.0: the router "
            "learns at train.learning_rate like every other weight)."
        )
    if router_scale != 1.0:
        optimizer = optax.chain(optimizer, optax.masked(optax.scale(router_scale), _router_mask))
    if train_config.grad_clip_norm < 0:
        raise ValueError(
            f"train.grad_clip_norm={train_config.grad_clip_norm} must be >= 0 (0 disables it)."
        )
    if train_config.grad_clip_norm > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(train_config.grad_clip_norm), optimizer)
    return optimizer, schedule
