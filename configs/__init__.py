"""Pieces shared by the config families: T5 sizes, paper training recipes, the tiny CPU recipe.

Each `configs/<family>.py` exposes `get_config(variant: str)`, starting from
`moe_jax.config.default_config()`. Load them from the repository root (as the Makefile and
`python -m moe_jax.train --config=configs/switch.py:tiny` do), so that `configs` is importable.
"""

import difflib

import ml_collections

T5_VOCAB_SIZE = 32128  # T5's 32000 SentencePiece ids + 100 sentinels, rounded up to 128 (T5X)
TINY_VOCAB_SIZE = 384  # 259 byte ids (moe_jax.data) + 125 span sentinels, a multiple of 128


def check_variant(variant: str, known: tuple[str, ...], suffix: str = "") -> None:
    """Raises ValueError when `variant` is not one of `known`, naming the closest one; `suffix`
    is said after the list (split_variant's '-E')."""
    if variant in known:
        return
    matches = difflib.get_close_matches(variant, known, n=1)
    hint = f"did you mean {matches[0]!r}? " if matches else ""
    raise ValueError(
        f"unknown variant {variant!r}; {hint}the variants are {', '.join(known)}{suffix}."
    )


def split_variant(variant: str, known: tuple[str, ...]) -> tuple[str, int | None]:
    """'base-16' -> ('base', 16); 'base' -> ('base', None); a known name with a hyphen
    ('stdlib-best') -> (name, None); 'stdlib-best-16' -> ('stdlib-best', 16). Raises ValueError
    on unknown names."""
    if variant in known:
        return variant, None
    name, sep, experts = variant.rpartition("-")
    if name not in known:
        name, sep, experts = variant.partition("-")
    check_variant(name, known, suffix=" (optionally '-E' for E experts, e.g. 'base-16')")
    if not sep:
        return name, None
    if not experts.isdigit() or int(experts) < 1:
        raise ValueError(
            f"variant {variant!r}: the part after '-' must be an expert count >= 1, "
            f"e.g. '{name}-16'."
        )
    return name, int(experts)


def set_t5_size(
    config: ml_collections.ConfigDict,
    *,
    d_model: int,
    d_ff: int,
    num_heads: int,
    num_layers: int,
    head_dim: int = 64,
) -> None:
    """A T5 v1.1-style encoder-decoder with `num_layers` in each stack, T5's 32128 vocabulary."""
    model = config.model
    model.kind = "encoder_decoder"
    model.vocab_size = T5_VOCAB_SIZE
    model.d_model = d_model
    model.d_ff = d_ff
    model.num_heads = num_heads
    model.head_dim = head_dim
    model.num_encoder_layers = num_layers
    model.num_decoder_layers = num_layers
    model.relative_attention_num_buckets = 32
    model.relative_attention_max_distance = 128


def set_t5_pretraining(config: ml_collections.ConfigDict) -> None:
    """T5/Switch/ST-MoE pre-training recipe on span corruption.

    Adafactor with `lr = 0.01` for 10k steps, then `0.01 * sqrt(10k / step)`: T5's
    `1 / sqrt(max(step, 10k))` (Raffel et al. 2020, Sec. 3.1.2; T5X MoE pretrain.gin:
    'constant * rsqrt_decay', warmup 10k), here with a linear warmup. Inputs of 512 tokens
    (targets of 114 follow from 15% noise, mean span 3); 128 sequences per batch (T5's 2^16
    tokens; T5X's default batch). No dropout in pre-training; bfloat16 compute, float32 params.
    """
    model, train = config.model, config.train
    model.dropout_rate = 0.0
    model.dtype = "bfloat16"
    model.param_dtype = "float32"
    model.scan_layers = True
    train.optimizer = "adafactor"
    train.schedule = "rsqrt"
    train.learning_rate = 0.01
    train.warmup_steps = 10_000
    train.num_steps = 524_288  # T5's 2^19 pre-training steps
    train.batch_size = 128
    train.seq_len = 512
    train.weight_decay = 0.0
    train.grad_clip_norm = 0.0  # Adafactor clips its own updates (at 1.0)
    train.checkpoint_every = 5000
    train.eval_every = 5000
    train.log_every = 100
    config.data.name = "tfds:c4"
    config.data.noise_density = 0.15
    config.data.mean_noise_span_length = 3.0
    config.data.inputs_length = 512


