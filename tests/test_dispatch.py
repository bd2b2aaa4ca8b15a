"""Dispatch backends against the per-expert dense reference, a literal case, and each other."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import blocked, dispatch, experts, ragged, routing
from tests.tolerances import assert_trees_close

G, T, M, H, E = 2, 12, 8, 16, 4


def _setup(activation="swiglu", seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (G, T, M))
    logits = jax.random.normal(keys[1], (G, T, E)) * 2.0
    params = experts.init_ffn_params(
        keys[2], d_model=M, d_ff=H, activation=activation, num_experts=E
    )
    return x, logits, params, functools.partial(experts.ffn, activation=activation)


@functools.partial(jax.jit, static_argnames=("backend", "expert_fn", "k", "capacity"))
def _run(backend, x, logits, params, expert_fn, *, k, capacity):
    route = routing.tokens_choose(logits, k=k, capacity=capacity)
    if backend == "reference":
        return dispatch.dense_reference(x, route, expert_fn, params)
    return dispatch.dispatch_combine(x, route, expert_fn, params, backend=backend, block_size=4)


def test_literal_case():
    # G=1, T=3, E=2, C=2. Expert e multiplies by (e + 1).
    # expert 0 holds tokens [2, 0] with weights [0.5, 0.25]; expert 1 holds [2, empty].
    # y0 = 0.25 * 1 * x0; y1 = 0 (dropped); y2 = 0.5 * 1 * x2 + 0.75 * 2 * x2 = 2 * x2.
    route = routing.Routing(
        token_index=jnp.array([[[2, 0], [2, -1]]]),
        weight=jnp.array([[[0.5, 0.25], [0.75, 0.0]]]),
        probs=jnp.zeros((1, 3, 2)),
        expert_index=None,
    )
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]])
    scale = jnp.array([1.0, 2.0])

    def expert_fn(params, xe, matmul=None):
        if matmul is None:
            return xe * params[:, None, None]
        return matmul(xe, params[:, None, None] * jnp.eye(2))  # dropless: diag weights

    expected = [[[0.25, 0.5], [0.0, 0.0], [10.0, 12.0]]]
    for backend in dispatch.BACKENDS:
        y = dispatch.dispatch_combine(x, route, expert_fn, scale, backend=backend, block_size=2)
        np.testing.assert_allclose(y, expected, rtol=1e-6, err_msg=backend)
    np.testing.assert_allclose(dispatch.dense_reference(x, route, expert_fn, scale), expected)


@functools.partial(jax.jit, static_argnames=("expert_fn", "k", "capacity"))
def _all_backends(x, logits, params, expert_fn, *, k, capacity):
    """The reference and every backend's output, in one compiled program."""
    route = routing.tokens_choose(logits, k=k, capacity=capacity)
    outputs = {"reference": dispatch.dense_reference(x, route, expert_fn, params)}
    for backend in dispatch.BACKENDS:
        outputs[backend] = dispatch.dispatch_combine(
            x, route, expert_fn, params, backend=backend, block_size=4
        )
    return outputs, route


@pytest.mark.parametrize(
    "activation, k, capacity",
    [("swiglu", 2, 3), ("relu", 1, 2), ("gelu", 2, 12), ("relu", 2, None)],
)
def test_backends_equal_dense_reference(activation, k, capacity):
    x, logits, params, expert_fn = _setup(activation)
    outputs, route = _all_backends(x, logits, params, expert_fn, k=k, capacity=capacity)
    ref = outputs["reference"]
    for backend in dispatch.BACKENDS:
        np.testing.assert_allclose(outputs[backend], ref, rtol=1e-5, atol=1e-6, err_msg=backend)
    dropped = routing.router_metrics(route)["fraction_assignments_dropped"]
    # the small capacities really drop tokens, and dropped tokens give exactly zero
    assert (capacity is not None and capacity <= 3) == bool(dropped > 0)
    unplaced = np.asarray(routing.slots_per_token(route)) == 0
    assert np.all(np.asarray(ref)[unplaced] == 0.0)


def test_gradients_agree_across_backends():
    x, logits, params, expert_fn = _setup("gated-gelu", seed=1)

    def loss(backend, x, logits, params):
        y = _run(backend, x, logits, params, expert_fn, k=2, capacity=4)
        return jnp.sum(jnp.sin(y))

    grad_fn = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    ref = grad_fn("reference", x, logits, params)
    assert float(jnp.abs(ref[1]).max()) > 0  # router logits get a gradient through weights
    for backend in dispatch.BACKENDS:
        got = grad_fn(backend, x, logits, params)
        # an input's gradient sums k experts' two gated weight rows of H entries each
        assert_trees_close(got, ref, num_summed=2 * 2 * H, rtol=1e-4, err_msg=backend)


