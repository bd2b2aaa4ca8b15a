"""DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434) and DeepSeek-V3 (DeepSeek-AI 2024, arXiv
2412.19437): Llama-style MoE decoders with multi-head latent attention, fine-grained routed
experts beside shared ones, dense first layers and group-limited routing.

    python -m moe_jax.train --config=configs/deepseek.py:tiny --workdir=runs/deepseek_tiny

The sizes are those of the released `config.json` files (Hugging Face `model_type`
`deepseek_v3` and `deepseek_v2`, which `moe_jax.hf` loads and saves):

- `v3` (`deepseek-ai/DeepSeek-V3`): d_model 7168, 61 layers (the first 3 dense, of width 18432),
  128 heads of multi-head latent attention (query latent 1536, key/value latent 512, 64 rotary
  and 128 position-free query/key features, 128 value features), 256 routed experts of width
  2048 with 8 chosen and 1 shared expert, vocabulary 129280. Routing (Sec. 2.1.2): sigmoid
  affinities, a correction bias for the choice only, updated by its sign at speed 0.001
  (aux-loss-free balancing, `moe.router='aux_free'`), 8 groups of which the 4 with the best two
  biased affinities are searched (`moe.num_groups`, `moe.topk_groups`), the k affinities
  renormalised and scaled by 2.5; the sequence-wise balance loss at alpha 1e-4 (Sec. 4.2). YaRN
  stretches a 4096-token context by 40 (mscale 1). The paper counts 671B total and 37B active
  parameters, without its multi-token prediction module, which moe_jax does not implement.
- `v2` (`deepseek-ai/DeepSeek-V2`): d_model 5120, 60 layers (the first dense, of width 12288),
  128 heads (query latent 1536, the same key/value shapes as V3), 160 routed experts of width
  1536 with 6 chosen and 2 shared; softmax routing limited to the 3 best of 8 groups by their
  best probability (group-limited greedy; the paper's device limit M = 3 over 8 devices), the
  raw probabilities scaled by 16; the expert-level balance loss per sequence at 0.003 (Sec. 4.1;
  the device- and communication-level ones are not implemented). YaRN stretches 4096 tokens by
  40 (mscale 0.707). The paper counts 236B total and 21B active.
- `v2_lite` (`deepseek-ai/DeepSeek-V2-Lite`): d_model 2048, 27 layers (the first dense, of width
  10944), 16 heads with no query latent (`model.q_lora_rank = 0`), 64 routed experts of width
  1408 with 6 chosen and 2 shared, greedy softmax routing, balance loss 0.001. The paper counts
  15.7B total and 2.4B active.
The papers count active parameters with the output head but not the embedding lookup;
`count_params` counts both, so `configs/README.md` compares its active count less the
embedding.

Sequences of 4096 tokens (the pretraining context before YaRN); optimizer settings are the
codebase defaults (AdamW, cosine), not the papers'.

`tiny` (V3-style): 4 layers, the first dense, d_model 128, 4 heads of latent attention (latent
32, 16 rotary + 16 position-free features, values of 32, no query latent), 16 experts of width
64 with 4 chosen in 4 groups of which 2 are searched, one shared expert, aux-loss-free routing
and the sequence-wise loss, plain rotary positions, on the synthetic corpus with the CPU recipe.
"""

import ml_collections

from configs import (
    TINY_VOCAB_SIZE,
    check_variant,
    set_fsdp,
    set_rope_decoder,
    set_rope_decoder_scale,
    set_tiny,
)
from moe_jax.config import default_config

_MLA = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
# variant: (the sizes `set_rope_decoder` takes, the latent attention's sizes, dense d_ff, the
# dense first layers, routed experts, k, shared experts, groups, groups searched, routed
# scaling, YaRN's mscale (0: plain rotary positions))
SIZES = {
    "v3": (
        dict(vocab_size=129_280, d_model=7168, num_layers=61, num_heads=128, expert_d_ff=2048),
        dict(_MLA, q_lora_rank=1536),
        18_432,
        3,
        256,
        8,
        1,
        8,
        4,
        2.5,
        1.0,
    ),
    "v2": (
        dict(vocab_size=102_400, d_model=5120, num_layers=60, num_heads=128, expert_d_ff=1536),
        dict(_MLA, q_lora_rank=1536),
        12_288,
        1,
        160,
        6,
        2,
        8,
        3,
        16.0,
        0.707,
    ),
    "v2_lite": (
        dict(vocab_size=102_400, d_model=2048, num_layers=27, num_heads=16, expert_d_ff=1408),
        dict(_MLA, q_lora_rank=0),
        10_944,
        1,
        64,
        6,
        2,
        1,
        1,
        1.0,
        0.707,
    ),
    "tiny": (
        dict(vocab_size=TINY_VOCAB_SIZE, d_model=128, num_layers=4, num_heads=4, expert_d_ff=64),
        dict(
            kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, q_lora_rank=0
        ),
        256,
        1,
        16,
        4,
        1,
        4,
        2,
        1.0,
        0.0,
    ),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The DeepSeek config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    if variant == "tiny":
        set_tiny(config, kind="rope_decoder")
    else:
        set_rope_decoder_scale(config, seq_len=4096)
        set_fsdp(config)
    sizes, latent, d_ff, dense, experts, k, shared, groups, searched, scaling, mscale = SIZES[
        variant
    ]
    set_rope_decoder(
        config,
        **sizes,
        num_kv_heads=sizes["num_heads"],
        head_dim=latent["qk_rope_head_dim"],
        rope_theta=10_000.0,
        norm_epsilon=1e-6,
        qk_norm=False,
    )
    model, moe, loss = config.model, config.moe, config.loss
    v3 = variant in ("v3", "tiny")
    model.hf_model_type = "deepseek_v3" if v3 else "deepseek_v2"
    model.attention = "mla"
    for name, value in latent.items():
        model[name] = value
    model.d_ff = d_ff
    if mscale:
        model.rope_type, model.rope_factor = "yarn", 40.0
        model.rope_original_max_positions = 4096
        model.rope_beta_fast, model.rope_beta_slow = 32.0, 1.0
        model.rope_mscale = model.rope_mscale_all_dim = mscale
    moe.num_experts, moe.k, moe.num_shared_experts = experts, k, shared
    moe.dense_layers = tuple(range(dense))
    moe.num_groups, moe.topk_groups, moe.routed_scaling = groups, searched, scaling
    loss.z_coef, loss.aux_scope = 0.0, "sequence"
    if v3:
        moe.router, moe.normalize, moe.bias_update_rate = "aux_free", "topk", 0.001
        loss.aux_coef = 1e-4
    else:
        moe.router, moe.normalize = "tokens_choose", "none"
        loss.aux_coef = 0.003 if variant == "v2" else 0.001
    return config
