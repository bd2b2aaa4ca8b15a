"""Rotary position embeddings and grouped-query self-attention (Llama-style decoders).

Used by `config.model.kind == 'rope_decoder'` (Mixtral, OLMoE, Qwen-MoE); no biases but the
optional q/k/v ones (`model.qkv_bias`, Qwen2-MoE).

- `rotary_embedding(x, positions, theta, yarn)`: RoPE (Su et al. 2021) in the "rotate half"
  layout that Llama, Mixtral and OLMoE checkpoints use: feature i of a head is paired with
  feature `i + D/2`, and the pair turns by the angle `position * theta**(-2i/D)`; with YaRN
  (`model.rope_type='yarn'`) by `moe_jax.rope`'s scaled frequencies, cos and sin scaled too.
- `GroupedQueryAttention`: N query heads share K key/value heads (Ainslie et al. 2023), query
  head n reading key/value head `n // (N / K)`; K == N is plain multi-head attention. Logits
  scaled by `1 / sqrt(D)`, softmax in float32. Optional q/k RMSNorm before RoPE (`qk_norm`):
  OLMoE's one RMSNorm over the whole `N * D` query projection and one over the `K * D` key
  projection, or with `qk_norm_per_head` Qwen3's one `[D]` RMSNorm for queries and one for keys,
  each applied to every head's D features alone.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.attention import MASKED_LOGIT, AttentionCache, RMSNorm, _param
from moe_jax.experts import dense_matmul
from moe_jax.rope import YarnScaling, rope_frequencies, yarn_from_config


def rotary_embedding(
    x: jax.Array, positions: jax.Array, *, theta: float, yarn: YarnScaling | None = None
) -> jax.Array:
    """Rotate `x: f32[B, L, N, D]` by its positions `i32[B, L]`; returns `[B, L, N, D]` in x's
    dtype.

    With `h = D // 2`, `x1 = x[..., :h]`, `x2 = x[..., h:]` and `a_i = position * theta**(-2i/D)`
    (angles in float32): `concat(x1 cos a - x2 sin a, x2 cos a + x1 sin a)`. The dot product of
    a rotated query and key then depends on their positions only through the difference. With
    `yarn`, `a_i` uses YaRN's inverse frequencies and cos and sin are multiplied by its
    attention scaling (`moe_jax.rope.rope_frequencies`).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}.")
    half = head_dim // 2
    inv_freq, scaling = rope_frequencies(head_dim, theta, yarn)  # [h]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, h]
    cos = (jnp.cos(angles) * scaling)[:, :, None, :].astype(x.dtype)  # [B, L, 1, h]
    sin = (jnp.sin(angles) * scaling)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)  # [B, L, N, D]


