"""Tests of configs/: variants load, paper sizes count to the papers' figures, tiny ones train."""

import functools
import importlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from moe_jax import models
from moe_jax.config import DECODER_KINDS

FAMILIES = {
    "dense": ("t5_base", "t5_large", "t5_xxl", "tiny", "small"),
    "switch": ("base", "large", "xxl", "c", "tiny", "stdlib", "stdlib-best", "small"),
    "st_moe": ("base", "l", "32b", "tiny"),
    "glam": ("0.1b_64e", "1.7b_64e", "8b_64e", "64b_64e", "tiny"),
    "mixtral": ("8x7b", "tiny"),
    "olmoe": ("1b_7b", "tiny"),
    "qwen_moe": ("qwen3_30b_a3b", "qwen3_235b_a22b", "qwen2_a2.7b", "tiny"),
    "gpt_oss": ("20b", "120b", "tiny"),
    "deepseek": ("v3", "v2", "v2_lite", "tiny"),
    "widenet": ("nlp_16e", "tiny"),
}


def get_config(family: str, variant: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f"configs.{family}").get_config(variant)


@functools.cache
def count(family: str, variant: str, include_embeddings: bool = True) -> dict[str, int]:
    """`models.count_params` of a named config, computed once per test session."""
    config = get_config(family, variant)
    return models.count_params(config, include_embeddings=include_embeddings)


@pytest.mark.parametrize(
    "family, variant", [(f, v) for f, variants in FAMILIES.items() for v in variants]
)
def test_every_variant_loads_and_builds_abstractly(family, variant):
    config = get_config(family, variant)
    assert config.model.kind in models.KINDS
    with pytest.raises(AttributeError):  # locked: a misspelt key fails loudly
        config.model.d_modle = 1
    counts = count(family, variant)
    assert 0 < counts["active"] <= counts["total"]


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_variant_raises(family):
    with pytest.raises(ValueError, match="variant"):
        get_config(family, "huge")


def within_printed_figure(counted: float, printed: float, last_digit: float) -> bool:
    """`counted` rounds to the paper's `printed` figure (half a unit of its `last_digit`), with 1%
    slack for the small parameters implementations place differently (norms, position biases)."""
    low, high = printed - last_digit / 2, printed + last_digit / 2
    return 0.99 * low <= counted <= 1.01 * high


B, T = 1e9, 1e12
PAPER_TOTALS = [
    # Switch Transformer (Fedus et al. 2022), Table 9 (Table 7 for the expert sweep), totals
    # including the (tied) embedding.
    ("dense", "t5_base", 223e6, 1e6),
    ("dense", "t5_large", 739e6, 1e6),
    ("dense", "t5_xxl", 11 * B, 1 * B),
    ("switch", "base", 7.4 * B, 0.1 * B),  # Table 7: 7.4B (Table 9 prints 7B)
    ("switch", "base-16", 1.1 * B, 0.1 * B),  # Table 7
    ("switch", "base-32", 2.0 * B, 0.1 * B),  # Table 7
    ("switch", "base-64", 3.8 * B, 0.1 * B),  # Table 7
    ("switch", "base-256", 14.7 * B, 0.1 * B),  # Table 7
    ("switch", "large", 26 * B, 1 * B),
    ("switch", "xxl", 395 * B, 1 * B),  # with 128 experts (Table 9 prints 64)
    ("switch", "c", 1571 * B, 1 * B),
    # ST-MoE (Zoph et al. 2022): ST-MoE-L 4.1B, ST-MoE-32B 269B.
    ("st_moe", "l", 4.1 * B, 0.1 * B),
    ("st_moe", "32b", 269 * B, 1 * B),
]

GLAM_TOTALS = [
    # GLaM (Du et al. 2022), Table 4 totals, which match without the 256K x d embedding table.
    ("0.1b_64e", 1.9 * B, 0.1 * B),
    ("1.7b_64e", 27 * B, 1 * B),
    ("8b_64e", 143 * B, 1 * B),
    ("64b_64e", 1.2 * T, 0.1 * T),
]


@pytest.mark.parametrize("family, variant, printed, last_digit", PAPER_TOTALS)
def test_paper_totals(family, variant, printed, last_digit):
    total = count(family, variant)["total"]
    assert within_printed_figure(total, printed, last_digit), (total, printed)


def test_widenet_nlp_16e_total():
    """Xue et al. 2022, NLP table: WideNet with 16 experts has 83M parameters, with ALBERT's
    factorised embedding (30000 x 128 and a 128 x 768 projection) in place of ours."""
    albert_embedding = 30_000 * 128 + 128 * 768
    total = count("widenet", "nlp_16e", include_embeddings=False)["total"] + albert_embedding
    assert within_printed_figure(total, 83e6, 1e6), total


