"""The `mixtral`, `olmoe`, `qwen2_moe` and `qwen3_moe` families: Llama-style MoE decoders, our
`model.kind='rope_decoder'`.

transformers' Mixtral, OLMoE, Qwen2-MoE and Qwen3-MoE (`models/{mixtral,olmoe,qwen2_moe,
qwen3_moe}/modeling_*.py`, 5.x) against moe_jax:

- Layers: pre-norm RMSNorm (`rms_norm_eps` -> `model.norm_epsilon`), self-attention with
  rotary positions (`rope_parameters.rope_theta`, or the older top-level `rope_theta`; the
  "rotate half" layout of `rope_attention.rotary_embedding`) and `num_key_value_heads` key/value
  heads, a sparse SwiGLU MoE block, a final RMSNorm and an untied `lm_head`.
  `rope_parameters` (or the legacy `rope_scaling`) with `rope_type='yarn'` is YaRN
  (`moe_jax.rope`): its `factor`, `original_max_position_embeddings`, `beta_fast`, `beta_slow`,
  `truncate`, `attention_factor`, `mscale` and `mscale_all_dim` are our `model.rope_factor`,
  `rope_original_max_positions`, ... (`_YARN_FIELDS`); we write `max_position_embeddings` as
  `factor * original_max_position_embeddings`, the ratio transformers checks.
  OLMoE adds one RMSNorm over the whole query projection and one over the key projection
  (`q_norm`, `k_norm`): our `model.qk_norm`. Qwen3-MoE's `q_norm`, `k_norm` are `[head_dim]`
  RMSNorms applied to each head alone: `model.qk_norm_per_head` as well. Logits are scaled by
  `head_dim ** -0.5`; our attention does the same, so no weight is rescaled.
- Qwen2-MoE has no q/k norm but biases on q, k and v (`qkv_bias`, our `model.qkv_bias`:
  `self_attn.q_proj.bias: [N*D]` is our `bq: [N, D]`), and beside the routed experts a shared
  SwiGLU expert `mlp.shared_expert` of `shared_expert_intermediate_size` whose output is scaled
  per token by `sigmoid(mlp.shared_expert_gate(x))` (`[1, M]`): our `moe.num_shared_experts`
  (that width divided by `moe_intermediate_size`, which must divide it) and
  `moe.shared_expert_gate`.
- Mixtral and OLMoE have experts in every layer. Qwen-MoE's layer i has experts unless
  `i in mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0` (our `moe.dense_layers` and
  `moe.sparse_every`); its other layers have a dense SwiGLU `mlp.{gate,up,down}_proj` of
  `intermediate_size` (our `model.d_ff`), its experts `moe_intermediate_size` (`moe.d_ff`). We
  write `decoder_sparse_step=1` and every dense layer in `mlp_only_layers`, which expresses any
  placement. transformers 5 writes Qwen's expert count as `num_local_experts` (an alias of the
  released configs' `num_experts`); we read both and write `num_experts`.
- Linear weights are `[out, in]`: `q_proj.weight: [N*D, M]` is our `wq: [M, N, D]` transposed
  and reshaped, `k_proj`/`v_proj` likewise with K heads, `o_proj.weight: [M, N*D]` our
  `wo: [N, D, M]`; the router `gate.weight: [E, M]` is our router `kernel: [M, E]` transposed.
- Experts compute `down(silu(gate x) * up x)`: gate is our `wi_gate`, up our `wi`, down our `wo`.
  Published checkpoints, and `save_pretrained` of transformers 5.24, store one tensor per expert:
  Mixtral `block_sparse_moe.experts.{j}.w1` (gate), `w3` (up), `w2` (down) and
  `block_sparse_moe.gate`; OLMoE and Qwen `mlp.experts.{j}.gate_proj`, `up_proj`, `down_proj`
  and `mlp.gate`. transformers 5 holds them fused in memory as `mlp.experts.gate_up_proj:
  [E, 2H, M]` (gate rows first) and `mlp.experts.down_proj: [E, M, H]`, under `mlp.gate`; we
  read both layouts and write the per-expert one, which transformers loads with no missing or
  unexpected keys.
- Routing: softmax of the float32 router logits, top-k, weights renormalised over the k chosen
  (Mixtral always; the others when `norm_topk_prob`, as Qwen3's releases set it) or the raw
  probabilities (OLMoE's and Qwen1.5-MoE's releases), and every token reaches its k experts:
  our `tokens_choose` with `normalize='topk'|'none'` and the dropless backend. Padding tokens
  take no expert slot here; in transformers they are routed but masked out of attention and of
  the loss, so the real tokens' outputs agree.
- Auxiliary loss: transformers' `load_balancing_loss_func` pools the top-k counts and mean
  probabilities of all layers and all real tokens of the batch into one loss, `E * sum_e f_e
  P_e`, added with `router_aux_loss_coef`; moe_jax computes the same Switch form per layer and
  routing group and sums it over layers (`moe_jax.steps`). `router_aux_loss_coef` loads as
  `loss.aux_coef` unchanged; there is no router z-loss in these families' transformers code
  (`loss.z_coef = 0`; OLMoE's paper trained with 0.001).
- Refused: sliding-window attention (Mixtral's `sliding_window`, Qwen's `use_sliding_window`
  and `layer_types`), attention biases but Qwen2's q/k/v ones, `clip_qkv`, RoPE scaling other
  than 'default' and 'yarn' (and yarn fields but those above), a non-SiLU activation, attention
  dropout and Mixtral's router jitter (training only; transformers multiplies the input of the
  router and the experts by the noise, our `moe.router_jitter` only the router's input).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moe_jax.hf.family import (
    LoadPlan,
    SavePlan,
    check_fields,
    check_settings,
    layer_paths,
    register,
)
from moe_jax.hf.t5 import TensorMap
from moe_jax.rope import ROPE_TYPES, YarnScaling
from moe_jax.stack import sparse_layer_flags

# HF module names of each family's MoE block and its per-expert (gate, up, down) linears
_PER_EXPERT = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v2": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM",  # moe_jax.hf.gpt_oss
    "deepseek_v2": "DeepseekV2ForCausalLM",  # moe_jax.hf.deepseek
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
# transformers' defaults of the fields a config.json may leave out: (vocab_size, hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads (None: the query heads),
# intermediate_size, moe_intermediate_size (None: intermediate_size), experts, k, rope_theta,
# rms_norm_eps, router_aux_loss_coef)
_DEFAULTS = {
    "mixtral": (32_000, 4096, 32, 32, None, 14_336, None, 8, 2, 1e6, 1e-5, 0.001),
    "olmoe": (50_304, 2048, 16, 16, None, 2048, None, 64, 8, 10_000.0, 1e-5, 0.01),
    "qwen2_moe": (151_936, 2048, 24, 16, None, 5632, 1408, 60, 4, 10_000.0, 1e-6, 0.001),
    "qwen3_moe": (151_936, 2048, 24, 32, 4, 6144, 768, 128, 8, 10_000.0, 1e-6, 0.001),
}


def _is_none(value) -> bool:
    return value is None


# a 'yarn' `rope_parameters`' fields and the `rope.YarnScaling` ones (our `model.rope_*` keys)
_YARN_FIELDS = {
    "factor": "factor",
    "original_max_position_embeddings": "original_max_positions",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "truncate": "truncate",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
}
_UNSET_YARN_FIELDS = ("attention_factor", "mscale", "mscale_all_dim")  # 0: not written
# plain RoPE's settings: YaRN's keys at default_config's values
_PLAIN_ROPE = {
    "model.rope_type": "default",
    "model.rope_factor": 1.0,
    "model.rope_original_max_positions": 0,
    "model.rope_beta_fast": 32.0,
    "model.rope_beta_slow": 1.0,
    "model.rope_truncate": True,
    "model.rope_attention_factor": 0.0,
    "model.rope_mscale": 0.0,
    "model.rope_mscale_all_dim": 0.0,
}


def _rope_settings(model_type: str, hf: dict, default_theta: float) -> dict[str, Any]:
    """Our `model.rope_*` settings from `rope_parameters` (transformers 5; the legacy
    `rope_scaling` first, as transformers reads it) and the top-level `rope_theta`.

    YaRN as transformers' `_compute_yarn_parameters` reads it: a top-level
    `original_max_position_embeddings` before the one in `rope_parameters`, else
    `max_position_embeddings`; a missing `factor` is `max_position_embeddings` over it; a missing
    or zero `beta_fast`, `beta_slow` is 32, 1. Other rope types and fields are refused by name.
    """
    parameters = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    where = f"{model_type} config.json: rope_parameters"
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"{where}.rope_type={rope_type!r} is not supported by moe_jax; it implements "
            f"{ROPE_TYPES} only."
        )
    theta = float(parameters.get("rope_theta", hf.get("rope_theta", default_theta)))
    settings = {**_PLAIN_ROPE, "model.rope_theta": theta}
    if rope_type == "default":
        return settings
    unknown = sorted(set(parameters) - {"rope_type", "type", "rope_theta", *_YARN_FIELDS})
    if unknown:
        raise ValueError(
            f"{where}: the yarn field(s) {unknown} are not supported by moe_jax; it reads "
            f"{sorted(_YARN_FIELDS)}."
        )
    max_positions = hf.get("max_position_embeddings")
    original = hf.get("original_max_position_embeddings")
    original = original or parameters.get("original_max_position_embeddings") or max_positions
    factor = parameters.get("factor")
    if factor is None and original and max_positions:
        factor = max_positions / original
    if not original or factor is None:
        raise ValueError(
            f"{where}: yarn needs original_max_position_embeddings or max_position_embeddings, "
            f"and factor or max_position_embeddings; got {parameters!r}."
        )
    attention_factor = parameters.get("attention_factor")
    if attention_factor is not None and not attention_factor > 0:
        raise ValueError(f"{where}.attention_factor={attention_factor!r} must be > 0.")
    try:  # YaRN's own checks (factor >= 1, ...), before any weight is read
        yarn = YarnScaling(
            factor=float(factor),
            original_max_positions=int(original),
            beta_fast=float(parameters.get("beta_fast") or 32.0),
            beta_slow=float(parameters.get("beta_slow") or 1.0),
            truncate=bool(parameters.get("truncate", True)),
            attention_factor=float(attention_factor or 0.0),
            mscale=float(parameters.get("mscale") or 0.0),
            mscale_all_dim=float(parameters.get("mscale_all_dim") or 0.0),
        )
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    settings["model.rope_type"] = "yarn"
    settings.update({f"model.rope_{ours}": getattr(yarn, ours) for ours in _YARN_FIELDS.values()})
    return settings


def _rope_parameters(model) -> dict[str, Any]:
    """transformers' `rope_parameters` of our `config.model.rope_*` settings."""
    parameters = {"rope_theta": model.rope_theta, "rope_type": model.rope_type}
    if model.rope_type == "yarn":
        for theirs, ours in _YARN_FIELDS.items():
            if theirs not in _UNSET_YARN_FIELDS or model[f"rope_{ours}"]:
                parameters[theirs] = model[f"rope_{ours}"]
    return parameters