def test_dropless_equals_einsum_when_nothing_drops():
    x, logits, params, expert_fn = _setup("swiglu", seed=2)
    einsum = _run("einsum", x, logits, params, expert_fn, k=2, capacity=T)
    route = routing.tokens_choose(logits, k=2, capacity=None)
    for block_size in (1, 3, 64):
        y = jax.jit(
            functools.partial(dispatch.dispatch_combine, backend="dropless", block_size=block_size),
            static_argnums=2,
        )(x, route, expert_fn, params)
        np.testing.assert_allclose(y, einsum, rtol=1e-5, atol=1e-6)


def test_ragged_dropless_equals_dense_reference_with_gradients():
    # ragged_dot runs on CPU (densely, slowly): small shapes check the accelerator path here
    x, logits, params, expert_fn = _setup("swiglu", seed=3)

    def loss(run, x, logits, params):
        route = routing.tokens_choose(logits, k=2, capacity=None, normalize="topk")
        return jnp.sum(jnp.sin(run(x, route, expert_fn, params)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2, 3)), static_argnums=0)
    want_loss, want = grad(dispatch.dense_reference, x, logits, params)
    got_loss, got = grad(ragged.dropless, x, logits, params)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    assert float(jnp.abs(want[1]).max()) > 0  # the router logits get a gradient too
    # an input's gradient sums k=2 experts' two SwiGLU weight rows of H entries each
    assert_trees_close(got, want, num_summed=2 * 2 * H)


def _dropless_grad_program(platforms):
    """StableHLO text of the dropless backend's gradient, lowered for `platforms`."""
    x, logits, params, expert_fn = _setup("swiglu")

    def loss(x, params):
        route = routing.tokens_choose(logits, k=2, capacity=None)
        y = dispatch.dispatch_combine(x, route, expert_fn, params, backend="dropless")
        return jnp.sum(y**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return jax.export.export(grad, platforms=platforms)(x, params).mlir_module()


def test_dropless_lowers_to_ragged_dot_for_tpu_and_gpu_and_blocks_for_cpu():
    accelerator = _dropless_grad_program(("tpu", "cuda"))
    # forward: swiglu's 3 matmuls; backward: 2 per matmul (rows and weights)
    assert accelerator.count('stablehlo.composite "chlo.ragged_dot"') >= 9
    assert "stablehlo.while" not in accelerator  # no loop over blocks
    cpu = _dropless_grad_program(("cpu",))
    assert "chlo.ragged_dot" not in cpu and "stablehlo.while" in cpu


def test_dispatch_halves_and_backends_agree():
    x, logits, _, _ = _setup()
    route = routing.tokens_choose(logits, k=2, capacity=3)
    by_einsum = dispatch.dispatch(x, route, backend="einsum")
    by_gather = dispatch.dispatch(x, route, backend="gather")
    assert by_gather.shape == (E, G, 3, M)
    np.testing.assert_allclose(by_gather, by_einsum)
    # slot (e, g, c) holds x[g, token_index[g, e, c]], zero when empty
    ti = np.asarray(route.token_index)
    g, e, c = np.argwhere(ti >= 0)[0]
    np.testing.assert_allclose(by_gather[e, g, c], x[g, ti[g, e, c]])
    # identity experts: combine(dispatch(x)) = x * (sum of the token's slot weights)
    total_weight = np.zeros((G, T))
    for g, e, c in np.argwhere(ti >= 0):
        total_weight[g, ti[g, e, c]] += float(route.weight[g, e, c])
    for backend in dispatch.CAPACITY_BACKENDS:
        y = dispatch.combine(by_gather, route, backend=backend)
        np.testing.assert_allclose(y, x * total_weight[..., None], rtol=1e-6, atol=1e-7)


def test_bfloat16_backends_match_float32():
    x, logits, params, _ = _setup()
    f32 = _run(
        "reference",
        x,
        logits,
        params,
        functools.partial(experts.ffn, activation="swiglu"),
        k=2,
        capacity=4,
    )
    bf16_fn = functools.partial(experts.ffn, activation="swiglu", dtype=jnp.bfloat16)
    for backend in dispatch.BACKENDS:
        y = _run(backend, x.astype(jnp.bfloat16), logits, params, bf16_fn, k=2, capacity=4)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, f32, atol=0.03 * float(jnp.abs(f32).max()), err_msg=backend)


