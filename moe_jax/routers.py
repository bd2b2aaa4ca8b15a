"""The NNX router: the router weights of every router kind, and the call that routes with them.

`Router(config, rngs)` holds the weights of the kind `config.moe.router` (`ROUTERS`), always
float32, and `route, logits = router(x, capacity=..., deterministic=...)` calls that kind's pure
function (`moe_jax.routing`, `balanced_routing`, `relu_routing`, `cosine_routing`, `soft_moe`)
on each device's own groups. `layers.MoeFeedForward` owns a Router; this module is the part of
the layers floor that binds router parameters (`moe_jax.layers` re-exports `Router`).

Kinds and their weights (logical axis names in brackets, as `out_sharding` metadata):
- `tokens_choose`, `gshard_top2`, `experts_choose`, `aux_free`, `base_layer`, `sinkhorn`,
  `remoe`, `forced_balanced`: `kernel: [M, E]` ('embed', None); logits x @ kernel, plus
  `logit_bias: [E]` (None,), zeros at init, with `moe.router_bias` (gpt-oss; not noisy_top_k).
- `noisy_top_k`: `kernel` and `noise_kernel: [M, E]` (Shazeer et al. 2017).
- `cosine`: `projection: [M, D]` ('embed', None), `expert_embeddings: [D, E]`,
  `log_temperature: []` (X-MoE; D = `moe.cosine_dim`, tau starts at `moe.cosine_temperature`).
- `soft_moe`: `slots: [M, E, S]` ('embed', None, None) and `scale: []` (Soft MoE); S slots per
  expert are `moe.expert_capacity`, or, when that is 0, the capacity of `moe.group_size` tokens
  at `moe.capacity_factor_train` (fixed when the router is built: each slot is a parameter).
- `hash`: no weights (the token id decides).

DeepSeek's top-k (the kinds of `GROUP_LIMITED_ROUTERS`): `moe.num_groups` and `moe.topk_groups`
keep each token's experts within its best groups of experts (`moe_jax.group_routing`; scored by
'top2_sum' of the biased affinities for `aux_free`, DeepSeek-V3's n_group / topk_group, and by
'max' of the probabilities for the others, DeepSeek-V2's group_limited_greedy);
`moe.max_expert_shards` M keeps them on at most M shards of the expert mesh axis of the mesh
set when the router is traced (DeepSeek-V2's device-limited routing, 'max'); and
`moe.routed_scaling` multiplies their combine weights (routed_scaling_factor).

Variables that are not parameters (gradients and `nnx.Optimizer(..., wrt=nnx.Param)` leave
them alone; the MoE layer moves them in training): `aux_free`'s `bias: RouterBias` f32[E]
(DeepSeek-V3) and `remoe`'s `l1_coefficient: L1Coefficient` f32[] (ReMoE's adaptive lambda).

Training and evaluation differ (`deterministic`): training jitters the router input (Switch,
`moe.router_jitter`), draws the noise of noisy top-k gating and GShard's random second choice,
and balances BASE layers (auction) and S-BASE (Sinkhorn) over the group; evaluation routes each
token on its own clean logits (GShard keeps every second choice that fits, BASE and S-BASE
take the top experts greedily).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import (
    balanced_routing,
    cosine_routing,
    experts,
    parallel,
    relu_routing,
    routing,
    soft_moe,
)
from moe_jax.group_routing import GroupLimit, check_group_limit

ROUTERS = (
    "tokens_choose",
    "gshard_top2",
    "experts_choose",
    "hash",
    "noisy_top_k",
    "aux_free",
    "soft_moe",
    "base_layer",
    "sinkhorn",
    "remoe",
    "cosine",
    "forced_balanced",
)
# routers that make a token's routing depend on its group's later tokens: causal stacks refuse
# them (`stack.TransformerStack`), for this reason. BASE and S-BASE do so in training only
# (the balanced assignment of the whole group); a decoder trained so would see the future there
# and meet a different router at evaluation, as batch-prioritized routing would.
NON_CAUSAL_ROUTERS = {
    "experts_choose": "(Expert Choice) lets each expert pick tokens from the whole group, "
    "future tokens included",
    "soft_moe": "(Soft MoE) mixes the whole group, future tokens included, into every slot",
    "base_layer": "(BASE layers) assigns a group's tokens to experts jointly in training, so a "
    "token's expert depends on later tokens",
    "sinkhorn": "(S-BASE) balances a group's token-expert matrix in training, so a token's "
    "experts depend on later tokens",
}
# routers with a balancing statistic counted where `loss.aux_scope` says (`losses.AUX_SCOPES`):
# the f_e P_e losses (aux_free's only at scope 'sequence' or 'global', DeepSeek-V3's
# complementary loss) and ReMoE's load-balanced L1
SCOPED_LOSS_ROUTERS = ("tokens_choose", "gshard_top2", "cosine", "aux_free", "remoe")
# routers that route on `x @ kernel`
_LINEAR_ROUTERS = (
    "tokens_choose",
    "gshard_top2",
    "experts_choose",
    "noisy_top_k",
    "aux_free",
    "base_layer",
    "sinkhorn",
    "remoe",
    "forced_balanced",
)
# routers that pick top-k by `routing.tokens_choose` or `routing.biased_top_k`, so they take the
# DeepSeek settings moe.num_groups / topk_groups / max_expert_shards / routed_scaling
GROUP_LIMITED_ROUTERS = ("tokens_choose", "noisy_top_k", "cosine", "aux_free")
# routers whose logits are x @ kernel alone, so `moe.router_bias` can add a bias to them
_BIASED_ROUTERS = tuple(kind for kind in _LINEAR_ROUTERS if kind != "noisy_top_k")


def logical_param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    """An `nnx.Param` carrying its logical axis names as `out_sharding` metadata."""
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def check_config_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    """A ValueError naming the setting and its allowed values unless `value` is one of them."""
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}; use one of {allowed}.")


class RouterBias(nnx.Variable):
    """Aux-loss-free selection bias f32[E]: updated by the layer in training, never by gradients."""


class L1Coefficient(nnx.Variable):
    """ReMoE's L1 coefficient lambda f32[]: updated by the layer in training, never by gradients."""


