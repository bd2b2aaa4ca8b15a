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
`rope_attention.GroupedQueryAttention`, rotary positions with base `model.rope_theta` on queries
and keys, `model.num_kv_heads` key/value heads, optional q/k RMSNorm (`model.qk_norm`, OLMoE).
FFNs and experts are SwiGLU (`ffn_activation = moe.activation = 'swiglu'`). Tied logits are
the plain dot product with the embedding (no T5 rescaling); Mixtral and OLMoE untie them. Their
MoE layers are the usual `MoeFeedForward` with a softmax `tokens_choose` router (top-k weights
renormalised for Mixtral, `moe.normalize='topk'`, raw for OLMoE), no jitter, and the dropless
backend (no capacity); `configs/mixtral.py` and `configs/olmoe.py` set them.

Sparse layers. Layer i (0-based) of a stack has a sparse FFN (`layers.MoeFeedForward`) when
- `moe.sparse_placement == 'every'`: `i % sparse_every == sparse_every - 1` (the last layer of
  each block of `sparse_every`; Switch/GLaM 2, ST-MoE 4, Switch-C 1);
- `'bottom'` / `'top'`: i is among the first / last `moe.num_sparse_layers` layers.
With `model.share_layers` (WideNet, Xue et al. 2022, "Go Wider Instead of Deeper") every
layer of a stack runs the same FFN, dense or sparse (the first layer's module), and attention
with the first layer's self-attention (and cross-attention) weights, while each layer keeps its
own RMSNorms and its own key/value cache; it needs every layer's FFN of one kind and unscanned
layers.
With `moe.extra_dense_ffn` (ST-MoE) a sparse layer has a second, dense FFN sublayer after the
sparse one. Expert Choice (`moe.router == 'experts_choose'`) and Soft MoE (`'soft_moe'`) see
future tokens (`routers.NON_CAUSAL_ROUTERS`), so a causal stack (the decoder-only model, the
encoder-decoder's decoder) with sparse layers refuses them; so does batch-prioritized routing
(`moe.batch_prioritized`), whose slot order depends on later tokens' scores. For the same
reason a causal stack fills capacity slots token by token (`moe.fill_order=''` resolves to
'token' there, to GShard's choice-major 'choice' in an encoder): with choice-major filling and
k >= 2, whether a token keeps its second expert depends on later tokens' first choices.

Padding. A token is padding where its segment id is 0 (when segment ids are given), else, in an
encoder, where its id is 0. Without segment ids a decoder treats every token as real: its inputs
are targets shifted right with id 0 as the start token (T5X, `moe_jax.data`). Padding keys are
masked out of attention and padding tokens take no expert slot.

Depth. The layers of a stack form segments of identical blocks (a block is the `sparse_every`
layers that repeat, or one layer); with `model.scan_layers` each segment's blocks are stacked
along a leading axis and run with `nnx.scan` (compile time flat in depth), otherwise they are a
list run in a Python loop. `model.remat` rematerialises each block in the backward pass by a
named policy (`REMAT_POLICIES`): 'none' (False), 'full' (True: keep only the block's input),
'save_dots' (keep matmul outputs), 'save_routing' (keep each MoE layer's `Routing`, tagged
`'moe_routing'` with `jax.ad_checkpoint.checkpoint_name` in `layers.py`: the backward pass
recomputes the FFNs and attention but not the router's top-k and slot sorting). Keeping an MoE
layer's combined output alone would save nothing here: its own backward needs the expert
activations, which are recomputed from the block's input anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import parallel
from moe_jax.attention import (
    MultiHeadAttention,
    RelativePositionBias,
    RMSNorm,
    attention_mask,
)
from moe_jax.config import DECODER_KINDS, KINDS
from moe_jax.experts import dense_matmul
from moe_jax.layers import FeedForward, MoeAux, MoeFeedForward
from moe_jax.rope_attention import GroupedQueryAttention
from moe_jax.routers import NON_CAUSAL_ROUTERS

PLACEMENTS = ("every", "bottom", "top")
# logical names of the residual stream's dims: rows over the batch axes, its embedding dim as
# an activation's (`moe_jax.mesh`)
RESIDUAL_AXES = ("batch", "length", "activation_embed")
# The stacked (scan) axis of block parameters is replicated: no logical name.
_SCAN_METADATA = {nnx.PARTITION_NAME: None}

# what the backward pass may keep from the forward pass of a block (None: only its inputs)
_REMAT_SAVES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_routing": jax.checkpoint_policies.save_only_these_names("moe_routing"),
}
REMAT_POLICIES = ("none", *_REMAT_SAVES)


def remat_policy(setting: bool | str) -> str:
    """The name of `model.remat`'s policy; True is 'full' and False is 'none'."""
    if isinstance(setting, bool):
        return "full" if setting else "none"
    if setting not in REMAT_POLICIES:
        raise ValueError(f"Unknown model.remat {setting!r}; use one of {REMAT_POLICIES}.")
    return setting


Plan = tuple[tuple[tuple[bool, ...], int], ...]


# ---------------------------------------------------------------------------- layer placement


def layer_plan(num_layers: int, moe_config: Any) -> Plan:
    """The segments of a stack: `((block_pattern, repeats), ...)`, bottom to top.

    `block_pattern` says which layers of a block are sparse (True); the segment is that block
    repeated `repeats` times. A dense model (`num_experts == 0`) is one segment of dense layers.
    """
    if num_layers < 1:
        raise ValueError(f"a stack needs num_layers >= 1, got {num_layers}.")
    if moe_config.num_experts == 0:
        return (((False,), num_layers),)
    if moe_config.num_experts < 0:
        raise ValueError(f"moe.num_experts must be >= 0 (0: dense), got {moe_config.num_experts}.")
    placement = moe_config.sparse_placement
    if placement == "every":
        every = moe_config.sparse_every
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"moe.sparse_every must be an int >= 1, got {every!r}.")
        segments = [((False,) * (every - 1) + (True,), num_layers // every)]
        segments.append(((False,), num_layers % every))  # dense layers past the last block
    elif placement in ("bottom", "top"):
        num_sparse = moe_config.num_sparse_layers
        if not 1 <= num_sparse <= num_layers:
            raise ValueError(
                f"moe.num_sparse_layers={num_sparse} must be in [1, {num_layers}] for "
                f"sparse_placement={placement!r}."
            )
        segments = [((True,), num_sparse), ((False,), num_layers - num_sparse)]
        if placement == "top":
            segments.reverse()
    else:
        raise ValueError(f"Unknown moe.sparse_placement {placement!r}; use one of {PLACEMENTS}.")
    return tuple((pattern, repeats) for pattern, repeats in segments if repeats > 0)


def sparse_layer_flags(num_layers: int, moe_config: Any) -> tuple[bool, ...]:
    """bool per layer, bottom to top: True where the FFN is sparse."""
    return tuple(
        flag
        for pattern, repeats in layer_plan(num_layers, moe_config)
        for flag in pattern * repeats
    )


# --------------------------------------------------------------------------------- layers


class LayerInputs(NamedTuple):
    """What every layer of a stack reads besides the residual stream (a pytree of arrays).

    Attributes:
      self_mask: bool[B, 1, L, Lk]; self_bias: f32[B, N, L, Lk] relative position bias, or None
        (rotary positions); Lk = L, or the cache length when decoding with a cache.
      token_ids: i32[B, L] the stack's input tokens (hash routing).
      padding_mask: bool[B, L] True for real tokens.
      encoded: [B, Le, M] encoder output (decoder of an encoder-decoder) or None.
      cross_mask: bool[B, 1, L, Le] or None.
      positions: i32[B, L] rotary positions (rope_decoder) or None.
      cache_index: i32[] cache row of the first of the L tokens when decoding with a cache, else
        None.
    """

    self_mask: jax.Array
    self_bias: jax.Array | None
    token_ids: jax.Array
    padding_mask: jax.Array
    encoded: jax.Array | None = None
    cross_mask: jax.Array | None = None
    positions: jax.Array | None = None
    cache_index: jax.Array | None = None


class TransformerLayer(nnx.Module):
    """Self-attention, optional cross-attention, an FFN (dense or sparse), optional extra dense FFN.

    Each sublayer is `x + dropout(sublayer(rms_norm(x)))`. Self-attention is T5's (relative
    position bias) or, with `rotary`, `GroupedQueryAttention` (rotary positions, GQA).
    """

    def __init__(self, config, *, sparse: bool, cross: bool, rngs: nnx.Rngs, rotary: bool = False):
        model = config.model
        self.sparse, self.cross, self.rotary = sparse, cross, rotary
        self.dtype = jnp.dtype(model.dtype)
        self.rules = parallel.logical_rules(config)  # for the residual stream's sharding

        def norm() -> RMSNorm:
            return _rms_norm(config)

        self.self_norm = norm()
        self.self_attention = (
            GroupedQueryAttention(config, rngs=rngs)
            if rotary
            else MultiHeadAttention(config, rngs=rngs)
        )
        if cross:
            self.cross_norm = norm()
            self.cross_attention = MultiHeadAttention(config, rngs=rngs)
        self.ffn_norm = norm()
        self.ffn = MoeFeedForward(config, rngs=rngs) if sparse else FeedForward(config, rngs=rngs)
        self.extra_dense = sparse and bool(config.moe.extra_dense_ffn)
        if self.extra_dense:
            self.extra_norm = norm()
            self.extra_ffn = FeedForward(config, rngs=rngs)
        self.dropout = nnx.Dropout(model.dropout_rate, rngs=rngs)

    def __call__(
        self, x: jax.Array, inputs: LayerInputs, *, deterministic: bool
    ) -> tuple[jax.Array, MoeAux | None]:
        """`x: [B, L, M]` -> (`[B, L, M]`, the sparse FFN's `MoeAux` or None)."""
        x = parallel.constrain(x, RESIDUAL_AXES, self.rules)  # FSDP splits weights, not x

        def residual(x: jax.Array, y: jax.Array) -> jax.Array:
            return x + self.dropout(y, deterministic=deterministic).astype(x.dtype)

        h = self.self_norm(x)
        if self.rotary:
            h = self.self_attention(
                h,
                mask=inputs.self_mask,
                positions=inputs.positions,
                deterministic=deterministic,
                cache_index=inputs.cache_index,
            )
        else:
            h = self.self_attention(
                h,
                h,
                mask=inputs.self_mask,
                bias=inputs.self_bias,
                deterministic=deterministic,
                cache_index=inputs.cache_index,
            )
        x = residual(x, h)
        if self.cross:
            h = self.cross_attention(
                self.cross_norm(x),
                inputs.encoded,
                mask=inputs.cross_mask,
                deterministic=deterministic,
            )
            x = residual(x, h)
        aux = None
        h = self.ffn_norm(x)
        if self.sparse:
            h, aux = self.ffn(
                h,
                deterministic=deterministic,
                token_ids=inputs.token_ids,
                padding_mask=inputs.padding_mask,
            )
        else:
            h = self.ffn(h, deterministic=deterministic)
        x = residual(x, h)
        if self.extra_dense:
            x = residual(x, self.extra_ffn(self.extra_norm(x), deterministic=deterministic))
        return x, aux


def _rms_norm(config) -> RMSNorm:
    """An RMSNorm over d_model with the config's epsilon, dtype and parameter dtype."""
    model = config.model
    return RMSNorm(
        model.d_model, epsilon=model.norm_epsilon, dtype=model.dtype, param_dtype=model.param_dtype
    )


def _stack_aux(auxes: list[MoeAux]) -> MoeAux | None:
    """Stack per-layer aux along a new leading axis; None when there is none."""
    if not auxes:
        return None
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *auxes)


def _concat_aux(auxes: list[MoeAux | None]) -> MoeAux | None:
    """Concatenate stacked aux along the leading (sparse layer) axis, skipping None."""
    auxes = [aux for aux in auxes if aux is not None]
    if not auxes:
        return None
    return jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *auxes)


class LayerBlock(nnx.Module):
    """Consecutive layers following `pattern` (True: sparse), the unit that scan repeats."""

    def __init__(
        self,
        config,
        pattern: tuple[bool, ...],
        *,
        cross: bool,
        rngs: nnx.Rngs,
        rotary: bool = False,
    ):
        self.layers = nnx.List(
            [
                TransformerLayer(config, sparse=sparse, cross=cross, rngs=rngs, rotary=rotary)
                for sparse in pattern
            ]
        )

    def __call__(
        self, x: jax.Array, inputs: LayerInputs, *, deterministic: bool
    ) -> tuple[jax.Array, MoeAux | None]:
        """`x: [B, L, M]` -> (`[B, L, M]`, MoeAux with leaves `[S_block, ...]` or None)."""
        auxes = []
        for layer in self.layers:
            x, aux = layer(x, inputs, deterministic=deterministic)
            if aux is not None:
                auxes.append(aux)
        return x, _stack_aux(auxes)


SHARED_FFNS = ("ffn", "extra_ffn")
SHARED_ATTENTIONS = ("self_attention", "cross_attention")


def _share_weights(target: nnx.Module, source: nnx.Module) -> None:
    """Point `target`'s parameters and submodules at `source`'s (one set of weights); `target`
    keeps its own key/value cache."""
    for name, value in vars(source).items():
        if isinstance(value, nnx.Variable | nnx.Module) and not isinstance(value, nnx.Cache):
            setattr(target, name, value)


def _share_layers(segments: nnx.List, scan: bool, plan: Plan) -> None:
    """WideNet (Xue et al. 2022): every layer of the stack uses the first layer's FFN modules
    and attention weights (one set of weights), keeping its own norms.

    Each layer keeps its own attention modules, whose parameters are the first layer's: a
    layer's key/value cache holds that layer's keys and values (`init_cache`), which differ
    from layer to layer since their inputs do.
    """
    if scan:
        raise ValueError(
            "model.share_layers=True (WideNet) needs model.scan_layers=False: scanned layers "
            "hold one set of weights per layer."
        )
    if len({sparse for pattern, _ in plan for sparse in pattern}) != 1:
        raise ValueError(
            "model.share_layers=True (WideNet) shares one FFN across all layers, so every layer "
            "must be sparse or every layer dense; set moe.sparse_placement='every' and "
            "moe.sparse_every=1 (or moe.num_experts=0)."
        )
    layers = [layer for segment in segments for block in segment for layer in block.layers]
    first = layers[0]
    for layer in layers[1:]:
        for name in SHARED_FFNS:
            if hasattr(first, name):
                setattr(layer, name, getattr(first, name))
        for name in SHARED_ATTENTIONS:
            if hasattr(first, name):
                _share_weights(getattr(layer, name), getattr(first, name))


def _create_stacked(make: Callable[[nnx.Rngs], nnx.Module], repeats: int, rngs: nnx.Rngs):
    """`repeats` independently initialised modules, parameters stacked on a leading axis."""

    @nnx.split_rngs(splits=repeats)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_SCAN_METADATA)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


class TransformerStack(nnx.Module):
    """An encoder (bidirectional) or decoder (causal, optionally cross-attending) stack.

    Holds the relative position bias (none with `rotary`: rotary positions in each layer's
    attention), the layers (in segments, see `layer_plan`), and the final RMSNorm; the token
    embedding belongs to the model. `init_cache` prepares it for incremental decoding
    (`moe_jax.decode`).
    """

    def __init__(
        self,
        config,
        num_layers: int,
        *,
        causal: bool,
        cross: bool,
        rngs: nnx.Rngs,
        rotary: bool = False,
    ):
        model = config.model
        self.causal, self.rotary = causal, rotary
        self.scan = bool(model.scan_layers)
        self.remat_policy = remat_policy(model.remat)
        self.plan = layer_plan(num_layers, config.moe)
        config = config.copy_and_resolve_references()  # this stack's router settings
        if causal and config.moe.decoder_router:
            config.moe.router = config.moe.decoder_router
        # a causal stack fills slots token by token, so no token's slots depend on later ones
        config.moe.fill_order = config.moe.fill_order or ("token" if causal else "choice")
        router = config.moe.router
        if (
            causal
            and router in NON_CAUSAL_ROUTERS
            and any(True in pattern for pattern, _ in self.plan)
        ):
            raise ValueError(
                f"moe.router={router!r} {NON_CAUSAL_ROUTERS[router]}, so it cannot be used in "
                "a causal decoder; in an encoder-decoder give the decoder a tokens-choose "
                "router (--config.moe.decoder_router=tokens_choose), or choose a tokens-choose "
                "router for every stack (moe.router='tokens_choose')."
            )
        if (
            causal
            and config.moe.batch_prioritized
            and any(True in pattern for pattern, _ in self.plan)
        ):
            raise ValueError(
                "moe.batch_prioritized=True ranks a group's tokens by their top-1 router "
                "scores, so whether a token keeps its expert slot depends on later tokens: it "
                "cannot be used in a causal decoder; set --config.moe.batch_prioritized=False."
            )
        self.position_bias = (
            None
            if rotary
            else RelativePositionBias(
                num_buckets=model.relative_attention_num_buckets,
                max_distance=model.relative_attention_max_distance,
                num_heads=model.num_heads,
                bidirectional=not causal,
                rngs=rngs,
                param_dtype=jnp.dtype(model.param_dtype),
            )
        )
        segments = []
        for pattern, repeats in self.plan:

            def make(rngs: nnx.Rngs, pattern=pattern) -> LayerBlock:
                return LayerBlock(config, pattern, cross=cross, rngs=rngs, rotary=rotary)

            if self.scan:
                segments.append(_create_stacked(make, repeats, rngs))
            else:
                segments.append(nnx.List([make(rngs) for _ in range(repeats)]))
        self.segments = nnx.List(segments)
        if model.share_layers:
            _share_layers(self.segments, self.scan, self.plan)
        self.final_norm = _rms_norm(config)
        self.dropout = nnx.Dropout(model.dropout_rate, rngs=rngs)
        self.cache_length: int | None = None

    def init_cache(self, batch: int, length: int, encoder_length: int | None = None) -> None:
        """Empty self-attention caches of `length` rows (and cross-attention caches of
        `encoder_length` rows) in every layer, for `batch` sequences."""
        for path, module in nnx.iter_modules(self):
            if isinstance(module, MultiHeadAttention | GroupedQueryAttention):
                cross = path[-1] == "cross_attention"
                module.init_cache(batch, encoder_length if cross else length)
        self.cache_length = length

    def __call__(
        self,
        x: jax.Array,
        *,
        token_ids: jax.Array,
        padding_mask: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None,
        deterministic: bool,
        encoded: jax.Array | None = None,
        cross_mask: jax.Array | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux | None]:
        """Embedded tokens `x: [B, L, M]` -> (normed output `[B, L, M]`, stacked MoeAux or None).

        `token_ids, positions: i32[B, L]`; `padding_mask: bool[B, L]`; `segment_ids: i32[B, L]`
        or None; `encoded: [B, Le, M]` and `cross_mask: bool[B, 1, L, Le]` for cross-attention.
        After `init_cache`, `cache_index: i32[]` says which cache rows the L tokens fill (their
        `positions` must be those rows): each token attends to the rows up to its own, and
        `encoded=None` reuses the cached cross-attention keys and values.
        """
        if cache_index is None:
            self_mask = attention_mask(
                key_valid=padding_mask,
                query_segments=segment_ids,
                key_segments=segment_ids,
                causal=self.causal,
            )
            key_positions = positions
        else:
            if self.cache_length is None:
                raise ValueError("cache_index needs a cache: call init_cache first.")
            key_positions = jnp.arange(self.cache_length, dtype=jnp.int32)[None]  # [1, Lc]
            self_mask = (key_positions[:, None, :] <= positions[:, :, None])[:, None]
            # [B, 1, L, Lc]
        inputs = LayerInputs(
            self_mask=self_mask,
            self_bias=None if self.rotary else self.position_bias(positions, key_positions),
            token_ids=token_ids,
            padding_mask=padding_mask,
            encoded=encoded,
            cross_mask=cross_mask,
            positions=positions if self.rotary else None,
            cache_index=cache_index,
        )

        def run_block(block: LayerBlock, x: jax.Array, inputs: LayerInputs):
            return block(x, inputs, deterministic=deterministic)

        if self.remat_policy != "none":
            run_block = nnx.remat(run_block, policy=_REMAT_SAVES[self.remat_policy])

        x = self.dropout(x, deterministic=deterministic)
        auxes = []
        for segment in self.segments:
            if self.scan:
                scan = nnx.scan(
                    run_block,
                    in_axes=(0, nnx.Carry, None),
                    out_axes=(nnx.Carry, 0),
                    transform_metadata=_SCAN_METADATA,
                )
                x, aux = scan(segment, x, inputs)  # aux leaves: [repeats, S_block, ...]
                if aux is not None:
                    aux = jax.tree.map(lambda a: a.reshape((-1, *a.shape[2:])), aux)
            else:
                block_auxes = []
                for block in segment:
                    x, block_aux = run_block(block, x, inputs)
                    block_auxes.append(block_aux)
                aux = _concat_aux(block_auxes)
            auxes.append(aux)
        x = self.dropout(self.final_norm(x), deterministic=deterministic)
        return x, _concat_aux(auxes)


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
    plus `k` experts' worth of each sparse layer's stacked expert weights (shared experts and
    routers are non-expert parameters, so they count in full).

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
        is_expert_weight = path[-1] in ("wi", "wi_gate", "wo") and "ffn" in path
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
