"""Router auxiliary losses: load balancing (Switch/T5X, GShard, Shazeer 2017), ReMoE's L1 and
the router z-loss.

Pure JAX (no Flax). All maths in float32. Every loss takes an optional padding_mask
f32|bool[G, T] (0 = padding): padding tokens are left out of every statistic. The losses are
wrapped in `jax.jit` so an eager call compiles once; under an outer jit they are inlined.

Where balancing is counted. The leading axis G of `load_balancing_loss`, `gshard_aux_loss` and
`relu_l1_loss` is the unit over which the per-expert fractions f_e and mean probabilities P_e
are counted; the loss is the mean over those units. `AUX_SCOPES` names the three a layer uses
(`loss.aux_scope`): 'group', the routing groups [G, T, ...] (Switch, T5X); 'sequence', the
batch's rows [B, L, ...] (DeepSeek-V3's sequence-wise balance loss, arXiv 2412.19437, Eqs.
17-20); 'global', the whole batch as one unit [1, B * L, ...] ("Demons in the Detail", Qiu et al.
2025, arXiv 2501.11873: f_e over the global batch). Under a mesh the layer sees the global batch,
so the 'global' sums run across devices (XLA inserts the all-reduce).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe_jax.routing import real_token_mask

AUX_SCOPES = ("group", "sequence", "global")


def _check_rank3(name: str, array: jax.Array) -> jax.Array:
    array = jnp.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name} must be rank 3 [G, T, ...], got shape {array.shape}.")
    return array


def _check_routing_inputs(probs: jax.Array, expert_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    probs = _check_rank3("probs", probs).astype(jnp.float32)
    expert_index = _check_rank3("expert_index", expert_index)
    if expert_index.shape[:2] != probs.shape[:2]:
        raise ValueError(
            f"expert_index [G, T, K] must share [G, T] = {probs.shape[:2]} with probs, "
            f"got {expert_index.shape}."
        )
    return probs, expert_index


def _chosen(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """f32[G, T, E]: 1.0 where expert e is among the token's choices."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [G, T, K, E]
    return jnp.max(one_hot, axis=-2)  # [G, T, E]