def soft_moe_slots(moe) -> int:
    """Slots per expert of a Soft MoE router from the `config.moe` settings (see module doc)."""
    if moe.expert_capacity > 0:
        return int(moe.expert_capacity)
    if moe.group_size > 0:
        return routing.expert_capacity(
            moe.group_size,
            moe.num_experts,
            moe.capacity_factor_train,
            min_capacity=moe.min_capacity,
        )
    raise ValueError(
        "router 'soft_moe' learns one vector per slot, so its slot count is fixed when the "
        "layer is built; with moe.group_size=0 (a group per sequence) set moe.expert_capacity "
        "(slots per expert), e.g. --config.moe.expert_capacity=1."
    )


class Router(nnx.Module):
    """Router of kind `config.moe.router`; float32 weights and maths whatever the model dtype.

    Choices take capacity slots in `config.moe.fill_order` ('choice' | 'token'; '' is 'choice'
    here, and `stack.TransformerStack` makes it 'token' in causal stacks). See the module doc
    for the kinds, their weights and what training changes.
    """

    def __init__(self, config, rngs: nnx.Rngs):
        moe = config.moe
        check_config_choice("router", moe.router, ROUTERS)
        self.kind = moe.router
        self.num_experts = moe.num_experts
        self.k = moe.k
        if self.kind == "gshard_top2" and self.k != 2:
            raise ValueError(f"router 'gshard_top2' routes k=2 experts; set moe.k=2, not {self.k}.")
        if self.kind == "base_layer" and self.k != 1:
            raise ValueError(
                f"router 'base_layer' assigns each token one expert (BASE layers); set moe.k=1, "
                f"not {self.k}."
            )
        self.jitter = float(moe.router_jitter)
        self.batch_prioritized = bool(moe.batch_prioritized)
        # '' outside a stack: TransformerStack resolves it by the stack's causality
        self.fill_order = moe.fill_order or "choice"
        check_config_choice("fill_order", self.fill_order, routing.FILL_ORDERS)
        # aux_free always renormalises its k affinities (DeepSeek-V3, Sec. 2.1.2); moe.normalize
        # is the setting of the tokens-choose routers only
        self.normalize = "topk" if self.kind == "aux_free" else moe.normalize
        self.group_limit, self.max_expert_shards, self.routed_scaling = _deepseek_limits(moe)
        self.second_policy = moe.second_policy
        self.second_threshold = float(moe.second_threshold)
        self.sinkhorn_iterations = int(moe.sinkhorn_iterations)
        d_model, num_experts = config.model.d_model, moe.num_experts
        init = experts.truncated_normal_init(moe.router_init_scale)
        if self.kind in _LINEAR_ROUTERS:
            self.kernel = logical_param(
                init(rngs.params(), (d_model, num_experts)), ("embed", None)
            )
        if not isinstance(moe.router_bias, bool):
            raise ValueError(f"moe.router_bias must be True or False, got {moe.router_bias!r}.")
        if moe.router_bias and self.kind not in _BIASED_ROUTERS:
            raise ValueError(
                f"moe.router_bias=True adds a bias to the logits x @ kernel, which router "
                f"{self.kind!r} does not compute; use one of {_BIASED_ROUTERS} or "
                f"router_bias=False."
            )
        self.logit_bias = (
            logical_param(jnp.zeros((num_experts,), jnp.float32), (None,))
            if moe.router_bias
            else None
        )
        if self.kind == "noisy_top_k":
            # zero noise weights start as plain top-k (Shazeer et al. 2017, Appendix A)
            self.noise_kernel = logical_param(
                jnp.zeros((d_model, num_experts), jnp.float32), ("embed", None)
            )
        if self.kind == "aux_free":
            self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))
        if self.kind == "remoe":
            self.l1_coefficient = L1Coefficient(jnp.float32(moe.remoe_l1_init))
        if self.kind == "cosine":
            if not moe.cosine_dim >= 1 or not moe.cosine_temperature > 0:
                raise ValueError(
                    f"router 'cosine' needs moe.cosine_dim >= 1 and moe.cosine_temperature > 0, "
                    f"got {moe.cosine_dim!r} and {moe.cosine_temperature!r}; X-MoE uses 16."
                )
            shape = (d_model, moe.cosine_dim)
            self.projection = logical_param(init(rngs.params(), shape), ("embed", None))
            shape = (moe.cosine_dim, num_experts)
            self.expert_embeddings = logical_param(init(rngs.params(), shape), (None, None))
            temperature = jnp.log(jnp.float32(moe.cosine_temperature))
            self.log_temperature = logical_param(temperature, ())
        if self.kind == "soft_moe":
            self.num_slots = soft_moe_slots(moe)
            shape = (d_model, num_experts, self.num_slots)
            self.slots = logical_param(init(rngs.params(), shape), ("embed", None, None))
            self.scale = logical_param(jnp.ones((), jnp.float32), ())
        self.rules = parallel.logical_rules(config)
        self.rngs = rngs["router"].fork()

    def __call__(
        self,
        x: jax.Array,
        *,
        capacity: int | None,
        deterministic: bool,
        token_ids: jax.Array | None = None,
        padding_mask: jax.Array | None = None,
    ) -> tuple[routing.Routing | soft_moe.SoftRouting, jax.Array | None]:
        """Route `x: [G, T, M]`: the routing and f32[G, T, E] logits (None for hash and Soft MoE).

        `token_ids: i32[G, T]` is required by hash routing; `padding_mask: bool[G, T]` marks
        the real tokens (padding takes no slot). Soft MoE returns a `soft_moe.SoftRouting`
        with `capacity` slots per expert.
        """
        if self.kind == "hash":
            if token_ids is None:
                raise ValueError("router 'hash' needs token_ids; pass layer(x, token_ids=ids).")
            route = parallel.per_device_groups(
                lambda ids, mask: routing.hash_routing(
                    ids, num_experts=self.num_experts, capacity=capacity, padding_mask=mask
                ),
                token_ids,
                padding_mask,
                rules=self.rules,
            )
            return route, None
        x = x.astype(jnp.float32)
        if not deterministic and self.jitter > 0:
            x = x * jax.random.uniform(
                self.rngs(), x.shape, minval=1.0 - self.jitter, maxval=1.0 + self.jitter
            )
        if self.kind == "soft_moe":
            slot_logits = soft_moe.soft_moe_logits(x, self.slots[...], self.scale[...])
            route = parallel.per_device_groups(
                soft_moe.soft_moe_routing, slot_logits, padding_mask, rules=self.rules
            )  # dispatch and combine weights [G, T, E, S]
            return route, None
        if self.kind == "noisy_top_k":
            noise_rng = None if deterministic else self.rngs()
            logits = routing.noisy_logits(
                x, self.kernel[...], self.noise_kernel[...], noise_rng
            )  # [G, T, E]
        elif self.kind == "cosine":
            logits = cosine_routing.cosine_logits(
                x, self.projection[...], self.expert_embeddings[...], self.log_temperature[...]
            )  # [G, T, E]
        else:
            logits = experts.dense_matmul(x, self.kernel[...].astype(jnp.float32))  # [G, T, E]
            if self.logit_bias is not None:
                logits = logits + self.logit_bias[...]
        # evaluation is deterministic: GShard keeps every second choice that fits
        second_policy = "all" if deterministic else self.second_policy
        rng = self.rngs() if self.kind == "gshard_top2" and second_policy != "all" else None
        select = functools.partial(
            self._select,
            capacity=capacity,
            second_policy=second_policy,
            balanced=not deterministic,
            group_limit=self._group_limit_on(parallel.current_mesh()),
        )
        # each device routes only its own groups (see parallel.per_device_groups)
        route = parallel.per_device_groups(select, logits, padding_mask, rng=rng, rules=self.rules)
        return route, logits

    def _select(
        self,
        logits: jax.Array,
        padding_mask: jax.Array | None,
        *,
        capacity: int | None,
        second_policy: str,
        balanced: bool,
        group_limit: GroupLimit | None,
        rng: jax.Array | None = None,
    ) -> routing.Routing:
        """The router kind's slot assignment for f32[G, T, E] logits."""
        common = dict(capacity=capacity, padding_mask=padding_mask)
        top_k = dict(k=self.k, normalize=self.normalize, fill_order=self.fill_order, **common)
        limited = dict(
            batch_prioritized=self.batch_prioritized,
            group_limit=group_limit,
            routed_scaling=self.routed_scaling,
            **top_k,
        )
        if self.kind in ("tokens_choose", "noisy_top_k", "cosine"):
            return routing.tokens_choose(logits, **limited)
        if self.kind == "gshard_top2":
            return routing.gshard_top2(
                logits,
                rng=rng,
                second_policy=second_policy,
                threshold=self.second_threshold,
                fill_order=self.fill_order,
                **common,
            )
        if self.kind == "experts_choose":
            return routing.experts_choose(logits, **common)
        if self.kind == "base_layer":
            return balanced_routing.base_layer(logits, balanced=balanced, **common)
        if self.kind == "sinkhorn":
            return balanced_routing.sinkhorn_top_k(
                logits, balanced=balanced, num_iterations=self.sinkhorn_iterations, **top_k
            )
        if self.kind == "remoe":
            return relu_routing.relu_routing(logits, **common)
        if self.kind == "forced_balanced":
            return balanced_routing.forced_balanced(logits, **top_k)
        return routing.biased_top_k(logits, self.bias[...], **limited)

    def _group_limit_on(self, mesh: parallel.AnyMesh | None) -> GroupLimit | None:
        """The group limit to route with: `moe.num_groups`'s, or with `moe.max_expert_shards`
        the expert shards of `mesh` as groups (None when the experts lie on no more shards)."""
        shards = parallel.expert_axis_size(mesh, self.rules)
        if not self.max_expert_shards or shards <= self.max_expert_shards:
            return self.group_limit
        limit = GroupLimit(shards, self.max_expert_shards, "max")
        try:
            check_group_limit(limit, num_experts=self.num_experts, k=self.k)
        except ValueError as error:
            raise ValueError(
                f"moe.max_expert_shards={self.max_expert_shards} on {shards} expert shards: {error}"
            ) from None
        return limit


