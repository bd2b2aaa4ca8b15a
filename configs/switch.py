"""Switch Transformer (Fedus, Zoph, Shazeer; JMLR 2022): top-1 routing, encoder-decoder.

    python -m moe_jax.train --config=configs/switch.py:tiny --workdir=runs/switch_tiny
    python -m moe_jax.train --config=configs/switch.py:base --config.moe.num_experts=16 ...
    python -m moe_jax.train --config=configs/switch.py:base-16 ...   # the same

Sizes as configured (Table 9; d_kv 64; experts at every other FFN of both stacks, every FFN in
Switch-C; the layer count is per stack):

| variant | params (paper) | d_model | d_ff      | heads | layers | experts | FFN       |
|---------|----------------|---------|-----------|-------|--------|---------|-----------|
| base    | 7B (7.4B, T.7) | 768     | 2048      | 12    | 12     | 128     | GEGLU     |
| large   | 26B            | 1024    | 4096 (**) | 16    | 24     | 128     | ReLU (**) |
| xxl     | 395B           | 4096    | 10240     | 64    | 24     | 128 (*) | GEGLU     |
| c       | 1571B          | 2080    | 6144      | 32    | 15     | 2048    | ReLU      |

Readings where the paper is inconsistent:
- (*) Switch-XXL: Table 9 prints 64 experts, but its 395B parameters need 128 (64 give 201B);
  T5X's switch_xxl.gin also uses 128. We follow 128.
- (**) Switch-Large: Table 9 prints GEGLU with d_ff 2816, which gives 27.1B (and T5-Large 750M,
  not 739M); a ReLU FFN of d_ff 4096 (the original T5-Large FFN; T5X's switch_large.gin)
  gives 26.3B and 738M, so we follow ReLU 4096. (For Base, GEGLU 2048 and T5X's ReLU 3072
  count the same.)
- Embeddings are tied (the logits reuse the input embedding), as Table 9's T5-Base 223M requires
  (see configs/dense.py) and as T5X's switch_base.gin does.
- Switch-C's 32 heads x 64 = 2048 is narrower than its d_model 2080; that is what Table 9 prints.
Training (Sec. 2 and 3, T5X switch gins): router `p = softmax(W_r x)`, top-1, float32 router;
train/eval capacity factors 1.25 / 2.0 (Table 1 and T5X); load-balancing coefficient 1e-2
(Sec. 2.2); no router z-loss (it came later, ST-MoE); multiplicative router input jitter 1e-2
(Table 11; T5X drops it); router init scale 0.1 (Sec. 2.3, Table 3); groups of 8192 tokens
(base), 4096 (large, xxl), 2048 (c) as in T5X; T5's Adafactor/rsqrt recipe. Table 7 gives
Switch-Base with 16/32/64/128/256 experts: 1.1B / 2.0B / 3.8B / 7.4B / 14.7B.

`tiny`: a decoder-only LM, 4 layers of d_model 128 with 8 top-1 experts at every other FFN,
byte-level synthetic corpus, AdamW; a few minutes on 2 CPU cores. `make run` trains it on the
bundled tiny Shakespeare text instead (`--config.data.name=tiny_shakespeare`), so that the text
it generates reads as text.
`--config.model.kind=encoder_decoder` turns it into a 2 + 2 layer encoder-decoder.

`stdlib` is the model of experiments/RESULTS.md (m), the smallest Switch we found to beat its
dense baseline on this CPU: `tiny` at d_model 64 (2 heads of 32, d_ff 256) on the Python
standard library corpus (`data.name=python_stdlib`) for 2000 steps (100 warmup, cosine), eval of
8 batches every 500. Its routing is Switch's as it stands (top-1, CF 1.25 / 2.0, balancing
1e-2, jitter 1e-2, router init 0.1x, every other FFN sparse); the departures of `tiny` (AdamW
and a cosine schedule instead of Adafactor/rsqrt, groups of one 128-token sequence instead of
2048-8192 tokens) stay. The dense baseline of equal active FLOPs is
`--config.moe.num_experts=0`; the dense model of equal total parameters is
`--config.moe.num_experts=1 --config.moe.d_ff=2048` (each sparse FFN one 2048-wide expert, as
wide as the 8 experts together, whose router always gives it weight 1: a dense FFN);
`stdlib-32` has 32 experts. About 10-13 min a run on 2 cores. The study's largest gain departs
from the paper (one learning rate for every weight) and is left as an option:
`--config.train.router_learning_rate_scale=10` beat dense by 0.033 nats instead of 0.014.

`stdlib-best` is the recipe of experiments/RESULTS.md (n): `stdlib` routed top-2 of its 8
experts, dropless, with the two router weights renormalised to sum to 1 (the small-scale study
of arXiv 2605.13769 routes top-2 of 4 experts). It closes 75% +- 5 of the gap from the
active-matched dense model to the dense model of equal total parameters (3 seeds, 2000 steps),
where `stdlib` closes 15% +- 11. It departs from Switch (top-1, capacity 1.25): a token's FFN
FLOPs in a sparse layer double, and no token is dropped. `stdlib-best-4` has 4 experts (53% +- 4).

`small` (d_model 512, 8 heads, d_ff 2048, 8 layers, seq 512, batch 8) is the throughput model
of `experiments/benchmark_train.py`: large enough that matmuls dominate a CPU step.
"""