@pytest.mark.parametrize("variant, printed, last_digit", GLAM_TOTALS)
def test_glam_totals_without_embeddings(variant, printed, last_digit):
    total = count("glam", variant, include_embeddings=False)["total"]
    assert within_printed_figure(total, printed, last_digit), (total, printed)


def test_switch_base_is_flop_matched_to_t5_base():
    # Switch-Base's active parameters are T5-Base's plus 12 routers (Sec. 2.4: FLOP-matched);
    # 12 sparse layers * 768 * 128 router weights = 1,179,648
    active = count("switch", "base")["active"]
    dense = count("dense", "t5_base")["total"]
    assert active - dense == 12 * 768 * 128


def test_glam_64b_activated_matches_paper():
    # GLaM Table 4: 96.6B activated for 64B/64E; counted with the tied 256K x 8192 embedding
    active = count("glam", "64b_64e")["active"]
    assert within_printed_figure(active, 96.6 * B, 0.1 * B), active


# (family, variant, total, active, relative tolerance): Mixtral (Jiang et al. 2024, Table 1 and
# Sec. 1: 46.7B total, 12.9B active) and OLMoE-1B-7B (Muennighoff et al. 2024: 6.9B total, 1.3B
# active, rounded), Qwen3-30B-A3B (model card: 30.5B, 3.3B), Qwen3-235B-A22B (235B, 22B) and
# Qwen1.5-MoE-A2.7B (14.3B, 2.7B), all counted with their untied embedding and output head.
ROPE_DECODER_COUNTS = [
    ("mixtral", "8x7b", 46.7 * B, 12.9 * B, 0.01),
    ("olmoe", "1b_7b", 6.9 * B, 1.3 * B, 0.02),
    ("qwen_moe", "qwen3_30b_a3b", 30.5 * B, 3.3 * B, 0.02),
    ("qwen_moe", "qwen3_235b_a22b", 235 * B, 22 * B, 0.02),
    ("qwen_moe", "qwen2_a2.7b", 14.3 * B, 2.7 * B, 0.02),
]


@pytest.mark.parametrize("family, variant, total, active, tolerance", ROPE_DECODER_COUNTS)
def test_rope_decoder_counts_match_papers(family, variant, total, active, tolerance):
    counts = count(family, variant)
    assert abs(counts["total"] / total - 1) <= tolerance, counts
    assert abs(counts["active"] / active - 1) <= tolerance, counts


# the gpt-oss model card (OpenAI 2025): 20.9B total / 3.6B active for gpt-oss-20b, 116.8B /
# 5.1B for gpt-oss-120b; its active counts hold the unembedding but not the embedding, which a
# token only looks up
GPT_OSS_COUNTS = [("20b", 20.9 * B, 3.6 * B), ("120b", 116.8 * B, 5.1 * B)]


@pytest.mark.parametrize("variant, total, active", GPT_OSS_COUNTS)
def test_gpt_oss_counts_match_the_model_card(variant, total, active):
    counts = count("gpt_oss", variant)
    config = get_config("gpt_oss", variant)
    embedding = config.model.vocab_size * config.model.d_model
    assert abs(counts["total"] / total - 1) <= 0.02, counts
    assert abs((counts["active"] - embedding) / active - 1) <= 0.02, counts


def test_gpt_oss_paper_choices():
    config = get_config("gpt_oss", "120b")
    model, moe = config.model, config.moe
    assert (model.sliding_window, model.full_attention_every) == (128, 2)
    assert model.attention_sinks and model.qkv_bias and model.attention_out_bias
    assert (model.rope_type, model.rope_factor, model.rope_original_max_positions) == (
        "yarn",
        32.0,
        4096,
    )
    assert (moe.num_experts, moe.k, moe.activation, moe.swiglu_limit) == (
        128,
        4,
        "swiglu_clamped",
        7.0,
    )
    assert moe.expert_bias and moe.router_bias and moe.normalize == "topk"


# DeepSeek-V3 (arXiv 2412.19437, Sec. 1 and 4.2): 671B total / 37B active; DeepSeek-V2 (arXiv
# 2405.04434, Sec. 1): 236B / 21B; DeepSeek-V2-Lite (its Appendix B): 15.7B / 2.4B. Their
# active counts hold the output head but not the embedding lookup; the printed active figures
# are rounded (V2-Lite's 2.45B prints as 2.4B)
DEEPSEEK_COUNTS = [
    ("v3", 671 * B, 37 * B, 1 * B),
    ("v2", 236 * B, 21 * B, 1 * B),
    ("v2_lite", 15.7 * B, 2.4 * B, 0.1 * B),
]


