"""The `mixtral` and `olmoe` families: Llama-style MoE decoders, our `model.kind='rope_decoder'`.

transformers' Mixtral and OLMoE (`models/{mixtral,olmoe}/modeling_*.py`, 5.x) against moe_jax:

- Layers: pre-norm RMSNorm (`rms_norm_eps` -> `model.norm_epsilon`), self-attention with
  rotary positions (`rope_parameters.rope_theta`, or the older top-level `rope_theta`; the
  "rotate half" layout of `rope_attention.rotary_embedding`) and `num_key_value_heads` key/value
  heads, a sparse SwiGLU MoE block in every layer, a final RMSNorm and an untied `lm_head`.
  OLMoE adds one RMSNorm over the whole query projection and one over the key projection
  (`q_norm`, `k_norm`): our `model.qk_norm`. Logits are scaled by `head_dim ** -0.5`; our
  attention does the same, so no weight is rescaled.
- Linear weights are `[out, in]`: `q_proj.weight: [N*D, M]` is our `wq: [M, N, D]` transposed
  and reshaped, `k_proj`/`v_proj` likewise with K heads, `o_proj.weight: [M, N*D]` our
  `wo: [N, D, M]`; the router `gate.weight: [E, M]` is our router `kernel: [M, E]` transposed.
- Experts compute `down(silu(gate x) * up x)`: gate is our `wi_gate`, up our `wi`, down our `wo`.
  Published checkpoints, and `save_pretrained` of transformers 5.24, store one tensor per expert:
  Mixtral `block_sparse_moe.experts.{j}.w1` (gate), `w3` (up), `w2` (down) and
  `block_sparse_moe.gate`; OLMoE `mlp.experts.{j}.gate_proj`, `up_proj`, `down_proj` and
  `mlp.gate`. transformers 5 holds them fused in memory as `mlp.experts.gate_up_proj:
  [E, 2H, M]` (gate rows first) and `mlp.experts.down_proj: [E, M, H]`, under `mlp.gate`; we
  read both layouts and write the per-expert one, which transformers loads with no missing or
  unexpected keys.
- Routing: softmax of the float32 router logits, top-k, weights renormalised over the k chosen
  (Mixtral always; OLMoE when `norm_topk_prob`) or the raw probabilities (OLMoE's release), and
  every token reaches its k experts: our `tokens_choose` with `normalize='topk'|'none'` and the
  dropless backend. Padding tokens take no expert slot here; in transformers they are routed but
  masked out of attention and of the loss, so the real tokens' outputs agree.
- Auxiliary loss: transformers' `load_balancing_loss_func` pools the top-k counts and mean
  probabilities of all layers and all real tokens of the batch into one loss, `E * sum_e f_e
  P_e`, added with `router_aux_loss_coef`; moe_jax computes the same Switch form per layer and
  routing group and sums it over layers (`moe_jax.steps`). `router_aux_loss_coef` loads as
  `loss.aux_coef` unchanged; there is no router z-loss in either family's transformers code
  (`loss.z_coef = 0`; OLMoE's paper trained with 0.001).
- Refused: sliding-window attention, attention biases, `clip_qkv`, RoPE scaling other than
  'default', a non-SiLU activation, attention dropout and Mixtral's router jitter (training
  only; transformers multiplies the input of the router and the experts by the noise, our
  `moe.router_jitter` only the router's input).
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
from moe_jax.stack import sparse_layer_flags

# HF module names of each family's MoE block and its per-expert (gate, up, down) linears
_PER_EXPERT = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}


def _is_none(value) -> bool:
    return value is None


def _rope_theta(model_type: str, hf: dict, default: float) -> float:
    """The rotary base of `rope_parameters` (transformers 5) or the top-level `rope_theta`."""
    parameters = hf.get("rope_parameters") or {}
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"{model_type} config.json: rope_parameters.rope_type={rope_type!r} is not supported "
            "by moe_jax; it implements the 'default' rotary embedding only."
        )
    return float(parameters.get("rope_theta", hf.get("rope_theta", default)))


class RopeDecoderFamily:
    """`mixtral` or `olmoe` (see the module docstring); the two differ in names and defaults."""

    def __init__(self, model_type: str):
        self.model_type = model_type
        self.architecture = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}[
            model_type
        ]
        self.mixtral = model_type == "mixtral"

    # ------------------------------------------------------------------------- config

    def to_moe_config(self, hf: dict, tensor_names: frozenset[str]) -> dict[str, Any]:
        mixtral = self.mixtral
        check_fields(
            self.model_type,
            hf,
            {
                "hidden_act": lambda v: v == "silu",
                "sliding_window": _is_none,
                "attention_bias": lambda v: v is False,
                "clip_qkv": _is_none,
                "rope_scaling": _is_none,
                "attention_dropout": lambda v: v == 0,
                "router_jitter_noise": lambda v: v == 0,
            },
        )
        d_model = hf.get("hidden_size", 4096 if mixtral else 2048)
        num_heads = hf.get("num_attention_heads", 32 if mixtral else 16)
        head_dim = hf.get("head_dim") or d_model // num_heads
        if not mixtral and head_dim * num_heads != d_model:
            raise ValueError(
                f"olmoe config.json: head_dim={head_dim} with num_attention_heads={num_heads} "
                f"must give hidden_size={d_model} (OLMoE's q_norm spans hidden_size)."
            )
        d_ff = hf.get("intermediate_size", 14336 if mixtral else 2048)
        experts_key = "num_local_experts" if mixtral else "num_experts"
        normalize = True if mixtral else bool(hf.get("norm_topk_prob", False))
        return {
            "model.kind": "rope_decoder",
            "model.vocab_size": hf.get("vocab_size", 32000 if mixtral else 50304),
            "model.d_model": d_model,
            "model.num_layers": hf.get("num_hidden_layers", 32 if mixtral else 16),
            "model.num_heads": num_heads,
            "model.num_kv_heads": hf.get("num_key_value_heads") or num_heads,
            "model.head_dim": head_dim,
            "model.d_ff": d_ff,
            "model.ffn_activation": "swiglu",
            "model.norm_epsilon": float(hf.get("rms_norm_eps", 1e-5)),
            "model.rope_theta": _rope_theta(self.model_type, hf, 1e6 if mixtral else 10_000.0),
            "model.qk_norm": not mixtral,
            "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
            "model.dropout_rate": 0.0,
            "moe.num_experts": hf.get(experts_key, 8 if mixtral else 64),
            "moe.k": hf.get("num_experts_per_tok", 2 if mixtral else 8),
            "moe.router": "tokens_choose",
            "moe.decoder_router": "",
            "moe.normalize": "topk" if normalize else "none",
            "moe.d_ff": d_ff,
            "moe.activation": "swiglu",
            "moe.backend": "dropless",
            "moe.router_jitter": 0.0,
            "moe.num_shared_experts": 0,
            "moe.extra_dense_ffn": False,
            "moe.sparse_placement": "every",
            "moe.sparse_every": 1,
            "moe.num_sparse_layers": 0,
            "loss.aux_coef": float(hf.get("router_aux_loss_coef", 0.001 if mixtral else 0.01)),
            "loss.z_coef": 0.0,
        }

    def _check_expressible(self, config) -> None:
        model, moe = config.model, config.moe
        required = {
            "model.kind": (model.kind, ("rope_decoder",)),
            "model.ffn_activation": (model.ffn_activation, ("swiglu",)),
            "model.qk_norm": (bool(model.qk_norm), (not self.mixtral,)),
            "moe.router": (moe.router, ("tokens_choose",)),
            "moe.activation": (moe.activation, ("", "swiglu")),
            "moe.normalize": (moe.normalize, ("topk",) if self.mixtral else ("topk", "none")),
            "moe.num_shared_experts": (moe.num_shared_experts, (0,)),
            "moe.extra_dense_ffn": (moe.extra_dense_ffn, (False,)),
        }
        check_settings(self.model_type, required)
        if moe.num_experts < 1 or not all(sparse_layer_flags(model.num_layers, moe)):
            raise ValueError(
                f"a {self.model_type} checkpoint has experts in every layer: set "
                "moe.num_experts >= 1, moe.sparse_placement='every' and moe.sparse_every=1."
            )
        if not self.mixtral and model.head_dim * model.num_heads != model.d_model:
            raise ValueError(
                f"model.head_dim={model.head_dim} x num_heads={model.num_heads} must equal "
                f"d_model={model.d_model} in an olmoe checkpoint (its q_norm spans hidden_size)."
            )

    def _hf_config(self, config) -> dict[str, Any]:
        model, moe = config.model, config.moe
        experts_key = "num_local_experts" if self.mixtral else "num_experts"
        hf = {
            "model_type": self.model_type,
            "architectures": [self.architecture],
            "vocab_size": model.vocab_size,
            "hidden_size": model.d_model,
            "intermediate_size": moe.d_ff or model.d_ff,
            "num_hidden_layers": model.num_layers,
            "num_attention_heads": model.num_heads,
            "num_key_value_heads": model.num_kv_heads or model.num_heads,
            "hidden_act": "silu",
            "max_position_embeddings": config.train.seq_len,
            "rms_norm_eps": model.norm_epsilon,
            "rope_parameters": {"rope_theta": model.rope_theta, "rope_type": "default"},
            "tie_word_embeddings": bool(model.tie_embeddings),
            "attention_dropout": 0.0,
            experts_key: moe.num_experts,
            "num_experts_per_tok": moe.k,
            "router_aux_loss_coef": config.loss.aux_coef,
            "output_router_logits": False,
            "use_cache": True,
        }
        if self.mixtral:
            hf.update({"head_dim": model.head_dim, "sliding_window": None})
            hf["router_jitter_noise"] = 0.0
        else:
            hf.update({"norm_topk_prob": moe.normalize == "topk", "clip_qkv": None})
            hf["attention_bias"] = False
        return hf

    # ------------------------------------------------------------------------ tensors

    def _tensors(self, config, *, fused: bool) -> TensorMap:
        """Every tensor but the experts' (added by `_experts`) and the head."""
        model, moe = config.model, config.moe
        m, n, d = model.d_model, model.num_heads, model.head_dim
        kv, e = model.num_kv_heads or n, moe.num_experts
        tensors = TensorMap()
        tensors.copy("model.embed_tokens.weight", ("embed", "embedding"), (model.vocab_size, m))
        tensors.copy("model.norm.weight", ("decoder", "final_norm", "scale"), (m,))
        block, _ = _PER_EXPERT[self.model_type]
        for index, path in enumerate(layer_paths(config, "decoder", model.num_layers)):
            prefix = f"model.layers.{index}"
            tensors.copy(f"{prefix}.input_layernorm.weight", (*path, "self_norm", "scale"), (m,))
            tensors.copy(
                f"{prefix}.post_attention_layernorm.weight", (*path, "ffn_norm", "scale"), (m,)
            )
            attention = (*path, "self_attention")
            for key, heads in (("q", n), ("k", kv), ("v", kv)):
                tensors.direct(
                    f"{prefix}.self_attn.{key}_proj.weight",
                    (*attention, f"w{key}"),
                    (heads * d, m),
                    lambda w, h=heads: w.T.reshape(m, h, d),  # [M, heads, D]
                    lambda w, h=heads: w.reshape(m, h * d).T,  # [heads*D, M]
                )
            tensors.direct(
                f"{prefix}.self_attn.o_proj.weight",
                (*attention, "wo"),
                (m, n * d),
                lambda w: w.T.reshape(n, d, m),  # [N, D, M]
                lambda w: w.reshape(n * d, m).T,  # [M, N*D]
            )
            if model.qk_norm:
                for key, heads in (("q", n), ("k", kv)):
                    name = f"{prefix}.self_attn.{key}_norm.weight"
                    tensors.copy(name, (*attention, f"{key}_norm", "scale"), (heads * d,))
            gate = f"{prefix}.{'mlp' if fused else block}.gate.weight"
            tensors.linear(gate, (*path, "ffn", "router", "kernel"), m, e)
            self._experts(tensors, prefix, (*path, "ffn"), config, fused=fused)
        return tensors

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
        fused = "model.layers.0.mlp.experts.gate_up_proj" in tensor_names
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
