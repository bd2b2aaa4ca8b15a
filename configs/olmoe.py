"""OLMoE (Muennighoff et al. 2024): a Llama-style decoder with 64 small experts, top-8, q/k norm.

    python -m moe_jax.train --config=configs/olmoe.py:tiny --workdir=runs/olmoe_tiny

`1b_7b` follows the paper (Sec. 2) and the released `allenai/OLMoE-1B-7B-0924` config.json:
d_model 2048, 16 layers, 16 heads of 128 (no grouped-query attention: 16 key/value heads),
64 SwiGLU experts of hidden width 1024 with 8 chosen per token in every layer, vocabulary 50304,
rope theta 10000, RMSNorm epsilon 1e-5 everywhere, RMSNorm on the full query and key
projections (`model.qk_norm`), untied output head, no biases. The paper counts 6.9B total and
1.3B active parameters; `count_params` gives 6.92B / 1.28B.

Routing: softmax router, top-8 with the raw softmax probabilities as weights (no
renormalisation: `norm_topk_prob = false` in the release, `moe.normalize = 'none'`), dropless
token choice (`moe.backend = 'dropless'`). Losses (Sec. 2): load balancing with weight 0.01 (the
release's `router_aux_loss_coef`) and router z-loss with weight 0.001. This codebase sums the
per-layer losses (`moe_jax.steps`); `transformers` reports only the load-balancing loss, with the
layers' statistics pooled, and no z-loss (see `tests/test_rope_decoder.py`). Sequences of 4096
tokens (the release's `max_position_embeddings`); optimizer settings of `1b_7b` are the
codebase defaults (AdamW, cosine), not the paper's.

`tiny`: 4 layers, d_model 128, 4 heads of 32, q/k norm, 16 experts of width 128 with top-4
(OLMoE's fine-grained experts: 4 x 128 = 512 active hidden units per token), on the synthetic
corpus with the CPU recipe (AdamW).
"""

import ml_collections

from configs import (
    TINY_VOCAB_SIZE,
    check_variant,
    set_rope_decoder,
    set_rope_decoder_scale,
    set_tiny,
)
from moe_jax.config import default_config

# variant: (the sizes `set_rope_decoder` takes, experts, k); 1b_7b: the released config.json
SIZES = {
    "1b_7b": (
        dict(
            vocab_size=50_304,
            d_model=2048,
            num_layers=16,
            num_heads=16,
            num_kv_heads=16,
            head_dim=128,
            expert_d_ff=1024,
            rope_theta=10_000.0,
            norm_epsilon=1e-5,
            qk_norm=True,
        ),
        64,
        8,
    ),
    "tiny": (
        dict(
            vocab_size=TINY_VOCAB_SIZE,
            d_model=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=4,
            head_dim=32,
            expert_d_ff=128,
            rope_theta=10_000.0,
            norm_epsilon=1e-5,
            qk_norm=True,
        ),
        16,
        4,
    ),
}
VARIANTS = tuple(SIZES)


def set_olmoe_routing(config: ml_collections.ConfigDict, *, num_experts: int, k: int) -> None:
    """Top-k of a softmax router without renormalisation; losses 0.01 (balance), 0.001 (z)."""
    config.moe.num_experts = num_experts
    config.moe.k = k
    config.moe.normalize = "none"
    config.loss.aux_coef = 1e-2
    config.loss.z_coef = 1e-3


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The OLMoE config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    if variant == "tiny":
        set_tiny(config, kind="rope_decoder")
    else:
        set_rope_decoder_scale(config, seq_len=4096)  # the release's max_position_embeddings
    sizes, num_experts, k = SIZES[variant]
    set_rope_decoder(config, **sizes)
    set_olmoe_routing(config, num_experts=num_experts, k=k)
    return config