import ml_collections

from configs import set_fsdp, set_small, set_t5_pretraining, set_t5_size, set_tiny, split_variant
from moe_jax.config import default_config

# name: (d_model, d_ff, num_heads, layers per stack, experts, sparse_every, activation, group)
SIZES = {
    "base": (768, 2048, 12, 12, 128, 2, "gated-gelu", 8192),
    "large": (1024, 4096, 16, 24, 128, 2, "relu", 4096),
    "xxl": (4096, 10240, 64, 24, 128, 2, "gated-gelu", 4096),
    "c": (2080, 6144, 32, 15, 2048, 1, "relu", 2048),
}
VARIANTS = (*SIZES, "tiny", "stdlib", "stdlib-best", "small")
FSDP_VARIANTS = ("large", "xxl", "c")  # 26B and up: FSDP (`configs.set_fsdp`); base's 7B fit


def set_switch_routing(config: ml_collections.ConfigDict) -> None:
    """Switch's router and losses (Sec. 2.2-2.4, Tables 1, 3, 11)."""
    moe = config.moe
    moe.router = "tokens_choose"
    moe.k = 1
    moe.normalize = "none"
    moe.batch_prioritized = False
    moe.capacity_factor_train = 1.25
    moe.capacity_factor_eval = 2.0
    moe.router_jitter = 0.01
    moe.router_init_scale = 0.1
    moe.sparse_placement = "every"
    moe.extra_dense_ffn = False
    config.loss.aux_coef = 1e-2
    config.loss.z_coef = 0.0


def set_stdlib_study(config: ml_collections.ConfigDict) -> None:
    """`tiny` made into the model of experiments/RESULTS.md (m) (see the module docstring)."""
    model, train = config.model, config.train
    model.d_model = 64
    model.num_heads = 2
    model.d_ff = 256
    config.data.name = "python_stdlib"
    train.num_steps = 2000
    train.warmup_steps = 100
    train.eval_every = 500
    train.eval_steps = 8
    train.checkpoint_every = 500
    train.log_every = 50


def set_stdlib_best(config: ml_collections.ConfigDict) -> None:
    """`stdlib` with the recipe of experiments/RESULTS.md (n): top-2 of the 8 full-width experts,
    dropless, the two weights renormalised to sum to 1 (see the module docstring)."""
    moe = config.moe
    moe.k = 2
    moe.backend = "dropless"
    moe.normalize = "topk"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    """The Switch config `variant`: one of `VARIANTS`, optionally '-E' for E experts ('base-16')."""
    name, num_experts = split_variant(variant, VARIANTS)
    config = default_config()
    set_switch_routing(config)
    if name in ("tiny", "stdlib", "stdlib-best", "small"):
        (set_small if name == "small" else set_tiny)(config, kind="decoder")
        config.model.ffn_activation = "gated-gelu"
        config.moe.num_experts = 8
        config.moe.sparse_every = 2
        if name.startswith("stdlib"):
            set_stdlib_study(config)
        if name == "stdlib-best":
            set_stdlib_best(config)
    else:
        d_model, d_ff, num_heads, num_layers, experts, every, activation, group = SIZES[name]
        set_t5_size(config, d_model=d_model, d_ff=d_ff, num_heads=num_heads, num_layers=num_layers)
        config.model.ffn_activation = activation
        config.model.tie_embeddings = True
        config.moe.num_experts = experts
        config.moe.sparse_every = every
        config.moe.group_size = group
        set_t5_pretraining(config)
        if name in FSDP_VARIANTS:
            set_fsdp(config)
    if num_experts is not None:
        config.moe.num_experts = num_experts
    return config
