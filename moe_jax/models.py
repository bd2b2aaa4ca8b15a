"""Transformer models: a T5 v1.1-style encoder-decoder and decoder-only LMs, sparse or dense.

`build_model(config, *, rngs)` returns
- `EncoderDecoder` (`config.model.kind == 'encoder_decoder'`; T5 v1.1, Switch, ST-MoE):
  `logits, aux = model(encoder_inputs, decoder_inputs, *, deterministic, encoder_segment_ids=None,
  decoder_segment_ids=None)`;
- `DecoderLM` (`'decoder'`: T5-style layers, GLaM; `'rope_decoder'`: Llama-style layers, Mixtral,
  OLMoE): `logits, aux = model(tokens, *, deterministic, segment_ids=None, positions=None)`.
`logits` are f32[B, L, V]; `aux` is one `layers.MoeAux` whose leaves carry a leading
`[num_sparse_layers]` axis (encoder's sparse layers first, then the decoder's), or None for a
dense model (`config.moe.num_experts == 0`).

Architecture (T5 v1.1): pre-norm residual sublayers `x + dropout(sublayer(rms_norm(x)))`, no
biases, one relative position bias table per stack shared by its layers, a final RMSNorm and
dropout per stack, token embeddings shared by encoder and decoder. Tied logits use the embedding
table with T5's `d_model ** -0.5` rescaling; untied logits have their own `[M, V]` kernel.
GLaM's relative position bias is per layer; here it is T5's one table per stack (a few thousand
parameters' difference).

Architecture ('rope_decoder'; Mixtral, OLMoE, as their `transformers` implementations compute
them): the same pre-norm residual layers and final RMSNorm (epsilon `model.norm_epsilon`), no
biases, but no relative position bias: each layer's self-attention is
`rope_attention.GroupedQueryAttention`, rotary positions with base `model.rope_theta` (scaled
by YaRN with `model.rope_type='yarn'`, `moe_jax.rope`) on queries and keys, `model.num_kv_heads`
key/value heads, optional q/k RMSNorm (`model.qk_norm`, OLMoE); with `model.attention='mla'`
it is `latent_attention.LatentAttention` (DeepSeek-V2/V3's multi-head latent attention).
FFNs and experts are SwiGLU (`ffn_activation = moe.activation = 'swiglu'`). Tied logits are
the plain dot product with the embedding (no T5 rescaling); Mixtral and OLMoE untie them. Their
MoE layers are the usual `MoeFeedForward` with a softmax `tokens_choose` router (top-k weights
renormalised for Mixtral, `moe.normalize='topk'`, raw for OLMoE), no jitter, and the dropless
backend (no capacity); `configs/mixtral.py` and `configs/olmoe.py` set them.

The layer stack (placement of sparse layers, padding, scan and remat) is
`moe_jax.stack.TransformerStack`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.attention import attention_mask
from moe_jax.config import DECODER_KINDS, KINDS
from moe_jax.experts import BIAS_NAMES, WEIGHT_NAMES, dense_matmul
from moe_jax.layers import MoeAux, MoeFeedForward

# also re-exported: the layer placement and remat policies, read as `models.layer_plan` etc.
from moe_jax.stack import (  # noqa: F401
    PLACEMENTS,
    REMAT_POLICIES,
    TransformerStack,
    _concat_aux,
    layer_plan,
    remat_policy,
    sparse_layer_flags,
)

# ---------------------------------------------------------------------------------- models


class Embedding(nnx.Module):
    """Token embedding `f32[V, M]` (logical `('vocab', 'embed')`), T5's unit-normal init.

    Also computes tied logits (`attend`).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        self.dtype = jnp.dtype(model.dtype)
        shape = (model.vocab_size, model.d_model)
        table = jax.random.normal(rngs.params(), shape, jnp.dtype(model.param_dtype))
        self.embedding = nnx.Param(table, out_sharding=("vocab", "embed"), eager_sharding=False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """`tokens: i32[B, L]` -> `[B, L, M]` in the compute dtype."""
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # [B, L, M]

    def attend(self, x: jax.Array) -> jax.Array:
        """`x: [B, L, M]` -> f32[B, L, V]: dot products with every token's embedding."""
        table = self.embedding[...].astype(self.dtype)
        return dense_matmul(x, table.T)  # [B, L, V]


class OutputLogits(nnx.Module):
    """Untied output projection `f32[M, V]` (logical `('embed', 'vocab')`)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        self.dtype = jnp.dtype(model.dtype)
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        kernel = init(rngs.params(), (model.d_model, model.vocab_size), model.param_dtype)
        self.kernel = nnx.Param(kernel, out_sharding=("embed", "vocab"), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        """`x: [B, L, M]` -> f32[B, L, V]."""
        kernel = self.kernel[...].astype(self.dtype)
        return dense_matmul(x, kernel)  # [B, L, V]


class _LanguageModelHead(nnx.Module):
    """Shared by both models: the embedding and the (tied or untied) logits."""

    def _init_head(self, config, rngs: nnx.Rngs) -> None:
        model = config.model
        if model.vocab_size < 2:
            raise ValueError(f"model.vocab_size must be >= 2, got {model.vocab_size}.")
        self.tie_embeddings = bool(model.tie_embeddings)
        # T5 rescales the hidden state before tied logits; Llama-style models do not
        self.tied_scale = 1.0 if model.kind == "rope_decoder" else model.d_model**-0.5
        self.embed = Embedding(config, rngs=rngs)
        if not self.tie_embeddings:
            self.output = OutputLogits(config, rngs=rngs)

    def logits(self, x: jax.Array) -> jax.Array:
        """f32[B, L, V] from the final hidden states `[B, L, M]`."""
        if self.tie_embeddings:
            return self.embed.attend(x * self.tied_scale)
        return self.output(x)


def _positions(tokens: jax.Array) -> jax.Array:
    """i32[B, L]: 0..L-1 in every row."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _check_tokens(name: str, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be integer token ids [B, L], got {tokens.dtype}{tokens.shape}."
        )