def set_fsdp(config: ml_collections.ConfigDict) -> None:
    """FSDP (ZeRO-3): every weight's embedding dim (logical 'embed') splits over the batch's mesh
    axes ('data' and 'expert'; an expert weight's over 'data', its expert dim taking 'expert'),
    so parameters and optimizer state are sharded over all data-parallel devices. XLA
    all-gathers each weight where it is used and reduce-scatters its gradient; activations keep
    their embedding dim whole (`activation_embed`, `moe_jax.mesh`)."""
    config.mesh.rules.embed = ("data", "expert")


def set_tiny(config: ml_collections.ConfigDict, *, kind: str) -> None:
    """A model that trains on 2 CPU cores in minutes: d_model 128, 4 heads, seq 128, batch 16.

    AdamW at 3e-3 with a short warmup and cosine decay (the papers' Adafactor at 0.01 is tuned
    for 10k-step warmups); the byte-level synthetic corpus with `vocab_size` 384.
    """
    model, train = config.model, config.train
    model.kind = kind
    model.vocab_size = TINY_VOCAB_SIZE
    model.d_model = 128
    model.num_heads = 4
    model.head_dim = 32
    model.d_ff = 512
    model.num_layers = 4
    model.num_encoder_layers = 2
    model.num_decoder_layers = 2
    model.relative_attention_num_buckets = 32
    model.relative_attention_max_distance = 128
    model.dropout_rate = 0.0
    model.dtype = "float32"
    model.param_dtype = "float32"
    config.moe.group_size = 128  # one sequence per routing group
    train.optimizer = "adamw"
    train.learning_rate = 3e-3
    train.schedule = "cosine"
    train.warmup_steps = 50
    train.num_steps = 600
    train.batch_size = 16
    train.seq_len = 128
    train.weight_decay = 0.0
    train.grad_clip_norm = 1.0
    train.checkpoint_every = 200
    train.eval_every = 200
    train.log_every = 20
    config.data.name = "synthetic"
    config.data.inputs_length = 0


def set_small(config: ml_collections.ConfigDict, *, kind: str) -> None:
    """`set_tiny` scaled up until matmuls dominate a CPU step (issue 14's throughput model).

    d_model 512, 8 heads of 64, d_ff 2048, 8 layers, sequences of 512 in batches of 8 (4096
    tokens a step), one sequence per routing group; the tiny recipe's corpus and optimizer.
    """
    set_tiny(config, kind=kind)
    model = config.model
    model.d_model, model.num_heads, model.head_dim, model.d_ff = 512, 8, 64, 2048
    model.num_layers = 8
    config.moe.group_size = 512
    config.train.batch_size, config.train.seq_len = 8, 512


def set_rope_decoder(
    config: ml_collections.ConfigDict,
    *,
    vocab_size: int,
    d_model: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    expert_d_ff: int,
    rope_theta: float,
    norm_epsilon: float,
    qk_norm: bool,
) -> None:
    """A Llama-style MoE decoder as Mixtral and OLMoE use it: `model.kind = 'rope_decoder'`,
    SwiGLU experts in every layer (no dense FFN), untied logits, softmax tokens-choose routing
    with no capacity (dropless) and no router jitter. The caller sets `moe.{num_experts, k,
    normalize}` and the loss coefficients.
    """
    model, moe = config.model, config.moe
    model.kind = "rope_decoder"
    model.vocab_size = vocab_size
    model.d_model = d_model
    model.num_layers = num_layers
    model.num_heads = num_heads
    model.num_kv_heads = num_kv_heads
    model.head_dim = head_dim
    model.d_ff = expert_d_ff
    model.ffn_activation = "swiglu"
    model.rope_theta = rope_theta
    model.norm_epsilon = norm_epsilon
    model.qk_norm = qk_norm
    model.tie_embeddings = False
    model.dropout_rate = 0.0
    moe.router = "tokens_choose"
    moe.activation = "swiglu"
    moe.d_ff = expert_d_ff
    moe.backend = "dropless"
    moe.router_jitter = 0.0
    moe.sparse_placement = "every"
    moe.sparse_every = 1
    moe.extra_dense_ffn = False
    moe.num_shared_experts = 0


def set_rope_decoder_scale(config: ml_collections.ConfigDict, *, seq_len: int) -> None:
    """Paper-size rope_decoder settings: bfloat16 compute, scanned layers, routing groups of 4096
    tokens, `seq_len`-token sequences of C4. Optimizer settings stay the codebase defaults."""
    config.model.dtype = "bfloat16"
    config.model.scan_layers = True
    config.moe.group_size = 4096
    config.train.seq_len = seq_len
    config.data.name = "tfds:c4"