@pytest.mark.parametrize("variant, total, active, last_digit", DEEPSEEK_COUNTS)
def test_deepseek_counts_match_the_papers(variant, total, active, last_digit):
    counts = count("deepseek", variant)
    config = get_config("deepseek", variant)
    embedding = config.model.vocab_size * config.model.d_model
    assert abs(counts["total"] / total - 1) <= 0.02, counts
    assert within_printed_figure(counts["active"] - embedding, active, last_digit), counts


def test_deepseek_paper_choices():
    v3 = get_config("deepseek", "v3")
    assert v3.model.attention == "mla" and v3.model.q_lora_rank == 1536
    assert (v3.moe.router, v3.moe.num_groups, v3.moe.topk_groups) == ("aux_free", 8, 4)
    assert (v3.moe.k, v3.moe.num_shared_experts, v3.moe.routed_scaling) == (8, 1, 2.5)
    assert v3.moe.dense_layers == (0, 1, 2) and v3.loss.aux_scope == "sequence"
    lite = get_config("deepseek", "v2_lite")
    assert lite.model.q_lora_rank == 0 and lite.moe.num_groups == 1
    assert (lite.moe.router, lite.moe.normalize) == ("tokens_choose", "none")


def test_rope_decoder_paper_choices():
    mixtral = get_config("mixtral", "8x7b")
    assert mixtral.model.kind == "rope_decoder" and mixtral.model.num_kv_heads == 8
    assert (mixtral.moe.num_experts, mixtral.moe.k, mixtral.moe.normalize) == (8, 2, "topk")
    assert (mixtral.model.rope_theta, mixtral.model.vocab_size) == (1e6, 32_000)
    olmoe = get_config("olmoe", "1b_7b")
    assert olmoe.model.qk_norm and (olmoe.moe.num_experts, olmoe.moe.k) == (64, 8)
    assert olmoe.moe.normalize == "none"
    assert (olmoe.loss.aux_coef, olmoe.loss.z_coef) == (1e-2, 1e-3)
    qwen = get_config("qwen_moe", "qwen3_30b_a3b")
    assert qwen.model.qk_norm and qwen.model.qk_norm_per_head and qwen.model.num_kv_heads == 4
    assert (qwen.moe.num_experts, qwen.moe.k, qwen.moe.normalize) == (128, 8, "topk")
    assert (qwen.moe.d_ff, qwen.model.head_dim, qwen.model.rope_theta) == (768, 128, 1e6)
    qwen2 = get_config("qwen_moe", "qwen2_a2.7b")
    assert qwen2.model.qkv_bias and not qwen2.model.qk_norm and qwen2.moe.shared_expert_gate
    assert (qwen2.moe.num_experts, qwen2.moe.k, qwen2.moe.num_shared_experts) == (60, 4, 4)
    assert qwen2.moe.normalize == "none" and qwen2.model.hf_model_type == "qwen2_moe"
    for config in (mixtral, olmoe, qwen, qwen2):
        assert config.moe.backend == "dropless" and config.moe.router_jitter == 0.0
        assert config.model.ffn_activation == config.moe.activation == "swiglu"
        assert not config.model.tie_embeddings
    assert mixtral.model.norm_epsilon == olmoe.model.norm_epsilon == 1e-5
    assert qwen.model.norm_epsilon == qwen2.model.norm_epsilon == 1e-6


def test_expert_count_in_variant_name_equals_override():
    from_name = get_config("switch", "base-16")
    overridden = get_config("switch", "base")
    overridden.moe.num_experts = 16
    assert from_name.to_dict() == overridden.to_dict()
    with pytest.raises(ValueError, match="expert count"):
        get_config("switch", "base-x")


def test_command_line_loading_and_override(monkeypatch):
    argv = ["prog", "--config=configs/switch.py:base", "--config.moe.num_experts=16"]
    monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    flag_values(argv)
    config = flag_values.config
    assert config.moe.num_experts == 16 and config.model.d_model == 768