class DecoderLM(_LanguageModelHead):
    """Decoder-only causal LM: embedding, causal stack of `model.num_layers`, logits.

    `model.kind` 'decoder' (GLaM): T5's relative position bias; 'rope_decoder' (Mixtral,
    OLMoE): rotary positions and grouped-query attention in every layer.
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        self._init_head(config, rngs)
        self.decoder = TransformerStack(
            config,
            config.model.num_layers,
            causal=True,
            cross=False,
            rngs=rngs,
            rotary=config.model.kind == "rope_decoder",
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        deterministic: bool,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux | None]:
        """`tokens: i32[B, L]` -> (f32[B, L, V] logits, MoeAux `[num_sparse_layers, ...]` or None).

        `segment_ids: i32[B, L]` packing segments (0: padding); `positions: i32[B, L]` positions
        within segments (default 0..L-1; only their differences within a segment matter).
        After `init_cache`, `cache_index: i32[]` says that `tokens` are positions
        `cache_index .. cache_index + L - 1` of the sequences whose earlier tokens are cached.
        """
        _check_tokens("tokens", tokens)
        padding_mask = jnp.ones(tokens.shape, jnp.bool_) if segment_ids is None else segment_ids > 0
        if positions is None:
            positions = (
                _positions(tokens) if cache_index is None else cache_index + _positions(tokens)
            )
        x, aux = self.decoder(
            self.embed(tokens),
            token_ids=tokens,
            padding_mask=padding_mask,
            positions=positions,
            segment_ids=segment_ids,
            deterministic=deterministic,
            cache_index=cache_index,
        )
        return self.logits(x), aux

    def init_cache(self, batch: int, length: int) -> None:
        """Empty key/value caches for `batch` sequences of up to `length` tokens."""
        self.decoder.init_cache(batch, length)


class EncoderDecoder(_LanguageModelHead):
    """T5 v1.1-style encoder-decoder (Switch, ST-MoE): shared embedding, two stacks, logits."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        model = config.model
        self._init_head(config, rngs)
        self.encoder = TransformerStack(
            config, model.num_encoder_layers, causal=False, cross=False, rngs=rngs
        )
        self.decoder = TransformerStack(
            config, model.num_decoder_layers, causal=True, cross=True, rngs=rngs
        )

    def __call__(
        self,
        encoder_inputs: jax.Array,
        decoder_inputs: jax.Array,
        *,
        deterministic: bool,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux | None]:
        """`encoder_inputs: i32[B, Le]`, `decoder_inputs: i32[B, Ld]` (targets shifted right)
        -> (f32[B, Ld, V] logits, MoeAux `[num_sparse_layers, ...]` (encoder first) or None).
        """
        encoded, encoder_valid, encoder_aux = self.encode(
            encoder_inputs, deterministic=deterministic, segment_ids=encoder_segment_ids
        )
        logits, decoder_aux = self.decode(
            decoder_inputs,
            encoded,
            encoder_valid,
            deterministic=deterministic,
            encoder_segment_ids=encoder_segment_ids,
            decoder_segment_ids=decoder_segment_ids,
        )
        return logits, _concat_aux([encoder_aux, decoder_aux])

    def encode(
        self,
        encoder_inputs: jax.Array,
        *,
        deterministic: bool,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, MoeAux | None]:
        """`encoder_inputs: i32[B, Le]` -> (encoded `[B, Le, M]`, bool[B, Le] real tokens,
        the encoder's MoeAux or None)."""
        _check_tokens("encoder_inputs", encoder_inputs)
        encoder_valid = encoder_inputs != 0 if segment_ids is None else segment_ids > 0
        encoded, aux = self.encoder(
            self.embed(encoder_inputs),
            token_ids=encoder_inputs,
            padding_mask=encoder_valid,
            positions=_positions(encoder_inputs),
            segment_ids=segment_ids,
            deterministic=deterministic,
        )
        return encoded, encoder_valid, aux

    def decode(
        self,
        decoder_inputs: jax.Array,
        encoded: jax.Array | None,
        encoder_valid: jax.Array,
        *,
        deterministic: bool,
        encoder_segment_ids: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux | None]:
        """`decoder_inputs: i32[B, Ld]` attending to `encoded: [B, Le, M]` (`encode`) ->
        (f32[B, Ld, V] logits, the decoder's MoeAux or None).

        After `init_cache`, `cache_index: i32[]` says that `decoder_inputs` are positions
        `cache_index ..` of the decoder sequences, and `encoded=None` reuses the cross-attention
        keys and values cached by the first call.
        """
        _check_tokens("decoder_inputs", decoder_inputs)
        if decoder_segment_ids is None:
            decoder_valid = jnp.ones(decoder_inputs.shape, jnp.bool_)
        else:
            decoder_valid = decoder_segment_ids > 0
        positions = _positions(decoder_inputs)
        if cache_index is not None:
            positions = cache_index + positions
        segments_given = encoder_segment_ids is not None and decoder_segment_ids is not None
        cross_mask = attention_mask(
            key_valid=encoder_valid,
            query_segments=decoder_segment_ids if segments_given else None,
            key_segments=encoder_segment_ids if segments_given else None,
        )  # [B, 1, 1 or Ld, Le]
        x, aux = self.decoder(
            self.embed(decoder_inputs),
            token_ids=decoder_inputs,
            padding_mask=decoder_valid,
            positions=positions,
            segment_ids=decoder_segment_ids,
            deterministic=deterministic,
            encoded=encoded,
            cross_mask=cross_mask,
            cache_index=cache_index,
        )
        return self.logits(x), aux

    def init_cache(self, batch: int, length: int, encoder_length: int) -> None:
        """Empty key/value caches for `batch` decoder sequences of up to `length` tokens
        attending to encoder outputs of `encoder_length` tokens."""
        self.decoder.init_cache(batch, length, encoder_length)


