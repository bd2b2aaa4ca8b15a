"""Sparse upcycling: the upcycled MoE computes the dense model's function at step 0, Drop-
Upcycling re-initialises exactly its share of hidden units per expert, mismatched checkpoints
are refused before anything is written, and an upcycled run trains and resumes like any run."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_training import TINY_TRAINING, configured

from moe_jax import train, upcycle
from moe_jax.config import default_config
from moe_jax.models import build_model

TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 1, 300)


def tiny(**overrides):
    """A tiny decoder-only config; `overrides` use '__' for '.' in keys."""
    settings = {
        **TINY_TRAINING,
        "model.num_layers": 4,
        "train.num_steps": 3,
        "train.warmup_steps": 1,
        "train.eval_every": 0,
        "train.checkpoint_every": 3,
    }
    return configured(default_config(), settings, overrides)


def dense_config(**overrides):
    return tiny(moe__num_experts=0, **overrides)


def moe_config(**overrides):
    settings = {"moe__k": 2, "moe__normalize": "topk", "moe__backend": "dropless"}
    return tiny(**{**settings, **overrides})


def upcycled(dense_cfg, moe_cfg, **options):
    dense = build_model(dense_cfg, rngs=nnx.Rngs(3))
    moe = build_model(moe_cfg, rngs=nnx.Rngs(4))
    upcycle.set_params(
        moe,
        upcycle.upcycle_params(
            upcycle.flat_params(dense), upcycle.flat_params(moe), moe_cfg, **options
        ),
    )
    return dense, moe


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # top-2 renormalised, every second layer sparse, dropless
        {"moe__k": 1, "moe__sparse_every": 1, "model__ffn_activation": "relu"},
        {
            "moe__sparse_placement": "top",
            "moe__num_sparse_layers": 3,
            "moe__backend": "einsum",
            "moe__capacity_factor_eval": 4.0,  # 4 experts: every token fits
        },
        {"model__kind": "rope_decoder", "model__ffn_activation": "swiglu"},
    ],
)
def test_upcycled_model_computes_the_dense_function(overrides):
    dense_overrides = {k: v for k, v in overrides.items() if k.startswith("model__")}
    dense, moe = upcycled(dense_config(**dense_overrides), moe_config(**overrides))
    want, _ = dense(TOKENS, deterministic=True)
    got, aux = moe(TOKENS, deterministic=True)
    assert aux is not None  # really sparse layers
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_router_is_the_moe_models_own_and_attention_is_the_dense_models():
    dense, moe = upcycled(dense_config(), moe_config())
    fresh = build_model(moe_config(), rngs=nnx.Rngs(4))
    layer = moe.decoder.segments[0][1].layers[1]  # depth 3: sparse (every 2nd layer)
    np.testing.assert_array_equal(
        layer.ffn.router.kernel[...], fresh.decoder.segments[0][1].layers[1].ffn.router.kernel[...]
    )
    dense_layer = dense.decoder.segments[0][3].layers[0]
    np.testing.assert_array_equal(layer.self_attention.wq[...], dense_layer.self_attention.wq[...])
    np.testing.assert_array_equal(layer.ffn.wo[...][2], dense_layer.ffn.wo[...])


def test_top1_without_renormalising_is_not_the_dense_function():
    """The exactness needs the weights to sum to 1: raw top-1 softmax weights scale the FFN."""
    dense, moe = upcycled(
        dense_config(), moe_config(moe__k=1, moe__normalize="none", moe__router_init_scale=10.0)
    )
    want, _ = dense(TOKENS, deterministic=True)
    got, _ = moe(TOKENS, deterministic=True)
    assert float(jnp.max(jnp.abs(got - want))) > 1e-3


def test_drop_upcycling_reinitialises_its_share_of_hidden_units_per_expert():
    ratio, d_ff = 0.25, TINY_TRAINING["model.d_ff"]
    dense, moe = upcycled(dense_config(), moe_config(), drop_ratio=ratio, key=jax.random.key(0))
    dense_ffn = dense.decoder.segments[0][1].layers[0].ffn
    experts = moe.decoder.segments[0][0].layers[1].ffn
    wi, gate, wo = experts.wi[...], experts.wi_gate[...], experts.wo[...]  # [E, M, F], [E, F, M]
    changed_wi = jnp.any(wi != dense_ffn.wi[...], axis=1)  # [E, F]
    changed_gate = jnp.any(gate != dense_ffn.wi_gate[...], axis=1)
    changed_wo = jnp.any(wo != dense_ffn.wo[...], axis=2)
    np.testing.assert_array_equal(changed_wi.sum(axis=1), round(ratio * d_ff))
    np.testing.assert_array_equal(changed_wi, changed_gate)  # the same units in every matrix
    np.testing.assert_array_equal(changed_wi, changed_wo)
    assert len({tuple(np.asarray(row)) for row in changed_wi}) == wi.shape[0]  # per expert
    fresh = wi[:, :, :][jnp.broadcast_to(changed_wi[:, None, :], wi.shape)]
    reference = dense_ffn.wi[...]
    assert abs(float(fresh.std()) / float(reference.std()) - 1) < 0.2
    assert abs(float(fresh.mean()) - float(reference.mean())) < 0.2 * float(reference.std())


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """Step 0 of a dense run (random weights) written by moe_jax.train."""
    workdir = str(tmp_path_factory.mktemp("dense"))
    train.save_initial_checkpoint(dense_config(), workdir, devices=jax.devices()[:1])
    return workdir


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__d_model": 48}, "model.d_model=32"),
        ({"moe__d_ff": 128}, "moe.d_ff (expert width)=128"),
        ({"model__num_layers": 6}, "decoder layers=6"),
        ({"model__vocab_size": 512}, "model.vocab_size=512"),
        ({"moe__num_experts": 0}, "moe.num_experts"),
    ],
)
def test_mismatched_checkpoint_is_refused_before_writing(dense_dir, overrides, message, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        upcycle.upcycle_run(dense_dir, moe_config(**overrides), str(out))
    assert not out.exists()


@pytest.mark.parametrize(
    "key, dense_value, moe_value",
    [
        ("rope_theta", 10_000.0, 500_000.0),
        ("norm_epsilon", 1e-6, 1e-5),
        ("relative_attention_num_buckets", 32, 16),
        ("relative_attention_max_distance", 128, 64),
        ("num_kv_heads", 0, 1),
        ("qk_norm", False, True),
        ("share_layers", False, True),
    ],
)
def test_every_architecture_key_is_compared(key, dense_value, moe_value):
    """Keys beyond the shapes change the dense function (rotary base, RMSNorm epsilon, position
    buckets, key/value heads, q/k norms, WideNet sharing): the refusal names key and values."""
    dense_cfg, moe_cfg = dense_config(), moe_config()
    dense_cfg.model[key], moe_cfg.model[key] = dense_value, moe_value
    message = (
        f"dense checkpoint has model.{key}={dense_value!r} but the MoE config has "
        f"model.{key}={moe_value!r}; set --config.model.{key}={dense_value!r}"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        upcycle.check_compatible(dense_cfg, moe_cfg)


def test_free_keys_may_differ_and_a_model_key_added_later_is_compared():
    """`FREE_MODEL_KEYS` may differ (a decoder-only model's encoder depth is unused); a model
    key the config gains later is compared without being listed anywhere."""
    dense_cfg = dense_config()
    moe_cfg = moe_config(
        model__dropout_rate=0.1,
        model__dtype="bfloat16",
        model__param_dtype="bfloat16",
        model__remat="full",
        model__hf_model_type="switch_transformers",
        model__num_encoder_layers=7,
    )
    upcycle.check_compatible(dense_cfg, moe_cfg)
    for config, value in ((dense_cfg, 1), (moe_cfg, 2)):
        with config.unlocked():
            config.model.future_setting = value
    with pytest.raises(ValueError, match=r"model\.future_setting=1 but .* model\.future_setting=2"):
        upcycle.check_compatible(dense_cfg, moe_cfg)


def test_upcycled_run_starts_at_the_dense_function_then_trains(dense_dir, tmp_path):
    devices = jax.devices()[:1]
    moe_dir = str(tmp_path / "moe")
    upcycle.upcycle_run(dense_dir, moe_config(), moe_dir, devices=devices)
    _, dense, _ = train.restore_for_inference(dense_dir)
    _, moe, moe_step = train.restore_for_inference(moe_dir)
    assert moe_step == 0
    want, _ = dense(TOKENS, deterministic=True)
    got, _ = moe(TOKENS, deterministic=True)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert train.run(moe_config(), moe_dir, devices=devices).step == 3
    assert sorted(os.listdir(os.path.join(moe_dir, "checkpoints"))) == ["0", "3"]


def test_upcycled_t5_computes_transformers_logits(tmp_path):
    """From a Hugging Face dense T5 (`hf:DIR`): the upcycled encoder-decoder, every FFN sparse,
    gives transformers' logits."""
    from test_hf_t5 import assert_close, batch, ours_logits, random_t5, t5_config, torch_logits

    reference = random_t5(t5_config())
    reference.save_pretrained(tmp_path)
    dense_cfg, dense = upcycle.load_dense(f"hf:{tmp_path}")
    moe_cfg = dense_cfg.copy_and_resolve_references()
    moe_cfg.moe.update(num_experts=4, k=2, normalize="topk", backend="dropless", sparse_every=1)
    upcycle.check_compatible(dense_cfg, moe_cfg)
    moe = build_model(moe_cfg, rngs=nnx.Rngs(0))
    upcycle.set_params(
        moe,
        upcycle.upcycle_params(upcycle.flat_params(dense), upcycle.flat_params(moe), moe_cfg),
    )
    encoder, decoder = batch()
    ours, aux = ours_logits(moe, encoder, decoder)
    assert aux is not None
    assert_close(ours, torch_logits(reference, encoder, decoder).logits)