def test_group_tokens_pads_and_ungroups():
    x = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
    grouped, grouping = dispatch.group_tokens(x, group_size=4)  # 10 tokens -> 3 groups of 4
    assert grouped.shape == (3, 4, 3) and grouping.num_padding == 2
    np.testing.assert_array_equal(grouped.reshape(12, 3)[:10], x.reshape(10, 3))
    np.testing.assert_array_equal(grouped.reshape(12, 3)[10:], 0.0)
    np.testing.assert_array_equal(grouping.valid.reshape(-1), [True] * 10 + [False] * 2)
    np.testing.assert_array_equal(grouping(grouped), x)
    one_group, small = dispatch.group_tokens(x, group_size=64)  # fewer tokens than a group
    assert one_group.shape == (1, 10, 3) and small.num_padding == 0
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="group_size"):
            dispatch.group_tokens(x, group_size=bad)


@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_group_padding_never_changes_real_tokens(backend):
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 7, M))  # 21 tokens -> 3 groups of 8
    grouped, grouping = dispatch.group_tokens(x, group_size=8)
    assert grouping.num_padding == 3
    router_w = jax.random.normal(jax.random.PRNGKey(5), (M, E))
    _, _, params, expert_fn = _setup()

    @jax.jit
    def forward(grouped):
        logits = grouped @ router_w
        capacity = None if backend == "dropless" else 3
        route = routing.tokens_choose(
            logits, k=2, capacity=capacity, batch_prioritized=True, padding_mask=grouping.valid
        )
        y = dispatch.dispatch_combine(grouped, route, expert_fn, params, backend=backend)
        return grouping(y), route

    y, route = forward(grouped)
    # padding tokens made huge (they would win batch-prioritized slots if they were routed)
    noisy = jnp.where(grouping.valid[..., None], grouped, 1e3)
    y_noisy, route_noisy = forward(noisy)
    np.testing.assert_array_equal(y, y_noisy)
    padding_positions = np.argwhere(~np.asarray(grouping.valid))
    for ti in (route.token_index, route_noisy.token_index):
        for g, t in padding_positions:
            assert not np.any(np.asarray(ti)[g] == t)


def test_block_layout_literal():
    # G=1, T=4, E=2, C=4; expert 0 holds tokens [0, 1, 3], expert 1 holds [2]. block_size 2:
    # expert 0 -> rows 0..3 (3 filled, 1 pad), expert 1 -> rows 4..5; bound ceil(4/2)+2 = 4 blocks.
    route = routing.Routing(
        token_index=jnp.array([[[0, 1, 3, -1], [2, -1, -1, -1]]]),
        weight=jnp.array([[[0.1, 0.2, 0.3, 0.0], [0.4, 0.0, 0.0, 0.0]]]),
        probs=jnp.zeros((1, 4, 2)),
        expert_index=jnp.zeros((1, 4, 1), jnp.int32),
    )
    layout = blocked.block_layout(route, block_size=2)
    np.testing.assert_array_equal(layout.row_token, [0, 1, 3, -1, 2, -1, -1, -1])
    np.testing.assert_allclose(layout.row_weight, [0.1, 0.2, 0.3, 0, 0.4, 0, 0, 0])
    np.testing.assert_array_equal(layout.block_expert, [0, 0, 1, 1])
    np.testing.assert_array_equal(layout.block_used, [True, True, True, False])


def test_block_matmul_gradient_matches_gathered_weights():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 4))
    w = jax.random.normal(jax.random.PRNGKey(1), (3, 4, 6))
    block_expert = jnp.array([0, 0, 2, 2, 2])
    block_used = jnp.array([True, True, True, True, False])

    def oracle(x, w):  # every block times its gathered weight; unused blocks give zero
        y = jnp.einsum("nba,nac->nbc", x, w[block_expert])
        return y * block_used[:, None, None]

    def loss(fn, x, w):
        return jnp.sum(jnp.cos(fn(x, w)))

    blocks = functools.partial(
        blocked.block_matmul, block_expert=block_expert, block_used=block_used
    )
    np.testing.assert_allclose(blocks(x, w), oracle(x, w), rtol=1e-6)
    got = jax.grad(functools.partial(loss, blocks), argnums=(0, 1))(x, w)
    want = jax.grad(functools.partial(loss, oracle), argnums=(0, 1))(x, w)
    # a weight's gradient sums the 5 blocks' 3 rows
    assert_trees_close(got, want, num_summed=5 * 3)


def test_bad_backend_raises():
    x, logits, params, expert_fn = _setup()
    route = routing.tokens_choose(logits, k=1, capacity=4)
    with pytest.raises(ValueError, match="'einsum', 'gather', 'dropless'"):
        dispatch.dispatch_combine(x, route, expert_fn, params, backend="ragged")
    with pytest.raises(ValueError, match="dropless"):
        dispatch.dispatch(x, route, backend="dropless")
