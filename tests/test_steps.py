"""The loss of `moe_jax.steps` on a stand-in model with known logits and aux losses."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.config import default_config
from moe_jax.layers import MoeAux
from moe_jax.steps import compute_loss


class FixedModel:
    """Returns fixed logits f32[1, 3, 2] and an MoeAux of two sparse layers."""

    def __call__(self, tokens, *, deterministic, segment_ids=None, positions=None):
        del tokens, deterministic, segment_ids, positions
        logits = jnp.array([[[0.0, 0.0], [0.0, 0.0], [10.0, 0.0]]])
        aux = MoeAux(
            load_balancing_loss=jnp.array([1.0, 2.0]),
            router_z_loss=jnp.array([0.5, 0.5]),
            router_l1_loss=jnp.array([0.02, 0.03]),
            fraction_tokens_dropped=jnp.array([0.25, 0.75]),
            fraction_assignments_dropped=jnp.array([0.25, 0.75]),
            router_confidence=jnp.array([0.5, 0.7]),
            expert_usage=jnp.array([1.0, 1.0]),
            expert_load=jnp.array([[0.5, 0.5], [1.0, 0.0]]),
            expert_load_routed=jnp.array([[0.25, 0.75], [1.0, 0.0]]),
            router_logit_max=jnp.array([1.5, 4.0]),
        )
        return logits, aux


def test_loss_is_masked_cross_entropy_plus_summed_aux_terms():
    # Tokens 1 and 2 have uniform logits over 2 classes: cross-entropy ln 2 each. Token 3 (target
    # 1, logits [10, 0]) would add ~10 but its weight is 0. Layers sum: balancing 1 + 2 = 3,
    # z-loss 0.5 + 0.5 = 1, ReMoE's L1 (its coefficient inside) 0.02 + 0.03 = 0.05, so
    # loss = ln 2 + 0.1 * 3 + 0.01 * 1 + 0.05.
    config = default_config()
    config.loss.aux_coef = 0.1
    config.loss.z_coef = 0.01
    batch = {
        "inputs": jnp.zeros((1, 3), jnp.int32),
        "targets": jnp.array([[0, 1, 1]]),
        "weights": jnp.array([[1.0, 1.0, 0.0]]),
        "segment_ids": jnp.ones((1, 3), jnp.int32),
        "positions": jnp.arange(3)[None],
    }
    loss, metrics = compute_loss(FixedModel(), batch, config, deterministic=False)
    assert float(loss) == pytest.approx(math.log(2) + 0.3 + 0.01 + 0.05, rel=1e-6)
    assert float(metrics["cross_entropy"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(metrics["aux_loss"]) == pytest.approx(3.0)
    assert float(metrics["z_loss"]) == pytest.approx(1.0)
    assert float(metrics["l1_loss"]) == pytest.approx(0.05)
    assert float(metrics["fraction_dropped"]) == pytest.approx(0.5)
    assert float(metrics["router_logit_max"]) == 4.0  # the larger of the two layers'
    # argmax of [0, 0] is class 0: token 1 (target 0) right, token 2 (target 1) wrong
    assert float(metrics["accuracy"]) == pytest.approx(0.5)
    assert float(metrics["weight_sum"]) == 2.0
    np.testing.assert_array_equal(metrics["expert_load"], [[0.5, 0.5], [1.0, 0.0]])
    np.testing.assert_array_equal(metrics["expert_load_routed"], [[0.25, 0.75], [1.0, 0.0]])
