"""The train and eval steps: pure functions of (state, batch), to be jit-compiled.

`make_train_step(...)` returns `train_step(state, batch, rng) -> (state, metrics)`;
`make_eval_step(...)` returns `eval_step(state, batch) -> metrics`. The model enters as an
`nnx.GraphDef` plus states (`nnx.split` / `nnx.merge` inside the step), so the steps shard under
a mesh like any jitted function of arrays.

Loss: masked mean cross-entropy over the target weights, plus `loss.aux_coef` times the
load-balancing loss, `loss.z_coef` times the router z-loss and ReMoE's L1 penalty (which carries
its own adaptive coefficient), each *summed* over the sparse layers (as T5X and ST-MoE do). The
metrics `aux_loss` and `z_loss` are those sums without their coefficients, `l1_loss` the L1
sum; `fraction_dropped` and `router_confidence` are means over the sparse layers,
`router_logit_max` the largest absolute router logit of any sparse layer, and `expert_load`
(filled slots, after capacity) and `expert_load_routed` (the router's choices, before capacity)
are `f32[num_sparse_layers, E]`.

Evaluation routes at the eval capacity factor, so tokens may drop, unless
`train.eval_dropless` runs it dropless, as the served model (`moe_jax.decode`) routes.

Randomness: the step's key is `fold_in(rng, state.step)` and reseeds every random stream of the
model (dropout, router jitter, GShard's random second choice), so a step's randomness depends on
(seed, step) only and a resumed run repeats an uninterrupted one exactly.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax.config import DECODER_KINDS
from moe_jax.layers import inference_copy


class TrainState(NamedTuple):
    """What a checkpoint holds; a pytree. `model_state` is the non-trainable model state
    (e.g. the aux-free router bias); random keys are not state (they derive from the step)."""

    step: jax.Array  # i32[]: updates applied so far
    params: nnx.State
    model_state: nnx.State
    opt_state: optax.OptState


# ------------------------------------------------------------------------------ the steps


def forward(model, batch: dict, config, *, deterministic: bool):
    """`(logits f32|bf16[B, L, V], aux, targets i32[B, L], weights f32[B, L])` of `model` on
    `batch` (decoder-only or encoder-decoder, by `config.model.kind`)."""
    if config.model.kind in DECODER_KINDS:
        logits, aux = model(
            batch["inputs"],
            deterministic=deterministic,
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
        )  # [B, L, V]
        return logits, aux, batch["targets"], batch["weights"]
    logits, aux = model(
        batch["encoder_inputs"],
        batch["decoder_inputs"],
        deterministic=deterministic,
        encoder_segment_ids=batch["encoder_segment_ids"],
        decoder_segment_ids=batch["decoder_segment_ids"],
    )  # [B, Ld, V]
    return logits, aux, batch["decoder_targets"], batch["decoder_weights"]


def soft_cross_entropy(
    logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """`(cross_entropy, kl)`, each f32[B, L]: of softmax(logits / temperature) against the
    soft targets softmax(teacher_logits / temperature), per token; kl = cross_entropy minus
    the teacher's entropy (0 when the two distributions agree)."""
    student = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)  # [B, L, V]
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    teacher_probs = jnp.exp(teacher)
    cross_entropy = -(teacher_probs * student).sum(-1)  # [B, L]
    kl = (teacher_probs * (teacher - student)).sum(-1)  # [B, L]
    return cross_entropy, kl


def compute_loss(model, batch: dict, config, *, deterministic: bool, teacher_logits=None):
    """`(loss, metrics)` of `model` on `batch`; metrics hold sums for token-weighted means.

    With `teacher_logits` f32[B, L, V] (distillation, `config.distill`), the cross-entropy
    term is `(1 - alpha) * CE(data) + alpha * temperature**2 * CE(teacher soft targets)`
    (Hinton et al. 2015's temperature**2 keeps the soft term's gradient scale), and the
    metrics add `distill_cross_entropy` and `distill_kl` (of the soft targets).
    """
    logits, aux, targets, weights = forward(model, batch, config, deterministic=deterministic)
    token_losses = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    )  # [B, L]
    weight_sum = weights.sum()
    cross_entropy = (token_losses * weights).sum() / jnp.maximum(weight_sum, 1.0)
    correct = (jnp.argmax(logits, axis=-1) == targets) * weights  # [B, L]
    step_metrics = {
        "cross_entropy": cross_entropy,
        "accuracy": correct.sum() / jnp.maximum(weight_sum, 1.0),
        "weight_sum": weight_sum,
    }
    loss = cross_entropy
    if teacher_logits is not None:
        alpha, temperature = config.distill.alpha, config.distill.temperature
        soft, kl = soft_cross_entropy(logits, teacher_logits, temperature)  # [B, L]
        soft = (soft * weights).sum() / jnp.maximum(weight_sum, 1.0)
        loss = (1.0 - alpha) * cross_entropy + alpha * temperature**2 * soft
        step_metrics.update(
            distill_cross_entropy=soft,
            distill_kl=(kl * weights).sum() / jnp.maximum(weight_sum, 1.0),
        )
    if aux is not None:
        aux_loss = aux.load_balancing_loss.sum()  # summed over the sparse layers
        z_loss = aux.router_z_loss.sum()
        l1_loss = aux.router_l1_loss.sum()
        loss = loss + config.loss.aux_coef * aux_loss + config.loss.z_coef * z_loss + l1_loss
        step_metrics.update(
            aux_loss=aux_loss,
            z_loss=z_loss,
            l1_loss=l1_loss,
            fraction_dropped=aux.fraction_tokens_dropped.mean(),
            router_confidence=aux.router_confidence.mean(),
            router_logit_max=aux.router_logit_max.max(),
            expert_load=aux.expert_load,  # [num_sparse_layers, E]
            expert_load_routed=aux.expert_load_routed,  # [num_sparse_layers, E]
        )
    step_metrics["loss"] = loss
    return loss, step_metrics


