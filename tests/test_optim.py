"""Schedules and optimizers of `moe_jax.optim` against hand-computed values and plain optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax import optim
from moe_jax.config import default_config
from moe_jax.models import build_model


def _train_config(**overrides):
    train = default_config().train
    train.unlock()
    train.update(overrides)
    return train


@pytest.mark.parametrize("name", optim.SCHEDULES)
@pytest.mark.parametrize(("warmup", "horizon"), [(0, 40), (10, 100)])
def test_schedules_follow_their_formulas_at_every_step(name, warmup, horizon):
    # The documented formulas in float64 at every update s = count + 1, past the horizon too:
    # warmup min(s / W, 1) (W at least 1), then 1, sqrt(W / s), or 0.1 + 0.9 * the cosine of
    # the progress (s - W) / (N - W), clipped to [0, 1].
    if name == "cosine" and warmup == 0:
        warmup = 1  # the cosine needs a warmup below the horizon and counts from it
    peak, length = 3e-3, max(warmup, 1)
    config = _train_config(
        schedule=name, learning_rate=peak, warmup_steps=warmup, num_steps=horizon
    )
    steps = np.arange(1, horizon + 30, dtype=np.float64)
    ramp = np.minimum(steps / length, 1.0)
    progress = np.clip((steps - warmup) / (horizon - warmup), 0.0, 1.0)
    decay = {
        "constant": np.ones_like(steps),
        "rsqrt": np.sqrt(length / np.maximum(steps, length)),
        "cosine": 0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * progress)),
    }[name]
    rates = optim.make_schedule(config)(jnp.arange(steps.size))
    np.testing.assert_allclose(rates, peak * ramp * decay, rtol=2e-6, atol=0)


def test_constant_schedule_warms_up_linearly():
    # warmup 4, peak 2.0: update 0 is the 1st of 4 warmup steps -> 2 * 1/4 = 0.5; update 3 -> 2.0.
    schedule = optim.make_schedule(
        _train_config(schedule="constant", learning_rate=2.0, warmup_steps=4)
    )
    assert [float(schedule(i)) for i in (0, 1, 3, 50)] == pytest.approx([0.5, 1.0, 2.0, 2.0])


def test_rsqrt_schedule_decays_as_inverse_square_root():
    # warmup 4, peak 1.0: update 3 (step 4) -> 1.0; update 15 (step 16) -> sqrt(4/16) = 0.5;
    # update 99 (step 100) -> sqrt(4/100) = 0.2.
    schedule = optim.make_schedule(
        _train_config(schedule="rsqrt", learning_rate=1.0, warmup_steps=4)
    )
    assert [float(schedule(i)) for i in (1, 3, 15, 99)] == pytest.approx([0.5, 1.0, 0.5, 0.2])


def test_cosine_schedule_ends_at_final_fraction():
    # peak 1.0, warmup 10, 110 steps: update 5 (count 4) -> 5/10 = 0.5; update 10 -> 1.0;
    # halfway through the decay (update 60) the cosine factor is 0.5, so lr = 0.1 + 0.9 * 0.5 =
    # 0.55; the last update (110) reaches 0.1.
    schedule = optim.make_schedule(
        _train_config(schedule="cosine", learning_rate=1.0, warmup_steps=10, num_steps=110)
    )
    assert [float(schedule(i)) for i in (4, 9, 59, 109)] == pytest.approx([0.5, 1.0, 0.55, 0.1])


def test_weight_decay_skips_vectors():
    # Zero gradients leave Adam's step at 0, so the update is the decoupled decay alone:
    # -lr * weight_decay * p = -1 * 0.1 * 3 = -0.3 on the matrix, 0 on the norm scale.
    config = _train_config(
        schedule="constant", learning_rate=1.0, warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0
    )
    optimizer, _ = optim.make_optimizer(config)
    params = {"kernel": jnp.full((2, 2), 3.0), "scale": jnp.full((2,), 3.0)}
    zeros = {"kernel": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.3, rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], 0.0)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_gradient_clipping_matches_clipped_gradients(name):
    # Two updates, the first gradient with norm 10 (clipped to 1 by scaling by 1/10), the second
    # with norm 0.5 (left alone); the oracle is optax's plain optimizer on pre-scaled gradients.
    config = _train_config(
        optimizer=name, schedule="constant", learning_rate=0.1, warmup_steps=0, grad_clip_norm=1.0
    )
    optimizer, schedule = optim.make_optimizer(config)
    plain = (
        optax.adamw(schedule, weight_decay=0.0) if name == "adamw" else optax.adafactor(schedule)
    )
    params = {"w": jnp.arange(6.0).reshape(2, 3) + 1.0}
    first = {"w": jnp.array([[6.0, 0.0, 0.0], [0.0, 8.0, 0.0]])}  # norm 10
    second = {"w": jnp.array([[0.3, 0.0, 0.0], [0.0, 0.0, 0.4]])}  # norm 0.5
    state, plain_state = optimizer.init(params), plain.init(params)
    for grads, scale in ((first, 0.1), (second, 1.0)):
        updates, state = optimizer.update(grads, state, params)
        scaled = {"w": grads["w"] * scale}
        expected, plain_state = plain.update(scaled, plain_state, params)
        np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer": "sgd"}, "train.optimizer='sgd'"),
        ({"schedule": "linear"}, "train.schedule='linear'"),
        ({"schedule": "cosine", "warmup_steps": 50, "num_steps": 50}, "train.warmup_steps=50"),
        ({"grad_clip_norm": -1.0}, "train.grad_clip_norm=-1.0"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        optim.make_optimizer(_train_config(**overrides))


@pytest.mark.parametrize("learning_rate", [0.0, -1.0])
def test_learning_rate_must_be_positive(learning_rate):
    with pytest.raises(ValueError, match=rf"train\.learning_rate={learning_rate}"):
        optim.make_optimizer(_train_config(learning_rate=learning_rate))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_weight_decay_follows_what_a_parameter_is(scan_layers):
    # Zero gradients leave AdamW's step at 0, so each update is the decoupled decay alone:
    # -lr * weight_decay * p on kernels and embeddings, 0 on norm scales and the relative position
    # bias table, whatever their rank (scan_layers stacks a leading layer axis onto each of them).
    config = default_config()
    model = config.model
    model.d_model, model.num_heads, model.head_dim, model.d_ff, model.num_layers = 16, 2, 8, 32, 4
    model.vocab_size, model.scan_layers = 32, scan_layers
    config.moe.num_experts = 2
    train = _train_config(
        schedule="constant", learning_rate=1.0, warmup_steps=0, weight_decay=0.1, grad_clip_norm=0.0
    )
    optimizer, _ = optim.make_optimizer(train)
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 3.0), abstract)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    seen = set()
    for (path, update), param in zip(nnx.to_flat_state(updates), jax.tree.leaves(params)):
        name = "/".join(str(key) for key in path)
        if path[-1] == "scale" or "position_bias" in path:
            seen.add("kept")
            np.testing.assert_array_equal(update[...], 0.0, err_msg=name)
        else:
            seen.add("decayed")
            np.testing.assert_allclose(update[...], -0.1 * param, rtol=1e-6, err_msg=name)
    assert seen == {"kept", "decayed"}


@pytest.mark.parametrize("router_scale", [0.25, 4.0])
def test_router_learning_rate_scale_moves_the_router_weights_only(router_scale):
    # Adam's first step on a gradient of ones is -lr * 1 / (1 + eps) = -1 at lr 1 on every
    # weight (to float32 rounding of the bias corrections, 7e-6); the router kernels (one per
    # sparse layer) move by -router_scale instead.
    config = default_config()
    model = config.model
    model.d_model, model.num_heads, model.head_dim, model.d_ff, model.num_layers = 16, 2, 8, 32, 4
    model.vocab_size = 32
    config.moe.num_experts = 2
    train = _train_config(
        schedule="constant",
        learning_rate=1.0,
        warmup_steps=0,
        grad_clip_norm=0.0,
        router_learning_rate_scale=router_scale,
    )
    optimizer, _ = optim.make_optimizer(train)
    abstract = nnx.state(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 3.0), abstract)
    ones = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(optimizer.update)(ones, optimizer.init(params), params)
    routers = []
    for path, update in nnx.to_flat_state(updates):
        name = "/".join(str(key) for key in path)
        expected = -router_scale if "router" in path else -1.0
        routers += [name] if "router" in path else []
        np.testing.assert_allclose(update[...], expected, rtol=2e-5, err_msg=name)
    assert len(routers) == 2 and all(name.endswith("router/kernel") for name in routers)


def test_router_learning_rate_scale_must_be_positive():
    with pytest.raises(ValueError, match=r"train\.router_learning_rate_scale=0\.0 must be > 0"):
        optim.make_optimizer(_train_config(router_learning_rate_scale=0.0))
