"""The default configuration every family in `configs/` starts from.

One `ml_collections.ConfigDict` holds the model, MoE, loss, training, mesh and data settings.
`configs/*.py` override it per paper and variant; the command line overrides it again with
`--config.moe.num_experts=16`. Keys are locked, so a misspelt override fails loudly;
`check_config_overrides` names it with close matches before anything starts (the trainer's and
the sweep's command lines; it imports no JAX).
"""

import difflib
import importlib.util
import os
import sys
from pathlib import Path

import ml_collections

# Decoder-only model kinds: 'decoder' (T5-style: relative position bias; GLaM) and
# 'rope_decoder' (Llama-style: rotary positions, grouped-query attention; Mixtral, OLMoE, Qwen).
DECODER_KINDS = ("decoder", "rope_decoder")
KINDS = (*DECODER_KINDS, "encoder_decoder")
EVAL_FULL_PASS = -1  # train.eval_steps that evaluates on the whole validation split, once
REPOSITORY = Path(__file__).resolve().parents[1]  # a clone's root, which holds configs/


def default_config() -> ml_collections.ConfigDict:
    """A small decoder-only Switch model; `configs/` change what they need."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict(
        {
            # 'decoder' (GLaM-style LM) | 'rope_decoder' (Mixtral/OLMoE-style LM) |
            # 'encoder_decoder' (T5 v1.1)
            "kind": "decoder",
            "vocab_size": 384,  # 256 bytes + 3 specials (data.py) + span-corruption sentinels
            "d_model": 128,
            "num_heads": 4,
            "head_dim": 32,
            "d_ff": 512,  # hidden width of the dense FFNs
            "num_layers": 4,  # decoder-only depth
            "num_encoder_layers": 4,  # encoder-decoder depths
            "num_decoder_layers": 4,
            # relu | gelu | gated-gelu | swiglu | swiglu_clamped (gpt-oss; moe.swiglu_limit)
            "ffn_activation": "gated-gelu",
            "dropout_rate": 0.0,
            "tie_embeddings": False,
            "norm_epsilon": 1e-6,  # RMSNorm's epsilon (T5 1e-6; Mixtral, OLMoE 1e-5)
            # rope_decoder only: rotary base, key/value heads (0: num_heads), q/k RMSNorm over the
            # whole projection (OLMoE) or, with qk_norm_per_head, over each head's features (Qwen3)
            "rope_theta": 10_000.0,
            "num_kv_heads": 0,
            "qk_norm": False,
            "qk_norm_per_head": False,
            "qkv_bias": False,  # rope_decoder: biases on the q, k, v projections (Qwen2-MoE)
            "attention_out_bias": False,  # rope_decoder: a bias on the output projection
            # rope_decoder: a learned logit per query head that joins each softmax's denominator
            # and takes no value (attention sinks, gpt-oss)
            "attention_sinks": False,
            # rope_decoder: > 0 makes layers attend only to the last `sliding_window` positions
            # (their own included); with full_attention_every = n > 0, layer i attends to every
            # position where i % n == n - 1 (gpt-oss 2: sliding and full alternate), with 0 every
            # layer slides (Mixtral's sliding_window)
            "sliding_window": 0,
            "full_attention_every": 0,
            # rope_decoder: 'default' RoPE or 'yarn' (YaRN, Peng et al. 2023; gpt-oss, Qwen3's
            # long context, DeepSeek-V3; moe_jax.rope). YaRN divides by rope_factor the inverse
            # frequencies of the pairs that turn fewer than rope_beta_slow times over the
            # pretraining context rope_original_max_positions, keeps those that turn more than
            # rope_beta_fast times, and ramps linearly between (the ramp's ends rounded out to
            # whole pairs with rope_truncate; gpt-oss turns it off)
            "rope_type": "default",
            "rope_factor": 1.0,
            "rope_original_max_positions": 0,
            "rope_beta_fast": 32.0,
            "rope_beta_slow": 1.0,
            "rope_truncate": True,
            # YaRN multiplies cos and sin by rope_attention_factor; 0: 0.1 ln(rope_factor) + 1,
            # or, with DeepSeek's rope_mscale and rope_mscale_all_dim both nonzero, the ratio of
            # 0.1 m ln(rope_factor) + 1 at m = rope_mscale to that at m = rope_mscale_all_dim
            "rope_attention_factor": 0.0,
            "rope_mscale": 0.0,
            "rope_mscale_all_dim": 0.0,
            # rope_decoder: 'gqa' (grouped-query attention, head_dim per head) | 'mla' (DeepSeek's
            # multi-head latent attention, moe_jax.latent_attention; head_dim unused): keys and
            # values up-projected from a normed latent of kv_lora_rank features per token, plus
            # one rotary key of qk_rope_head_dim features shared by the heads (the cache holds
            # these kv_lora_rank + qk_rope_head_dim numbers per token and layer); each head's
            # query and key have qk_nope_head_dim position-free features and qk_rope_head_dim
            # rotary ones, its value v_head_dim; q_lora_rank > 0 projects the queries through a
            # normed latent of that width too (DeepSeek-V3; 0: directly, DeepSeek-V2-Lite)
            "attention": "gqa",
            "q_lora_rank": 0,
            "kv_lora_rank": 64,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 32,
            "v_head_dim": 32,
            "relative_attention_num_buckets": 32,
            "relative_attention_max_distance": 128,
            # Hugging Face model_type that moe_jax.hf.save writes ('' until loaded or set)
            "hf_model_type": "",
            "dtype": "float32",  # compute dtype: float32 | bfloat16 (routers stay float32)
            "param_dtype": "float32",
            # WideNet: one attention and one FFN (MoE) shared by all layers of a stack, each
            # layer with its own norms (Xue et al. 2022)
            "share_layers": False,
            "scan_layers": False,
            "remat": "none",  # none | full | save_dots | save_routing (stack.REMAT_POLICIES)
        }
    )

    config.moe = ml_collections.ConfigDict(
        {
            "num_experts": 8,  # 0 makes every FFN dense
            "k": 1,  # experts per token (tokens-choose routers)
            # tokens_choose | gshard_top2 | experts_choose | hash | noisy_top_k | aux_free |
            # soft_moe | base_layer | sinkhorn | remoe | cosine | forced_balanced
            # (moe_jax.routers); experts_choose and soft_moe are for encoders only
            "router": "tokens_choose",
            # router of causal (decoder) stacks; '' means `router`. Expert Choice sees future
            # tokens, so an encoder-decoder with router='experts_choose' sets this, e.g. to
            # 'tokens_choose'.
            "decoder_router": "",
            "d_ff": 0,  # expert hidden width; 0 means model.d_ff
            "activation": "",  # expert activation; '' means model.ffn_activation
            # swiglu_clamped (gpt-oss), in experts and dense FFNs alike: gate clipped from above
            # and up to [-limit, limit], out = (up + 1) * gate * sigmoid(alpha * gate)
            "swiglu_limit": 7.0,
            "swiglu_alpha": 1.702,
            "capacity_factor_train": 1.25,
            "capacity_factor_eval": 2.0,
            "min_capacity": 4,
            # > 0: exactly this many slots per expert per group, in training and evaluation,
            # instead of the capacity factors (Hugging Face Switch's `expert_capacity`); the
            # soft_moe router's slots per expert (0: from group_size and capacity_factor_train)
            "expert_capacity": 0,
            "group_size": 1024,  # tokens per routing group; 0: each sequence is one group
            "backend": "einsum",  # einsum | gather | dropless
            "batch_prioritized": False,
            # order in which a group's k * T choices take capacity slots: 'choice' (GShard,
            # T5X: every first choice before any second) or 'token' (each token's k choices
            # together, in position order). '' picks 'token' in causal stacks, where 'choice'
            # lets later tokens decide whether a token keeps its second expert (for k >= 2 with
            # capacity), and 'choice' in encoders. Set 'choice' in a decoder only to match a
            # paper's code and accept that leak. k = 1 and dropless routing fill alike.
            "fill_order": "",
            # none | topk, for tokens_choose and noisy_top_k; aux_free always renormalises its
            # k affinities (DeepSeek-V3)
            "normalize": "none",
            # DeepSeek group-limited routing (moe_jax.group_routing) for tokens_choose,
            # noisy_top_k, cosine and aux_free: the experts split into num_groups groups of
            # consecutive experts (1: no limit), each token picks its k experts within its
            # topk_groups best groups, a group scored by its best probability (tokens_choose:
            # DeepSeek-V2's group_limited_greedy) or by the sum of its two best biased affinities
            # (aux_free: DeepSeek-V3's n_group / topk_group)
            "num_groups": 1,
            "topk_groups": 1,
            # > 0: each token's experts lie on at most this many shards of the expert mesh axis
            # (DeepSeek-V2's device-limited routing, M): the group limit with the shards as
            # groups, scored by their best expert; 0 (or a mesh with no more expert shards):
            # off. Not with num_groups > 1
            "max_expert_shards": 0,
            # multiplies the combine weights of the routers above after normalisation
            # (DeepSeek's routed_scaling_factor; 2.5 in DeepSeek-V3)
            "routed_scaling": 1.0,
            "second_policy": "random",  # gshard_top2: random | all | sampling
            "second_threshold": 0.5,
            "router_jitter": 0.01,  # multiplicative input jitter eps in training (Switch)
            "router_init_scale": 0.1,  # Switch's truncated-normal scale sqrt(scale / fan_in)
            # a learned bias f32[E] (zeros at init) added to the logits x @ kernel (gpt-oss)
            "router_bias": False,
            "expert_dropout": 0.0,
            # scale of the experts' truncated-normal fan-in init (1.0 usual; Switch, Sec. 2.3,
            # draws every weight at 0.1)
            "expert_init_scale": 1.0,
            # biases on the experts' projections, bi (, bi_gate): [E, H] and bo: [E, M], zeros
            # at init (gpt-oss)
            "expert_bias": False,
            "num_shared_experts": 0,  # always-on dense experts (DeepSeekMoE)
            # scale the shared experts' output by sigmoid(x @ w), w: [M, 1] (Qwen2-MoE)
            "shared_expert_gate": False,
            "bias_update_rate": 0.001,  # aux_free router (DeepSeek-V3)
            "sinkhorn_iterations": 10,  # sinkhorn router (S-BASE): Sinkhorn steps in training
            # remoe router (ReMoE): the L1 coefficient's start and its factor per training step
            # toward 1 - k / E zero gates (moe.k is the target number of active experts)
            "remoe_l1_init": 1e-8,
            "remoe_l1_rate": 1.2,
            # cosine router (X-MoE): dimension of the hypersphere and the temperature's start
            "cosine_dim": 16,
            "cosine_temperature": 0.07,
            "sparse_every": 2,  # every n-th FFN is sparse (Switch/GLaM 2, ST-MoE 4, Switch-C 1)
            "sparse_placement": "every",  # every | bottom | top
            "num_sparse_layers": 0,  # for bottom | top placement
            # indices of layers whose FFN is dense wherever the placement puts experts (Qwen's
            # mlp_only_layers)
            "dense_layers": (),
            "extra_dense_ffn": False,  # ST-MoE's dense FFN beside each sparse one
        }
    )

    config.loss = ml_collections.ConfigDict(
        {
            "aux_coef": 1e-2,
            "z_coef": 1e-3,
            # where the balancing loss counts its f_e and P_e (moe_jax.losses.AUX_SCOPES): each
            # routing 'group', each 'sequence' (batch row; DeepSeek-V3), or the 'global' batch
            "aux_scope": "group",
        }
    )

    config.train = ml_collections.ConfigDict(
        {
            "num_steps": 200,
            "batch_size": 16,
            "seq_len": 128,
            "optimizer": "adamw",  # adamw | adafactor
            "learning_rate": 3e-3,
            "schedule": "cosine",  # cosine | rsqrt | constant
            # steps the schedule is laid over (the cosine's end); 0: train.num_steps of the run's
            # first start, kept when a resume raises num_steps (moe_jax.run_identity)
            "schedule_steps": 0,
            "warmup_steps": 20,
            "weight_decay": 0.0,
            "grad_clip_norm": 1.0,
            # multiplies the router weights' learning rate (moe_jax.optim)
            "router_learning_rate_scale": 1.0,
            "checkpoint_every": 100,
            "keep_checkpoints": 3,
            "eval_every": 100,
            # batches per evaluation (the first ones of the split, the same every time), or
            # -1 (EVAL_FULL_PASS): the whole validation split once (text files and TFDS)
            "eval_steps": 4,
            # evaluate with no capacity limit (no token dropped, as decoding routes) instead of
            # at moe.capacity_factor_eval; metrics.jsonl's eval lines say which (eval_dropless)
            "eval_dropless": False,
            "log_every": 10,
            # 'hf:DIR' starts from the weights of a Hugging Face checkpoint (moe_jax.hf)
            "init_from": "",
        }
    )

    # Knowledge distillation into this model (moe_jax.distill; Switch Sec. 5): loss =
    # (1 - alpha) * cross-entropy on the data + alpha * temperature**2 * cross-entropy against
    # the softmax(logits / temperature) of the frozen teacher run in eval mode
    config.distill = ml_collections.ConfigDict(
        {
            "teacher": "",  # the teacher's moe_jax.train workdir; '' trains without one
            "alpha": 0.25,  # Switch Table 6
            "temperature": 1.0,
        }
    )

    config.mesh = ml_collections.ConfigDict(
        {
            "data": -1,  # -1 takes the devices the other axes leave
            "expert": 1,
            "model": 1,
            "expert_parallelism": "shard_map",  # shard_map | gspmd
            # logical axis -> mesh axis (or None); one table for parameters and activations
            "rules": ml_collections.ConfigDict(
                {
                    "batch": ("data", "expert"),
                    "length": None,
                    # weights' embedding dim: None replicated, ("data", "expert") FSDP; typed
                    # `object` so that --config.mesh.rules.embed="('data', 'expert')" sets it
                    "embed": ml_collections.FieldReference(None, field_type=object),
                    "activation_embed": None,  # activations' embedding dim
                    "mlp": "model",
                    "heads": "model",
                    "kv": None,
                    "vocab": "model",
                    "expert": "expert",
                }
            ),
        }
    )

    config.data = ml_collections.ConfigDict(
        {
            # synthetic | tiny_shakespeare | python_stdlib | text:PATH | tfds:lm1b | tfds:c4 |
            # tfds:tiny_shakespeare
            "name": "synthetic",
            "download": False,
            "data_dir": "",  # TFDS data directory; '' uses TFDS_DATA_DIR or the TFDS default
            "noise_density": 0.15,  # T5 span corruption (encoder-decoder models)
            "mean_noise_span_length": 3.0,
            "inputs_length": 0,  # encoder length for span corruption; 0 derives it from seq_len
        }
    )
    config.lock()
    return config


def config_keys(config: ml_collections.ConfigDict, prefix: str = ""):
    """Every dotted key of `config`, sections included."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, ml_collections.ConfigDict):
            yield from config_keys(value, f"{prefix}{key}.")


