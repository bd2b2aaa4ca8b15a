"""Hand-computed literal cases and input checks for moe_jax.routing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import routing

# Four tokens, two experts (G=1, T=4, E=2). Rows are router probabilities; logits = log(probs)
# so softmax(logits) gives them back.
PROBS_4X2 = np.array([[[0.9, 0.1], [0.6, 0.4], [0.8, 0.2], [0.3, 0.7]]], np.float32)
LOGITS_4X2 = np.log(PROBS_4X2)

# Three tokens, three experts (G=1, T=3, E=3).
PROBS_3X3 = np.array([[[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]], np.float32)
LOGITS_3X3 = np.log(PROBS_3X3)


def assert_routing(result, token_index, weight):
    np.testing.assert_array_equal(result.token_index, np.array(token_index, np.int32))
    np.testing.assert_allclose(result.weight, np.array(weight, np.float32), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- expert_capacity


def test_expert_capacity_formula():
    # 1.25 * 1024 / 8 = 160 (the Switch training factor).
    assert routing.expert_capacity(1024, 8, 1.25) == 160
    # 1.0 * 10 / 4 = 2.5 -> round 2 -> max(4, 2) = 4.
    assert routing.expert_capacity(10, 4, 1.0) == 4
    # Same without the floor: max(1, 2) = 2.
    assert routing.expert_capacity(10, 4, 1.0, min_capacity=1) == 2
    # 2.0 * 10 / 4 = 5 -> up to a multiple of 4 = 8.
    assert routing.expert_capacity(10, 4, 2.0, min_capacity=0, multiple_of=4) == 8
    # 0.1 * 4 / 8 = 0.05 -> round 0; the result never falls below 1.
    assert routing.expert_capacity(4, 8, 0.1, min_capacity=0) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_tokens=0, num_experts=4, capacity_factor=1.0), "num_tokens"),
        (dict(num_tokens=8, num_experts=0, capacity_factor=1.0), "num_experts"),
        (dict(num_tokens=8, num_experts=4, capacity_factor=0.0), "capacity_factor"),
        (dict(num_tokens=8, num_experts=4, capacity_factor=1.0, min_capacity=-1), "min_capacity"),
        (dict(num_tokens=8, num_experts=4, capacity_factor=1.0, multiple_of=0), "multiple_of"),
    ],
)
def test_expert_capacity_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        routing.expert_capacity(**kwargs)


# ---------------------------------------------------------------- tokens_choose


def test_top1_capacity_two_drops_third_token():
    # Top-1 experts: t0->e0 (.9), t1->e0 (.6), t2->e0 (.8), t3->e1 (.7). Position order with C=2:
    # e0 takes t0, t1 and is full, so t2 is dropped; e1 takes t3 and keeps one slot empty.
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2)
    assert_routing(result, [[[0, 1], [3, -1]]], [[[0.9, 0.6], [0.7, 0.0]]])
    np.testing.assert_array_equal(result.expert_index, [[[0], [0], [0], [1]]])
    np.testing.assert_allclose(result.probs, PROBS_4X2, rtol=1e-6)


def test_top1_batch_prioritized_drops_a_different_token():
    # Descending top-1 prob: t0 .9, t2 .8, t3 .7, t1 .6. e0 takes t0 then t2 (slots in that
    # order) and is full when t1 comes, so t1 is dropped instead of t2.
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2, batch_prioritized=True)
    assert_routing(result, [[[0, 2], [3, -1]]], [[[0.9, 0.8], [0.7, 0.0]]])


def test_batch_prioritized_ties_keep_position_order():
    # All four tokens have top-1 prob .5 on e0 (ties at e0/e1 go to the lower index); with C=2
    # the tie keeps position order: t0, t1.
    logits = np.zeros((1, 4, 2))
    result = routing.tokens_choose(logits, k=1, capacity=2, batch_prioritized=True)
    assert_routing(result, [[[0, 1], [-1, -1]]], [[[0.5, 0.5], [0.0, 0.0]]])


def test_top2_first_choices_fill_before_second_choices():
    # Choices: t0 (e0 .6, e1 .3), t1 (e0 .5, e1 .4), t2 (e1 .7, e0 .2); C=2.
    # First choices: e0 <- t0, t1 (full); e1 <- t2.
    # Second choices: t0 -> e1 slot 1; t1 -> e1 full, dropped; t2 -> e0 full, dropped.
    result = routing.tokens_choose(LOGITS_3X3, k=2, capacity=2)
    assert_routing(result, [[[0, 1], [2, 0], [-1, -1]]], [[[0.6, 0.5], [0.7, 0.3], [0, 0]]])
    np.testing.assert_array_equal(result.expert_index, [[[0, 1], [0, 1], [1, 0]]])


def test_top2_topk_normalization():
    # Same slots; weights renormalised over each token's two choices: t0 .6/.9, .3/.9;
    # t1 .5/.9; t2 .7/.9. (NumPy integers are accepted for k and capacity.)
    result = routing.tokens_choose(
        LOGITS_3X3, k=np.int64(2), capacity=np.int32(2), normalize="topk"
    )
    assert_routing(
        result,
        [[[0, 1], [2, 0], [-1, -1]]],
        [[[0.6 / 0.9, 0.5 / 0.9], [0.7 / 0.9, 0.3 / 0.9], [0, 0]]],
    )


def test_top2_token_order_fills_each_token_before_the_next():
    # Token by token, each token's two choices together, C=2:
    # t0: e0 slot 0, e1 slot 0; t1: e0 slot 1 (full), e1 slot 1 (full); t2: e1 and e0 full,
    # both dropped. Choice-major order (above) drops t1's second choice to keep t2's first
    # instead: a later token decides what an earlier one keeps, which a decoder must not do.
    result = routing.tokens_choose(LOGITS_3X3, k=2, capacity=2, fill_order="token")
    assert_routing(result, [[[0, 1], [0, 1], [-1, -1]]], [[[0.6, 0.5], [0.3, 0.4], [0, 0]]])
    np.testing.assert_array_equal(result.expert_index, [[[0, 1], [0, 1], [1, 0]]])
    # the first two tokens' slots do not depend on the third token's choices (now e2, e0)
    other_third = LOGITS_3X3.copy()
    other_third[0, 2] = np.log([0.1, 0.1, 0.8])
    again = routing.tokens_choose(other_third, k=2, capacity=2, fill_order="token")
    assert_routing(again, [[[0, 1], [0, 1], [2, -1]]], [[[0.6, 0.5], [0.3, 0.4], [0.8, 0]]])
    gshard = routing.gshard_top2(
        LOGITS_3X3, capacity=2, rng=None, second_policy="all", fill_order="token"
    )
    assert_routing(
        gshard,
        [[[0, 1], [0, 1], [-1, -1]]],
        [[[0.6 / 0.9, 0.5 / 0.9], [0.3 / 0.9, 0.4 / 0.9], [0, 0]]],
    )
    biased = routing.biased_top_k(
        LOGITS_3X3, jnp.zeros(3), k=2, capacity=2, score="softmax", fill_order="token"
    )
    np.testing.assert_array_equal(biased.token_index, result.token_index)
    with pytest.raises(ValueError, match="fill_order must be one of"):
        routing.tokens_choose(LOGITS_3X3, k=2, capacity=2, fill_order="position")


def test_fill_orders_agree_for_top1():
    logits = jax.random.normal(jax.random.key(3), (2, 16, 4))
    choice = routing.tokens_choose(logits, k=1, capacity=3)
    token = routing.tokens_choose(logits, k=1, capacity=3, fill_order="token")
    np.testing.assert_array_equal(choice.token_index, token.token_index)


def test_capacity_none_never_drops():
    # C = T = 3: every choice of every token finds a slot. e0 gets t0, t1 (first) then t2
    # (second); e1 gets t2 (first) then t0, t1 (second).
    result = routing.tokens_choose(LOGITS_3X3, k=2, capacity=None)
    assert_routing(
        result,
        [[[0, 1, 2], [2, 0, 1], [-1, -1, -1]]],
        [[[0.6, 0.5, 0.2], [0.7, 0.3, 0.4], [0, 0, 0]]],
    )


def test_padding_tokens_take_no_slot_and_no_capacity():
    # t0 is padding: e0 gets t1, t2 (t2 is no longer dropped), e1 gets t3.
    mask = np.array([[0, 1, 1, 1]])
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2, padding_mask=mask)
    assert_routing(result, [[[1, 2], [3, -1]]], [[[0.6, 0.8], [0.7, 0.0]]])


def test_bfloat16_logits_are_routed_in_float32():
    logits16 = jnp.asarray(LOGITS_3X3, jnp.bfloat16)
    result = routing.tokens_choose(logits16, k=2, capacity=2)
    expected = routing.tokens_choose(logits16.astype(jnp.float32), k=2, capacity=2)
    assert result.weight.dtype == jnp.float32 and result.probs.dtype == jnp.float32
    np.testing.assert_array_equal(result.token_index, expected.token_index)
    np.testing.assert_array_equal(result.weight, expected.weight)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(k=0, capacity=2), "k"),
        (dict(k=3, capacity=2), "k"),
        (dict(k=1, capacity=-1), "capacity"),
        (dict(k=1, capacity=0), "capacity"),
        (dict(k=1, capacity=2.5), "capacity"),
        (dict(k=1, capacity=2, normalize="softmax"), "normalize"),
        (dict(k=1, capacity=2, padding_mask=np.ones((1, 3))), "padding_mask"),
    ],
)
def test_tokens_choose_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        routing.tokens_choose(LOGITS_4X2, **kwargs)


def test_logits_must_be_rank_3():
    with pytest.raises(ValueError, match="logits"):
        routing.tokens_choose(LOGITS_4X2[0], k=1, capacity=2)
    with pytest.raises(ValueError, match="logits"):
        routing.experts_choose(LOGITS_4X2[0], capacity=2)
    with pytest.raises(ValueError, match="logits"):
        routing.gshard_top2(LOGITS_4X2[0], capacity=2, rng=None, second_policy="all")


# ---------------------------------------------------------------- gshard_top2


def test_gshard_all_matches_literal():
    # g1, g2 renormalised by g1 + g2: t0 (e0 .6/.9, e1 .3/.9), t1 (e0 .5/.9, e1 .4/.9),
    # t2 (e1 .7/.9, e0 .2/.9). C=2 slots fill as in the top-2 literal case.
    result = routing.gshard_top2(LOGITS_3X3, capacity=2, rng=None, second_policy="all")
    assert_routing(
        result,
        [[[0, 1], [2, 0], [-1, -1]]],
        [[[0.6 / 0.9, 0.5 / 0.9], [0.7 / 0.9, 0.3 / 0.9], [0, 0]]],
    )
    np.testing.assert_array_equal(result.expert_index, [[[0, 1], [0, 1], [1, 0]]])


def test_gshard_random_threshold_extremes():
    rng = jax.random.key(0)
    # threshold 1e-6: g2 / threshold > 1 > u for every token, so every second is kept, as 'all'.
    keep_all = routing.gshard_top2(LOGITS_3X3, capacity=2, rng=rng, threshold=1e-6)
    every = routing.gshard_top2(LOGITS_3X3, capacity=2, rng=None, second_policy="all")
    assert_routing(keep_all, every.token_index, every.weight)
    # threshold 1e6: g2 / threshold < 1e-6, so (for this key) no second choice takes a slot;
    # first choices: e0 <- t0 (.6/.9), t1 (.5/.9); e1 <- t2 (.7/.9).
    keep_none = routing.gshard_top2(LOGITS_3X3, capacity=2, rng=rng, threshold=1e6)
    assert_routing(
        keep_none, [[[0, 1], [2, -1], [-1, -1]]], [[[0.6 / 0.9, 0.5 / 0.9], [0.7 / 0.9, 0], [0, 0]]]
    )
    # expert_index still records both choices, before the random decision.
    np.testing.assert_array_equal(keep_none.expert_index, every.expert_index)


@pytest.mark.parametrize("threshold, rate", [(0.5, 0.75), (1.0, 0.375), (0.25, 1.0)])
def test_gshard_random_keeps_second_at_rate(threshold, rate):
    # probs [.5, .3, .1, .1] for every token: g2 = .3 / .8 = .375, kept at min(1, g2/threshold).
    # 8192 tokens, capacity None: the kept fraction has std <= sqrt(.25 / 8192) = .0055; the
    # tolerance .025 is > 4.5 std.
    logits = np.broadcast_to(np.log(np.array([0.5, 0.3, 0.1, 0.1])), (1, 8192, 4))
    result = routing.gshard_top2(logits, capacity=None, rng=jax.random.key(1), threshold=threshold)
    token_index = np.asarray(result.token_index)
    seconds_kept = np.sum(token_index[0, 1] >= 0) / 8192
    assert np.all(token_index[0, 0] >= 0)  # every first choice got its slot
    np.testing.assert_allclose(seconds_kept, rate, atol=0.025)


def test_gshard_sampling_draws_second_from_the_rest():
    # probs [.5, .3, .1, .1]: the first is e0; the second is drawn from [.3, .1, .1] / .5 =
    # [.6, .2, .2] over e1..e3 and never e0. Std of each frequency <= .0055 at 8192 tokens.
    logits = np.broadcast_to(np.log(np.array([0.5, 0.3, 0.1, 0.1])), (1, 8192, 4))
    result = routing.gshard_top2(
        logits, capacity=None, rng=jax.random.key(2), second_policy="sampling"
    )
    expert_index = np.asarray(result.expert_index)
    second = expert_index[0, :, 1]
    assert np.all(expert_index[0, :, 0] == 0)
    frequency = np.bincount(second, minlength=4) / 8192
    np.testing.assert_allclose(frequency, [0.0, 0.6, 0.2, 0.2], atol=0.025)
    # Weights are renormalised over the pair: g2 / (g1 + g2), e.g. .1 / .6 for e2.
    t = int(np.argmax(second == 2))
    slot = np.argmax(np.asarray(result.token_index)[0, 2] == t)
    np.testing.assert_allclose(np.asarray(result.weight)[0, 2, slot], 0.1 / 0.6, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(capacity=2, rng=None), "rng"),
        (dict(capacity=2, rng=jax.random.key(0), second_policy="top"), "second_policy"),
        (dict(capacity=2, rng=jax.random.key(0), threshold=0.0), "threshold"),
        (dict(capacity=0, rng=jax.random.key(0)), "capacity"),
    ],
)
def test_gshard_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        routing.gshard_top2(LOGITS_3X3, **kwargs)


def test_gshard_needs_two_experts():
    with pytest.raises(ValueError, match="2 experts"):
        routing.gshard_top2(np.zeros((1, 3, 1)), capacity=2, rng=None, second_policy="all")


# ---------------------------------------------------------------- experts_choose


def test_experts_choose_literal():
    # e0's column [.9, .6, .8, .3]: top-2 tokens t0 (.9), t2 (.8).
    # e1's column [.1, .4, .2, .7]: top-2 tokens t3 (.7), t1 (.4).
    result = routing.experts_choose(LOGITS_4X2, capacity=2)
    assert_routing(result, [[[0, 2], [3, 1]]], [[[0.9, 0.8], [0.7, 0.4]]])
    assert result.expert_index is None


def test_experts_choose_skips_padding():
    # t2, t3 are padding; C=3 > 2 real tokens. e0: t0 (.9), t1 (.6), empty.
    # e1: t1 (.4), t0 (.1), empty.
    mask = np.array([[1, 1, 0, 0]])
    result = routing.experts_choose(LOGITS_4X2, capacity=3, padding_mask=mask)
    assert_routing(result, [[[0, 1, -1], [1, 0, -1]]], [[[0.9, 0.6, 0.0], [0.4, 0.1, 0.0]]])


def test_experts_choose_rejects_capacity_above_tokens():
    with pytest.raises(ValueError, match="capacity"):
        routing.experts_choose(LOGITS_4X2, capacity=5)
    with pytest.raises(ValueError, match="capacity"):
        routing.experts_choose(LOGITS_4X2, capacity=0)


# ---------------------------------------------------------------- hash_routing


def test_hash_expert_literal():
    # h = id * 0x9E3779B1 mod 2**32; h ^= h >> 16; expert = h mod E.
    # id 1: h = 0x9E3779B1 -> 0x9E3779B1 ^ 0x9E37 = 0x9E37E786; mod 4 = 0x86 & 3 = 2; mod 8 = 6.
    # id 2: h = 0x3C6EF362 -> ^ 0x3C6E = 0x3C6ECF0C; mod 4 = 0; mod 8 = 0xC & 7 = 4.
    # id 3: h = 0xDAA66D13 -> ^ 0xDAA6 = 0xDAA6B7B5; mod 4 = 1; mod 8 = 0xB5 & 7 = 5.
    ids = np.array([0, 1, 2, 3])
    np.testing.assert_array_equal(routing.hash_expert(ids, 4), [0, 2, 0, 1])
    np.testing.assert_array_equal(routing.hash_expert(ids, 8), [0, 6, 4, 5])


def test_hash_expert_matches_python_integers():
    ids = np.arange(0, 50000, 37)

    def python_hash(token_id, num_experts):
        hashed = (token_id * 0x9E3779B1) % 2**32
        return (hashed ^ (hashed >> 16)) % num_experts

    for num_experts in (3, 8, 64):
        expected = [python_hash(int(i), num_experts) for i in ids]
        np.testing.assert_array_equal(routing.hash_expert(ids, num_experts), expected)


def test_hash_routing_literal():
    # Experts of ids [0, 1, 2, 3] with E=4: [0, 2, 0, 1]. C=1: e0 takes t0 and drops t2;
    # e1 <- t3; e2 <- t1; e3 empty. Weight 1.0, probs one-hot.
    result = routing.hash_routing(np.array([[0, 1, 2, 3]]), num_experts=4, capacity=1)
    assert_routing(result, [[[0], [3], [1], [-1]]], [[[1.0], [1.0], [1.0], [0.0]]])
    np.testing.assert_array_equal(result.expert_index, [[[0], [2], [0], [1]]])
    np.testing.assert_array_equal(result.probs, np.eye(4)[[0, 2, 0, 1]][None])


def test_hash_routing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="token_ids"):
        routing.hash_routing(np.zeros((1, 4)), num_experts=4, capacity=1)
    with pytest.raises(ValueError, match="num_experts"):
        routing.hash_routing(np.zeros((1, 4), np.int32), num_experts=0, capacity=1)
    with pytest.raises(ValueError, match="capacity"):
        routing.hash_routing(np.zeros((1, 4), np.int32), num_experts=4, capacity=-2)


# ---------------------------------------------------------------- noisy_logits

W_GATE = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
W_NOISE = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])


def test_noisy_logits_clean_without_rng():
    # x = (1, 2): x W_g = (1*1 + 2*0, 1*0 + 2*1, 1*2 + 2*(-1)) = (1, 2, 0).
    x = np.array([[[1.0, 2.0]]])
    np.testing.assert_allclose(routing.noisy_logits(x, W_GATE, W_NOISE, None), [[[1, 2, 0]]])


def test_noisy_logits_noise_scale_is_softplus():
    # x W_noise = (0, 0, 10): noise std softplus(0) = ln 2 = .693 on e0, e1 and softplus(10) =
    # 10.0000454 on e2; mean 0. 8192 draws: the std's own std is about std / sqrt(2 * 8192),
    # i.e. .8% (tolerance 4%); the mean's is std / 90 (tolerance std / 20).
    x = np.broadcast_to(np.array([1.0, 2.0]), (1, 8192, 2))
    noise = np.asarray(routing.noisy_logits(x, W_GATE, W_NOISE, jax.random.key(3))) - [1, 2, 0]
    expected_std = np.array([math.log(2.0), math.log(2.0), 10.0000454])
    np.testing.assert_allclose(np.std(noise, axis=(0, 1)), expected_std, rtol=0.04)
    np.testing.assert_allclose(np.mean(noise, axis=(0, 1)), 0.0, atol=expected_std.max() / 20)


def test_noisy_logits_rejects_bad_weights():
    x = np.ones((1, 2, 2))
    with pytest.raises(ValueError, match="w_gate"):
        routing.noisy_logits(x, np.ones((3, 3)), np.ones((3, 3)), None)
    with pytest.raises(ValueError, match="w_noise"):
        routing.noisy_logits(x, W_GATE, np.ones((2, 4)), None)


# ---------------------------------------------------------------- biased_top_k

LOGITS_BIAS = np.array([[[2.0, 0.0, -1.0]]])
# sigmoid(2, 0, -1) = (.8807971, .5, .2689414)
SIGMOID = np.array([0.8807971, 0.5, 0.2689414])


def test_biased_top_k_selects_with_bias_weights_without():
    # bias (0, 0, .7): biased scores (.881, .5, .969) -> k=1 picks e2, weighted by its unbiased
    # sigmoid .2689 (normalize='none').
    bias = np.array([0.0, 0.0, 0.7])
    top1 = routing.biased_top_k(LOGITS_BIAS, bias, k=1, capacity=1, normalize="none")
    assert_routing(top1, [[[-1], [-1], [0]]], [[[0.0], [0.0], [SIGMOID[2]]]])
    # k=2 picks e2 then e0; 'topk' weights .2689 / (.2689 + .8808) = .2339 and .7661.
    top2 = routing.biased_top_k(LOGITS_BIAS, bias, k=2, capacity=1)
    share = SIGMOID[2] / (SIGMOID[2] + SIGMOID[0])
    assert_routing(top2, [[[0], [-1], [0]]], [[[1 - share], [0.0], [share]]])
    np.testing.assert_array_equal(top2.expert_index, [[[2, 0]]])
    # probs are the unbiased scores renormalised over experts.
    np.testing.assert_allclose(top2.probs[0, 0], SIGMOID / SIGMOID.sum(), rtol=1e-6)


def test_biased_top_k_gradient_ignores_bias():
    bias = np.array([0.0, 0.0, 0.7])
    grad = jax.jit(
        jax.grad(lambda b: routing.biased_top_k(LOGITS_BIAS, b, k=2, capacity=1).weight.sum())
    )
    np.testing.assert_array_equal(grad(bias), 0.0)


def test_biased_top_k_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bias"):
        routing.biased_top_k(LOGITS_BIAS, np.zeros(4), k=1, capacity=1)
    with pytest.raises(ValueError, match="score"):
        routing.biased_top_k(LOGITS_BIAS, np.zeros(3), k=1, capacity=1, score="tanh")
    with pytest.raises(ValueError, match="k"):
        routing.biased_top_k(LOGITS_BIAS, np.zeros(3), k=4, capacity=1)


def test_update_expert_bias_from_load():
    # load (5, 1, 3, 3), mean 3: e0 overloaded -> -rate; e1 underloaded -> +rate; e2, e3 stay.
    new_bias = routing.update_expert_bias(
        np.array([0.1, 0.0, 0.0, -0.2]), np.array([5.0, 1.0, 3.0, 3.0]), rate=0.01
    )
    np.testing.assert_allclose(new_bias, [0.09, 0.01, 0.0, -0.2], rtol=1e-6)


def test_update_expert_bias_from_routing():
    # Top-1 choices of LOGITS_4X2 (counted before capacity): e0 three tokens, e1 one; mean 2.
    # With t0 as padding: e0 two, e1 one; mean 1.5. Either way e0 is over and e1 under.
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=1)
    np.testing.assert_array_equal(routing.expert_assignments(result), [3.0, 1.0])
    mask = np.array([[0, 1, 1, 1]])
    np.testing.assert_array_equal(routing.expert_assignments(result, mask), [2.0, 1.0])
    new_bias = routing.update_expert_bias(np.zeros(2), result, rate=0.001, padding_mask=mask)
    np.testing.assert_allclose(new_bias, [-0.001, 0.001])
    with pytest.raises(ValueError, match="rate"):
        routing.update_expert_bias(np.zeros(2), result, rate=-1.0)
    with pytest.raises(ValueError, match="load"):
        routing.update_expert_bias(np.zeros(2), np.ones(3))


# ---------------------------------------------------------------- to_masks, router_metrics


def test_to_masks_literal():
    # Slots of the top-1, C=2 case: e0 = (t0 .9, t1 .6), e1 = (t3 .7, empty).
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2)
    dispatch, combine = routing.to_masks(result, num_tokens=4)
    expected = np.zeros((1, 4, 2, 2), bool)
    expected[0, 0, 0, 0] = expected[0, 1, 0, 1] = expected[0, 3, 1, 0] = True
    np.testing.assert_array_equal(dispatch, expected)
    assert dispatch.dtype == jnp.bool_
    expected_combine = np.zeros((1, 4, 2, 2), np.float32)
    expected_combine[0, 0, 0, 0], expected_combine[0, 1, 0, 1] = 0.9, 0.6
    expected_combine[0, 3, 1, 0] = 0.7
    np.testing.assert_allclose(combine, expected_combine, rtol=1e-6)


def test_router_metrics_literal_tokens_choose():
    # Top-1, C=2: t2 dropped. Dropped tokens 1/4; dropped assignments 1/4 (K=1);
    # confidence mean(.9, .6, .8, .7) = .75; both experts used; load (2, 1) / 3.
    metrics = routing.router_metrics(routing.tokens_choose(LOGITS_4X2, k=1, capacity=2))
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 0.25)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 0.25)
    np.testing.assert_allclose(metrics["router_confidence"], 0.75, rtol=1e-6)
    np.testing.assert_allclose(metrics["expert_usage"], 1.0)
    np.testing.assert_allclose(metrics["expert_load"], [2 / 3, 1 / 3], rtol=1e-6)
    # The same routing judged with t3 as padding: 3 real tokens, t2 dropped -> 1/3 of tokens and
    # of assignments (t3's slot is not counted as a real placement); confidence (.9+.6+.8)/3.
    routed = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2)
    metrics = routing.router_metrics(routed, np.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["router_confidence"], 2.3 / 3, rtol=1e-6)


def test_router_metrics_literal_top2_with_padding():
    # Top-2, C=2, t2 padding: first choices e0 <- t0, t1; seconds t0 -> e1, t1 -> e1.
    # Real tokens 2, none dropped; 4 assignments requested, 4 placed; confidence (.6 + .5) / 2;
    # e2 unused -> usage 2/3; load (2, 2, 0) / 4.
    mask = np.array([[1, 1, 0]])
    result = routing.tokens_choose(LOGITS_3X3, k=2, capacity=2, padding_mask=mask)
    metrics = routing.router_metrics(result, mask)
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 0.0)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 0.0)
    np.testing.assert_allclose(metrics["router_confidence"], 0.55, rtol=1e-6)
    np.testing.assert_allclose(metrics["expert_usage"], 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(metrics["expert_load"], [0.5, 0.5, 0.0])
    # Without padding, C=2: t1's and t2's second choices are dropped: 2 of 6 assignments,
    # no token left without a slot.
    metrics = routing.router_metrics(routing.tokens_choose(LOGITS_3X3, k=2, capacity=2))
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 0.0)


def test_router_metrics_literal_experts_choose():
    # Padding case above: 4 of 6 slots filled -> 2/6 of offered assignments dropped; no real
    # token left out; load (2, 2) / 4; confidence mean(.9, .6) over the real tokens.
    mask = np.array([[1, 1, 0, 0]])
    result = routing.experts_choose(LOGITS_4X2, capacity=3, padding_mask=mask)
    metrics = routing.router_metrics(result, mask)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 2 / 6, rtol=1e-6)
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 0.0)
    np.testing.assert_allclose(metrics["expert_load"], [0.5, 0.5])
    np.testing.assert_allclose(metrics["router_confidence"], 0.75, rtol=1e-6)
    # Without padding and C=1, e0 takes t0 and e1 t3: t1, t2 are left out.
    metrics = routing.router_metrics(routing.experts_choose(LOGITS_4X2, capacity=1))
    np.testing.assert_allclose(metrics["fraction_tokens_dropped"], 0.5)
    np.testing.assert_allclose(metrics["fraction_assignments_dropped"], 0.0)


def test_routing_is_a_pytree():
    result = routing.tokens_choose(LOGITS_4X2, k=1, capacity=2)
    assert len(jax.tree.leaves(result)) == 4
    assert len(jax.tree.leaves(routing.experts_choose(LOGITS_4X2, capacity=2))) == 3
