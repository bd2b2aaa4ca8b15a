"""A micro model trains a few steps with each router of issue 24: the jitted train step runs,
its loss is finite and falls on a fixed batch, and ReMoE's L1 coefficient moves by its factor."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import models, optim, steps
from moe_jax.config import default_config

VOCAB, LENGTH, STEPS = 32, 16, 5


def micro_config(router):
    config = default_config()
    model = config.model
    # Soft MoE, BASE and S-BASE are for encoders: an encoder-decoder with a tokens-choose decoder
    encoder_only = router in ("soft_moe", "base_layer", "sinkhorn")
    model.kind = "encoder_decoder" if encoder_only else "decoder"
    model.vocab_size, model.d_model, model.num_heads, model.head_dim = VOCAB, 16, 2, 8
    model.d_ff, model.num_layers, model.num_encoder_layers, model.num_decoder_layers = 32, 2, 2, 1
    moe = config.moe
    moe.router, moe.decoder_router, moe.num_experts, moe.group_size = router, "", 4, 16
    moe.k, moe.backend = 1 if router == "base_layer" else 2, "gather"
    if encoder_only:
        moe.decoder_router = "tokens_choose"
    if router == "soft_moe":
        moe.backend, moe.expert_capacity = "einsum", 2
    if router == "remoe":
        moe.remoe_l1_init = 1e-3
    config.train.learning_rate, config.train.warmup_steps = 1e-2, 1
    return config


def _batch(kind):
    tokens = jax.random.randint(jax.random.key(1), (4, LENGTH), 3, VOCAB)
    ones = jnp.ones(tokens.shape, jnp.int32)
    if kind == "decoder":
        return {
            "inputs": tokens,
            "targets": jnp.roll(tokens, -1, axis=1),
            "weights": ones.astype(jnp.float32),
            "segment_ids": ones,
            "positions": jnp.broadcast_to(jnp.arange(LENGTH), tokens.shape),
        }
    return {
        "encoder_inputs": tokens,
        "decoder_inputs": jnp.roll(tokens, 1, axis=1),
        "decoder_targets": tokens,
        "decoder_weights": ones.astype(jnp.float32),
        "encoder_segment_ids": ones,
        "decoder_segment_ids": ones,
    }


@pytest.mark.parametrize(
    "router", ["soft_moe", "base_layer", "sinkhorn", "remoe", "cosine", "forced_balanced"]
)
def test_micro_model_trains(router):
    config = micro_config(router)
    network = models.build_model(config, rngs=nnx.Rngs(0))
    graphdef, params, rng_state, model_state = nnx.split(network, nnx.Param, nnx.RngState, ...)
    optimizer, schedule = optim.make_optimizer(config.train)
    train_step = jax.jit(steps.make_train_step(graphdef, rng_state, optimizer, schedule, config))
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, model_state, optimizer.init(params))
    batch = _batch(config.model.kind)
    cross_entropy = []
    for _ in range(STEPS):
        state, metrics = train_step(state, batch, jax.random.key(2))
        cross_entropy.append(float(metrics["cross_entropy"]))
        assert math.isfinite(float(metrics["loss"])) and "l1_loss" in metrics
    assert cross_entropy[-1] < cross_entropy[0] - 0.1, cross_entropy
    if router == "remoe":
        # one controller step per training step: lambda = 1e-3 * 1.2**m, m an integer in [-5, 5]
        coefficient = [leaf for leaf in jax.tree.leaves(state.model_state) if leaf.ndim == 0]
        exponent = np.log(np.asarray(coefficient) / 1e-3) / np.log(1.2)
        np.testing.assert_allclose(exponent, np.round(exponent), atol=1e-3)
        assert np.all(np.abs(np.round(exponent)) <= STEPS) and np.any(np.round(exponent) != 0)
        assert float(metrics["l1_loss"]) > 0