def resolve_config_spec(spec: str) -> str:
    """`PATH[:VARIANT]` of `--config`, made usable from any directory.

    A relative PATH not found from the working directory is looked up in the repository (so
    `configs/switch.py:tiny` works anywhere in an editable install), and the folder above a
    `configs/` package goes on `sys.path` so that the file's `from configs import ...` works.
    Raises ValueError (one line) when the file is in neither place.
    """
    path, colon, variant = spec.partition(":")
    if not os.path.isfile(path) and os.path.isfile(REPOSITORY / path):
        path = str(REPOSITORY / path)
    if not os.path.isfile(path):
        places = " and ".join(dict.fromkeys([os.getcwd(), str(REPOSITORY)]))
        raise ValueError(
            f"--config={spec} names no file (looked in {places}); "
            + _config_file_hint(path, colon + variant)
        )
    folder = Path(path).resolve().parent
    if (folder / "__init__.py").is_file() and str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    return path + colon + variant


def _config_file_hint(path: str, variant: str) -> str:
    """What to pass instead of the missing config file `path`: the file of the closest name in
    the same folder (from the working directory or the repository), else the usual example."""
    folder = Path(path).parent
    names = sorted(
        {
            file.stem
            for base in (Path.cwd(), REPOSITORY)
            for file in (base / folder).glob("*.py")
            if file.name != "__init__.py"
        }
    )
    matches = difflib.get_close_matches(Path(path).stem, names, n=1, cutoff=0.6)
    if matches:
        return f"did you mean --config={folder / matches[0]}.py{variant}?"
    return "pass one of configs/*.py with a variant, e.g. --config=configs/switch.py:tiny."


