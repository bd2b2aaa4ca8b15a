"""GLaM (Du et al. 2022): decoder-only LM, 64 experts at every other FFN, GShard top-2 gating.

    python -m moe_jax.train --config=configs/glam.py:tiny --workdir=runs/glam_tiny

Sizes (GLaM Table 4; head dim 64 for 0.1B, 128 otherwise):

| variant  | total (paper) | activated (paper) | layers | d_model | d_ff  | heads |
|----------|---------------|-------------------|--------|---------|-------|-------|
| 0.1b_64e | 1.9B          | 145M              | 12     | 768     | 3072  | 12    |
| 1.7b_64e | 27B           | 1.878B            | 24     | 2048    | 8192  | 16    |
| 8b_64e   | 143B          | 9.8B              | 32     | 4096    | 16384 | 32    |
| 64b_64e  | 1.2T          | 96.6B             | 64     | 8192    | 32768 | 128   |

Readings where the paper leaves room:
- GLaM gates the dense FFNs with GEGLU (Sec. 4: "in the non-MoE Transformer feed-forward
  sub-layers"); experts with three matrices would put 0.1B/64E at 2.8B, not 1.9B, so experts are
  plain two-matrix GELU FFNs (`moe.activation = 'gelu'`).
- Table 4's totals match without the 256K-row embedding table (0.1B/64E: 1.88B without it, 2.08B
  with it), so `count_params(config, include_embeddings=False)` is the figure to compare; the
  activated counts of the paper do not follow one rule (see configs/README.md).
- 64B/64E: 128 heads of 128 (attention width 16384 = 2 x d_model), as Table 4 prints.
- The input embedding is reused for the logits (tied); the relative position bias is one table
  per stack (GLaM's is per layer: a few thousand parameters).
Training (Sec. 4-5): top-2 GShard gating with random second-expert routing, capacity factor 2.0
(counting both choices), auxiliary loss 1e-2, no router z-loss, no jitter; sequences of 1024,
about 1M tokens per batch (1024 sequences); Adafactor, learning rate 0.01 for 10k steps then
inverse square root decay; vocabulary 256K SentencePiece; dropout 0; routing groups of one
sequence (1024 tokens; the paper does not state a group size).
Slot order: GShard's Algorithm 1 places every first choice of a group before any second choice,
which in this decoder lets later tokens decide whether a token keeps its second expert. The
config keeps moe_jax's causal default (`moe.fill_order=''`, token by token in a causal stack);
`--config.moe.fill_order=choice` is the paper's order, leak included.

`tiny`: 4 layers, d_model 128, 8 experts at every other FFN, GShard top-2, AdamW.
"""

import ml_collections

from configs import check_variant, set_fsdp, set_tiny
from moe_jax.config import default_config

GLAM_VOCAB_SIZE = 256_000  # "256K" SentencePiece vocabulary (Sec. 5)

# name: (num_layers, d_model, d_ff, num_heads, head_dim), GLaM Table 4; every size has 64 experts
SIZES = {
    "0.1b_64e": (12, 768, 3072, 12, 64),
    "1.7b_64e": (24, 2048, 8192, 16, 128),
    "8b_64e": (32, 4096, 16384, 32, 128),
    "64b_64e": (64, 8192, 32768, 128, 128),
}
VARIANTS = (*SIZES, "tiny")
# FSDP (`configs.set_fsdp`) where the float32 parameters and Adafactor's state of the experts a
# device holds do not fit one chip's HBM (27B and up; 0.1B/64E's 1.9B fit replicated)
FSDP_VARIANTS = ("1.7b_64e", "8b_64e", "64b_64e")


def set_glam_routing(config: ml_collections.ConfigDict) -> None:
    """GLaM's gating (GShard Algorithm 1), losses and sparse-layer layout."""
    moe = config.moe
    moe.router = "gshard_top2"
    moe.k = 2
    moe.second_policy = "random"
    moe.second_threshold = 0.5
    moe.fill_order = ""  # causal in this decoder; 'choice' is Algorithm 1's order (see above)
    moe.capacity_factor_train = 2.0
    moe.capacity_factor_eval = 2.0
    moe.router_jitter = 0.0
    moe.sparse_placement = "every"
    moe.sparse_every = 2
    moe.extra_dense_ffn = False
    moe.activation = "gelu"
    config.model.ffn_activation = "gated-gelu"
    config.model.tie_embeddings = True
    config.loss.aux_coef = 1e-2
    config.loss.z_coef = 0.0


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The GLaM config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    set_glam_routing(config)
    if variant == "tiny":
        set_tiny(config, kind="decoder")
        config.moe.num_experts = 8
        return config
    num_layers, d_model, d_ff, num_heads, head_dim = SIZES[variant]
    model, train = config.model, config.train
    model.kind = "decoder"
    model.vocab_size = GLAM_VOCAB_SIZE
    model.num_layers = num_layers
    model.d_model = d_model
    model.d_ff = d_ff
    model.num_heads = num_heads
    model.head_dim = head_dim
    model.dropout_rate = 0.0
    model.dtype = "bfloat16"
    model.scan_layers = True
    config.moe.num_experts = 64
    config.moe.group_size = 1024
    train.optimizer = "adafactor"
    train.schedule = "rsqrt"
    train.learning_rate = 0.01
    train.warmup_steps = 10_000
    train.batch_size = 1024
    train.seq_len = 1024
    train.grad_clip_norm = 0.0
    train.weight_decay = 0.0
    config.data.name = "tfds:c4"
    if variant in FSDP_VARIANTS:
        set_fsdp(config)
    return config
