"""The layer stack of the transformer models: layer placement, layers, blocks, scan, remat.

`TransformerStack` is the encoder or decoder of `moe_jax.models` (its embedding and logits
live there); `layer_plan` and `sparse_layer_flags` say which of its layers are sparse.

Sparse layers. Layer i (0-based) of a stack has a sparse FFN (`layers.MoeFeedForward`) when
- `moe.sparse_placement == 'every'`: `i % sparse_every == sparse_every - 1` (the last layer of
  each block of `sparse_every`; Switch/GLaM 2, ST-MoE 4, Switch-C 1);
- `'bottom'` / `'top'`: i is among the first / last `moe.num_sparse_layers` layers;
and i is not in `moe.dense_layers` (Qwen's `mlp_only_layers`).
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
list run in a Python loop; scanning needs every block of a segment to attend alike, so layers
whose sliding windows (`rope_attention.sliding_layers`) do not repeat with the block are
refused there. `model.remat` rematerialises each block in the backward pass by a
named policy (`REMAT_POLICIES`): 'none' (False), 'full' (True: keep only the block's input),
'save_dots' (keep matmul outputs), 'save_routing' (keep each MoE layer's `Routing`, tagged
`'moe_routing'` with `jax.ad_checkpoint.checkpoint_name` in `layers.py`: the backward pass
recomputes the FFNs and attention but not the router's top-k and slot sorting). Keeping an MoE
layer's combined output alone would save nothing here: its own backward needs the expert
activations, which are recomputed from the block's input anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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
from moe_jax.latent_attention import ATTENTION_KINDS, LatentAttention
from moe_jax.layers import FeedForward, MoeAux, MoeFeedForward
from moe_jax.rope_attention import GroupedQueryAttention, sliding_layers, sliding_window_mask
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
    plan = tuple((pattern, repeats) for pattern, repeats in segments if repeats > 0)
    dense = set(moe_config.dense_layers)
    if not dense:
        return plan
    if not dense <= set(range(num_layers)):
        raise ValueError(
            f"moe.dense_layers={tuple(moe_config.dense_layers)!r} must be layer indices in "
            f"[0, {num_layers})."
        )
    # one-layer blocks, each run of equal layers a segment
    flags = [flag and i not in dense for i, flag in enumerate(_flags(plan))]
    runs: list[tuple[tuple[bool, ...], int]] = []
    for flag in flags:
        if runs and runs[-1][0] == (flag,):
            runs[-1] = ((flag,), runs[-1][1] + 1)
        else:
            runs.append(((flag,), 1))
    return tuple(runs)


def _flags(plan: Plan) -> tuple[bool, ...]:
    return tuple(flag for pattern, repeats in plan for flag in pattern * repeats)


def sparse_layer_flags(num_layers: int, moe_config: Any) -> tuple[bool, ...]:
    """bool per layer, bottom to top: True where the FFN is sparse."""
    return _flags(layer_plan(num_layers, moe_config))


# --------------------------------------------------------------------------------- layers


class LayerInputs(NamedTuple):
    """What every layer of a stack reads besides the residual stream (a pytree of arrays).

    Attributes:
      self_mask: bool[B, 1, L, Lk]; self_bias: f32[B, N, L, Lk] relative position bias, or None
        (rotary positions); Lk = L, or the cache length when decoding with a cache.
      sliding_mask: bool[B, 1, L, Lk] self_mask within `model.sliding_window`, for the layers
        that slide (`rope_attention.sliding_layers`), or None when none does.
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
    sliding_mask: jax.Array | None
    token_ids: jax.Array
    padding_mask: jax.Array
    encoded: jax.Array | None = None
    cross_mask: jax.Array | None = None
    positions: jax.Array | None = None
    cache_index: jax.Array | None = None


