"""Cosine router logits (X-MoE, Chi et al. 2022, arXiv 2204.09179) and the cosine similarity.

Pure JAX (no Flax). X-MoE scores a token against each expert on a low-dimensional hypersphere:
the token's hidden state is projected to D dims (D << M), and the score is the cosine between
that projection and a learned D-dim expert embedding, divided by a learned temperature:

    s[t, e] = cos(W h_t, w_e) / tau

(their Sec. 3, routing on the hypersphere). Route the scores as logits with
`routing.tokens_choose` (softmax over experts, top-k), as X-MoE does. Soft MoE
(`moe_jax.soft_moe`) scores tokens against its slots with the same `cosine_similarity`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# added to squared norms, so an all-zero vector normalises to zero instead of NaN
_NORM_EPS = 1e-6


def l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    """`x / sqrt(sum(x**2, axis) + 1e-6)`: unit vectors along `axis` (zero stays zero)."""
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + _NORM_EPS)


def cosine_similarity(x: jax.Array, vectors: jax.Array) -> jax.Array:
    """f32[..., N] cosine between each row of `x: [..., D]` and each column of `vectors: [D, N]`.

    Computed in float32 at the highest matmul precision (a router's logits).
    """
    x, vectors = jnp.asarray(x), jnp.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != x.shape[-1]:
        raise ValueError(
            f"vectors must be [D, N] with D = x.shape[-1] = {x.shape[-1]}, got {vectors.shape}."
        )
    x = l2_normalize(x.astype(jnp.float32), axis=-1)
    vectors = l2_normalize(vectors.astype(jnp.float32), axis=0)
    return jnp.einsum("...d,dn->...n", x, vectors, precision=jax.lax.Precision.HIGHEST)


@jax.jit
def cosine_logits(
    x: jax.Array,
    projection: jax.Array,
    expert_embeddings: jax.Array,
    log_temperature: jax.Array,
) -> jax.Array:
    """X-MoE routing scores `cos(x W, w_e) / exp(log_temperature)`.

    The temperature is learned through its logarithm, so it stays positive.

    Args:
      x: f32[..., M] router inputs. projection: f32[M, D] (W). expert_embeddings: f32[D, E].
      log_temperature: f32[] log of tau.
    Returns:
      f32[..., E] logits, each in [-1 / tau, 1 / tau].
    """
    x = jnp.asarray(x).astype(jnp.float32)
    projection = jnp.asarray(projection).astype(jnp.float32)
    if projection.ndim != 2 or projection.shape[0] != x.shape[-1]:
        raise ValueError(
            f"projection must be [M, D] with M = x.shape[-1] = {x.shape[-1]}, "
            f"got {projection.shape}."
        )
    projected = jnp.einsum("...m,md->...d", x, projection, precision=jax.lax.Precision.HIGHEST)
    cosine = cosine_similarity(projected, expert_embeddings)  # [..., E]
    return cosine * jnp.exp(-jnp.asarray(log_temperature, jnp.float32))