def test_paper_training_choices():
    switch = get_config("switch", "xxl")
    assert (switch.moe.k, switch.moe.capacity_factor_train, switch.moe.capacity_factor_eval) == (
        1,
        1.25,
        2.0,
    )
    assert switch.train.optimizer == "adafactor" and switch.train.schedule == "rsqrt"
    assert switch.model.vocab_size == 32128 and switch.moe.num_experts == 128
    st_moe = get_config("st_moe", "32b")
    assert (st_moe.moe.k, st_moe.moe.sparse_every, st_moe.moe.extra_dense_ffn) == (2, 4, True)
    assert (st_moe.loss.z_coef, st_moe.loss.aux_coef) == (1e-3, 1e-2)
    glam = get_config("glam", "8b_64e")
    assert glam.moe.router == "gshard_top2" and glam.model.vocab_size == 256_000
    assert glam.train.seq_len == 1024 and glam.model.kind == "decoder"


def batch_for(config, batch: int = 2, length: int = 32):
    """Random token ids (shorter than the config's seq_len: shapes do not change the code path)."""
    model = config.model
    ids = jax.random.randint(jax.random.key(0), (batch, length), 3, model.vocab_size)
    if model.kind in DECODER_KINDS:
        return (ids,)
    return ids, ids[:, : length // 4]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_variant_trains_forward_and_backward(family):
    config = get_config(family, "tiny")
    assert config.model.vocab_size == 384 and config.train.seq_len == 128
    assert config.train.optimizer == "adamw"
    model = models.build_model(config, rngs=nnx.Rngs(0))
    inputs = batch_for(config)

    @nnx.jit
    def loss_and_grads(model, inputs):
        def loss_fn(model):
            logits, aux = model(*inputs, deterministic=False)
            targets = inputs[-1]
            log_probs = jax.nn.log_softmax(logits)
            loss = -jnp.take_along_axis(log_probs, targets[..., None], -1).mean()
            if aux is not None:
                loss = loss + 1e-2 * aux.load_balancing_loss.sum()
            return loss

        return nnx.value_and_grad(loss_fn)(model)

    loss, grads = loss_and_grads(model, inputs)
    assert jnp.isfinite(loss)
    norms = [jnp.abs(g).sum() for g in jax.tree.leaves(grads)]
    assert all(bool(jnp.isfinite(n)) for n in norms)
    assert all(float(n) > 0 for n in norms)


def test_switch_stdlib_is_the_tiny_config_with_the_overrides_results_md_ran():
    # RESULTS.md (m) ran `configs/switch.py:tiny` with these --set overrides; the variant must
    # be that run, key for key, but for mesh.data=1, which on a one-device CPU is what the
    # default -1 (every device) gives.
    overrides = {
        "data.name": "python_stdlib",
        "model.d_model": 64,
        "model.num_heads": 2,
        "model.d_ff": 256,
        "train.num_steps": 2000,
        "train.warmup_steps": 100,
        "train.eval_every": 500,
        "train.eval_steps": 8,
        "train.checkpoint_every": 500,
        "train.log_every": 50,
    }
    tiny = get_config("switch", "tiny")
    for key, value in overrides.items():
        section, name = key.split(".")
        tiny[section][name] = value
    assert get_config("switch", "stdlib").to_dict() == tiny.to_dict()
    assert get_config("switch", "stdlib-32").moe.num_experts == 32


def test_switch_stdlib_best_is_stdlib_with_the_overrides_results_md_ran():
    # RESULTS.md (n) ran `configs/switch.py:stdlib` with these overrides as its best recipe.
    stdlib = get_config("switch", "stdlib")
    stdlib.moe.k = 2
    stdlib.moe.backend = "dropless"
    stdlib.moe.normalize = "topk"
    assert get_config("switch", "stdlib-best").to_dict() == stdlib.to_dict()
    assert get_config("switch", "stdlib-best-4").moe.num_experts == 4
    with pytest.raises(ValueError, match="expert count"):
        get_config("switch", "stdlib-x")


def test_config_path_resolves_from_any_directory_and_a_missing_one_fails_in_one_line(
    tmp_path, monkeypatch
):
    from moe_jax.config import REPOSITORY, load_config_file, resolve_config_argv

    monkeypatch.chdir(tmp_path)  # outside the repository
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(REPOSITORY))])
    monkeypatch.delitem(
        sys.modules, "configs", raising=False
    )  # dense.py's `from configs import ...` reloads it
    argv = resolve_config_argv(["train", "--config=configs/dense.py:tiny", "--workdir=w"])
    assert argv == ["train", f"--config={REPOSITORY / 'configs' / 'dense.py'}:tiny", "--workdir=w"]
    assert load_config_file("configs/dense.py:tiny").moe.num_experts == 0
    with pytest.raises(ValueError) as error:
        resolve_config_argv(["train", "--config=configs/swich.py:tiny"])
    assert "--config=configs/swich.py:tiny names no file" in str(error.value)
    assert "\n" not in str(error.value)
