"""Flax NNX modules that own the FFN and MoE parameters and call the pure functions.

- `FeedForward(config, rngs, d_ff=None, activation=None)`: dense FFN (dense baselines, ST-MoE's
  extra dense FFN, shared experts).
- `Router(config, rngs)`: router weights (always float32), input jitter, the router kind of
  `config.moe.router` (defined in `moe_jax.routers`, which lists the kinds).
- `MoeFeedForward(config, rngs)`: `y, aux = layer(x, deterministic=...)`.
- `inference_copy(model, dropless=True, trace_routing=False)`: a copy of a model whose MoE
  layers route with no capacity and/or trace their routing (decoding, scoring, and the dropless
  evaluation of `train.eval_dropless`).

Logical axis names. Every parameter carries them as the flax 0.12 `out_sharding` metadata
(`nnx.Param(value, out_sharding=('expert', 'embed', 'mlp'), eager_sharding=False)`):
`wi`/`wi_gate` `('expert', 'embed', 'mlp')`, `wo` `('expert', 'mlp', 'embed')`, dense FFN
`('embed', 'mlp')` / `('mlp', 'embed')`, the expert biases of `moe.expert_bias` `bi`/`bi_gate`
`('expert', 'mlp')` and `bo` `('expert', 'embed')`, router `('embed', None)` (small,
replicated; the other router kinds' weights are listed in `moe_jax.routers`).
`eager_sharding=False` lets modules be built without a mesh; read the names with
`nnx.get_partition_spec(nnx.state(model))` and map them to mesh axes with the config's rules
table (`moe_jax.parallel`).

Router state that is not a parameter. `config.moe.router = 'aux_free'` keeps its bias as a
`RouterBias` variable and `'remoe'` its L1 coefficient as an `L1Coefficient`, not `nnx.Param`s:
gradients (`nnx.grad(..., argnums=nnx.DiffState(0, nnx.Param))`) and
`nnx.Optimizer(model, tx, wrt=nnx.Param)` leave them alone, and the layer itself moves them
(`update_expert_bias`, `relu_routing.update_l1_coefficient`) on every call with
`deterministic=False`. A train step must therefore carry the model's whole state out of the
step (use `nnx.jit`, or `nnx.split`/`nnx.merge` and return the non-Param state), and must not
run the training forward pass twice per step.

Where the balancing statistics are counted: `config.loss.aux_scope` ('group' | 'sequence' |
'global', `losses.AUX_SCOPES`) regroups the routers' probabilities and choices into routing
groups, batch rows or the whole (global) batch before the balancing loss counts them; it applies
to the routers of `routers.SCOPED_LOSS_ROUTERS`, and the others refuse a scope but 'group'.

Expert-parallel hook. `MoeFeedForward.experts_impl` is the function that runs dispatch, experts
and combine: `(x: [G, T, M], routing, expert_fn, expert_params, *, param_axes, backend, rng)
-> f32[G, T, M]`, where `param_axes` maps each expert weight to its logical axis names (read
from the weights' `out_sharding` metadata, the one place they are written) and `rng` is the
expert-dropout key (None without dropout) that the hook gives `expert_fn` as `dropout_rng`, per
device under `shard_map`. Every layer builds it from its config: `parallel.ExpertParallel`,
which runs expert parallelism (shard_map + all_to_all, or GSPMD, by
`config.mesh.expert_parallelism`) when the mesh set with `jax.set_mesh` at trace time has an
expert axis larger than 1, and the local `dispatch.dispatch_combine` otherwise. It is a static
attribute: a layer may be given another function (`layer.experts_impl = fn`), and jit retraces
when it changes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from moe_jax import dispatch, experts, losses, parallel, relu_routing, routing, soft_moe
from moe_jax.balanced_routing import balanced_capacity
from moe_jax.routers import (
    ROUTERS,
    SCOPED_LOSS_ROUTERS,
    Router,
    check_config_choice,
    logical_param,
)

__all__ = ["ROUTERS", "FeedForward", "MoeAux", "MoeFeedForward", "Router"]


class MoeAux(NamedTuple):
    """What an MoE layer reports; the caller decides what enters the loss.

    Attributes:
      load_balancing_loss: f32[] the router kind's balancing loss, without its coefficient,
        counted over `loss.aux_scope`: Switch's form for tokens_choose and cosine, GShard's for
        gshard_top2, Shazeer's importance + load for noisy_top_k, and for aux_free DeepSeek-V3's
        complementary balance loss (`losses.deepseek_balance_loss`, Switch's form over K) at
        scope 'sequence' or 'global' and none at 'group'; 0 for experts_choose, hash,
        soft_moe, base_layer, sinkhorn, remoe and forced_balanced, which need none.
      router_z_loss: f32[] ST-MoE z-loss of the router logits (0 for hash and soft_moe).
      router_l1_loss: f32[] remoe's adaptive coefficient times its load-balanced L1 penalty
        (`losses.relu_l1_loss`, counted over `loss.aux_scope`); the train step adds it as it
        is. 0 for the other routers.
      fraction_tokens_dropped, fraction_assignments_dropped, router_confidence, expert_usage:
        f32[] from `routing.router_metrics` (`soft_moe.soft_metrics` for soft_moe).
      expert_load: f32[E] share of the filled slots per expert (after capacity).
      expert_load_routed: f32[E] share of the tokens' expert choices per expert, counted before
        capacity (what the router asked for; a collapse shows here even when capacity hides it
        from `expert_load`); the filled slots for experts_choose, which has no choices, and
        each expert's share of the combine weight for soft_moe (whose `expert_load` is 1/E).
      router_logit_max: f32[] largest absolute router logit over the real tokens (0 for hash
        and soft_moe): the logit growth that the z-loss holds back (ST-MoE, Sec. 3.3).
      token_weights: f32[B, L, E] the combine weight each token got from each expert (0: not
        routed there, or dropped), when the layer's `trace_routing` is on; else None.
    """

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    router_l1_loss: jax.Array
    fraction_tokens_dropped: jax.Array
    fraction_assignments_dropped: jax.Array
    router_confidence: jax.Array
    expert_usage: jax.Array
    expert_load: jax.Array
    expert_load_routed: jax.Array
    router_logit_max: jax.Array
    token_weights: jax.Array | None = None


def swiglu_settings(moe) -> tuple[float, float]:
    """`(moe.swiglu_limit, moe.swiglu_alpha)`, the clamp and slope of 'swiglu_clamped'."""
    limit, alpha = float(moe.swiglu_limit), float(moe.swiglu_alpha)
    if not limit > 0 or not alpha > 0:
        raise ValueError(
            f"moe.swiglu_limit and moe.swiglu_alpha must be > 0, got {moe.swiglu_limit!r} and "
            f"{moe.swiglu_alpha!r}; gpt-oss uses 7.0 and 1.702."
        )
    return limit, alpha


class FeedForward(nnx.Module):
    """Dense FFN `wo(act(x wi))` (gated: `wo(act(x wi_gate) * x wi)`), dropout on the hidden.

    `d_ff` defaults to `config.model.d_ff`, `activation` to `config.model.ffn_activation`;
    compute in `config.model.dtype`, parameters in `config.model.param_dtype`; 'swiglu_clamped'
    clamps at `config.moe.swiglu_limit` with slope `config.moe.swiglu_alpha`.
    """

    def __init__(
        self, config, rngs: nnx.Rngs, d_ff: int | None = None, activation: str | None = None
    ):
        model = config.model
        self.activation = activation or model.ffn_activation
        experts.check_activation(self.activation)
        d_ff = d_ff or model.d_ff
        if d_ff < 1:
            raise ValueError(f"d_ff must be >= 1, got {d_ff!r}.")
        self.dtype = jnp.dtype(model.dtype)
        self.dropout_rate = float(model.dropout_rate)
        self.swiglu_limit, self.swiglu_alpha = swiglu_settings(config.moe)
        params = experts.init_ffn_params(
            rngs.params(),
            d_model=model.d_model,
            d_ff=d_ff,
            activation=self.activation,
            dtype=jnp.dtype(model.param_dtype),
        )
        self.wi = logical_param(params["wi"], ("embed", "mlp"))
        self.wo = logical_param(params["wo"], ("mlp", "embed"))
        if "wi_gate" in params:
            self.wi_gate = logical_param(params["wi_gate"], ("embed", "mlp"))
        self.rngs = rngs["dropout"].fork()

    def params(self) -> dict[str, jax.Array]:
        """The weights as the dict `experts.ffn` takes."""
        return {name: getattr(self, name)[...] for name in experts.param_names(self.activation)}

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """`x: [..., M]` -> `[..., M]` in the compute dtype."""
        rate = 0.0 if deterministic else self.dropout_rate
        out = experts.ffn(
            self.params(),
            x,
            activation=self.activation,
            matmul=experts.dense_matmul,
            dtype=self.dtype,
            dropout_rate=rate,
            dropout_rng=self.rngs() if rate > 0 else None,
            swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha,
        )
        return out.astype(self.dtype)


def _float_weight(variable: nnx.Variable) -> jax.Array:
    """A parameter's array, dequantized when it is stored as a `qwix.QArray`."""
    value = variable.get_value()
    return qwix.dequantize(value) if isinstance(value, qwix.QArray) else variable[...]


class MoeFeedForward(nnx.Module):
    """Sparse MoE FFN: route, dispatch to stacked experts, combine, plus optional shared experts.

    Configuration read: `config.model.{d_model, d_ff, ffn_activation, dtype, param_dtype,
    dropout_rate}` and `config.moe.{num_experts, k, router, d_ff, activation,
    capacity_factor_train, capacity_factor_eval, min_capacity, group_size, backend,
    expert_dropout, num_shared_experts, shared_expert_gate, bias_update_rate, remoe_l1_rate,
    ...}` (router keys: see `Router`) and `config.loss.aux_scope`. Shared experts are one dense
    `FeedForward` `shared` of width `num_shared_experts * H`; with `shared_expert_gate`
    (Qwen2-MoE) its output is scaled per token by `sigmoid(x @ shared_gate)`, `shared_gate:
    [M, 1]`.
    Expert weights: `wi: [E, M, H]`, `wi_gate: [E, M, H]` (gated activations), `wo: [E, H, M]`,
    drawn with truncated-normal fan-in init of scale `moe.expert_init_scale` (1.0 by default);
    with `moe.expert_bias` (gpt-oss) also the zero-initialised biases `bi: [E, H]`, `bi_gate:
    [E, H]` (gated activations) and `bo: [E, M]`. A dropped token's empty slot runs its expert
    on a zero row, bias included, and gets combine weight 0, so nothing of it reaches the output.

    Two static switches for inference (`inference_copy` sets them on a copy of a model):
    `dropless = True` routes a tokens-choose router with `capacity=None` (no token is dropped,
    whatever the capacity factor; Expert Choice and Soft MoE keep their capacity), and
    `trace_routing = True` fills `MoeAux.token_weights`.
    """

    def __init__(self, config, rngs: nnx.Rngs):
        model, moe = config.model, config.moe
        if moe.num_experts < 1:
            raise ValueError(
                f"MoeFeedForward needs moe.num_experts >= 1, got {moe.num_experts}; "
                "use FeedForward for a dense layer."
            )
        if moe.k < 1:
            raise ValueError(f"moe.k={moe.k} routes each token to no expert; set moe.k >= 1.")
        if moe.k > moe.num_experts:
            raise ValueError(
                f"moe.k must be in [1, num_experts={moe.num_experts}], got k={moe.k}; "
                "lower k or add experts."
            )
        if not isinstance(moe.group_size, int) or moe.group_size < 0:
            raise ValueError(
                f"moe.group_size must be an int >= 1 (0: one group per sequence), got "
                f"{moe.group_size!r}."
            )
        dispatch.check_backend(moe.backend)
        for name in ("capacity_factor_train", "capacity_factor_eval"):
            if not moe[name] > 0:
                raise ValueError(f"moe.{name} must be > 0, got {moe[name]!r}.")
        self.activation = moe.activation or model.ffn_activation
        experts.check_activation(self.activation)
        self.swiglu_limit, self.swiglu_alpha = swiglu_settings(moe)
        if not isinstance(moe.expert_bias, bool):
            raise ValueError(f"moe.expert_bias must be True or False, got {moe.expert_bias!r}.")
        self.expert_bias = moe.expert_bias
        if moe.backend == "dropless" and moe.router == "experts_choose":
            raise ValueError(
                "backend 'dropless' needs a tokens-choose router; experts_choose fixes each "
                "expert's capacity, so use backend 'gather' or 'einsum' with it."
            )
        if moe.router == "soft_moe":
            soft_moe.check_backend(moe.backend)
        self.aux_scope = config.loss.aux_scope
        check_config_choice("loss.aux_scope", self.aux_scope, losses.AUX_SCOPES)
        if self.aux_scope != "group" and moe.router not in SCOPED_LOSS_ROUTERS:
            raise ValueError(
                f"loss.aux_scope={self.aux_scope!r} says where a balancing loss counts its "
                f"statistics, but router {moe.router!r} has none to count; keep "
                f"loss.aux_scope='group', or use one of {SCOPED_LOSS_ROUTERS}."
            )
        self.num_experts = moe.num_experts
        self.router_kind = moe.router
        self.backend = moe.backend
        self.group_size = moe.group_size
        self.capacity_factor_train = float(moe.capacity_factor_train)
        self.capacity_factor_eval = float(moe.capacity_factor_eval)
        self.min_capacity = int(moe.min_capacity)
        self.expert_capacity = int(moe.expert_capacity)
        self.expert_dropout = float(moe.expert_dropout)
        self.bias_update_rate = float(moe.bias_update_rate)
        self.k = moe.k
        self.remoe_l1_rate = float(moe.remoe_l1_rate)
        self.dtype = jnp.dtype(model.dtype)
        d_ff = moe.d_ff or model.d_ff

        self.router = Router(config, rngs)
        params = experts.init_ffn_params(
            rngs.params(),
            d_model=model.d_model,
            d_ff=d_ff,
            activation=self.activation,
            num_experts=moe.num_experts,
            init_scale=float(moe.expert_init_scale),
            bias=self.expert_bias,
            dtype=jnp.dtype(model.param_dtype),
        )
        axes = {
            "wi": ("expert", "embed", "mlp"),
            "wi_gate": ("expert", "embed", "mlp"),
            "wo": ("expert", "mlp", "embed"),
            "bi": ("expert", "mlp"),
            "bi_gate": ("expert", "mlp"),
            "bo": ("expert", "embed"),
        }
        for name in self.expert_param_names():
            setattr(self, name, logical_param(params[name], axes[name]))
        # S always-on experts of width H are one dense FFN of width S * H (DeepSeekMoE)
        self.shared = (
            FeedForward(
                config, rngs, d_ff=moe.num_shared_experts * d_ff, activation=self.activation
            )
            if moe.num_shared_experts > 0
            else None
        )
        # Qwen2-MoE: the shared experts' output scaled per token by sigmoid(x @ shared_gate)
        if moe.shared_expert_gate and self.shared is None:
            raise ValueError("moe.shared_expert_gate=True needs moe.num_shared_experts >= 1.")
        self.shared_gate = (
            logical_param(
                experts.truncated_normal_init(1.0)(
                    rngs.params(), (model.d_model, 1), jnp.dtype(model.param_dtype)
                ),
                ("embed", None),
            )  # [M, 1]
            if moe.shared_expert_gate
            else None
        )
        self.rngs = rngs["dropout"].fork()
        self.experts_impl: Callable[..., jax.Array] = parallel.ExpertParallel.from_config(config)
        self.dropless = False
        self.trace_routing = False

    def expert_param_names(self) -> tuple[str, ...]:
        """Attribute names of the stacked expert weights (and biases), as `experts.ffn` keys
        them."""
        return experts.param_names(self.activation, bias=self.expert_bias)

    def expert_param_axes(self) -> dict[str, tuple[str | None, ...] | None]:
        """Logical axis names of each stacked expert weight, from its `out_sharding` metadata
        (None for a weight that has none)."""
        return {
            name: getattr(self, name).get_metadata().get("out_sharding")
            for name in self.expert_param_names()
        }

    def expert_params(self) -> dict[str, jax.Array]:
        """The stacked expert weights as the dict `experts.ffn` takes; weights stored quantized
        (`moe_jax.quantize`) are dequantized here."""
        return {name: _float_weight(getattr(self, name)) for name in self.expert_param_names()}

    def capacity(self, tokens_per_group: int, deterministic: bool) -> int | None:
        """Slots per expert per group: `moe.expert_capacity` when set, else from the capacity
        factors; None (never drop) for the dropless backend or the `dropless` switch. Soft MoE
        has its fixed slots; BASE layers in training exactly the ceil(T / E) its balanced
        assignment fills."""
        if self.router_kind == "soft_moe":
            return self.router.num_slots
        if self.backend == "dropless" or (self.dropless and self.router_kind != "experts_choose"):
            return None
        if self.router_kind == "base_layer" and not deterministic:
            return balanced_capacity(tokens_per_group, self.num_experts)
        if self.expert_capacity > 0:
            capacity = self.expert_capacity
        else:
            factor = self.capacity_factor_eval if deterministic else self.capacity_factor_train
            capacity = routing.expert_capacity(
                tokens_per_group, self.num_experts, factor, min_capacity=self.min_capacity
            )
        if self.router_kind == "experts_choose":
            # an expert picks among the group's T tokens, so it has at most T slots
            capacity = min(capacity, tokens_per_group)
        return capacity

    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        token_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, MoeAux]:
        """`x: f32|bf16[B, L, M]` -> (`[B, L, M]` in x's dtype, `MoeAux`).

        `token_ids: i32[B, L]` (hash routing); `padding_mask: bool[B, L]`, True for real
        tokens (padding takes no expert slot and is left out of the losses and metrics).
        Tokens that find no slot get zero from the routed experts; the residual carries them.
        """
        if x.ndim != 3:
            raise ValueError(f"x must be [B, L, M], got shape {x.shape}.")
        group_size = self.group_size or x.shape[1]  # 0: each sequence is a group
        grouped, grouping = dispatch.group_tokens(x, group_size=group_size)  # [G, T, M]
        real = grouping.valid  # [G, T]
        if padding_mask is not None:
            real = real & grouping.group(padding_mask.astype(jnp.bool_))
        grouped_ids = None if token_ids is None else grouping.group(token_ids)  # [G, T]
        route, logits = self.router(
            grouped,
            capacity=self.capacity(grouping.group_size, deterministic),
            deterministic=deterministic,
            token_ids=grouped_ids,
            padding_mask=real,
        )
        # the 'save_routing' remat policy keeps the slots, so the backward pass does not re-route
        route = jax.tree.map(lambda leaf: checkpoint_name(leaf, "moe_routing"), route)
        rate = 0.0 if deterministic else self.expert_dropout
        expert_fn = functools.partial(
            experts.ffn,
            activation=self.activation,
            dtype=self.dtype,
            dropout_rate=rate,
            swiglu_limit=self.swiglu_limit,
            swiglu_alpha=self.swiglu_alpha,
        )
        routed = self.experts_impl(
            grouped.astype(self.dtype),
            route,
            expert_fn,
            self.expert_params(),
            param_axes=self.expert_param_axes(),
            backend=self.backend,
            rng=self.rngs() if rate > 0 else None,
        )  # [G, T, M]
        y = grouping(routed)  # [B, L, M]
        if self.shared is not None:
            shared = self.shared(x, deterministic=deterministic)  # [B, L, M]
            if self.shared_gate is not None:
                gate = experts.dense_matmul(
                    x.astype(self.dtype), self.shared_gate[...].astype(self.dtype)
                )
                shared = shared * jax.nn.sigmoid(gate).astype(shared.dtype)  # gate: [B, L, 1]
            y = y + shared
        aux = self._aux(route, logits, real, grouping)
        if self.trace_routing:
            aux = aux._replace(token_weights=grouping(self._token_weights(route)))  # [B, L, E]
        if self.router_kind == "aux_free" and not deterministic:
            bias = self.router.bias
            bias[...] = routing.update_expert_bias(
                bias[...], route, rate=self.bias_update_rate, padding_mask=real
            )
        if self.router_kind == "remoe" and not deterministic:
            coefficient = self.router.l1_coefficient
            coefficient[...] = relu_routing.update_l1_coefficient(
                coefficient[...],
                relu_routing.gate_sparsity(route.probs, real),
                target_sparsity=1.0 - self.k / self.num_experts,
                rate=self.remoe_l1_rate,
            )
        return y.astype(x.dtype), aux

    def _token_weights(self, route: routing.Routing | soft_moe.SoftRouting) -> jax.Array:
        """f32[G, T, E] the combine weight each token gets from each expert."""
        if isinstance(route, soft_moe.SoftRouting):
            return route.probs
        _, combine = routing.to_masks(route, route.probs.shape[1])  # [G, T, E, C]
        return combine.sum(-1)

    def _by_scope(self, arrays: tuple, grouping: dispatch.Grouping) -> tuple:
        """`[G, T, ...]` arrays regrouped into the units `loss.aux_scope` counts balance over:
        the groups as they are, the batch rows `[B, L, ...]`, or one unit `[1, G * T, ...]`."""
        if self.aux_scope == "sequence":
            return tuple(grouping(a) for a in arrays)
        if self.aux_scope == "global":
            return tuple(a.reshape(1, -1, *a.shape[2:]) for a in arrays)
        return arrays

    def _aux(
        self,
        route: routing.Routing | soft_moe.SoftRouting,
        logits: Any,
        real: jax.Array,
        grouping: dispatch.Grouping,
    ) -> MoeAux:
        zero = jnp.zeros((), jnp.float32)
        balancing, l1_loss = zero, zero
        if self.router_kind == "noisy_top_k":  # Shazeer's losses count the whole batch
            balancing = losses.importance_load_loss(route.probs, route.expert_index, real)
        elif self.router_kind in SCOPED_LOSS_ROUTERS:
            scoped = self._by_scope((route.probs, route.expert_index, real), grouping)
            if self.router_kind == "gshard_top2":
                balancing = losses.gshard_aux_loss(*scoped)
            elif self.router_kind == "remoe":
                coefficient = self.router.l1_coefficient[...]
                l1_loss = coefficient * losses.relu_l1_loss(*scoped, k=self.k)
            elif self.router_kind == "aux_free":
                if self.aux_scope != "group":
                    balancing = losses.deepseek_balance_loss(*scoped)
            else:
                balancing = losses.load_balancing_loss(*scoped)
        z_loss = zero if logits is None else losses.router_z_loss(logits, real)
        logit_max = zero if logits is None else jnp.max(jnp.abs(logits) * real[..., None])
        if isinstance(route, soft_moe.SoftRouting):
            metrics = soft_moe.soft_metrics(route, real)
            routed_share = metrics["expert_load_routed"]
        else:
            metrics = routing.router_metrics(route, real)
            routed = routing.expert_assignments(route, real)  # [E]
            routed_share = routed / jnp.maximum(jnp.sum(routed), 1.0)
        return MoeAux(
            load_balancing_loss=balancing,
            router_z_loss=z_loss,
            router_l1_loss=l1_loss,
            fraction_tokens_dropped=metrics["fraction_tokens_dropped"],
            fraction_assignments_dropped=metrics["fraction_assignments_dropped"],
            router_confidence=metrics["router_confidence"],
            expert_usage=metrics["expert_usage"],
            expert_load=metrics["expert_load"],
            expert_load_routed=routed_share,
            router_logit_max=logit_max,
        )


def inference_copy(
    model: nnx.Module,
    *,
    dropless: bool = True,
    trace_routing: bool = False,
    encoder_dropless: bool | None = None,
) -> nnx.Module:
    """A copy of `model` (parameters shared) whose MoE layers route dropless and/or report
    per-token routing in `MoeAux.token_weights` (see `MoeFeedForward`).

    `encoder_dropless` sets an encoder-decoder's encoder apart (None: as `dropless`); decoding
    passes False, so that the encoder keeps its eval capacity while the decoder runs dropless.
    """
    if encoder_dropless is None:
        encoder_dropless = dropless
    copy = nnx.clone(model)
    for path, module in nnx.iter_modules(copy):
        if isinstance(module, MoeFeedForward):
            module.dropless = encoder_dropless if path[0] == "encoder" else dropless
            module.trace_routing = trace_routing
    return copy