def _rng_stream_tags(rng_state: nnx.State) -> tuple[str, ...]:
    """Names of the model's random streams ('dropout', 'router', ...)."""
    keys = jax.tree.leaves(rng_state, is_leaf=lambda x: isinstance(x, nnx.RngKey))
    return tuple(sorted({key.tag for key in keys if isinstance(key, nnx.RngKey)}))


def stand_in_rng_state(rng_state: nnx.State) -> nnx.State:
    """Keys and counts shaped like the model's RNG state, built inside the trace so that they
    compile to the same constants in every process; `nnx.reseed` replaces them before use."""

    def stand_in(leaf):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.split(jax.random.key(0), leaf.shape)
        return jnp.zeros(leaf.shape, leaf.dtype)

    return jax.tree.map(stand_in, rng_state)


def make_train_step(
    graphdef: nnx.GraphDef,
    rng_state: nnx.State,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    config,
    teacher: tuple[nnx.GraphDef, Any] | None = None,
) -> Callable:
    """`train_step(state, batch, rng, teacher_state=None) -> (state, metrics)`, pure (jit it).

    `graphdef` and `rng_state` come from `nnx.split(model, nnx.Param, nnx.RngState, ...)`; only
    the structure of `rng_state` is used (arrays or `jax.ShapeDtypeStruct`s). `rng` is the run's
    base key; the step's key is `fold_in(rng, state.step)`, which reseeds every random stream of
    the model (dropout, router jitter), so a step's randomness depends on (seed, step) only.

    Distillation: `teacher = (teacher_graphdef, teacher_config)` of `nnx.split(teacher_model)`;
    the step then takes the teacher's state, runs the teacher deterministically (eval mode,
    no gradient) and adds its soft targets to the loss (`compute_loss`).
    """
    tags = _rng_stream_tags(rng_state)

    def train_step(state: TrainState, batch: dict, rng: jax.Array, teacher_state=None):
        step_key = jax.random.fold_in(rng, state.step)
        teacher_logits = None
        if teacher is not None:
            teacher_graphdef, teacher_config = teacher
            teacher_model = nnx.merge(teacher_graphdef, teacher_state)
            teacher_logits, *_ = forward(teacher_model, batch, teacher_config, deterministic=True)
            teacher_logits = jax.lax.stop_gradient(teacher_logits)  # [B, L, V]

        def loss_fn(params):
            rngs = stand_in_rng_state(rng_state)
            model = nnx.merge(graphdef, params, rngs, state.model_state, copy=True)
            nnx.reseed(model, policy="match_shape", **dict.fromkeys(tags, step_key))
            loss, step_metrics = compute_loss(
                model, batch, config, deterministic=False, teacher_logits=teacher_logits
            )
            _, _, _, model_state = nnx.split(model, nnx.Param, nnx.RngState, ...)
            return loss, (step_metrics, model_state)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (_, (step_metrics, model_state)), grads = grad_fn(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_metrics.update(
            learning_rate=schedule(state.step),
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(params),
        )
        return TrainState(state.step + 1, params, model_state, opt_state), step_metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, rng_state: nnx.State, config) -> Callable:
    """`eval_step(state, batch) -> metrics`: the deterministic forward pass (no jitter or
    dropout) at the eval capacity factor, or with no capacity when `train.eval_dropless` is set
    (every MoE layer switched to dropless by `layers.inference_copy`, as decoding routes; Expert
    Choice keeps its capacity); arguments as for `make_train_step`."""

    def eval_step(state: TrainState, batch: dict):
        rngs = stand_in_rng_state(rng_state)  # unused: evaluation draws no random numbers
        model = nnx.merge(graphdef, state.params, rngs, state.model_state)
        if config.train.eval_dropless:
            model = inference_copy(model, dropless=True)
        _, step_metrics = compute_loss(model, batch, config, deterministic=True)
        return step_metrics

    return eval_step
