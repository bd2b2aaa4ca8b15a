"""WideNet (Xue et al., AAAI 2022, "Go Wider Instead of Deeper"): one attention block and one
MoE FFN shared by every layer, each layer with its own norms (`model.share_layers`).

    python -m moe_jax.train --config=configs/widenet.py:tiny --workdir=runs/widenet_tiny
    python -m moe_jax.train --config=configs/widenet.py:tiny --config.model.share_layers=False \\
        --workdir=runs/widenet_tiny_unshared   # the same active FLOPs, L sets of weights

`nlp_16e` is the paper's largest NLP WideNet: ALBERT-base's shared layer (12 layers, hidden 768,
12 heads, FFN 3072, GELU) with its FFN replaced by 16 experts, 83M parameters in the paper's
NLP table (next to ALBERT-base 12M; 4 and 8 experts: 26M and 45M). Readings:
- The paper's model is ALBERT's encoder with a factorised 30000 x 128 embedding and a 128 -> 768
  projection (3.9M parameters); moe_jax has no encoder-only model or factorised embedding, so
  this is a decoder-only LM with the same shared layer and a plain tied 30000 x 768 embedding.
  tests/test_configs.py checks the count without embeddings plus ALBERT's 3.9M embedding
  against 83M; the rest (biases, BERT's pooler and MLM head, ~1.2M) moe_jax's layers do not
  have.
- Top-2 routing (`moe.k=2`) and every FFN sparse, as WideNet replaces every (shared) FFN.
`tiny`: `configs/switch.py:tiny`'s decoder-only LM (4 layers, d_model 128) with every layer
sharing one attention and one 8-expert top-2 MoE.
"""

import ml_collections

from configs import check_variant, set_tiny
from moe_jax.config import default_config

VARIANTS = ("nlp_16e", "tiny")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The WideNet config `variant` (one of `VARIANTS`)."""
    check_variant(variant, VARIANTS)
    config = default_config()
    model, moe = config.model, config.moe
    model.share_layers = True
    moe.sparse_placement = "every"
    moe.sparse_every = 1
    moe.k = 2
    if variant == "tiny":
        set_tiny(config, kind="decoder")
        model.ffn_activation = "gated-gelu"
        moe.num_experts = 8
        return config
    model.kind = "decoder"
    model.vocab_size = 30_000
    model.d_model = 768
    model.num_heads = 12
    model.head_dim = 64
    model.d_ff = 3072
    model.num_layers = 12
    model.ffn_activation = "gelu"
    model.tie_embeddings = True
    moe.num_experts = 16
    return config
