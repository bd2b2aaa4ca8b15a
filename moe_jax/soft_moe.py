"""Soft MoE (Puigcerver et al., ICLR 2024, arXiv 2308.00951): every slot mixes every token.

Pure JAX (no Flax). This is the one documented extension of the routing contract: a slot of
Soft MoE holds no single token but a weighted average of all the group's tokens, so it cannot
be written in the slot view of `routing.Routing`. `SoftRouting` carries the dense weights
instead, and the einsum backend of `moe_jax.dispatch` computes with them (the gather and
dropless backends move whole tokens and refuse it; see `check_backend`).

With S slots per expert, one learned vector phi[:, e, s] per slot and logits
l[g, t, e, s] = scale * cos(x[g, t], phi[:, e, s]) (inputs and slot vectors l2-normalised, a
learned scalar scale: the paper's normalisation for large models, which vmoe's SoftRouter
applies always), the paper's equations (Sec. 2) are

    D[g, :, e, s] = softmax over the group's tokens t of l[g, t, e, s]    (dispatch weights)
    x~[g, e, s]   = sum_t D[g, t, e, s] x[g, t]                            (slot inputs)
    y~[g, e, s]   = expert_e(x~[g, e, s])
    C[g, t, :, :] = softmax over all E * S slots of l[g, t, :, :]          (combine weights)
    y[g, t]       = sum_{e, s} C[g, t, e, s] y~[g, e, s]

Nothing is dropped and there is no balancing loss. Padding tokens take no part in any slot's
mixture and get zero output. A slot mixes the whole group, future tokens too, so Soft MoE is for
encoders only (causal stacks refuse it), and a group should be one sequence (`moe.group_size=0`)
to keep examples independent of the others in their batch.
Shapes: G groups, T tokens per group, E experts, S slots per expert, M model dim.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.cosine_routing import cosine_similarity
from moe_jax.routing import real_token_mask

# the only dispatch backend that computes with dense mixing weights
SOFT_BACKENDS = ("einsum",)


class SoftRouting(NamedTuple):
    """Soft MoE's dense dispatch and combine weights (a JAX pytree; leaves lead with G).

    Attributes:
      dispatch_weight: f32[G, T, E, S] D above: for each slot, a softmax over the group's real
        tokens (0 on padding); sums to 1 over T.
      combine_weight: f32[G, T, E, S] C above: for each real token, a softmax over the E * S
        slots (all zero for padding); sums to 1 over (E, S).
      probs: f32[G, T, E] each token's combine weight per expert (C summed over slots), for the
        metrics.
    """

    dispatch_weight: jax.Array
    combine_weight: jax.Array
    probs: jax.Array


def check_backend(backend: str) -> None:
    """A ValueError unless `backend` can compute Soft MoE's dense slot mixing."""
    if backend not in SOFT_BACKENDS:
        raise ValueError(
            f"backend {backend!r} moves whole tokens into slots, but Soft MoE's slots mix every "
            f"token (a SoftRouting); use backend 'einsum'."
        )


@jax.jit
def soft_moe_logits(x: jax.Array, slot_params: jax.Array, scale: jax.Array) -> jax.Array:
    """l = scale * cos(x, phi): f32[G, T, E, S] from `x: [G, T, M]`, `slot_params: [M, E, S]`
    (phi) and the learned f32[] `scale`."""
    slot_params = jnp.asarray(slot_params)
    if slot_params.ndim != 3:
        raise ValueError(f"slot_params must be [M, E, S], got shape {slot_params.shape}.")
    d_model, num_experts, num_slots = slot_params.shape
    flat = slot_params.reshape(d_model, num_experts * num_slots)  # [M, E*S]
    cosine = cosine_similarity(x, flat)  # [G, T, E*S]
    cosine = cosine.reshape(*cosine.shape[:-1], num_experts, num_slots)  # [G, T, E, S]
    return jnp.asarray(scale, jnp.float32) * cosine


def _masked_softmax(logits: jax.Array, mask: jax.Array, axis: tuple[int, ...]) -> jax.Array:
    """Softmax of `logits` over `axis` among entries where `mask`; 0 elsewhere (and 0 where the
    mask leaves nothing to normalise over)."""
    masked = jnp.where(mask, logits, -jnp.inf)
    peak = jax.lax.stop_gradient(jnp.max(masked, axis=axis, keepdims=True))
    peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
    exp = jnp.exp(masked - peak)
    return exp / jnp.maximum(jnp.sum(exp, axis=axis, keepdims=True), jnp.finfo(jnp.float32).tiny)


@jax.jit
def soft_moe_routing(logits: jax.Array, padding_mask: jax.Array | None = None) -> SoftRouting:
    """Dispatch and combine weights (the module doc's D and C) from f32[G, T, E, S] logits.

    Args:
      logits: f32[G, T, E, S] (`soft_moe_logits`; any float dtype, computed in float32).
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      SoftRouting.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 4:
        raise ValueError(f"logits must be rank 4 [G, T, E, S], got shape {logits.shape}.")
    logits = logits.astype(jnp.float32)
    real = real_token_mask(padding_mask, logits.shape[:2])[..., None, None]  # [G, T, 1, 1]
    dispatch_weight = _masked_softmax(logits, real, axis=(1,))  # [G, T, E, S]
    combine_weight = _masked_softmax(logits, real, axis=(2, 3))  # [G, T, E, S]
    return SoftRouting(dispatch_weight, combine_weight, jnp.sum(combine_weight, axis=-1))


def dispatch(x: jax.Array, routing: SoftRouting) -> jax.Array:
    """Slot inputs x~ = sum_t D x: `x: [G, T, M]` -> `[E, G, S, M]` in x's dtype."""
    weight = routing.dispatch_weight.astype(x.dtype)
    return jnp.einsum("gtes,gtm->egsm", weight, x)  # [E, G, S, M]


def combine(expert_out: jax.Array, routing: SoftRouting) -> jax.Array:
    """Outputs y = sum_{e, s} C y~: `expert_out: [E, G, S, M]` -> f32[G, T, M]."""
    return jnp.einsum(
        "gtes,egsm->gtm",
        routing.combine_weight,
        expert_out,
        preferred_element_type=jnp.float32,
    )  # [G, T, M]


@jax.jit
def soft_metrics(routing: SoftRouting, padding_mask: jax.Array | None = None) -> dict:
    """The diagnostics of `routing.router_metrics` for Soft MoE (padding tokens excluded).

    Nothing is dropped (both fractions 0); router_confidence is the mean over real tokens of
    the largest per-expert combine weight max_e probs; expert_usage the fraction of experts
    whose slots give some real token a weight; expert_load f32[E] the share of the computed
    slots, 1/E each (every expert runs all its S slots); expert_load_routed f32[E] each
    expert's share of the real tokens' combine weight.
    """
    num_groups, num_tokens, num_experts = routing.probs.shape
    real = real_token_mask(padding_mask, (num_groups, num_tokens)).astype(jnp.float32)
    num_real = jnp.maximum(jnp.sum(real), 1.0)
    weight_per_expert = jnp.einsum("gte,gt->e", routing.probs, real)  # [E]
    return {
        "fraction_tokens_dropped": jnp.zeros((), jnp.float32),
        "fraction_assignments_dropped": jnp.zeros((), jnp.float32),
        "router_confidence": jnp.sum(jnp.max(routing.probs, axis=-1) * real) / num_real,
        "expert_usage": jnp.mean(weight_per_expert > 0),
        "expert_load": jnp.full((num_experts,), 1.0 / num_experts, jnp.float32),
        "expert_load_routed": weight_per_expert / num_real,
    }