class TransformerLayer(nnx.Module):
    """Self-attention, optional cross-attention, an FFN (dense or sparse), optional extra dense FFN.

    Each sublayer is `x + dropout(sublayer(rms_norm(x)))`. Self-attention is T5's (relative
    position bias) or, with `rotary`, `GroupedQueryAttention` (rotary positions, GQA) or with
    `model.attention='mla'` `LatentAttention` (DeepSeek's multi-head latent attention), within
    the sliding window where `sliding`.
    """

    def __init__(
        self,
        config,
        *,
        sparse: bool,
        cross: bool,
        rngs: nnx.Rngs,
        rotary: bool = False,
        sliding: bool = False,
    ):
        model = config.model
        self.sparse, self.cross, self.rotary, self.sliding = sparse, cross, rotary, sliding
        self.dtype = jnp.dtype(model.dtype)
        self.rules = parallel.logical_rules(config)  # for the residual stream's sharding

        def norm() -> RMSNorm:
            return _rms_norm(config)

        self.self_norm = norm()
        if not rotary:
            self.self_attention = MultiHeadAttention(config, rngs=rngs)
        elif model.attention == "mla":
            self.self_attention = LatentAttention(config, rngs=rngs)
        else:
            self.self_attention = GroupedQueryAttention(config, rngs=rngs)
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
                mask=inputs.sliding_mask if self.sliding else inputs.self_mask,
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
    """Consecutive layers following `pattern` (True: sparse), the unit that scan repeats; layer j
    attends within the sliding window where `sliding[j]`."""

    def __init__(
        self,
        config,
        pattern: tuple[bool, ...],
        *,
        cross: bool,
        rngs: nnx.Rngs,
        rotary: bool = False,
        sliding: tuple[bool, ...] | None = None,
    ):
        sliding = sliding or (False,) * len(pattern)
        self.layers = nnx.List(
            [
                TransformerLayer(
                    config, sparse=sparse, cross=cross, rngs=rngs, rotary=rotary, sliding=slides
                )
                for sparse, slides in zip(pattern, sliding, strict=True)
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
        if model.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"model.attention={model.attention!r} is not one of {ATTENTION_KINDS}."
            )
        if model.attention == "mla" and not rotary:
            raise ValueError(
                "model.attention='mla' (multi-head latent attention) needs rotary attention "
                f"(model.kind='rope_decoder'), not model.kind={model.kind!r}."
            )
        sliding = sliding_layers(num_layers, model)
        if any(sliding) and not rotary:
            raise ValueError(
                f"model.sliding_window={model.sliding_window} needs rotary attention "
                f"(model.kind='rope_decoder'), not model.kind={model.kind!r}."
            )
        self.window = model.sliding_window if any(sliding) else 0
        segments, first_layer = [], 0
        for pattern, repeats in self.plan:
            blocks = [
                sliding[start : start + len(pattern)]
                for start in range(first_layer, first_layer + repeats * len(pattern), len(pattern))
            ]
            first_layer += repeats * len(pattern)

            def make(rngs: nnx.Rngs, pattern=pattern, slides=None) -> LayerBlock:
                return LayerBlock(
                    config, pattern, cross=cross, rngs=rngs, rotary=rotary, sliding=slides
                )

            if self.scan:
                if len(set(blocks)) > 1:
                    raise ValueError(
                        f"model.scan_layers=True repeats one block of {len(pattern)} layer(s), "
                        f"but model.sliding_window={model.sliding_window} with "
                        f"full_attention_every={model.full_attention_every} gives its blocks "
                        "different attention; set model.scan_layers=False, or a "
                        "full_attention_every that repeats with the sparse layers "
                        "(moe.sparse_every)."
                    )
                segments.append(_create_stacked(partial(make, slides=blocks[0]), repeats, rngs))
            else:
                segments.append(nnx.List([make(rngs, slides=slides) for slides in blocks]))
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
            if isinstance(module, MultiHeadAttention | GroupedQueryAttention | LatentAttention):
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
        sliding_mask = None
        if self.window:
            sliding_mask = sliding_window_mask(self_mask, positions, key_positions, self.window)
        inputs = LayerInputs(
            self_mask=self_mask,
            self_bias=None if self.rotary else self.position_bias(positions, key_positions),
            sliding_mask=sliding_mask,
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
