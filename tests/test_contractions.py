"""Dense contractions on rows (`experts.dense_matmul`) equal the einsum forms they replaced.

Every dense contraction of the models (dense FFN, router, attention q/k/v and output
projections, tied and untied logits) runs as one 2-D matmul on rows (issue 14). The oracle for
each site kind is the `...a,ab->...b`-style einsum each site used before, forward and gradient.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import experts, models
from moe_jax.config import default_config


def _normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(key), shape).astype(dtype)


# site kind: (x shape, w shape, contracted dims, the einsum the site used before)
SITES = {
    "dense FFN": ((2, 6, 8), (8, 12), 1, "blm,mh->blh"),
    "router": ((3, 5, 8), (8, 4), 1, "gtm,me->gte"),
    "attention q/k/v": ((2, 6, 8), (8, 3, 4), 1, "blm,mnd->blnd"),
    "attention output": ((2, 6, 3, 4), (3, 4, 8), 2, "bqnd,ndm->bqm"),
    "untied logits": ((2, 6, 8), (8, 16), 1, "blm,mv->blv"),
    "FFN rows": ((10, 8), (8, 12), 1, "ta,ab->tb"),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("site", SITES)
def test_rows_form_equals_einsum_forward_and_gradient(site, dtype):
    x_shape, w_shape, contracted, spec = SITES[site]
    x, w = _normal(0, x_shape, dtype), _normal(1, w_shape, dtype)
    probe = _normal(2, x_shape[: len(x_shape) - contracted] + w_shape[contracted:])

    def rows(x, w):
        return jnp.sum(experts.dense_matmul(x, w, contracted=contracted) * probe)

    def einsum(x, w):
        out = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
        return jnp.sum(out * probe)

    out_rows = experts.dense_matmul(x, w, contracted=contracted)
    out_einsum = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    assert out_rows.dtype == jnp.float32 and out_rows.shape == out_einsum.shape
    np.testing.assert_allclose(out_rows, out_einsum, rtol=1e-6, atol=1e-6)
    for got, want in zip(
        jax.grad(rows, argnums=(0, 1))(x, w), jax.grad(einsum, argnums=(0, 1))(x, w), strict=True
    ):
        assert got.dtype == want.dtype == dtype
        np.testing.assert_allclose(
            got.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-6, atol=1e-6
        )


def test_tied_logits_equal_the_einsum_against_the_embedding_table():
    config = default_config()
    config.model.vocab_size, config.model.d_model = 16, 8
    embed = models.Embedding(config, rngs=nnx.Rngs(0))
    x = _normal(3, (2, 5, 8))

    graphdef, params = nnx.split(embed)

    def loss(params, x, form):
        if form == "rows":
            return jnp.sum(nnx.merge(graphdef, params).attend(x) ** 2)
        return jnp.sum(jnp.einsum("blm,vm->blv", x, params["embedding"][...]) ** 2)

    table = embed.embedding[...]
    np.testing.assert_allclose(
        embed.attend(x), jnp.einsum("blm,vm->blv", x, table), rtol=1e-6, atol=1e-6
    )
    grads = [jax.grad(loss, argnums=(0, 1))(params, x, form) for form in ("rows", "einsum")]
    for got, want in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_mismatched_weight_is_a_clear_error():
    with pytest.raises(ValueError, match=r"w is \(3, 4, 8\); pass weights shaped \[\*\(2, 4\)"):
        experts.dense_matmul(jnp.ones((2, 6, 2, 4)), jnp.ones((3, 4, 8)), contracted=2)


@pytest.mark.parametrize("kind", ["decoder", "rope_decoder"])
def test_forward_exports_for_tpu_and_gpu(kind):
    config = default_config()
    model = config.model
    model.kind, model.vocab_size, model.d_model, model.num_layers = kind, 32, 16, 1
    model.num_heads, model.head_dim, model.d_ff = 2, 8, 32
    config.moe.num_experts, config.moe.group_size, config.moe.backend = 4, 16, "gather"
    network = models.build_model(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(network)

    def forward(state, tokens):
        logits, _ = nnx.merge(graphdef, state)(tokens, deterministic=True)
        return logits

    tokens = jnp.zeros((2, 16), jnp.int32)
    exported = jax.export.export(jax.jit(forward), platforms=("tpu", "cuda"))(state, tokens)
    assert exported.platforms == ("tpu", "cuda")
    assert "dot_general" in exported.mlir_module()
