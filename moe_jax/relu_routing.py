"""ReLU routing (ReMoE, Wang et al., ICLR 2025, arXiv 2412.14711) and its L1 controller.

Pure JAX (no Flax). ReMoE replaces softmax and top-k by a ReLU: the gates are
R(x) = ReLU(x W_r), a token goes to every expert whose gate is positive, and that gate is the
combine weight, so routing is differentiable and the number of experts per token varies. The
sparsity is held at a target by an L1 penalty lambda * L_reg on the gates
(`losses.relu_l1_loss`) whose coefficient is adapted after every training step:

    lambda_{i+1} = lambda_i * alpha ** sign(target_sparsity - S_i),

S_i the fraction of zero gates at step i and target_sparsity = 1 - k / E for k active experts
on average (the paper's lambda_0 = 1e-8 and alpha = 1.2). Shapes as in `moe_jax.routing`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.routing import Routing, float_logits, real_token_mask, static_capacity
from moe_jax.slots import route_choices


@functools.partial(jax.jit, static_argnames=("capacity",))
def relu_routing(
    logits: jax.Array, *, capacity: int | None, padding_mask: jax.Array | None = None
) -> Routing:
    """ReMoE's router: each real token to every expert with a positive gate ReLU(logit).

    An expert's slots take its tokens in position order (so routing is causal); a token past
    the expert's C slots is dropped there (capacity None: C = T, nothing dropped).

    Args:
      logits: f32[G, T, E] router logits x W_r.
      capacity: C (static int >= 1) or None.
      padding_mask: f32|bool[G, T], 0 for padding tokens (their gates are 0).
    Returns:
      Routing with probs = the gates ReLU(logits) f32[G, T, E] (not normalised; 0 on padding)
      and expert_index i32[G, T, E] = e where token t's gate for e is positive, else -1.
    """
    logits = float_logits(logits)
    num_groups, num_tokens, num_experts = logits.shape
    capacity = static_capacity(capacity, num_tokens)
    real = real_token_mask(padding_mask, (num_groups, num_tokens))
    gates = jnp.where(real[..., None], jax.nn.relu(logits), 0.0)  # [G, T, E]
    active = gates > 0
    experts = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), gates.shape)
    token_index, weight = route_choices(
        experts, gates, active, num_experts=num_experts, capacity=capacity
    )
    return Routing(token_index, weight, gates, jnp.where(active, experts, -1))


@jax.jit
def gate_sparsity(gates: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """f32[] S: the fraction of zero gates among the real tokens' f32[G, T, E] gates."""
    gates = jnp.asarray(gates)
    real = real_token_mask(padding_mask, gates.shape[:2]).astype(jnp.float32)
    active = jnp.einsum("gte,gt->", (gates > 0).astype(jnp.float32), real)
    return 1.0 - active / jnp.maximum(jnp.sum(real) * gates.shape[-1], 1.0)


def update_l1_coefficient(
    coefficient: jax.Array,
    sparsity: jax.Array,
    *,
    target_sparsity: float,
    rate: float = 1.2,
) -> jax.Array:
    """One step of ReMoE's controller: `coefficient * rate ** sign(target_sparsity - sparsity)`.

    Too many active gates (sparsity below target) raise the L1 coefficient by the factor
    `rate`, too few lower it, and exactly at the target it stays.

    Args:
      coefficient: f32[] lambda_i (> 0). sparsity: f32[] S_i (`gate_sparsity`).
      target_sparsity: 1 - k / E, in [0, 1). rate: alpha > 1 (ReMoE uses 1.2).
    Returns:
      f32[] lambda_{i+1}.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(
            f"target_sparsity must be in [0, 1), got {target_sparsity!r}; it is 1 - k / E."
        )
    if not rate > 1.0:
        raise ValueError(f"rate must be > 1, got {rate!r}; ReMoE uses 1.2.")
    step = jnp.sign(jnp.float32(target_sparsity) - jnp.asarray(sparsity, jnp.float32))
    return jnp.asarray(coefficient, jnp.float32) * jnp.float32(rate) ** step