class RopeDecoderFamily:
    """`mixtral`, `olmoe`, `qwen2_moe` or `qwen3_moe` (see the module docstring): they differ in
    names, defaults, the q/k norm, (Qwen) dense layers and (Qwen2) the shared expert and q/k/v
    biases."""

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.architecture = _ARCHITECTURES[model_type]
        self.mixtral = model_type == "mixtral"
        self.qwen = model_type in ("qwen2_moe", "qwen3_moe")
        self.qwen2 = model_type == "qwen2_moe"
        self.qk_norm = model_type in ("olmoe", "qwen3_moe")

    # ------------------------------------------------------------------------- config

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        mixtral, qwen, qwen2 = self.mixtral, self.qwen, self.qwen2
        # Qwen keeps `sliding_window` but uses it only with `use_sliding_window` (which, in
        # Qwen2, makes some `layer_types` sliding)
        window = (
            {"use_sliding_window": lambda v: v is False} if qwen else {"sliding_window": _is_none}
        )
        supported = {
            **window,
            "hidden_act": lambda v: v == "silu",
            "attention_bias": lambda v: v is False,
            "layer_types": lambda v: v is None or set(v) <= {"full_attention"},
            "clip_qkv": _is_none,
            "attention_dropout": lambda v: v == 0,
            "router_jitter_noise": lambda v: v == 0,
        }
        check_fields(self.model_type, hf, supported)
        (
            vocab,
            d_model,
            layers,
            heads,
            kv_heads,
            d_ff,
            expert_d_ff,
            experts,
            k,
            theta,
            eps,
            aux,
        ) = _DEFAULTS[self.model_type]
        d_model = hf.get("hidden_size", d_model)
        num_heads = hf.get("num_attention_heads", heads)
        head_dim = hf.get("head_dim") or d_model // num_heads
        if self.model_type == "olmoe" and head_dim * num_heads != d_model:
            raise ValueError(
                f"olmoe config.json: head_dim={head_dim} with num_attention_heads={num_heads} "
                f"must give hidden_size={d_model} (OLMoE's q_norm spans hidden_size)."
            )
        num_layers = hf.get("num_hidden_layers", layers)
        # an mlp_only_layers index past the last layer names no layer (transformers ignores it)
        dense_layers = sorted(i for i in hf.get("mlp_only_layers") or () if 0 <= i < num_layers)
        d_ff = hf.get("intermediate_size", d_ff)
        expert_d_ff = hf.get("moe_intermediate_size", expert_d_ff) if qwen else d_ff
        experts_key = "num_local_experts" if mixtral else "num_experts"
        num_experts = hf.get(experts_key, hf.get("num_local_experts", experts))
        normalize = True if mixtral else bool(hf.get("norm_topk_prob", False))
        num_shared = 0
        if qwen2:
            shared = hf.get("shared_expert_intermediate_size", 5632)
            num_shared = shared // expert_d_ff
            if shared < 1 or shared % expert_d_ff:
                raise ValueError(
                    f"qwen2_moe config.json: shared_expert_intermediate_size={shared} is not "
                    f"supported by moe_jax: it must be a multiple of moe_intermediate_size="
                    f"{expert_d_ff} (its shared experts are moe.num_shared_experts of that width)."
                )
        return {
            "model.kind": "rope_decoder",
            "model.vocab_size": hf.get("vocab_size", vocab),
            "model.d_model": d_model,
            "model.num_layers": num_layers,
            "model.num_heads": num_heads,
            "model.num_kv_heads": hf.get("num_key_value_heads", kv_heads) or num_heads,
            "model.head_dim": head_dim,
            "model.d_ff": d_ff,
            "model.ffn_activation": "swiglu",
            "model.norm_epsilon": float(hf.get("rms_norm_eps", eps)),
            **_rope_settings(self.model_type, hf, theta),
            "model.qk_norm": self.qk_norm,
            "model.qk_norm_per_head": self.model_type == "qwen3_moe",
            "model.qkv_bias": bool(hf.get("qkv_bias", True)) if qwen2 else False,
            "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "model.dropout_rate": 0.0,
            "moe.num_experts": num_experts,
            "moe.k": hf.get("num_experts_per_tok", k),
            "moe.router": "tokens_choose",
            "moe.decoder_router": "",
            "moe.normalize": "topk" if normalize else "none",
            "moe.d_ff": expert_d_ff,
            "moe.activation": "swiglu",
            "moe.backend": "dropless",
            "moe.router_jitter": 0.0,
            "moe.num_shared_experts": num_shared,
            "moe.shared_expert_gate": qwen2,
            "moe.extra_dense_ffn": False,
            "moe.sparse_placement": "every",
            "moe.sparse_every": hf.get("decoder_sparse_step", 1) if qwen else 1,
            "moe.num_sparse_layers": 0,
            "moe.dense_layers": tuple(dense_layers) if qwen else (),
            "loss.aux_coef": float(hf.get("router_aux_loss_coef", aux)),
            "loss.z_coef": 0.0,
        }

    def _check_expressible(self, config) -> None:
        model, moe = config.model, config.moe
        required = {
            "model.kind": (model.kind, ("rope_decoder",)),
            "model.attention": (model.attention, ("gqa",)),
            "model.ffn_activation": (model.ffn_activation, ("swiglu",)),
            "model.rope_type": (model.rope_type, ROPE_TYPES),
            "model.qk_norm": (bool(model.qk_norm), (self.qk_norm,)),
            "model.qk_norm_per_head": (
                bool(model.qk_norm_per_head),
                (self.model_type == "qwen3_moe",),
            ),
            "moe.router": (moe.router, ("tokens_choose",)),
            "moe.activation": (moe.activation, ("", "swiglu")),
            "moe.normalize": (moe.normalize, ("topk",) if self.mixtral else ("topk", "none")),
            "moe.extra_dense_ffn": (moe.extra_dense_ffn, (False,)),
            "model.attention_sinks": (bool(model.attention_sinks), (False,)),
            "model.attention_out_bias": (bool(model.attention_out_bias), (False,)),
            "model.sliding_window": (model.sliding_window, (0,)),
            "moe.expert_bias": (bool(moe.expert_bias), (False,)),
            "moe.router_bias": (bool(moe.router_bias), (False,)),
        }
        if not self.qwen2:  # Qwen2's settings are checked below
            required["model.qkv_bias"] = (bool(model.qkv_bias), (False,))
            required["moe.num_shared_experts"] = (moe.num_shared_experts, (0,))
            required["moe.shared_expert_gate"] = (bool(moe.shared_expert_gate), (False,))
        check_settings(self.model_type, required)
        if self.qwen2 and not (moe.num_shared_experts >= 1 and moe.shared_expert_gate):
            raise ValueError(
                "a qwen2_moe checkpoint has one sigmoid-gated shared expert in each sparse "
                "layer: set moe.num_shared_experts >= 1 and moe.shared_expert_gate=True."
            )
        if self.qwen:
            return  # any placement of dense layers is `mlp_only_layers`
        if moe.num_experts < 1 or not all(sparse_layer_flags(model.num_layers, moe)):
            raise ValueError(
                f"a {self.model_type} checkpoint has experts in every layer: set "
                "moe.num_experts >= 1, moe.sparse_placement='every' and moe.sparse_every=1."
            )
        if self.model_type == "olmoe" and model.head_dim * model.num_heads != model.d_model:
            raise ValueError(
                f"model.head_dim={model.head_dim} x num_heads={model.num_heads} must equal "
                f"d_model={model.d_model} in an olmoe checkpoint (its q_norm spans hidden_size)."
            )

    def _shared_hf_config(self, config) -> dict[str, Any]:
        """The `config.json` fields every Llama-style family writes alike."""
        model, moe = config.model, config.moe
        max_positions = config.train.seq_len
        if model.rope_type == "yarn":  # YaRN's stretched context, as transformers expects it
            max_positions = round(model.rope_factor * model.rope_original_max_positions)
        return {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": model.vocab_size,
            "hidden_size": model.d_model,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.num_kv_heads or model.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rms_norm_eps": model.norm_epsilon,
            "rope_parameters": _rope_parameters(model),
            "tie_word_embeddings": bool(model.tie_embeddings),
            "attention_dropout": 0.0,
            "num_experts_per_tok": moe.k,
            "router_aux_loss_coef": config.loss.aux_coef,
            "output_router_logits": False,
            "use_cache": True,
        }

    def _hf_config(self, config) -> dict[str, Any]:
        model, moe = config.model, config.moe
        experts_key = "num_local_experts" if self.mixtral else "num_experts"
        hf = self._shared_hf_config(config)
        hf["intermediate_size"] = model.d_ff if self.qwen else moe.d_ff or model.d_ff
        hf[experts_key] = moe.num_experts
        if self.mixtral:
            hf.update({"head_dim": model.head_dim, "sliding_window": None})
            hf["router_jitter_noise"] = 0.0
        elif self.qwen:
            flags = sparse_layer_flags(model.num_layers, moe)
            hf.update({"head_dim": model.head_dim, "moe_intermediate_size": moe.d_ff or model.d_ff})
            hf.update({"norm_topk_prob": moe.normalize == "topk", "decoder_sparse_step": 1})
            hf["mlp_only_layers"] = [i for i, sparse in enumerate(flags) if not sparse]
            hf["use_sliding_window"] = False
            if self.qwen2:
                shared = moe.num_shared_experts * (moe.d_ff or model.d_ff)
                hf.update({"qkv_bias": bool(model.qkv_bias)})
                hf["shared_expert_intermediate_size"] = shared
            else:
                hf["attention_bias"] = False
        else:
            hf.update({"norm_topk_prob": moe.normalize == "topk", "clip_qkv": None})
            hf["attention_bias"] = False
        return hf

    # ------------------------------------------------------------------------ tensors

    def _tensors(self, config, *, fused: bool) -> TensorMap:
        """Every tensor but the experts' (added by `_experts`) and the head."""
        model, moe = config.model, config.moe
        m = model.d_model
        tensors = TensorMap()
        tensors.copy("model.embed_tokens.weight", ("embed", "embedding"), (model.vocab_size, m))
        tensors.copy("model.norm.weight", ("decoder", "final_norm", "scale"), (m,))
        sparse = sparse_layer_flags(model.num_layers, moe)
        for index, path in enumerate(layer_paths(config, "decoder", model.num_layers)):
            prefix = f"model.layers.{index}"
            tensors.copy(f"{prefix}.input_layernorm.weight", (*path, "self_norm", "scale"), (m,))
            tensors.copy(
                f"{prefix}.post_attention_layernorm.weight", (*path, "ffn_norm", "scale"), (m,)
            )
            self._attention(tensors, f"{prefix}.self_attn", (*path, "self_attention"), model)
            if not sparse[index]:  # Qwen's dense layers: a SwiGLU of intermediate_size
                self._swiglu(tensors, f"{prefix}.mlp", (*path, "ffn"), m, model.d_ff)
                continue
            self._sparse_ffn(tensors, prefix, (*path, "ffn"), config, fused=fused)
        return tensors

    @staticmethod
    def _attention(tensors: TensorMap, prefix: str, attention: tuple, model) -> None:
        """`{prefix}.{q,k,v,o}_proj` (their biases, q/k norms, sinks) <-> our
        GroupedQueryAttention at `attention`."""
        m, n, d = model.d_model, model.num_heads, model.head_dim
        kv = model.num_kv_heads or n
        for key, heads in (("q", n), ("k", kv), ("v", kv)):
            tensors.direct(
                f"{prefix}.{key}_proj.weight",
                (*attention, f"w{key}"),
                (heads * d, m),
                lambda w, h=heads: w.T.reshape(m, h, d),  # [M, heads, D]
                lambda w, h=heads: w.reshape(m, h * d).T,  # [heads*D, M]
            )
        for key, heads in (("q", n), ("k", kv), ("v", kv)) if model.qkv_bias else ():
            tensors.direct(
                f"{prefix}.{key}_proj.bias",
                (*attention, f"b{key}"),
                (heads * d,),
                lambda b, h=heads: b.reshape(h, d),  # [heads, D]
                lambda b, h=heads: b.reshape(h * d),  # [heads*D]
            )
        tensors.direct(
            f"{prefix}.o_proj.weight",
            (*attention, "wo"),
            (m, n * d),
            lambda w: w.T.reshape(n, d, m),  # [N, D, M]
            lambda w: w.reshape(n * d, m).T,  # [M, N*D]
        )
        if model.attention_out_bias:
            tensors.copy(f"{prefix}.o_proj.bias", (*attention, "bo"), (m,))
        if model.attention_sinks:
            tensors.copy(f"{prefix}.sinks", (*attention, "sinks"), (n,))
        if model.qk_norm:
            widths = {"q": n * d, "k": kv * d} if not model.qk_norm_per_head else {"q": d, "k": d}
            for key, width in widths.items():
                tensors.copy(
                    f"{prefix}.{key}_norm.weight", (*attention, f"{key}_norm", "scale"), (width,)
                )

    def _sparse_ffn(self, tensors: TensorMap, prefix: str, path: tuple, config, *, fused: bool):
        """The router, the experts and (Qwen2) the gated shared expert of layer `prefix`."""
        model, moe = config.model, config.moe
        m, e = model.d_model, moe.num_experts
        block, _ = _PER_EXPERT[self.model_type]
        gate = f"{prefix}.{'mlp' if fused else block}.gate.weight"
        tensors.linear(gate, (*path, "router", "kernel"), m, e)
        self._experts(tensors, prefix, path, config, fused=fused)
        if moe.shared_expert_gate:  # Qwen2's shared expert and its gate
            width = moe.num_shared_experts * (moe.d_ff or model.d_ff)
            shared = f"{prefix}.mlp.shared_expert"
            self._swiglu(tensors, shared, (*path, "shared"), m, width)
            tensors.linear(f"{prefix}.mlp.shared_expert_gate.weight", (*path, "shared_gate"), m, 1)

    @staticmethod
    def _swiglu(tensors: TensorMap, prefix: str, path: tuple, d_model: int, d_ff: int) -> None:
        """A dense SwiGLU `{prefix}.{gate,up,down}_proj` <-> our FeedForward at `path`."""
        for ours, theirs in (("wi_gate", "gate_proj"), ("wi", "up_proj")):
            tensors.linear(f"{prefix}.{theirs}.weight", (*path, ours), d_model, d_ff)
        tensors.linear(f"{prefix}.down_proj.weight", (*path, "wo"), d_ff, d_model)

    def _experts(self, tensors: TensorMap, prefix: str, path: tuple, config, *, fused: bool):
        m, e = config.model.d_model, config.moe.num_experts
        h = config.moe.d_ff or config.model.d_ff
        if fused:
            # transformers 5 in memory: gate_up_proj [E, 2H, M] (gate rows first), down [E, M, H]
            gate_up, down = f"{prefix}.mlp.experts.gate_up_proj", f"{prefix}.mlp.experts.down_proj"
            tensors.shapes[gate_up], tensors.shapes[down] = (e, 2 * h, m), (e, m, h)
            tensors.params[(*path, "wi_gate")] = lambda get: get(gate_up)[:, :h].transpose(0, 2, 1)
            tensors.params[(*path, "wi")] = lambda get: get(gate_up)[:, h:].transpose(0, 2, 1)
            tensors.params[(*path, "wo")] = lambda get: get(down).transpose(0, 2, 1)
            return
        block, (gate, up, down_name) = _PER_EXPERT[self.model_type]
        for ours, theirs, shape in (
            ("wi_gate", gate, (h, m)),
            ("wi", up, (h, m)),
            ("wo", down_name, (m, h)),
        ):
            names = [f"{prefix}.{block}.experts.{j}.{theirs}.weight" for j in range(e)]
            tensors.stacked(names, (*path, ours), shape, np.transpose, np.transpose)

    def _head(self, tensors: TensorMap, config) -> None:
        if not config.model.tie_embeddings:
            model = config.model
            tensors.linear("lm_head.weight", ("output", "kernel"), model.d_model, model.vocab_size)

    def load_plan(self, hf: dict, config, tensor_names: frozenset[str]) -> LoadPlan:
        fused = any(name.endswith(".mlp.experts.gate_up_proj") for name in tensor_names)
        tensors = self._tensors(config, fused=fused)
        self._head(tensors, config)
        # a tied checkpoint may still carry the head (a copy of the embedding)
        ignored = {"lm_head.weight"} if config.model.tie_embeddings else set()
        return tensors.load_plan(ignored)

    def save_plan(self, config) -> SavePlan:
        self._check_expressible(config)
        tensors = self._tensors(config, fused=False)
        self._head(tensors, config)
        return SavePlan(config=self._hf_config(config), tensors=tensors.tensors)


MIXTRAL = register(RopeDecoderFamily("mixtral"))
OLMOE = register(RopeDecoderFamily("olmoe"))
QWEN2_MOE = register(RopeDecoderFamily("qwen2_moe"))
QWEN3_MOE = register(RopeDecoderFamily("qwen3_moe"))