def resolve_config_argv(argv: list[str]) -> list[str]:
    """`argv` with every `--config=SPEC` passed through `resolve_config_spec`."""
    return [
        "--config=" + resolve_config_spec(arg.removeprefix("--config="))
        if arg.startswith("--config=")
        else arg
        for arg in argv
    ]


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`get_config(VARIANT)` of `--config=PATH[:VARIANT]`. A ValueError of the file's
    `get_config` (an unknown variant, a checkpoint `configs/hf.py` cannot read) is raised again
    prefixed with the `--config` argument."""
    path, _, variant = resolve_config_spec(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("_moe_jax_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(variant) if variant else module.get_config()
    except ValueError as error:
        raise ValueError(f"--config={spec}: {error}") from None


def check_config_overrides(argv: list[str]) -> None:
    """Raises ValueError when the `--config` file gives no config (`load_config_file`) or a
    `--config.KEY=...` names no key of it, suggesting close matches; run before absl parses
    the flags, whose own report of a failing config file is a traceback."""
    overrides = [
        arg.removeprefix("--config.").split("=", 1)[0]
        for arg in argv[1:]
        if arg.startswith("--config.")
    ]
    specs = [arg.split("=", 1)[1] for arg in argv[1:] if arg.startswith("--config=")]
    if not specs:
        if overrides:
            raise ValueError("--config.KEY overrides need --config=PATH:VARIANT first.")
        return
    known = list(config_keys(load_config_file(specs[-1])))
    for key in overrides:
        if key not in known:
            matches = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
            hint = (
                "did you mean " + " or ".join(f"--config.{match}" for match in matches) + "?"
                if matches
                else f"the keys are listed in {specs[-1].partition(':')[0]} and moe_jax/config.py."
            )
            raise ValueError(f"--config.{key}: the config has no key {key!r}; {hint}")
