"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, Sec. 2.1, Eq. 9-19).

`model.attention='mla'` in a `model.kind='rope_decoder'`. Each token's keys and values come from
one small latent: the token `x: [M]` is projected to `c = RMSNorm(x W_dkv): [R]`
(`kv_lora_rank`) and a rotary key `k_r = RoPE(x W_kr): [Dr]` (`qk_rope_head_dim`) shared by every
head; head n's key is `concat(c W_uk[n], k_r)` (`W_uk[n]: [R, Dn]`, `qk_nope_head_dim`) and its
value `c W_uv[n]` (`v_head_dim` Dv). Queries are `x W_q` or, with `q_lora_rank` Rq > 0, low-rank
too, `RMSNorm(x W_dq) W_uq`, head n's split into `Dn` position-free features and `Dr` rotated ones.
Logits are scaled by `(Dn + Dr)**-0.5`, times `m(rope_factor, rope_mscale_all_dim)**2` with
YaRN (`moe_jax.rope`; transformers' `yarn_apply_mscale`); softmax in float32.

The key/value cache holds per token and layer only `c` and the rotated `k_r`,
`kv_lora_rank + qk_rope_head_dim` numbers (`[B, Lc, R + Dr]`), instead of GQA's `2 K D`.
A call up-projects the cached latents of all `Lc` rows to per-head keys and values (transformers
does the same); folding `W_uk` into the queries and `W_uv` into the output (the paper's Sec.
2.1.3) would save that up-projection at decode time but is not done here. Sliding windows
(`model.sliding_window`) apply as with GQA, through the mask the stack passes; attention sinks,
q/k RMSNorm and biases are refused by name.

Rotary layout. `rope_attention.rotary_embedding` pairs feature i with `i + Dr/2` (rotate half).
DeepSeek's checkpoints pair features `(2i, 2i+1)` (transformers' `rope_interleave=True`, the
DeepSeek-V3 default, and DeepSeek-V2's complex rotation); reordering the rotary output features
of `W_q` / `W_uq` and `W_kr` by `interleaved_to_halves(Dr)` when loading makes the two equal
(transformers' V3 keeps that reordered layout in its own cache).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.attention import MASKED_LOGIT, AttentionCache, RMSNorm, _param
from moe_jax.experts import dense_matmul
from moe_jax.rope import yarn_from_config
from moe_jax.rope_attention import rotary_embedding

ATTENTION_KINDS = ("gqa", "mla")  # model.attention of a rope_decoder
# transformers' DeepSeek-V2/V3 build q_a_layernorm and kv_a_layernorm with RMSNorm's default
# epsilon, not the config's rms_norm_eps
LATENT_NORM_EPSILON = 1e-6


def interleaved_to_halves(rope_dim: int) -> np.ndarray:
    """i32[Dr]: feature j of the rotate-half layout is feature `order[j]` of the interleaved one.

    Interleaved pair i is features `(2i, 2i+1)`, rotate-half pair i is `(i, i + Dr/2)`, so the
    order is the even features, then the odd ones.
    """
    features = np.arange(rope_dim)
    return np.concatenate([features[0::2], features[1::2]])


def _check_latent_config(model) -> None:
    """ValueError naming the `config.model` key whose value MLA cannot use."""
    sizes = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    for key in sizes:
        value = getattr(model, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(
                f"model.{key} must be an int >= 1 for model.attention='mla', got {value!r}."
            )
    if not isinstance(model.q_lora_rank, int) or model.q_lora_rank < 0:
        raise ValueError(
            f"model.q_lora_rank must be an int >= 0 (0: queries projected directly), got "
            f"{model.q_lora_rank!r}."
        )
    if model.qk_rope_head_dim % 2:
        raise ValueError(
            f"rotary embeddings need an even model.qk_rope_head_dim, got {model.qk_rope_head_dim}."
        )
    if model.num_kv_heads not in (0, model.num_heads):
        raise ValueError(
            f"model.attention='mla' gives every query head its own key and value, so "
            f"model.num_kv_heads={model.num_kv_heads} must be 0 or model.num_heads="
            f"{model.num_heads}."
        )
    for key in ("qk_norm", "qkv_bias", "attention_out_bias", "attention_sinks"):
        if getattr(model, key):
            raise ValueError(
                f"model.{key}={getattr(model, key)!r} is not supported with "
                "model.attention='mla'; set it to False."
            )


class LatentAttention(nnx.Module):
    """Multi-head latent attention with rotary positions (module docstring).

    Reads `config.model.{d_model, num_heads, q_lora_rank, kv_lora_rank, qk_rope_head_dim,
    qk_nope_head_dim, v_head_dim, rope_theta, rope_type and YaRN's rope_*, dropout_rate, dtype,
    param_dtype}`; `head_dim` is not used. With N heads, Dq = Dn + Dr per query and key head:
    - `q_lora_rank == 0`: `wq: [M, N, Dq]` (logical `('embed', 'heads', 'kv')`);
      else `wq_down: [M, Rq]` (`('embed', None)`), RMSNorm `q_norm: [Rq]`,
      `wq_up: [Rq, N, Dq]` (`(None, 'heads', 'kv')`). Each head's Dq features are its Dn
      position-free ones, then its Dr rotary ones.
    - `wkv_down: [M, R + Dr]` (`('embed', None)`): the latent's R features, then the rotary
      key's Dr; RMSNorm `kv_norm: [R]` on the latent.
    - `wkv_up: [R, N, Dn + Dv]` (`(None, 'heads', 'kv')`): each head's key features, then its
      value features.
    - `wo: [N, Dv, M]` (`('heads', 'kv', 'embed')`).
    Projections truncated-normal fan-in init; the latent dims are replicated (no logical name).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        _check_latent_config(model)
        self.num_heads = model.num_heads
        self.q_lora_rank, self.kv_lora_rank = model.q_lora_rank, model.kv_lora_rank
        self.rope_dim, self.nope_dim = model.qk_rope_head_dim, model.qk_nope_head_dim
        self.value_dim = model.v_head_dim
        self.theta = float(model.rope_theta)
        if not self.theta > 1:
            raise ValueError(f"model.rope_theta must be > 1, got {model.rope_theta!r}.")
        self.yarn = yarn_from_config(model)
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            self.scale *= self.yarn.magnitude(self.yarn.mscale_all_dim) ** 2
        self.dtype = jnp.dtype(model.dtype)
        self.dropout = nnx.Dropout(model.dropout_rate, rngs=rngs)
        param_dtype = jnp.dtype(model.param_dtype)

        def init(shape: tuple[int, ...], names: tuple[str | None, ...], inputs: int = 1):
            """A weight whose first `inputs` dims are its fan-in."""
            initializer = nnx.initializers.variance_scaling(
                1.0,
                "fan_in",
                "truncated_normal",
                in_axis=tuple(range(inputs)),
                out_axis=tuple(range(inputs, len(shape))),
            )
            return _param(initializer(rngs.params(), shape, param_dtype), names)

        def norm(width: int) -> RMSNorm:
            return RMSNorm(
                width, epsilon=LATENT_NORM_EPSILON, dtype=model.dtype, param_dtype=param_dtype
            )

        query_dim = self.nope_dim + self.rope_dim
        if self.q_lora_rank:
            self.wq_down = init((model.d_model, self.q_lora_rank), ("embed", None))
            self.q_norm = norm(self.q_lora_rank)
            q_shape = (self.q_lora_rank, self.num_heads, query_dim)
            self.wq_up = init(q_shape, (None, "heads", "kv"))
        else:
            q_shape = (model.d_model, self.num_heads, query_dim)
            self.wq = init(q_shape, ("embed", "heads", "kv"))
        kv_down_shape = (model.d_model, self.kv_lora_rank + self.rope_dim)
        self.wkv_down = init(kv_down_shape, ("embed", None))
        self.kv_norm = norm(self.kv_lora_rank)
        kv_up_shape = (self.kv_lora_rank, self.num_heads, self.nope_dim + self.value_dim)
        self.wkv_up = init(kv_up_shape, (None, "heads", "kv"))
        out_shape = (self.num_heads, self.value_dim, model.d_model)
        self.wo = init(out_shape, ("heads", "kv", "embed"), inputs=2)
        self.cache: AttentionCache | None = nnx.data(None)

    def init_cache(self, batch: int, length: int) -> None:
        """An empty (zero) cache of `length` rows per sequence, each the normed latent and the
        rotated key: `[B, Lc, R + Dr]` (`[S, B, Lc, R + Dr]` in a scanned stack)."""
        layers = self.wkv_down.shape[:-2]
        shape = (*layers, batch, length, self.kv_lora_rank + self.rope_dim)
        self.cache = AttentionCache(jnp.zeros(shape, self.dtype))

    def _matmul(self, x: jax.Array, w: nnx.Param) -> jax.Array:
        return dense_matmul(x, w[...].astype(self.dtype)).astype(self.dtype)

    def _queries(self, x: jax.Array) -> jax.Array:
        """`x: [B, L, M]` -> queries `[B, L, N, Dn + Dr]`, not yet rotated."""
        if not self.q_lora_rank:
            return self._matmul(x, self.wq)
        return self._matmul(self.q_norm(self._matmul(x, self.wq_down)), self.wq_up)

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

        With a cache (`init_cache`), the latents and rotated keys of `x` are written at cache rows
        `cache_index ..` and the queries attend to all `Lc` rows: `mask` is `[B, 1, L, Lc]`.
        """
        x = x.astype(self.dtype)
        rotate = lambda features: rotary_embedding(
            features, positions, theta=self.theta, yarn=self.yarn
        )
        q = self._queries(x)
        q_nope, q_rope = q[..., : self.nope_dim], rotate(q[..., self.nope_dim :])
        # [B, L, N, Dn], [B, L, N, Dr]
        compressed = self._matmul(x, self.wkv_down)  # [B, L, R + Dr]
        latent = self.kv_norm(compressed[..., : self.kv_lora_rank])  # [B, L, R]
        k_rope = rotate(compressed[:, :, None, self.kv_lora_rank :])[:, :, 0]  # [B, L, Dr]
        if self.cache is not None:
            rows = jnp.concatenate([latent, k_rope], axis=-1)  # [B, L, R + Dr]
            new = jax.lax.dynamic_update_slice_in_dim(self.cache[...], rows, cache_index, axis=1)
            self.cache[...] = new  # [B, Lc, R + Dr]
            latent, k_rope = new[..., : self.kv_lora_rank], new[..., self.kv_lora_rank :]
        keys_values = self._matmul(latent, self.wkv_up)  # [B, Lk, N, Dn + Dv]
        k_nope, v = keys_values[..., : self.nope_dim], keys_values[..., self.nope_dim :]
        logits = jnp.einsum("bqnd,bknd->bnqk", q_nope, k_nope, preferred_element_type=jnp.float32)
        logits += jnp.einsum("bqnd,bkd->bnqk", q_rope, k_rope, preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits * self.scale, MASKED_LOGIT)  # [B, N, L, Lk]
        probs = jax.nn.softmax(logits, axis=-1)
        probs = self.dropout(probs, deterministic=deterministic).astype(self.dtype)
        context = jnp.einsum("bnqk,bknd->bqnd", probs, v, preferred_element_type=jnp.float32)
        # [B, L, N, Dv]
        wo = self.wo[...].astype(self.dtype)
        out = dense_matmul(context.astype(self.dtype), wo, contracted=2)  # [B, L, M]
        return out.astype(self.dtype)
