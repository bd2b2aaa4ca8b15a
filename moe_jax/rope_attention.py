"""Rotary position embeddings and grouped-query self-attention (Llama-style decoders).

Used by `config.model.kind == 'rope_decoder'` (Mixtral, OLMoE, Qwen-MoE, gpt-oss); no biases but
the optional q/k/v ones (`model.qkv_bias`, Qwen2-MoE, gpt-oss) and the output projection's
(`model.attention_out_bias`, gpt-oss).

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
- Attention sinks (`model.attention_sinks`; gpt-oss, after Xiao et al. 2024, "Efficient
  Streaming Language Models with Attention Sinks"): query head n has a learned logit `s_n` that
  joins its softmax's denominator and carries no value, `p_j = exp(l_j) / (exp(s_n) +
  sum_i exp(l_i))`, so a head may give less than all of its weight to the keys.
- Sliding windows (`model.sliding_window` W > 0): a query at position q sees the keys at
  positions `q - W < p <= q`. `sliding_layers` says which layers slide
  (`model.full_attention_every`), `sliding_window_mask` narrows a causal mask to the window.
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


def sliding_layers(num_layers: int, model_config) -> tuple[bool, ...]:
    """bool per layer, bottom to top: True where the layer attends within `model.sliding_window`.

    With `full_attention_every = n > 0` layer i attends to all positions where `i % n == n - 1`
    (gpt-oss: n = 2, so sliding and full layers alternate, the first sliding); with 0 every layer
    slides. No layer slides when `sliding_window` is 0.
    """
    window, every = model_config.sliding_window, model_config.full_attention_every
    if not isinstance(window, int) or window < 0:
        raise ValueError(
            f"model.sliding_window must be an int >= 0 (0: no sliding window), got {window!r}."
        )
    if not isinstance(every, int) or every < 0:
        raise ValueError(
            f"model.full_attention_every must be an int >= 0 (0: every layer slides), got "
            f"{every!r}."
        )
    if window == 0:
        return (False,) * num_layers
    return tuple(every == 0 or i % every != every - 1 for i in range(num_layers))


def sliding_window_mask(
    mask: jax.Array, query_positions: jax.Array, key_positions: jax.Array, window: int
) -> jax.Array:
    """`mask: bool[B, 1, Lq, Lk]` narrowed to the keys `q - window < k <= q` of each query.

    `query_positions: i32[B, Lq]`, `key_positions: i32[B or 1, Lk]` (their cache rows when
    decoding with a cache). The difference of positions is taken, so a packed or left-padded row,
    whose positions restart or start late, windows its real tokens as an unpadded row would.
    """
    distance = query_positions[:, :, None] - key_positions[:, None, :]  # [B, Lq, Lk]
    return mask & (distance < window)[:, None]  # [B, 1, Lq, Lk]


class GroupedQueryAttention(nnx.Module):
    """Self-attention with rotary positions and `num_kv_heads` key/value heads.

    Reads `config.model.{d_model, num_heads, num_kv_heads (0: num_heads), head_dim, rope_theta,
    rope_type and YaRN's rope_* (`rope.yarn_from_config`), qk_norm, qk_norm_per_head, qkv_bias,
    attention_out_bias, attention_sinks, norm_epsilon, dropout_rate, dtype, param_dtype}`.
    Weights:
    `wq: [M, N, D]`, `wk, wv: [M, K, D]` (logical `('embed', 'heads', 'kv')`), `wo: [N, D, M]`
    (`('heads', 'kv', 'embed')`), truncated-normal fan-in init; with `qk_norm`, RMSNorm scales
    `q_norm: [N * D]`, `k_norm: [K * D]`, or `q_norm, k_norm: [D]` with `qk_norm_per_head`; with
    `qkv_bias`, biases `bq: [N, D]`, `bk, bv: [K, D]` (zeros; logical `('heads', 'kv')`); with
    `attention_out_bias`, `bo: [M]` (zeros); with `attention_sinks`, `sinks: f32[N]` (zeros, the
    sink's logit of each query head; logical `('heads',)`).
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
        out_bias = jnp.zeros((model.d_model,), param_dtype)
        self.bo = _param(out_bias, ("embed",)) if model.attention_out_bias else None  # [M]
        sinks = jnp.zeros((self.num_heads,), param_dtype)
        self.sinks = _param(sinks, ("heads",)) if model.attention_sinks else None  # [N]
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
        if self.sinks is None:
            probs = jax.nn.softmax(logits, axis=-1)  # [B, K, R, L, Lk]
        else:  # one more logit per head in the denominator, whose weight is then dropped
            sinks = self.sinks[...].astype(jnp.float32).reshape(self.num_kv_heads, group)
            sinks = jnp.broadcast_to(sinks[None, :, :, None, None], (*logits.shape[:-1], 1))
            # [B, K, R, L, 1]
            with_sinks = jnp.concatenate([logits, sinks], axis=-1)  # [B, K, R, L, Lk + 1]
            probs = jax.nn.softmax(with_sinks, axis=-1)[..., :-1]  # [B, K, R, L, Lk]
        probs = self.dropout(probs, deterministic=deterministic).astype(self.dtype)
        context = jnp.einsum("bgrqs,bsgd->bqgrd", probs, v, preferred_element_type=jnp.float32)
        context = context.reshape(batch, length, self.num_heads, self.head_dim)  # [B, L, N, D]
        wo = self.wo[...].astype(self.dtype)
        out = dense_matmul(context.astype(self.dtype), wo, contracted=2)  # [B, L, M]
        if self.bo is not None:
            out = out + self.bo[...].astype(out.dtype)
        return out.astype(self.dtype)
