"""bfloat16 compute (`model.dtype = 'bfloat16'`): every dense matmul takes bf16 operands except
the float32 router, parameters stay float32, and a micro model trains with a falling loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import models, optim, steps
from moe_jax.config import default_config

NUM_EXPERTS = 4


def micro_config(kind: str):
    config = default_config()
    model = config.model
    model.kind, model.vocab_size, model.d_model, model.num_layers = kind, 32, 16, 2
    model.num_heads, model.head_dim, model.d_ff, model.dtype = 2, 8, 32, "bfloat16"
    model.dropout_rate = 0.0
    config.moe.num_experts, config.moe.group_size, config.moe.backend = NUM_EXPERTS, 16, "gather"
    config.train.optimizer, config.train.learning_rate, config.train.warmup_steps = "adamw", 1e-2, 1
    return config


def _dot_operands(jaxpr, found):
    """(dtype, shape) operand pairs of every dot_general in `jaxpr` and its sub-jaxprs."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple((v.aval.dtype, v.aval.shape) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _dot_operands(sub, found)
    return found


@pytest.mark.parametrize("kind", ["decoder", "rope_decoder"])
def test_only_the_router_multiplies_in_float32(kind):
    network = models.build_model(micro_config(kind), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(network)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, deterministic=True)[0]

    jaxpr = jax.make_jaxpr(forward)(state, jnp.zeros((2, 16), jnp.int32)).jaxpr
    dots = _dot_operands(jaxpr, [])
    float32 = [d for d in dots if any(dtype == jnp.float32 for dtype, _ in d)]
    # the router's logits [rows, M] @ [M, E] and the balancing loss's sums over [G, T, E]
    assert float32 and all(any(s[-1] == NUM_EXPERTS for _, s in d) for d in float32)
    assert len(dots) - len(float32) >= 8  # attention, FFN, experts and logits all in bf16
    assert all(dtype == jnp.bfloat16 for d in dots if d not in float32 for dtype, _ in d)


def test_micro_model_trains_in_bfloat16():
    config = micro_config("decoder")
    network = models.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, rng_state, model_state = nnx.split(network, nnx.Param, nnx.RngState, ...)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    optimizer, schedule = optim.make_optimizer(config.train)
    train_step = jax.jit(steps.make_train_step(graphdef, rng_state, optimizer, schedule, config))
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 0, 32)
    batch = {
        "inputs": tokens,
        "targets": jnp.roll(tokens, -1, axis=1),
        "weights": jnp.ones(tokens.shape),
        "segment_ids": jnp.ones(tokens.shape, jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16), tokens.shape),
    }
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, batch, jax.random.PRNGKey(2))
        losses.append(float(metrics["cross_entropy"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.3  # one fixed batch: AdamW at 1e-2 memorises it
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
