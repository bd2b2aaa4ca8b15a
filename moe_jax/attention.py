"""Attention for the T5 v1.1-style models: RMSNorm, relative position bias, multi-head attention.

Flax NNX modules with no biases anywhere (T5 v1.1, Raffel et al. 2020 and its v1.1 release):

- `RMSNorm`: `x / sqrt(mean(x**2) + eps) * scale` (T5's "layer norm": no mean subtraction, no bias).
- `relative_position_bucket`: T5's log-spaced buckets of key-minus-query distances.
- `RelativePositionBias`: one learned scalar per (bucket, head), added to the attention logits.
- `MultiHeadAttention`: projections `wq, wk, wv: [M, N, D]`, `wo: [N, D, M]` (N heads of width D),
  logits scaled by `1 / sqrt(D)` (T5 folds that factor into its initialiser instead), softmax in
  float32, dropout on the attention probabilities.

Masks are boolean `[B, 1, Lq, Lk]` (True: the query may attend to the key); `attention_mask`
builds them from causality, segment ids (packing) and key padding.

Key/value cache (incremental decoding, `moe_jax.decode`). `MultiHeadAttention.cache` is None in
training; `init_cache` gives it an `AttentionCache` holding the projected keys and values,
`[2, B, Lc, N, D]` (keys first).
A self-attention call with `cache_index` writes its keys/values at cache rows
`cache_index .. cache_index + Lq - 1` and attends to all `Lc` rows (the mask hides the unwritten
ones); a cross-attention call with `keys_values` fills the cache once, and later calls with
`keys_values=None` reuse it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.experts import dense_matmul

# Masked logits get this value rather than -inf, so a query row with no visible key (a padding
# query) gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e9


def _param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    """`y = x / sqrt(mean(x**2, -1) + epsilon) * scale`, computed in float32, returned in `dtype`.

    `scale: f32[M]` starts at ones (logical axis `'embed'`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        epsilon: float = 1e-6,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)
        self.scale = _param(jnp.ones((num_features,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x: [..., M]` -> `[..., M]` in the module's dtype."""
        x = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)  # [..., 1]
        y = x * jax.lax.rsqrt(mean_square + self.epsilon) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


def relative_position_bucket(
    relative_position: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> jax.Array:
    """T5's bucket of each relative position `key_position - query_position`, i32 like the input.

    Bidirectional (encoder): half the buckets for keys after the query, half for keys at or
    before it. Causal (decoder): keys after the query all fall in bucket 0. Within a direction,
    with `n = |distance|` and `exact = buckets_per_direction // 2`: distances `n < exact` get their
    own bucket `n`; larger ones share log-spaced buckets
    `exact + floor(log(n / exact) / log(max_distance / exact) * (buckets_per_direction - exact))`,
    capped at the direction's last bucket (every distance >= max_distance shares it).
    """
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(
            f"relative_attention_num_buckets={num_buckets} is too small; use >= 4 (T5 uses 32)."
        )
    per_direction = num_buckets // 2 if bidirectional else num_buckets
    exact = per_direction // 2
    if max_distance <= exact:
        raise ValueError(
            f"relative_attention_max_distance={max_distance} must exceed {exact} (half the "
            f"buckets per direction); T5 uses 128 with 32 buckets."
        )
    distance_back = -relative_position  # > 0: the key is before the query
    if bidirectional:
        offset = jnp.where(distance_back < 0, per_direction, 0)
        n = jnp.abs(distance_back)
    else:
        offset = jnp.zeros_like(distance_back)
        n = jnp.maximum(distance_back, 0)
    # log-spaced bucket, valid only where n >= exact (clamped to keep log finite elsewhere)
    ratio = jnp.maximum(n, exact).astype(jnp.float32) / exact
    log_bucket = exact + (
        jnp.log(ratio) / math.log(max_distance / exact) * (per_direction - exact)
    ).astype(relative_position.dtype)
    log_bucket = jnp.minimum(log_bucket, per_direction - 1)
    return offset + jnp.where(n < exact, n, log_bucket)


class RelativePositionBias(nnx.Module):
    """Learned bias `f32[num_buckets, N]`, looked up per (query, key) distance bucket and head.

    T5 shares one table across all layers of a stack (encoder, decoder self-attention).
    """

    def __init__(
        self,
        *,
        num_buckets: int,
        max_distance: int,
        num_heads: int,
        bidirectional: bool,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        init = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform")
        self.embedding = _param(
            init(rngs.params(), (num_buckets, num_heads), param_dtype), (None, "heads")
        )

    def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        """`query_positions: i32[B, Lq]`, `key_positions: i32[B, Lk]` -> f32[B, N, Lq, Lk]."""
        relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, Lq, Lk]
        buckets = relative_position_bucket(
            relative.astype(jnp.int32),
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        bias = self.embedding[...].astype(jnp.float32)[buckets]  # [B, Lq, Lk, N]
        return jnp.transpose(bias, (0, 3, 1, 2))  # [B, N, Lq, Lk]


def attention_mask(
    *,
    query_valid: jax.Array | None = None,
    key_valid: jax.Array,
    query_segments: jax.Array | None = None,
    key_segments: jax.Array | None = None,
    causal: bool = False,
) -> jax.Array:
    """bool[B, 1, Lq, Lk]: True where a query may attend to a key.

    Args:
      query_valid: bool[B, Lq] real queries (None: all). Padding queries see nothing.
      key_valid: bool[B, Lk] real keys; padding keys are never attended to.
      query_segments, key_segments: i32[B, Lq], i32[B, Lk] packing segment ids; a query sees only
        keys of its own segment. Both or neither.
      causal: a query at index i sees keys at indices <= i (self-attention, Lq == Lk).
    """
    mask = key_valid[:, None, :]  # [B, 1, Lk]
    if query_valid is not None:
        mask = mask & query_valid[:, :, None]  # [B, Lq, Lk]
    if (query_segments is None) != (key_segments is None):
        raise ValueError("pass both query_segments and key_segments, or neither.")
    if query_segments is not None:
        mask = mask & (query_segments[:, :, None] == key_segments[:, None, :])  # [B, Lq, Lk]
    if causal:
        length = key_valid.shape[1]
        mask = mask & jnp.tril(jnp.ones((length, length), jnp.bool_))  # [B, Lq, Lk]
    return mask[:, None]  # [B, 1, Lq, Lk]


class AttentionCache(nnx.Cache):
    """Projected keys and values stacked as `[2, B, Lc, N, D]` (keys first), compute dtype."""


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with no biases; reads `config.model.{d_model, num_heads, head_dim,
    dropout_rate, dtype, param_dtype}`.

    Weights: `wq, wk, wv: [M, N, D]` (logical `('embed', 'heads', 'kv')`), `wo: [N, D, M]`
    (`('heads', 'kv', 'embed')`), truncated-normal fan-in init.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        self.num_heads, self.head_dim = model.num_heads, model.head_dim
        self.dtype = jnp.dtype(model.dtype)
        self.dropout = nnx.Dropout(model.dropout_rate, rngs=rngs)
        param_dtype = jnp.dtype(model.param_dtype)
        shape_in = (model.d_model, self.num_heads, self.head_dim)
        init_in = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=0, out_axis=(1, 2)
        )
        init_out = nnx.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
        )
        names_in = ("embed", "heads", "kv")
        self.wq = _param(init_in(rngs.params(), shape_in, param_dtype), names_in)
        self.wk = _param(init_in(rngs.params(), shape_in, param_dtype), names_in)
        self.wv = _param(init_in(rngs.params(), shape_in, param_dtype), names_in)
        shape_out = (self.num_heads, self.head_dim, model.d_model)
        self.wo = _param(init_out(rngs.params(), shape_out, param_dtype), ("heads", "kv", "embed"))
        self.cache: AttentionCache | None = nnx.data(None)

    def init_cache(self, batch: int, length: int) -> None:
        """Give this module an empty (zero) cache of `length` keys and values per sequence.

        A module of a scanned stack (weights with leading layer axes) gets one cache per layer,
        `[R, 2, B, Lc, N, D]`.
        """
        layers = self.wq.shape[:-3]
        shape = (*layers, 2, batch, length, self.num_heads, self.head_dim)
        self.cache = AttentionCache(jnp.zeros(shape, self.dtype))

    def _project(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        w = w[...].astype(self.dtype)
        return dense_matmul(x.astype(self.dtype), w).astype(self.dtype)  # [B, L, N, D]

    def _keys_values(
        self, keys_values: jax.Array | None, cache_index: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Projected keys and values `[B, Lk, N, D]`, through the cache when there is one."""
        if keys_values is not None:
            k = self._project(keys_values, self.wk)  # [B, Lk, N, D]
            v = self._project(keys_values, self.wv)  # [B, Lk, N, D]
            if self.cache is None:
                return k, v
            new = jnp.stack([k, v])  # [2, B, Lk, N, D]
            if cache_index is not None:  # self-attention: write the new rows
                new = jax.lax.dynamic_update_slice_in_dim(self.cache[...], new, cache_index, axis=2)
            self.cache[...] = new  # [2, B, Lc, N, D]
            return new[0], new[1]
        if self.cache is None:
            raise ValueError("keys_values=None reads the cache, but this module has none.")
        return self.cache[0], self.cache[1]

    def __call__(
        self,
        queries: jax.Array,
        keys_values: jax.Array | None,
        *,
        mask: jax.Array,
        bias: jax.Array | None = None,
        deterministic: bool,
        cache_index: jax.Array | None = None,
    ) -> jax.Array:
        """Attend from `queries: [B, Lq, M]` to `keys_values: [B, Lk, M]`.

        `mask: bool[B, 1, Lq, Lk]` (see `attention_mask`); `bias: f32[B, N, Lq, Lk]` (relative
        positions) or None. With a cache (see the module docstring), `Lk` is the cache length,
        `cache_index: i32[]` is where a self-attention call writes, and `keys_values=None` reuses
        cached cross-attention keys. Returns `[B, Lq, M]` in the compute dtype.
        """
        q = self._project(queries, self.wq)  # [B, Lq, N, D]
        k, v = self._keys_values(keys_values, cache_index)  # [B, Lk, N, D]
        logits = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / math.sqrt(self.head_dim)  # [B, N, Lq, Lk]
        if bias is not None:
            logits = logits + bias
        logits = jnp.where(mask, logits, MASKED_LOGIT)
        probs = jax.nn.softmax(logits, axis=-1)  # [B, N, Lq, Lk]
        probs = self.dropout(probs, deterministic=deterministic).astype(self.dtype)
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
        wo = self.wo[...].astype(self.dtype)
        out = dense_matmul(context.astype(self.dtype), wo, contracted=2)  # [B, Lq, M]
        return out.astype(self.dtype)
