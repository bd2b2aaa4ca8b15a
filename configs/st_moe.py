"""ST-MoE (Zoph et al. 2022): top-2 routing, router z-loss, a sparse layer at every 4th FFN.

    python -m moe_jax.train --config=configs/st_moe.py:tiny --workdir=runs/st_moe_tiny

Sizes (the ST-MoE paper's table of model configurations, and T5X's st_moe gins; GEGLU; layers
per stack; one FFN in 4 is sparse and is followed by an extra dense FFN sublayer):

| variant | params (paper) | d_model | d_ff  | heads x d_kv | layers | experts | source       |
|---------|----------------|---------|-------|--------------|--------|---------|--------------|
| base    | (none given)   | 768     | 2048  | 12 x 64      | 12     | 16      | st_moe_base  |
| l       | 4.1B           | 1024    | 2816  | 16 x 64      | 24     | 32      | paper        |
| 32b     | 269B           | 5120    | 20480 | 64 x 128     | 24     | 64      | paper, gin   |

Readings: ST-MoE-L (FLOP-matched to T5-Large) is taken with T5-Large's 24 layers per stack,
the reading that gives its 4.1B parameters (12 per stack would give 2.1B). ST-MoE-32B's 269B
needs the extra dense FFN beside each of its 6 + 6 sparse layers (without it: 265B). Logits are
untied (T5 v1.1; T5X's st_moe gins keep a separate logits layer).
Training (the paper's Sec. 3 stability study and T5X's gins): top-2 tokens-choose routing, no
batch-prioritized routing (T5X's ST-MoE leaves BPR off), train/eval capacity factors 1.25 / 2.0,
load-balancing coefficient 1e-2, router z-loss 1e-3 (32B and L; 1e-4 in T5X's base gin), no
router jitter (T5X), router init scale 0.1, groups of 4096 tokens; T5's Adafactor/rsqrt recipe.
Slot order: T5X fills capacity choice-major (every first choice before any second) in both
stacks. The encoder keeps that order; the decoder fills token by token (`moe.fill_order=''`),
since choice-major top-2 there lets later tokens decide which of a token's choices keep their
slot. `--config.moe.fill_order=choice` is T5X's order in the decoder too, leak included.

`tiny`: a 4 + 4 layer encoder-decoder, d_model 128, 8 experts at every 4th FFN with the extra
dense FFN (so one sparse layer per stack), span corruption on the synthetic corpus, AdamW.
"""

import ml_collections

from configs import set_fsdp, set_t5_pretraining, set_t5_size, set_tiny, split_variant
from moe_jax.config import default_config

# name: (d_model, d_ff, num_heads, head_dim, layers per stack, experts, z-loss coefficient)
SIZES = {
    "base": (768, 2048, 12, 64, 12, 16, 1e-4),
    "l": (1024, 2816, 16, 64, 24, 32, 1e-3),
    "32b": (5120, 20480, 64, 128, 24, 64, 1e-3),
}
VARIANTS = (*SIZES, "tiny")
FSDP_VARIANTS = ("32b",)  # ST-MoE-32B's 269B: FSDP (`configs.set_fsdp`); base and l fit


def set_st_moe_routing(config: ml_collections.ConfigDict) -> None:
    """ST-MoE's router, losses and sparse-layer layout."""
    moe = config.moe
    moe.router = "tokens_choose"
    moe.k = 2
    moe.normalize = "none"
    moe.batch_prioritized = False
    moe.fill_order = ""  # choice-major in the encoder, token by token in the decoder (above)
    moe.capacity_factor_train = 1.25
    moe.capacity_factor_eval = 2.0
    moe.router_jitter = 0.0
    moe.router_init_scale = 0.1
    moe.sparse_placement = "every"
    moe.sparse_every = 4
    moe.extra_dense_ffn = True
    config.model.ffn_activation = "gated-gelu"
    config.loss.aux_coef = 1e-2
    config.loss.z_coef = 1e-3


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The ST-MoE config `variant`: one of `VARIANTS`, optionally '-E' for E experts ('l-64')."""
    name, num_experts = split_variant(variant, VARIANTS)
    config = default_config()
    set_st_moe_routing(config)
    if name == "tiny":
        set_tiny(config, kind="encoder_decoder")
        config.model.num_encoder_layers = 4
        config.model.num_decoder_layers = 4
        config.moe.num_experts = 8
    else:
        d_model, d_ff, num_heads, head_dim, num_layers, experts, z_coef = SIZES[name]
        set_t5_size(
            config,
            d_model=d_model,
            d_ff=d_ff,
            num_heads=num_heads,
            num_layers=num_layers,
            head_dim=head_dim,
        )
        config.model.tie_embeddings = False
        config.moe.num_experts = experts
        config.moe.group_size = 4096
        config.loss.z_coef = z_coef
        set_t5_pretraining(config)
        if name in FSDP_VARIANTS:
            set_fsdp(config)
    if num_experts is not None:
        config.moe.num_experts = num_experts
    return config
