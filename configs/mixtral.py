"""Mixtral (Jiang et al. 2024): a Llama-style decoder with 8 SwiGLU experts, top-2, in every layer.

    python -m moe_jax.train --config=configs/mixtral.py:tiny --workdir=runs/mixtral_tiny

`8x7b` follows the paper's Table 1 and the released `mistralai/Mixtral-8x7B-v0.1` config.json:
dim 4096, 32 layers, head_dim 128, 32 query heads and 8 key/value heads (grouped-query
attention), hidden_dim 14336 per expert, vocabulary 32000, 8 experts with top-2, rope theta 1e6,
RMSNorm epsilon 1e-5, untied output head, no biases. The paper counts 46.7B parameters (47B in
Sec. 1) of which 13B (12.9B) are active per token; `count_params` gives 46.70B / 12.88B.

Routing (Sec. 2.1): softmax over the top-2 router logits, which is the softmax over all logits
renormalised over the chosen two (`moe.normalize = 'topk'`); every token goes to its two experts
(dropless, `moe.backend = 'dropless'`), as the released model computes in `transformers`. The
paper states no training recipe beyond the 32k-token context (Sec. 2); the load-balancing
coefficient is the released config's `router_aux_loss_coef` 0.001 and there is no router
z-loss. This codebase sums the per-layer load-balancing losses (`moe_jax.steps`), where
`transformers` pools the layers' statistics into one loss; see `tests/test_rope_decoder.py`.
Optimizer settings of `8x7b` are the codebase defaults (AdamW, cosine), not the paper's.

`tiny`: 4 layers, d_model 128, 4 query / 2 key-value heads of 32, 8 experts of width 448
(Mixtral's 3.5 x d_model), top-2, on the synthetic corpus with the CPU recipe (AdamW).
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

# variant: the sizes `set_rope_decoder` takes (8x7b: Table 1 and the released config.json)
SIZES = {
    "8x7b": dict(
        vocab_size=32_000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        expert_d_ff=14_336,
        rope_theta=1e6,
        norm_epsilon=1e-5,
        qk_norm=False,
    ),
    "tiny": dict(
        vocab_size=TINY_VOCAB_SIZE,
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        expert_d_ff=448,
        rope_theta=1e6,
        norm_epsilon=1e-5,
        qk_norm=False,
    ),
}
VARIANTS = tuple(SIZES)


def set_mixtral_routing(config: ml_collections.ConfigDict) -> None:
    """8 experts, top-2 with renormalised weights; load-balancing coefficient 0.001."""
    config.moe.num_experts = 8
    config.moe.k = 2
    config.moe.normalize = "topk"
    config.loss.aux_coef = 1e-3
    config.loss.z_coef = 0.0


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The Mixtral config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    if variant == "tiny":
        set_tiny(config, kind="rope_decoder")
    else:
        set_rope_decoder_scale(config, seq_len=32_768)  # the 32k-token context (Sec. 2)
    set_rope_decoder(config, **SIZES[variant])
    set_mixtral_routing(config)
    if variant == "8x7b":  # 47B: FSDP (`configs.set_fsdp`)
        set_fsdp(config)
    return config