def _deepseek_limits(moe) -> tuple[GroupLimit | None, int, float]:
    """(group limit, max expert shards, routed scaling) from `moe.num_groups`, `topk_groups`,
    `max_expert_shards` and `routed_scaling`, checked against the router kind."""
    num_groups, topk_groups = moe.num_groups, moe.topk_groups
    max_shards, scaling = moe.max_expert_shards, float(moe.routed_scaling)
    if not isinstance(max_shards, int) or max_shards < 0:
        raise ValueError(f"moe.max_expert_shards must be an int >= 0 (0: off), got {max_shards!r}.")
    if not scaling > 0:
        raise ValueError(f"moe.routed_scaling must be > 0, got {moe.routed_scaling!r}.")
    limited = num_groups != 1 or max_shards > 0 or scaling != 1.0
    if limited and moe.router not in GROUP_LIMITED_ROUTERS:
        raise ValueError(
            f"moe.num_groups={num_groups}, moe.max_expert_shards={max_shards} and "
            f"moe.routed_scaling={scaling} set DeepSeek's top-k routing, which router "
            f"{moe.router!r} does not do; use one of {GROUP_LIMITED_ROUTERS} or the defaults "
            f"1, 0 and 1.0."
        )
    if num_groups != 1 and max_shards > 0:
        raise ValueError(
            f"moe.num_groups={num_groups} and moe.max_expert_shards={max_shards} both limit "
            f"the groups a token's experts come from; set one of them."
        )
    if num_groups == 1:
        return None, max_shards, scaling
    score = "top2_sum" if moe.router == "aux_free" else "max"
    limit = GroupLimit(num_groups, topk_groups, score)
    try:
        check_group_limit(limit, num_experts=moe.num_experts, k=moe.k)
    except ValueError as error:
        raise ValueError(f"moe.num_groups / moe.topk_groups: {error}") from None
    return limit, max_shards, scaling
