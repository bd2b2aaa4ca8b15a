"""Dense T5 baselines of the Switch Transformer paper, and a tiny dense LM.

    python -m moe_jax.train --config=configs/dense.py:tiny --workdir=runs/dense_tiny

Variants as configured (Fedus et al. 2022, Switch Transformer, Table 9; d_kv 64; the layer
count is per stack, encoder and decoder alike):

| variant  | params (paper) | d_model | d_ff         | heads | layers | FFN             |
|----------|----------------|---------|--------------|-------|--------|-----------------|
| t5_base  | 223M           | 768     | 2048         | 12    | 12     | GEGLU           |
| t5_large | 739M           | 1024    | 4096 (*)     | 16    | 24     | ReLU (*)        |
| t5_xxl   | 11B            | 4096    | 10240        | 64    | 24     | GEGLU           |

Readings that reproduce the printed parameter counts:
- Table 9's 223M for T5-Base matches only with the input embedding reused for the output
  logits (tied: 223M; an untied T5 v1.1 logits kernel adds another 32128 x 768 = 25M), so these
  configs tie the embeddings, like Switch's T5X config (switch_base.gin re-uses the embedder).
- (*) T5-Large: Table 9 prints GEGLU with d_ff 2816, which gives 750M, not 739M; the original
  T5-Large FFN (ReLU, d_ff 4096; also T5X's switch_large.gin: MLP_DIM 4096 with ReLU) gives
  738M, so we follow it.
  (For Base the two readings, GEGLU 2048 and T5X's ReLU 3072, have the same count.)
Training: T5's Adafactor/rsqrt recipe (`configs.set_t5_pretraining`).

`tiny` is the dense counterpart of `configs/switch.py:tiny`: the same decoder-only LM (4 layers,
d_model 128, d_ff 512) with every FFN dense, so the two compare directly.

`small` (d_model 512, 8 heads, d_ff 2048, 8 layers, seq 512, batch 8) is the throughput model
of `experiments/benchmark_train.py`: large enough that matmuls dominate a CPU step.
"""

import ml_collections

from configs import check_variant, set_small, set_t5_pretraining, set_t5_size, set_tiny
from moe_jax.config import default_config

# name: (d_model, d_ff, num_heads, layers per stack, FFN activation), Switch Transformer Table 9
SIZES = {
    "t5_base": (768, 2048, 12, 12, "gated-gelu"),
    "t5_large": (1024, 4096, 16, 24, "relu"),
    "t5_xxl": (4096, 10240, 64, 24, "gated-gelu"),
}
VARIANTS = (*SIZES, "tiny", "small")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The dense config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    config.moe.num_experts = 0
    config.loss.aux_coef = 0.0
    config.loss.z_coef = 0.0
    if variant in ("tiny", "small"):
        (set_tiny if variant == "tiny" else set_small)(config, kind="decoder")
        config.model.ffn_activation = "gated-gelu"
        return config
    d_model, d_ff, num_heads, num_layers, activation = SIZES[variant]
    set_t5_size(config, d_model=d_model, d_ff=d_ff, num_heads=num_heads, num_layers=num_layers)
    config.model.ffn_activation = activation
    config.model.tie_embeddings = True
    set_t5_pretraining(config)
    return config
