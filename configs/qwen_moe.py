"""Qwen's MoE decoders: Qwen3-MoE (Qwen Team 2025, "Qwen3 Technical Report"; 128 fine-grained
experts, top-8, q/k RMSNorm per head, grouped-query attention) and Qwen1.5-MoE (a gated shared
expert beside 60 routed ones, q/k/v biases).

    python -m moe_jax.train --config=configs/qwen_moe.py:tiny --workdir=runs/qwen_moe_tiny

The sizes are those of the released `config.json` files (Hugging Face `model_type` `qwen3_moe`
and `qwen2_moe`, which `moe_jax.hf` loads and saves):

- `qwen3_30b_a3b` (`Qwen/Qwen3-30B-A3B`): d_model 2048, 48 layers, 32 query heads and 4
  key/value heads of head_dim 128 (the attention is 4096 wide, twice d_model), 128 SwiGLU
  experts of hidden width 768 (`moe_intermediate_size`) with 8 chosen per token in every layer
  (`decoder_sparse_step` 1, no `mlp_only_layers`), vocabulary 151936, rope theta 1e6, RMSNorm
  epsilon 1e-6, untied output head, no biases. The model card counts 30.5B total and 3.3B
  active parameters; `count_params` gives 30.53B / 3.35B.
- `qwen3_235b_a22b` (`Qwen/Qwen3-235B-A22B`): d_model 4096, 94 layers, 64 query / 4 key-value
  heads of 128, 128 experts of width 1536, top-8, the same vocabulary, theta and epsilon. The
  card counts 235B / 22B; `count_params` gives 235.09B / 22.19B.
- `qwen2_a2.7b` (`Qwen/Qwen1.5-MoE-A2.7B`, `qwen2_moe`): d_model 2048, 24 layers, 16 heads of
  128 (no grouped-query attention), biases on q, k and v (`model.qkv_bias`), 60 experts of
  width 1408 with top-4 and the raw softmax probabilities as weights (`norm_topk_prob` false),
  and in every layer a shared SwiGLU expert of width 5632 (`shared_expert_intermediate_size`:
  4 experts' width, `moe.num_shared_experts = 4`) whose output is scaled per token by
  `sigmoid(x @ w)`, `w: [M, 1]` (`moe.shared_expert_gate`); rope theta 1e6, epsilon 1e-6,
  sequences of 8192. The card counts 14.3B total and 2.7B active; `count_params` gives
  14.32B / 2.69B.

Every layer has experts in both releases; `moe.dense_layers` (`mlp_only_layers`) and
`moe.sparse_every` (`decoder_sparse_step`) place dense SwiGLU FFNs of `model.d_ff`
(`intermediate_size`: 6144 and 12288, unused by the releases) where a checkpoint has them.

Attention: Qwen3's q/k RMSNorm is one `[head_dim]` scale for queries and one for keys, applied to
each head alone before RoPE (`model.qk_norm_per_head`; OLMoE's spans the whole projection).
Routing: softmax router, top-8 renormalised over the chosen experts (`norm_topk_prob` true in
the releases, `moe.normalize = 'topk'`), dropless token choice. Losses: the release's
`router_aux_loss_coef` 0.001 for load balancing, computed over the global batch as the report
trains it (`loss.aux_scope = 'global'`; transformers pools the whole batch and all layers), no
router z-loss. Sequences of 32768 tokens (the native context); optimizer settings are the
codebase defaults (AdamW, cosine), not the report's.

`tiny` (Qwen3-style): 4 layers, d_model 128, 4 query / 2 key-value heads of 32, per-head q/k
norm, 16 experts of width 64 with top-4 renormalised, on the synthetic corpus with the CPU
recipe (AdamW).
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

_QWEN3 = dict(vocab_size=151_936, head_dim=128, rope_theta=1e6, norm_epsilon=1e-6, qk_norm=True)
# variant: (the sizes `set_rope_decoder` takes, dense d_ff, experts, k)
SIZES = {
    "qwen3_30b_a3b": (
        dict(_QWEN3, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, expert_d_ff=768),
        6144,
        128,
        8,
    ),
    "qwen3_235b_a22b": (
        dict(_QWEN3, d_model=4096, num_layers=94, num_heads=64, num_kv_heads=4, expert_d_ff=1536),
        12_288,
        128,
        8,
    ),
    "qwen2_a2.7b": (
        dict(
            _QWEN3,
            d_model=2048,
            num_layers=24,
            num_heads=16,
            num_kv_heads=16,
            expert_d_ff=1408,
            qk_norm=False,
        ),
        5632,
        60,
        4,
    ),
    "tiny": (
        dict(
            vocab_size=TINY_VOCAB_SIZE,
            d_model=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            head_dim=32,
            expert_d_ff=64,
            rope_theta=1e6,
            norm_epsilon=1e-6,
            qk_norm=True,
        ),
        256,
        16,
        4,
    ),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The Qwen MoE config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    qwen2 = variant.startswith("qwen2")
    config = default_config()
    if variant == "tiny":
        set_tiny(config, kind="rope_decoder")
    else:
        set_rope_decoder_scale(config, seq_len=8192 if qwen2 else 32_768)
        set_fsdp(config)
    sizes, d_ff, num_experts, k = SIZES[variant]
    set_rope_decoder(config, **sizes)
    model, moe = config.model, config.moe
    model.d_ff = d_ff
    model.hf_model_type = "qwen2_moe" if qwen2 else "qwen3_moe"
    moe.num_experts, moe.k = num_experts, k
    if qwen2:
        model.qkv_bias = True
        moe.num_shared_experts, moe.shared_expert_gate = 4, True
        moe.normalize = "none"
    else:
        model.qk_norm_per_head = True
        moe.normalize = "topk"
        if variant != "tiny":  # Qwen3 balances its experts over the global batch
            config.loss.aux_scope = "global"
    config.loss.aux_coef, config.loss.z_coef = 1e-3, 0.0
    return config