def build_model(config, *, rngs: nnx.Rngs) -> DecoderLM | EncoderDecoder:
    """The model `config.model.kind` names (one of `KINDS`)."""
    kind = config.model.kind
    if kind in DECODER_KINDS:
        return DecoderLM(config, rngs=rngs)
    if kind == "encoder_decoder":
        return EncoderDecoder(config, rngs=rngs)
    raise ValueError(f"Unknown model.kind {kind!r}; use one of {KINDS}.")


def router_logits(
    model: DecoderLM | EncoderDecoder, *args, **kwargs
) -> tuple[jax.Array, MoeAux | None, list[jax.Array]]:
    """`model(*args, **kwargs)` plus every sparse layer's router logits.

    Returns `(logits, aux, router_logits)`, `router_logits` a list of f32[G, T, E] (the layer's
    routing groups, see `dispatch.group_tokens`), bottom to top, the encoder's layers first. The
    routers' outputs are captured with `nnx.capture`, which cannot see into `nnx.scan`: build
    the model with `model.scan_layers=False`.
    """
    stacks = [getattr(model, name) for name in ("encoder", "decoder") if hasattr(model, name)]
    if any(stack.scan for stack in stacks):
        raise ValueError(
            "router_logits cannot read the routers of scanned layers; build the model with "
            "model.scan_layers=False."
        )
    (logits, aux), captured = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
        *args, **kwargs
    )
    routers = [
        (path, value)
        for path, value in nnx.to_flat_state(captured)
        if path[-2:] == ("router", "__call__")
    ]
    # encoder before decoder, then segment, block and layer indices in order
    routers.sort(key=lambda item: (item[0][0] != "encoder", item[0][1:]))
    # each router ran once: its captured outputs are a one-tuple of (Routing, logits)
    return logits, aux, [value.get_value()[0][1] for _, value in routers]


# ---------------------------------------------------------------------------- param counting


def count_params(config, *, include_embeddings: bool = True) -> dict[str, int]:
    """`{'total': int, 'active': int}` parameters of `config`'s model, built abstractly.

    The model is traced with `nnx.eval_shape`, so no array is allocated (Switch-C's 1.6T
    parameters count in seconds). `active` is what one token touches: every non-expert parameter
    plus `k` experts' worth of each sparse layer's stacked expert weights and biases (shared
    experts and routers are non-expert parameters, so they count in full).

    Embeddings (the `[V, M]` table and an untied `[M, V]` output kernel) count in both numbers
    by default, as Switch (Table 9: T5-Base's 223M includes its tied 32128 x 768 table) and
    ST-MoE count them; `include_embeddings=False` leaves them out, which is how GLaM's Table 4
    totals read (0.1B/64E: 1.9B matches only without its 256K x 768 table).
    """
    model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
    total = active = 0
    for path, param in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = param.size
        if not include_embeddings and path[-2:] in (("embed", "embedding"), ("output", "kernel")):
            continue
        total += size
        is_expert_weight = path[-1] in WEIGHT_NAMES + BIAS_NAMES and "ffn" in path
        if is_expert_weight and isinstance(_submodule(model, path[:-1]), MoeFeedForward):
            active += size * config.moe.k // config.moe.num_experts
        else:
            active += size
    return {"total": int(total), "active": int(active)}


def _submodule(module: nnx.Module, path: tuple) -> Any:
    """The object at `path` (attribute names and list indices) below `module`."""
    for key in path:
        module = module[key] if isinstance(module, nnx.List) else getattr(module, key)
    return module