@jax.jit
def load_balancing_loss(
    probs: jax.Array, expert_index: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
    """Switch/T5X load-balancing loss, counted before capacity drops.

    E**2 * mean_{g,e}(f[g, e] * P[g, e]), with f the fraction of the group's real tokens that
    chose e among their top-k and P the mean router probability of e over those tokens. This is
    Switch's `alpha * N * sum_i f_i P_i` (Fedus et al. 2022, eq. 4) per group without alpha;
    uniform routing gives exactly K. Gradients reach the router through P only.

    Args:
      probs: f32[G, T, E] router probabilities.
      expert_index: i32[G, T, K] experts chosen per token.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      f32[] loss.
    """
    probs, expert_index = _check_routing_inputs(probs, expert_index)
    num_groups, num_tokens, num_experts = probs.shape
    real = real_token_mask(padding_mask, (num_groups, num_tokens)).astype(jnp.float32)
    num_real = jnp.maximum(jnp.sum(real, axis=1), 1.0)[:, None]  # [G, 1]
    chosen = _chosen(expert_index, num_experts)  # [G, T, E]
    fraction_chosen = jnp.einsum("gte,gt->ge", chosen, real) / num_real  # [G, E]
    mean_prob = jnp.einsum("gte,gt->ge", probs, real) / num_real  # [G, E]
    return num_experts**2 * jnp.mean(fraction_chosen * mean_prob)


@jax.jit
def gshard_aux_loss(
    probs: jax.Array, expert_index: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
    """GShard's auxiliary loss (Lepikhin et al. 2020, Algorithm 1), first choices only (GLaM).

    The paper writes (1/E) sum_e (c_e / S) m_e with c_e the first-choice count of expert e, S the
    group size and m_e its mean gate. We scale it by E**2, as the public Mesh TensorFlow and
    lingvo top-2 gating code does, so that uniform routing gives 1.0 like the Switch loss: it is
    `load_balancing_loss` on the first choice, `expert_index[..., :1]`.

    Args:
      probs: f32[G, T, E]. expert_index: i32[G, T, K], choice 0 first.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      f32[] loss.
    """
    probs, expert_index = _check_routing_inputs(probs, expert_index)
    return load_balancing_loss(probs, expert_index[..., :1], padding_mask)


@jax.jit
def deepseek_balance_loss(
    probs: jax.Array, expert_index: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
    """DeepSeek-V3's complementary balance loss without alpha (arXiv 2412.19437, Eqs. 17-20).

    Per unit g (a sequence at `loss.aux_scope='sequence'`, the paper's sequence-wise loss):
    sum_i f_i P_i with f_i = E / (K T) times the number of the unit's T real tokens that chose
    expert i, and P_i the mean over them of the normalised affinity s'_i = s_i / sum_j s_j
    (`routing.biased_top_k`'s probs); the mean over units. f_i carries the 1 / K that Switch's
    form lacks, so this is `load_balancing_loss / K`, and uniform routing gives 1.

    Args:
      probs: f32[G, T, E] normalised affinities. expert_index: i32[G, T, K] the chosen experts.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      f32[] loss.
    """
    probs, expert_index = _check_routing_inputs(probs, expert_index)
    return load_balancing_loss(probs, expert_index, padding_mask) / expert_index.shape[-1]


@functools.partial(jax.jit, static_argnames=("k",))
def relu_l1_loss(
    gates: jax.Array,
    expert_index: jax.Array,
    padding_mask: jax.Array | None = None,
    *,
    k: float,
) -> jax.Array:
    """ReMoE's load-balanced L1 penalty on ReLU gates (Wang et al. 2025, arXiv 2412.14711).

    mean over units g of sum_e f[g, e] * mean_t gates[g, t, e], with f[g, e] = (E / k) times the
    fraction of the unit's real tokens whose gate for e is positive (1 for every expert when k
    experts per token are active and balanced; no gradient). This is `load_balancing_loss` of
    the gates divided by k. Without the f weighting it would be the plain L1 norm of the gates;
    the weighting presses hardest on the busiest experts. The layer multiplies it by its
    adaptive coefficient (`relu_routing.update_l1_coefficient`).

    Args:
      gates: f32[G, T, E] ReLU gates (`relu_routing.relu_routing`'s probs).
      expert_index: i32[G, T, E] e where the gate is positive, -1 elsewhere.
      padding_mask: f32|bool[G, T], 0 for padding tokens.
      k: the target number of active experts per token (> 0).
    Returns:
      f32[] loss.
    """
    if not k > 0:
        raise ValueError(f"k must be > 0, got {k!r}; it is the target active experts per token.")
    return load_balancing_loss(gates, expert_index, padding_mask) / k


def _squared_coefficient_of_variation(values: jax.Array) -> jax.Array:
    """Var(values) / mean(values)**2 over the last axis (population variance); 0 if all zero."""
    mean = jnp.mean(values, axis=-1)
    return jnp.var(values, axis=-1) / jnp.maximum(mean**2, 1e-20)


@jax.jit
def importance_load_loss(
    probs: jax.Array, expert_index: jax.Array, padding_mask: jax.Array | None = None
) -> jax.Array:
    """Shazeer et al. 2017 (Sec. 4, Appendix A): CV(importance)**2 + CV(load)**2.

    Over the whole batch (all groups): importance_e = sum of probs[..., e] over real tokens;
    load_e = the number of real tokens that chose e among their top-k (before capacity). The
    paper's smooth load estimator needs the noise of each gate; we use the plain count, so the
    load term carries no gradient and the importance term trains the router. The two terms are
    added with equal weight (the paper weights them separately). A balanced router scores 0.

    Args:
      probs: f32[G, T, E] router probabilities (or dense gates). expert_index: i32[G, T, K].
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      f32[] loss.
    """
    probs, expert_index = _check_routing_inputs(probs, expert_index)
    num_groups, num_tokens, num_experts = probs.shape
    real = real_token_mask(padding_mask, (num_groups, num_tokens)).astype(jnp.float32)
    importance = jnp.einsum("gte,gt->e", probs, real)  # [E]
    load = jnp.einsum("gte,gt->e", _chosen(expert_index, num_experts), real)  # [E]
    return _squared_coefficient_of_variation(importance) + _squared_coefficient_of_variation(load)


@jax.jit
def router_z_loss(logits: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, Sec. 3.3, eq. 5): mean of logsumexp(logits)**2.

    sum(logsumexp(logits, -1)**2) / (G * T); with a padding_mask the mean is over real tokens.
    Zero logits give log(E)**2.

    Args:
      logits: f32[G, T, E] router logits (any float dtype; computed in float32).
      padding_mask: f32|bool[G, T], 0 for padding tokens.
    Returns:
      f32[] loss.
    """
    logits = _check_rank3("logits", logits).astype(jnp.float32)
    real = real_token_mask(padding_mask, logits.shape[:2]).astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)  # [G, T]
    return jnp.sum(real * log_z**2) / jnp.maximum(jnp.sum(real), 1.0)
