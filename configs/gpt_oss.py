"""OpenAI's gpt-oss (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card"): a Llama-style MoE
decoder with attention sinks, sliding-window layers alternating with full attention, YaRN
rotary scaling, biases in attention, router and experts, and a clamped SwiGLU.

    python -m moe_jax.train --config=configs/gpt_oss.py:tiny --workdir=runs/gpt_oss_tiny

The sizes are those of the released `config.json` files (Hugging Face `model_type` `gpt_oss`,
which `moe_jax.hf` loads and saves):

- `20b` (`openai/gpt-oss-20b`): d_model 2880, 24 layers, 64 query heads and 8 key/value heads of
  head_dim 64 (the attention is 4096 wide), 32 experts of hidden width 2880 with 4 chosen per
  token in every layer, vocabulary 201088, RMSNorm epsilon 1e-5, untied output head. The model
  card counts 20.9B total and 3.6B active parameters.
- `120b` (`openai/gpt-oss-120b`): 36 layers and 128 experts, the rest as `20b`. The card counts
  116.8B total and 5.1B active.
The card's active counts hold the output head but not the embedding (a lookup); `count_params`
counts both, so `configs/README.md` compares its active count less the embedding.

Attention: query head n adds a learned sink logit `s_n` to its softmax's denominator
(`model.attention_sinks`); even layers attend to the last 128 positions (`model.sliding_window`),
odd layers to all (`model.full_attention_every = 2`); q, k, v and o have biases. Rotary
positions: theta 150000 with YaRN (Peng et al. 2023) stretching a 4096-token original context by
a factor 32 to 131072 (`beta_fast` 32, `beta_slow` 1, no truncation of the correction range).
Routing: a router with a bias, softmax over its top-4 logits (our softmax renormalised over the
chosen 4, `moe.normalize = 'topk'`), dropless. Experts: biases on both projections and
`(clip(up, -7, 7) + 1) * g * sigmoid(1.702 g)` with `g = min(gate, 7)` (`moe.activation =
'swiglu_clamped'`). Load balancing at the release's `router_aux_loss_coef` 0.001, no z-loss.
Scanning needs every scanned block to attend alike, and one-layer blocks alternate here, so the
paper sizes unroll their layers (`model.scan_layers = False`). Sequences of 4096 tokens (the
original context before YaRN); optimizer settings are the codebase defaults (AdamW, cosine), not
OpenAI's, which the card does not give.

`tiny`: 4 layers, d_model 128, 4 query / 2 key-value heads of 32, window 32 of the 128-token
sequences, 8 experts of width 128, top-2, plain rotary positions, on the synthetic corpus with
the CPU recipe (AdamW).
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

_GPT_OSS = dict(
    vocab_size=201_088,
    d_model=2880,
    num_heads=64,
    num_kv_heads=8,
    head_dim=64,
    expert_d_ff=2880,
    rope_theta=150_000.0,
    norm_epsilon=1e-5,
    qk_norm=False,
)
# variant: (the sizes `set_rope_decoder` takes, experts, k, sliding window)
SIZES = {
    "20b": (dict(_GPT_OSS, num_layers=24), 32, 4, 128),
    "120b": (dict(_GPT_OSS, num_layers=36), 128, 4, 128),
    "tiny": (
        dict(
            vocab_size=TINY_VOCAB_SIZE,
            d_model=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            expert_d_ff=128,
            rope_theta=10_000.0,
            norm_epsilon=1e-5,
            qk_norm=False,
        ),
        8,
        2,
        32,
    ),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The gpt-oss config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    if variant == "tiny":
        set_tiny(config, kind="rope_decoder")
    else:
        set_rope_decoder_scale(config, seq_len=4096)
        set_fsdp(config)
        config.model.scan_layers = False  # the layers' attention alternates (docstring)
    sizes, num_experts, k, window = SIZES[variant]
    set_rope_decoder(config, **sizes)
    model, moe = config.model, config.moe
    model.hf_model_type = "gpt_oss"
    model.qkv_bias = model.attention_out_bias = model.attention_sinks = True
    model.sliding_window, model.full_attention_every = window, 2
    if variant != "tiny":
        model.rope_type, model.rope_factor = "yarn", 32.0
        model.rope_beta_fast, model.rope_beta_slow = 32.0, 1.0
        model.rope_original_max_positions, model.rope_truncate = 4096, False
    moe.num_experts, moe.k, moe.normalize = num_experts, k, "topk"
    moe.activation, moe.swiglu_limit, moe.swiglu_alpha = "swiglu_clamped", 7.0, 1.702
    moe.expert_bias = moe.router_bias = True
    config.loss.aux_coef, config.loss.z_coef = 1e-3, 0.0
    return config