class GroupedQueryAttention(nnx.Module):
    """Self-attention with rotary positions and `num_kv_heads` key/value heads.

    Reads `config.model.{d_model, num_heads, num_kv_heads (0: num_heads), head_dim, rope_theta,
    rope_type and YaRN's rope_* (`rope.yarn_from_config`), qk_norm, qk_norm_per_head,
    norm_epsilon, dropout_rate, dtype, param_dtype}`. Weights:
    `wq: [M, N, D]`, `wk, wv: [M, K, D]` (logical `('embed', 'heads', 'kv')`), `wo: [N, D, M]`
    (`('heads', 'kv', 'embed')`), truncated-normal fan-in init; with `qk_norm`, RMSNorm scales
    `q_norm: [N * D]`, `k_norm: [K * D]`, or `q_norm, k_norm: [D]` with `qk_norm_per_head`; with
    `qkv_bias`, biases `bq: [N, D]`, `bk, bv: [K, D]` (zeros; logical `('heads', 'kv')`).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        self.num_heads, self.head_dim = model.num_heads, model.head_dim
        self.num_kv_heads = model.num_kv_heads or model.num_heads
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model.num_kv_heads={model.num_kv_heads} must divide model.num_heads="
                f"{model.num_heads} (0 means num_heads: plain multi-head attention)."
            )
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even model.head_dim, got {self.head_dim}.")
        self.theta = float(model.rope_theta)
        if not self.theta > 1:
            raise ValueError(f"model.rope_theta must be > 1, got {model.rope_theta!r}.")
        self.yarn = yarn_from_config(model)
        self.dtype = jnp.dtype(model.dtype)
        self.dropout = nnx.Dropout(model.dropout_rate, rngs=rngs)
        param_dtype = jnp.dtype(model.param_dtype)
        init_in = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        init_out = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        names_in = ("embed", "heads", "kv")
        q_shape = (model.d_model, self.num_heads, self.head_dim)
        kv_shape = (model.d_model, self.num_kv_heads, self.head_dim)
        self.wq = _param(init_in(rngs.params(), q_shape, param_dtype), names_in)
        self.wk = _param(init_in(rngs.params(), kv_shape, param_dtype), names_in)
        self.wv = _param(init_in(rngs.params(), kv_shape, param_dtype), names_in)
        out_shape = (self.num_heads, self.head_dim, model.d_model)
        self.wo = _param(init_out(rngs.params(), out_shape, param_dtype), ("heads", "kv", "embed"))
        bias = lambda shape: _param(jnp.zeros(shape, param_dtype), ("heads", "kv"))
        self.bq = bias(q_shape[1:]) if model.qkv_bias else None  # [N, D]
        self.bk = bias(kv_shape[1:]) if model.qkv_bias else None  # [K, D]
        self.bv = bias(kv_shape[1:]) if model.qkv_bias else None  # [K, D]
        self.qk_norm = bool(model.qk_norm)
        self.qk_norm_per_head = bool(model.qk_norm_per_head)
        if self.qk_norm_per_head and not self.qk_norm:
            raise ValueError("model.qk_norm_per_head=True needs model.qk_norm=True.")
        if self.qk_norm:

            def norm(width: int) -> RMSNorm:
                return RMSNorm(
                    width,
                    epsilon=model.norm_epsilon,
                    dtype=model.dtype,
                    param_dtype=model.param_dtype,
                )

            if self.qk_norm_per_head:
                self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)
            else:
                self.q_norm = norm(self.num_heads * self.head_dim)
                self.k_norm = norm(self.num_kv_heads * self.head_dim)
        self.cache: AttentionCache | None = nnx.data(None)

    def init_cache(self, batch: int, length: int) -> None:
        """An empty (zero) cache of `length` rotated keys and values per sequence,
        `[2, B, Lc, K, D]` (K key/value heads; `[R, 2, ...]` in a scanned stack)."""
        layers = self.wq.shape[:-3]
        shape = (*layers, 2, batch, length, self.num_kv_heads, self.head_dim)
        self.cache = AttentionCache(jnp.zeros(shape, self.dtype))

    def _project(self, x: jax.Array, w: nnx.Param, bias: nnx.Param | None = None) -> jax.Array:
        out = dense_matmul(x, w[...].astype(self.dtype))
        if bias is not None:
            out = out + bias[...].astype(out.dtype)
        return out.astype(self.dtype)  # [B, L, heads, D]

    def _normed(self, x: jax.Array, norm: RMSNorm) -> jax.Array:
        """RMSNorm over each head's features (`qk_norm_per_head`) or over all heads' together:
        `[B, L, H, D]` -> `[B, L, H, D]`."""
        if self.qk_norm_per_head:
            return norm(x)
        batch, length, heads, head_dim = x.shape
        return norm(x.reshape(batch, length, heads * head_dim)).reshape(x.shape)

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array,
        positions: jax.Array,
        deterministic: bool,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """Attend within `x: [B, L, M]`; `mask: bool[B, 1, L, L]` (see `attention.attention_mask`),
        `positions: i32[B, L]` rotary positions. Returns `[B, L, M]` in the compute dtype.

        With a cache (`init_cache`), the rotated keys and values of `x` are written at cache rows
        `cache_index ..` and the queries attend to all `Lc` rows: `mask` is `[B, 1, L, Lc]`.
        """
        x = x.astype(self.dtype)
        q = self._project(x, self.wq, self.bq)  # [B, L, N, D]
        k = self._project(x, self.wk, self.bk)  # [B, L, K, D]
        v = self._project(x, self.wv, self.bv)  # [B, L, K, D]
        if self.qk_norm:
            q, k = self._normed(q, self.q_norm), self._normed(k, self.k_norm)
        q = rotary_embedding(q, positions, theta=self.theta, yarn=self.yarn)
        k = rotary_embedding(k, positions, theta=self.theta, yarn=self.yarn)
        if self.cache is not None:
            new = jax.lax.dynamic_update_slice_in_dim(
                self.cache[...], jnp.stack([k, v]), cache_index, axis=2
            )  # [2, B, Lc, K, D]
            self.cache[...] = new
            k, v = new[0], new[1]
        batch, length = q.shape[:2]
        group = self.num_heads // self.num_kv_heads
        q = q.reshape(batch, length, self.num_kv_heads, group, self.head_dim)  # [B, L, K, R, D]
        logits = jnp.einsum("bqgrd,bsgd->bgrqs", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(self.head_dim)  # [B, K, R, L, Lk]
        logits = jnp.where(mask[:, :, None], logits, MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, K, R, L, L]
        probs = self.dropout(probs, deterministic=deterministic).astype(self.dtype)
        context = jnp.einsum("bgrqs,bsgd->bqgrd", probs, v, preferred_element_type=jnp.float32)
        context = context.reshape(batch, length, self.num_heads, self.head_dim)  # [B, L, N, D]
        wo = self.wo[...].astype(self.dtype)
        out = dense_matmul(context.astype(self.dtype), wo, contracted=2)  # [B, L, M]
        return out.astype(self.dtype)
